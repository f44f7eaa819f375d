"""One app, run by its own thread: load, instantiate, tick loop, store requests, restarts (SPEC 5.2).

Theory of operation
-------------------

* **A thread per app.** Calls into wasm block (the GIL is released inside them), so each app gets
  a thread that owns its `AppInstance`; nothing else touches the instance. Other threads talk to
  the runner through its inbox (store replies, wake-ups) and flags (stop, restart), and read its
  counters (`status()`).
* **The loop** (SPEC 5.2): wait until the next tick is due or messages arrive; deliver up to
  `MESSAGE_BATCH_MAX` messages; call `__exocore_tick`; the next tick is at the time the app asked
  for, `DEFAULT_TICK_INTERVAL_MS` when it asked for none, and at least `MIN_TICK_INTERVAL_MS`
  away when it asked for a time already past.
* **Store requests**: each OutMessage goes to the `StoreBridge`, which calls `reply(InMessage)`
  later from any thread; the reply goes through the inbox, tagged with the run (generation) that
  sent the request, so replies to a dead run are dropped. At most `store_requests_in_flight_max`
  requests per app await a reply; beyond that the app gets an immediate error reply.
* **Time**: the guest's `__exocore_host_now` is consistent time (SPEC 1.9: a `Clock`, by default
  one per runner over `wall_ns`; the service shares the node's among its apps), not the bare wall
  clock (SPEC 11: the original's TODO): it never goes back nor repeats, even when the wall clock is
  set back, and the delay to the tick an app asks for is measured on that same clock.
* **Failures**: any `AppFault` (trap, fuel, deadline, memory, bad out-message, exit, or a package
  that does not load) ends the run: the reason is logged with the app's identity and kept as
  `last_error`, the state becomes BACKOFF, and the app restarts after `RestartPolicy`'s delay
  (1 s doubling to 30 s, back to 1 s after a run of 60 s). `restart()` restarts at once and
  resets the delay; `stop()` ends the thread (a call in progress ends by its deadline at the latest).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from exocommon.apps import load_manifest
from exocommon.clock import Clock
from exocommon.errors import ExocoreError
from exocore.apps import runtime_pb2
from exocore.apps.v1 import app_host_pb2

from .runtime import (
    LOG_DEBUG,
    LOG_ERROR,
    LOG_INFO,
    LOG_TRACE,
    LOG_WARN,
    MESSAGE_STATUS_UNHANDLED,
    AppFault,
    AppInstance,
    FaultKind,
    WasmEngine,
)
from .settings import (
    DEFAULT_TICK_INTERVAL_MS,
    MESSAGE_BATCH_MAX,
    MIN_TICK_INTERVAL_MS,
    AppLimits,
    RestartPolicy,
)

log = logging.getLogger(__name__)
# Guest log lines (and stdout/stderr), with the app's identity as fields.
app_log = logging.getLogger("exoapphost.app")

_LEVELS = {
    LOG_ERROR: logging.ERROR,
    LOG_WARN: logging.WARNING,
    LOG_INFO: logging.INFO,
    LOG_DEBUG: logging.DEBUG,
    LOG_TRACE: 5,
}

REPLY_TYPES = {
    runtime_pb2.STORE_ENTITY_QUERY: runtime_pb2.STORE_ENTITY_RESULTS,
    runtime_pb2.STORE_MUTATION_REQUEST: runtime_pb2.STORE_MUTATION_RESULT,
}


class AppState(enum.IntEnum):
    STARTING = app_host_pb2.APP_STATE_STARTING
    RUNNING = app_host_pb2.APP_STATE_RUNNING
    BACKOFF = app_host_pb2.APP_STATE_BACKOFF
    STOPPED = app_host_pb2.APP_STATE_STOPPED


@dataclass(frozen=True)
class AppSpec:
    """What to run: an installed package folder (`directory`, manifest validated at each start),
    or for tests and benchmarks a module file or the module bytes."""

    app_id: str
    name: str
    version: str = ""
    directory: Path | None = None
    module_path: Path | None = None
    wasm: bytes | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.version} ({self.app_id})".replace("  ", " ")


class StoreBridge(Protocol):
    """Carries an app's store requests; `reply` may be called from any thread."""

    def submit(
        self, app: AppSpec, message: runtime_pb2.OutMessage, reply: Callable[[runtime_pb2.InMessage], None]
    ) -> None: ...


class _WallTime:
    """A `TimeSource` over a wall clock function (the runner's monotonic clock is its own)."""

    def __init__(self, wall_ns: Callable[[], int]) -> None:
        self._wall_ns = wall_ns

    def now_ns(self) -> int:
        return self._wall_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


def next_tick_delay_s(requested_ns: int, now_ns: int) -> float:
    """Seconds until the next tick, for an app that asked for `requested_ns` (0 = no request)."""
    if requested_ns == 0:
        return DEFAULT_TICK_INTERVAL_MS / 1000
    return max((requested_ns - now_ns) / 1e9, MIN_TICK_INTERVAL_MS / 1000)


def error_reply(message: runtime_pb2.OutMessage, error: str) -> runtime_pb2.InMessage:
    return runtime_pb2.InMessage(
        type=REPLY_TYPES.get(message.type, runtime_pb2.IN_MESSAGE_INVALID),
        rendez_vous_id=message.rendez_vous_id,
        error=error,
    )


@dataclass(frozen=True)
class AppStatusSnapshot:
    spec: AppSpec
    state: AppState
    restarts: int
    last_error: str
    last_error_at_ns: int
    started_at_ns: int
    ticks: int
    store_requests: int
    store_requests_in_flight: int
    messages: int
    memory_bytes: int
    fuel_consumed: int


@dataclass(frozen=True)
class _Reply:
    generation: int
    message: runtime_pb2.InMessage
    counted: bool  # in the in-flight count (False for refusals made by the runner itself)


_WAKE = object()


class AppRunner:
    """Runs one app on its own thread (see module docstring)."""

    def __init__(
        self,
        spec: AppSpec,
        engine: WasmEngine,
        limits: AppLimits,
        restart_policy: RestartPolicy,
        bridge: StoreBridge,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        guest_clock: Clock | None = None,
        recent_logs: int = 200,
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.limits = limits
        self.restart_policy = restart_policy
        self.bridge = bridge
        self._clock = clock
        self._wall_ns = wall_ns
        # The guest's time (see module docstring).
        self.guest_clock = guest_clock if guest_clock is not None else Clock(0, _WallTime(wall_ns))
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._log_extra = {"app": spec.name, "app_id": spec.app_id, "app_version": spec.version}
        self.recent_logs: deque[tuple[int, str]] = deque(maxlen=recent_logs)
        self.faults: deque[AppFault] = deque(maxlen=20)
        # status counters: written by the runner thread only
        self._state = AppState.STOPPED
        self._restarts = 0
        self._last_error = ""
        self._last_error_at_ns = 0
        self._started_at_ns = 0
        self._ticks = 0
        self._store_requests = 0
        self._in_flight = 0
        self._messages = 0
        self._memory_bytes = 0
        self._fuel_done = 0  # fuel of the runs that ended
        self._instance: AppInstance | None = None

    # -- control (any thread) -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("runner already started")
        self._state = AppState.STARTING
        self._thread = threading.Thread(target=self._main, name=f"app-{self.spec.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Stop the app; True once its thread ended (within `timeout`)."""
        self._stop.set()
        self._wake.set()
        self._inbox.put(_WAKE)
        if self._thread is None:
            self._state = AppState.STOPPED
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def restart(self) -> None:
        """Restart the app now (also from BACKOFF), with the restart delay reset."""
        self._restart.set()
        self._wake.set()
        self._inbox.put(_WAKE)

    @property
    def running_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> AppStatusSnapshot:
        instance = self._instance
        fuel = self._fuel_done + (instance.stats.fuel_consumed if instance is not None else 0)
        return AppStatusSnapshot(
            spec=self.spec,
            state=self._state,
            restarts=self._restarts,
            last_error=self._last_error,
            last_error_at_ns=self._last_error_at_ns,
            started_at_ns=self._started_at_ns,
            ticks=self._ticks,
            store_requests=self._store_requests,
            store_requests_in_flight=self._in_flight,
            messages=self._messages,
            memory_bytes=self._memory_bytes,
            fuel_consumed=fuel,
        )

    # -- the thread -------------------------------------------------------------------------------

    def _main(self) -> None:
        delay_ms: int | None = None
        while not self._stop.is_set():
            self._restart.clear()
            run_started = self._clock()
            try:
                self._run_once()
            except AppFault as fault:
                delay_ms = self.restart_policy.next_delay_ms(delay_ms, (self._clock() - run_started) * 1000)
                self._on_fault(fault, delay_ms)
            except Exception as exc:  # a host bug: keep the other apps and the service running
                log.exception("app runner failed", extra=self._log_extra)
                delay_ms = self.restart_policy.next_delay_ms(delay_ms, (self._clock() - run_started) * 1000)
                self._on_fault(AppFault(FaultKind.TRAP, f"host error: {exc!r}"), delay_ms)
            else:
                if not self._stop.is_set():  # restart requested
                    self._restarts += 1
                    delay_ms = None
                continue
            self._state = AppState.BACKOFF
            self._wake.clear()
            if self._stop.is_set():
                break
            self._wake.wait(delay_ms / 1000)
            if self._restart.is_set():
                delay_ms = None
        self._state = AppState.STOPPED

    def _on_fault(self, fault: AppFault, delay_ms: int) -> None:
        self.faults.append(fault)
        self._restarts += 1
        self._last_error = fault.reason
        self._last_error_at_ns = self._wall_ns()
        log.error(
            "app %s stopped: %s; restarting in %g s",
            self.spec.name,
            fault.reason,
            delay_ms / 1000,
            extra={**self._log_extra, "fault": fault.kind.value},
        )

    def _load_module(self) -> object:
        spec = self.spec
        try:
            if spec.wasm is not None:
                return self.engine.compile(spec.wasm)
            if spec.directory is not None:
                manifest = load_manifest(spec.directory)
                manifest.validate()
                if manifest.module_path is None:
                    raise AppFault(FaultKind.LOAD, "the app declares no module")
                return self.engine.load_module(manifest.module_path, manifest.manifest.module.multihash)
            if spec.module_path is not None:
                return self.engine.load_module(spec.module_path)
        except ExocoreError as exc:
            raise AppFault(FaultKind.LOAD, f"invalid package: {exc}") from None
        raise AppFault(FaultKind.LOAD, "no module to run")

    def _run_once(self) -> None:
        self._generation += 1
        self._in_flight = 0
        self._state = AppState.STARTING
        module = self._load_module()
        instance = AppInstance(
            self.engine,
            module,  # type: ignore[arg-type]
            self.limits,
            name=self.spec.name,
            on_log=self._on_guest_log,
            on_out_message=self._on_out_message,
            clock_ns=self.guest_clock.consistent_time,
        )
        self._instance = instance
        try:
            instance.start()
            self._state = AppState.RUNNING
            self._started_at_ns = self._wall_ns()
            log.info("app %s started", self.spec.name, extra=self._log_extra)
            next_tick = self._clock()
            while True:
                batch = self._take_batch(max(0.0, next_tick - self._clock()))
                if self._stop.is_set() or self._restart.is_set():
                    return
                for item in batch:
                    if isinstance(item, _Reply) and item.generation == self._generation:
                        if item.counted:
                            self._in_flight -= 1
                        self._messages += 1
                        if instance.deliver(item.message) == MESSAGE_STATUS_UNHANDLED:
                            log.debug(
                                "reply %d not handled by the app (expired?)",
                                item.message.rendez_vous_id,
                                extra=self._log_extra,
                            )
                requested = instance.tick()
                self._ticks += 1
                next_tick = self._clock() + next_tick_delay_s(requested, self.guest_clock.consistent_time())
                self._memory_bytes = instance.memory_bytes()
        finally:
            self._memory_bytes = instance.stats.memory_bytes or self._memory_bytes
            self._fuel_done += instance.stats.fuel_consumed
            self._instance = None
            instance.close()

    def _take_batch(self, timeout: float) -> list[object]:
        try:
            first = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < MESSAGE_BATCH_MAX:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    # -- callbacks from the instance (runner thread, inside a guest call) -----------------------------

    def _on_guest_log(self, level: int, text: str) -> None:
        self.recent_logs.append((level, text))
        app_log.log(_LEVELS.get(level, logging.INFO), "%s", text, extra=self._log_extra)

    def _on_out_message(self, message: runtime_pb2.OutMessage) -> None:
        self._store_requests += 1
        generation = self._generation
        if self._in_flight >= self.limits.store_requests_in_flight_max:
            refusal = error_reply(
                message,
                f"too many store requests in flight (limit {self.limits.store_requests_in_flight_max})",
            )
            self._inbox.put(_Reply(generation, refusal, counted=False))
            return
        self._in_flight += 1
        inbox = self._inbox

        def reply(answer: runtime_pb2.InMessage) -> None:
            inbox.put(_Reply(generation, answer, counted=True))

        self.bridge.submit(self.spec, message, reply)
