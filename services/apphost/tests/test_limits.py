"""Limits and failures, each through a WAT guest run by an `AppRunner` thread: an infinite loop
(epoch deadline), runaway fuel, memory growth past the cap, a trap, a bad out-message, an exit,
the store requests in flight; each failed app is restarted with backoff, the reason is its
last_error, and the other apps keep running."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from exoapphost.runner import REPLY_TYPES, AppRunner, AppSpec, AppState
from exoapphost.runtime import FaultKind, WasmEngine
from exoapphost.settings import AppLimits, RestartPolicy
from exocommon.clock import NS_PER_SEC, Clock, MockTimeSource
from exocore.apps import runtime_pb2

pytestmark = pytest.mark.timeout(60)

FAST_RESTART = RestartPolicy(backoff_initial_ms=50, backoff_max_ms=200, healthy_after_ms=60_000)


class FakeBridge:
    """Answers every store request at once with an empty result (or keeps it, `hold=True`)."""

    def __init__(self, hold: bool = False, data: bytes = b"") -> None:
        self.hold = hold
        self.data = data
        self.requests: list[runtime_pb2.OutMessage] = []

    def submit(self, app: AppSpec, message: runtime_pb2.OutMessage, reply: Callable) -> None:
        self.requests.append(message)
        if not self.hold:
            reply(
                runtime_pb2.InMessage(
                    type=REPLY_TYPES[message.type], rendez_vous_id=message.rendez_vous_id, data=self.data
                )
            )


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def run_app(engine: WasmEngine):
    runners: list[AppRunner] = []

    def start(
        wasm: bytes, limits: AppLimits | None = None, policy: RestartPolicy = FAST_RESTART, bridge=None, name="app"
    ) -> AppRunner:
        runner = AppRunner(
            AppSpec(app_id=f"id-{name}", name=name, version="1", wasm=wasm),
            engine,
            limits or AppLimits(),
            policy,
            bridge or FakeBridge(),
        )
        runner.start()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        assert runner.stop(5), f"runner {runner.spec.name} did not stop"


def fault_of(runner: AppRunner, timeout: float = 10.0):
    wait_until(lambda: runner.faults, timeout, f"a fault of {runner.spec.name}")
    return runner.faults[0]


def test_an_infinite_loop_is_interrupted_and_the_other_apps_keep_running(run_app, wat_guest):
    healthy = run_app(wat_guest(), name="healthy")
    wait_until(lambda: healthy.status().ticks > 3, what="the healthy app ticking")
    limits = AppLimits(fuel_per_call=10**15, call_timeout_ms=300)
    started = time.monotonic()
    looping = run_app(wat_guest(tick="(loop $forever (br $forever))"), limits=limits, name="looping")
    ticks_before = healthy.status().ticks
    fault = fault_of(looping)
    elapsed = time.monotonic() - started
    assert fault.kind is FaultKind.DEADLINE
    assert 0.3 <= elapsed < 2.0
    # The healthy app ticked (every 10 ms) while the other one was stuck in its loop.
    assert healthy.status().ticks - ticks_before >= 5
    wait_until(lambda: looping.status().restarts >= 2, what="restarts")
    status = looping.status()
    assert status.last_error == "deadline exceeded: __exocore_tick ran longer than 300 ms"
    assert status.last_error_at_ns > 0
    assert healthy.status().restarts == 0 and healthy.status().state is AppState.RUNNING
    # stop() ends a runner stuck in a call within the call's deadline.
    started = time.monotonic()
    assert looping.stop(5)
    assert time.monotonic() - started < 1.5


def test_runaway_computation_runs_out_of_fuel(run_app, wat_guest):
    count_to_100m = """(func $work (local $i i32)
        (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br_if $l (i32.lt_u (local.get $i) (i32.const 100000000)))))"""
    wasm = wat_guest(tick="(call $work)", data=count_to_100m)
    runner = run_app(wasm, limits=AppLimits(fuel_per_call=100_000), name="fuel")
    fault = fault_of(runner)
    assert fault.kind is FaultKind.OUT_OF_FUEL
    assert runner.status().last_error == "out of fuel: __exocore_tick used more than 100000 fuel"


def test_memory_growth_past_the_cap_stops_the_app(run_app, wat_guest):
    grow_until_refused = """
        (block $full (loop $grow
            (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
            (br $grow)))
        unreachable"""
    runner = run_app(wat_guest(tick=grow_until_refused), limits=AppLimits(memory_max_bytes=1 << 20), name="memory")
    fault = fault_of(runner)
    assert fault.kind is FaultKind.OUT_OF_MEMORY
    assert runner.status().last_error.startswith("out of memory: linear memory at its cap of 1048576 bytes")
    assert runner.status().memory_bytes == 1 << 20


def test_the_sdk_allocator_failing_stops_the_app(run_app, example_wasm: Path):
    """A reply larger than the memory cap: __exocore_alloc returns NULL."""
    bridge = FakeBridge(data=b"x" * (512 * 1024))
    runner = run_app(example_wasm.read_bytes(), limits=AppLimits(memory_max_bytes=256 * 1024), bridge=bridge)
    fault = fault_of(runner)
    assert fault.kind is FaultKind.OUT_OF_MEMORY
    assert fault.reason.startswith("out of memory: __exocore_alloc(5242") and "(cap 262144)" in fault.reason


def test_a_trap_stops_the_app(run_app, wat_guest):
    runner = run_app(wat_guest(tick="unreachable"), name="trap")
    fault = fault_of(runner)
    assert fault.kind is FaultKind.TRAP
    assert runner.status().last_error.startswith("trap in __exocore_tick: wasm trap: wasm `unreachable` instruction")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"\xff\xff\xff", "bad out-message: not an OutMessage"),
        (runtime_pb2.OutMessage(type=7, rendez_vous_id=1).SerializeToString(), "bad out-message: unknown type 7"),
        (
            runtime_pb2.OutMessage(type=runtime_pb2.STORE_ENTITY_QUERY, data=b"\xff\xff").SerializeToString(),
            "bad out-message: STORE_ENTITY_QUERY data is not a EntityQuery",
        ),
    ],
)
def test_a_bad_out_message_gets_a_decode_error_and_stops_the_app(run_app, wat_guest, message: bytes, reason: str):
    escaped = "".join(f"\\{b:02x}" for b in message)
    tick = f"""(if (i32.eq (call $out (i32.const 256) (i32.const {len(message)})) (i32.const 2))
                   (then (call $log (i32.const 3) (i32.const 240) (i32.const 12))))"""
    wasm = wat_guest(tick=tick, data=f'(data (i32.const 240) "decode error")(data (i32.const 256) "{escaped}")')
    runner = run_app(wasm, name="bad-message")
    fault = fault_of(runner)
    assert fault.kind is FaultKind.BAD_MESSAGE
    assert runner.status().last_error.startswith(reason)
    assert (3, "decode error") in runner.recent_logs  # the guest saw MESSAGE_STATUS_DECODE_ERROR


def test_an_out_of_bounds_log_stops_the_app(run_app, wat_guest):
    runner = run_app(wat_guest(tick="(call $log (i32.const 3) (i32.const 65530) (i32.const 100))"), name="oob")
    assert fault_of(runner).kind is FaultKind.BAD_MESSAGE
    assert "outside the linear memory" in runner.status().last_error


def test_a_wasi_exit_stops_the_app(run_app, wat_guest):
    wasm = wat_guest(
        imports='(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))',
        tick="(call $exit (i32.const 3))",
    )
    runner = run_app(wasm, name="exit")
    assert fault_of(runner).kind is FaultKind.EXIT
    assert runner.status().last_error == "the app exited with status 3 in __exocore_tick"


def test_restarts_back_off_and_restart_resets_the_delay(run_app, wat_guest):
    runner = run_app(wat_guest(tick="unreachable"), policy=RestartPolicy(backoff_initial_ms=20_000))
    wait_until(lambda: runner.status().state is AppState.BACKOFF, what="backoff")
    time.sleep(0.3)
    assert runner.status().restarts == 1  # waiting 20 s before the next try
    runner.restart()
    wait_until(lambda: runner.status().restarts == 2, timeout=2, what="an immediate restart")


def test_restart_policy():
    policy = RestartPolicy()
    delays = []
    previous = None
    for _ in range(7):
        previous = policy.next_delay_ms(previous, ran_ms=10)
        delays.append(previous)
    assert delays == [1000, 2000, 4000, 8000, 16000, 30000, 30000]
    assert policy.next_delay_ms(30000, ran_ms=60_000) == 1000  # a healthy run resets it


def test_store_requests_in_flight_are_capped(run_app, bench_wasm: Path):
    bridge = FakeBridge(hold=True)  # never answers
    runner = run_app(bench_wasm.read_bytes(), limits=AppLimits(store_requests_in_flight_max=3), bridge=bridge)
    # The bench guest keeps 8 queries in flight: 3 reach the store, the others are refused at once
    # (and the guest, which retries on any reply, keeps being refused).
    wait_until(lambda: runner.status().store_requests > 20, what="refusals")
    status = runner.status()
    assert len(bridge.requests) == 3 and status.store_requests_in_flight == 3
    assert status.state is AppState.RUNNING and status.restarts == 0


def test_a_package_that_does_not_load_is_retried_with_backoff(engine: WasmEngine, tmp_path: Path):
    (tmp_path / "app.yaml").write_text("name: broken\nversion: 1.0.0\npublic_key: nope\n")
    runner = AppRunner(
        AppSpec("id", "broken", "1.0.0", directory=tmp_path), engine, AppLimits(), FAST_RESTART, FakeBridge()
    )
    runner.start()
    try:
        wait_until(lambda: runner.faults, what="a load fault")
        assert runner.faults[0].kind is FaultKind.LOAD
        assert runner.status().last_error.startswith("invalid package: ")
    finally:
        runner.stop()


class RecordingClock(Clock):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.issued: list[int] = []

    def consistent_time(self) -> int:
        value = super().consistent_time()
        self.issued.append(value)
        return value


def test_guest_time_is_consistent_time_that_never_goes_back(engine: WasmEngine, wat_guest):
    # SPEC 11: the original gave apps the bare wall clock (a TODO said consistent time).
    wall = MockTimeSource()
    default = AppRunner(
        AppSpec("id", "app", "1", wasm=b""), engine, AppLimits(), FAST_RESTART, FakeBridge(), wall_ns=wall.now_ns
    )
    before = default.guest_clock.consistent_time()
    wall.set(wall.now_ns() - 3600 * NS_PER_SEC)
    assert default.guest_clock.consistent_time() > before

    clock = RecordingClock(0, wall)
    runner = AppRunner(
        AppSpec("id", "app", "1", wasm=wat_guest()),
        engine,
        AppLimits(),
        FAST_RESTART,
        FakeBridge(),
        wall_ns=wall.now_ns,
        guest_clock=clock,
    )
    runner.start()
    try:
        wait_until(lambda: runner.status().ticks > 3, what="ticks")
        wall.set(wall.now_ns() - 3600 * NS_PER_SEC)  # the wall clock is set back an hour
        ticks = runner.status().ticks
        # The app still ticks every 10 ms: the delay it asked for is measured on its own clock.
        wait_until(lambda: runner.status().ticks > ticks + 5, timeout=2, what="ticks after the clock went back")
    finally:
        runner.stop()
    assert clock.issued == sorted(set(clock.issued))  # strictly increasing, whatever the wall clock did
