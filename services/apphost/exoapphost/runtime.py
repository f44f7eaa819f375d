"""One app's WebAssembly instance on wasmtime, with limits (SPEC 5.3; the limits are new).

Theory of operation
-------------------

* **One engine per process** (`WasmEngine`): fuel and epoch interruption on, one daemon thread
  incrementing the epoch every `EPOCH_TICK_MS`, compiled modules cached in memory and on disk
  (`Module.serialize`, keyed by the module's multihash and the wasmtime version), so restarts and
  later runs skip compilation.
* **One store and instance per app** (`AppInstance`): the host imports (module ``exocore``),
  WASI preview 1 with stdout/stderr captured line by line into the app's log, and
  `store.set_limits` capping the linear memory. `AppInstance` does no threading and no I/O: the
  runner thread (runner.py) calls it, tests drive it directly.
* **Every call into the guest** (`_initialize`, the three init exports, a tick, a message, the
  allocator) gets `fuel_per_call` fuel and an epoch deadline of `call_timeout_ms`. A call that
  traps, runs out of fuel, passes its deadline, exits (WASI ``proc_exit``) or makes a host call
  the host refuses raises `AppFault`, with a `FaultKind` and a one-line reason; the instance is
  dead afterwards and the runner replaces it.
* **Messages**: the guest's `__exocore_host_out_message` bytes must decode as an `OutMessage` of a
  known type whose `data` decodes as the request it names; otherwise the guest gets
  MESSAGE_STATUS_DECODE_ERROR and the call ends in an `AppFault` (BAD_MESSAGE). Good messages go to
  `on_out_message`. In-messages are copied into one guest buffer obtained from `__exocore_alloc`
  and reused (grown when too small, freed at close): one guest call per message instead of three.
* **Memory exhaustion**: memory.grow past the cap fails in the guest (it returns -1, it does not
  trap); guests built on the SDK then trap, as does `__exocore_alloc` returning 0. A trap while the
  memory is within one page of the cap is reported as OUT_OF_MEMORY.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import wasmtime
from google.protobuf.message import DecodeError
from wasmtime import (
    Config,
    Engine,
    ExitTrap,
    Func,
    FuncType,
    Linker,
    Memory,
    Module,
    Store,
    Trap,
    TrapCode,
    ValType,
    WasiConfig,
    WasmtimeError,
)

from exocommon.hashing import multihash_sha3_256, multihash_to_base58
from exocore.apps import runtime_pb2
from exocore.store import mutation_pb2, query_pb2

from . import _fastcall
from .settings import EPOCH_TICK_MS, AppLimits

log = logging.getLogger(__name__)

InMessage = runtime_pb2.InMessage
OutMessage = runtime_pb2.OutMessage

MESSAGE_STATUS_OK = runtime_pb2.MESSAGE_STATUS_OK
MESSAGE_STATUS_UNHANDLED = runtime_pb2.MESSAGE_STATUS_UNHANDLED
MESSAGE_STATUS_DECODE_ERROR = runtime_pb2.MESSAGE_STATUS_DECODE_ERROR

LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG, LOG_TRACE = 1, 2, 3, 4, 5

HOST_MODULE = "exocore"
WASI_MODULE = "wasi_snapshot_preview1"
REQUIRED_EXPORTS = (
    "__exocore_init",
    "__exocore_app_init",
    "__exocore_app_boot",
    "__exocore_tick",
    "__exocore_in_message",
    "__exocore_alloc",
    "__exocore_free",
)
# An out-message or log line longer than this is refused (BAD_MESSAGE) / truncated.
OUT_MESSAGE_MAX_BYTES = 16 * 1024 * 1024
LOG_LINE_MAX_BYTES = 64 * 1024
WASM_PAGE = 65536
_U64 = (1 << 64) - 1

# What each out-message type carries (validated before it leaves the host function).
OUT_MESSAGE_PAYLOADS = {
    runtime_pb2.STORE_ENTITY_QUERY: query_pb2.EntityQuery,
    runtime_pb2.STORE_MUTATION_REQUEST: mutation_pb2.MutationRequest,
}


class FaultKind(enum.Enum):
    LOAD = "load"
    TRAP = "trap"
    OUT_OF_FUEL = "out of fuel"
    DEADLINE = "deadline"
    OUT_OF_MEMORY = "out of memory"
    BAD_MESSAGE = "bad message"
    EXIT = "exit"


class AppFault(Exception):
    """The app broke a rule or a limit; its instance is dead. `str()` is the one-line reason."""

    def __init__(self, kind: FaultKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _wasmtime_version() -> str:
    return getattr(wasmtime, "__version__", "") or "unknown"


class WasmEngine:
    """The process's wasmtime engine: config, epoch ticker thread, compiled module cache."""

    def __init__(self, cache_dir: Path | None = None, epoch_tick_ms: int = EPOCH_TICK_MS) -> None:
        config = Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        self.engine = Engine(config)
        self.cache_dir = cache_dir
        self.epoch_tick_s = epoch_tick_ms / 1000
        self._modules: dict[str, Module] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- epoch ticker ------------------------------------------------------------------------

    def _tick_epochs(self) -> None:
        while not self._stop.wait(self.epoch_tick_s):
            self.engine.increment_epoch()

    def ensure_ticker(self) -> None:
        with self._lock:
            if self._ticker is None and not self._stop.is_set():
                self._ticker = threading.Thread(target=self._tick_epochs, name="wasm-epoch", daemon=True)
                self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(1.0)

    # -- modules -------------------------------------------------------------------------------

    def _cache_file(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{key}.wasmtime-{_wasmtime_version()}.cwasm"

    def compile(self, wasm: bytes, key: str | None = None) -> Module:
        """The compiled module of `wasm` (cached by `key`, default its multihash); AppFault(LOAD)
        when it does not compile or lacks the exports the host calls."""
        if key is None:
            key = multihash_to_base58(multihash_sha3_256(wasm))
        with self._lock:
            module = self._modules.get(key)
        if module is not None:
            return module
        module = self._load_cached(key)
        if module is None:
            try:
                module = Module(self.engine, wasm)
            except WasmtimeError as exc:
                raise AppFault(FaultKind.LOAD, f"invalid wasm module: {_first_line(str(exc))}") from None
            check_module(module)
            self._store_cached(key, module)
        with self._lock:
            self._modules[key] = module
        return module

    def load_module(self, path: Path, multihash: str | None = None) -> Module:
        """The compiled module of the file `path` (its manifest `multihash`, already verified, is
        the cache key when given)."""
        if multihash is not None:
            with self._lock:
                module = self._modules.get(multihash)
            if module is not None:
                return module
            module = self._load_cached(multihash)
            if module is not None:
                with self._lock:
                    self._modules[multihash] = module
                return module
        try:
            wasm = path.read_bytes()
        except OSError as exc:
            raise AppFault(FaultKind.LOAD, f"cannot read module {path.name}: {exc.strerror or exc}") from None
        return self.compile(wasm, multihash)

    def _load_cached(self, key: str) -> Module | None:
        file = self._cache_file(key)
        if file is None or not file.is_file():
            return None
        try:
            # Read into memory rather than `deserialize_file`, which maps the file: a cache file changed
            # in place while the module lives would then crash the process (SIGBUS).
            module = Module.deserialize(self.engine, file.read_bytes())
            check_module(module)
            return module
        except (WasmtimeError, AppFault, OSError) as exc:  # other wasmtime build or settings: recompile
            log.info("compiled module cache entry unusable, recompiling", extra={"file": str(file), "error": str(exc)})
            return None

    def _store_cached(self, key: str, module: Module) -> None:
        file = self._cache_file(key)
        if file is None:
            return
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(bytes(module.serialize()))
            tmp.replace(file)
        except OSError as exc:
            log.warning("cannot write the compiled module cache", extra={"file": str(file), "error": str(exc)})


def check_module(module: Module) -> None:
    """AppFault(LOAD) unless the module exports memory and every entry point, and imports only
    from the host and WASI."""
    exports = {e.name: e.type for e in module.exports}
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise AppFault(FaultKind.LOAD, "the module does not export its linear memory as `memory`")
    missing = [name for name in REQUIRED_EXPORTS if not isinstance(exports.get(name), FuncType)]
    if missing:
        raise AppFault(FaultKind.LOAD, f"the module does not export {', '.join(missing)} (link the Exocore SDK)")
    for imp in module.imports:
        if imp.module not in (HOST_MODULE, WASI_MODULE):
            raise AppFault(
                FaultKind.LOAD, f"the module imports {imp.module}.{imp.name}, which the host does not provide"
            )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _trap_text(trap: Trap) -> str:
    """The useful line of a trap ("wasm trap: ..." when present) and the innermost frame."""
    lines = [line.strip() for line in str(trap.message).splitlines() if line.strip()]
    if "Caused by:" in lines:  # "Caused by:\n 0: memory fault at ...\n 1: wasm trap: out of bounds ..."
        causes = [re.sub(r"^\d+:\s*", "", line) for line in lines[lines.index("Caused by:") + 1 :]]
        cause = "; ".join(causes)
    else:
        cause = lines[0] if lines else "trap"
    frames = trap.frames
    if frames:
        frame = frames[0]
        where = frame.func_name or f"func {frame.func_index}"
        cause += f" (in {where} at offset {frame.module_offset:#x})"
    return cause


class _LineBuffer:
    """WASI stdout/stderr: bytes in, complete lines out to the app's log."""

    def __init__(self, level: int, emit: Callable[[int, str], None]) -> None:
        self.level = level
        self.emit = emit
        self.pending = bytearray()

    def write(self, data: bytes) -> int:
        self.pending += data
        while (end := self.pending.find(b"\n")) >= 0:
            self.emit(self.level, self.pending[:end].decode("utf-8", "replace"))
            del self.pending[: end + 1]
        if len(self.pending) > LOG_LINE_MAX_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.pending:
            self.emit(self.level, self.pending.decode("utf-8", "replace"))
            self.pending.clear()


@dataclass
class InstanceStats:
    calls: int = 0
    fuel_consumed: int = 0
    memory_bytes: int = 0


class AppInstance:
    """One instantiated app (see module docstring). Not thread safe: one thread calls it."""

    def __init__(
        self,
        engine: WasmEngine,
        module: Module,
        limits: AppLimits,
        *,
        name: str = "app",
        on_log: Callable[[int, str], None],
        on_out_message: Callable[[runtime_pb2.OutMessage], None],
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._engine = engine
        self._module = module
        self.limits = limits
        self.name = name
        self._on_log = on_log
        self._on_out_message = on_out_message
        self._clock_ns = clock_ns
        self._epoch_ticks = limits.epoch_ticks()
        self.stats = InstanceStats()
        self._store: Store | None = None
        self._memory: Memory | None = None
        self._funcs: dict[str, Callable[..., int | None]] = {}
        self._fault: AppFault | None = None
        self._dead = False
        self._scratch_ptr = 0
        self._scratch_size = 0
        self._stdout = _LineBuffer(LOG_INFO, on_log)
        self._stderr = _LineBuffer(LOG_WARN, on_log)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Instantiate and run the init sequence: `_initialize` (WASI reactors), `__exocore_init`,
        `__exocore_app_init`, `__exocore_app_boot`."""
        self._engine.ensure_ticker()
        engine = self._engine.engine
        store = Store(engine)
        store.set_limits(memory_size=self.limits.memory_max_bytes)
        wasi = WasiConfig()
        wasi.argv = [self.name]
        wasi.stdout_custom = self._stdout.write
        wasi.stderr_custom = self._stderr.write
        store.set_wasi(wasi)
        linker = Linker(engine)
        linker.define_wasi()
        i32, i64 = ValType.i32(), ValType.i64()
        imports: list[tuple[str, list[ValType], ValType | None, Callable[..., int | None], int | None]] = [
            ("__exocore_host_log", [i32, i32, i32], None, self._host_log, None),
            ("__exocore_host_now", [], i64, self._host_now, 0),
            ("__exocore_host_out_message", [i32, i32], i32, self._host_out_message, MESSAGE_STATUS_DECODE_ERROR),
        ]
        for name, params, result, method, on_failure in imports:
            guarded = self._guarded(name, method, on_failure)
            if _fastcall.AVAILABLE:
                func = _fastcall.host_func(store, params, result, guarded)
            else:  # pragma: no cover - wasmtime-py without the expected internals
                func = Func(store, FuncType(params, [result] if result is not None else []), guarded)
            linker.define(store, HOST_MODULE, name, func)
        self._store = store
        store.set_fuel(self.limits.fuel_per_call)
        store.set_epoch_deadline(self._epoch_ticks)
        try:
            instance = linker.instantiate(store, self._module)
        except Trap as trap:
            raise self._die(self._fault or self._fault_of_trap(trap, "instantiation")) from None
        except WasmtimeError as exc:
            raise self._die(AppFault(FaultKind.LOAD, f"cannot instantiate: {_first_line(str(exc))}")) from None
        exports = instance.exports(store)
        memory = exports["memory"]
        assert isinstance(memory, Memory)
        self._memory = memory
        for name in (*REQUIRED_EXPORTS, "_initialize"):
            func = exports.get(name)
            if isinstance(func, Func):
                self._funcs[name] = (
                    _fastcall.GuestFunc(store, func) if _fastcall.AVAILABLE else functools.partial(func, store)
                )
        if "_initialize" in self._funcs:
            self._call("_initialize")
        self._call("__exocore_init")
        self._call("__exocore_app_init")
        self._call("__exocore_app_boot")

    def close(self) -> None:
        """Free the scratch buffer (when the instance is healthy) and drop the store."""
        if self._scratch_ptr and not self._dead:
            try:
                self._call("__exocore_free", self._scratch_ptr, self._scratch_size)
            except AppFault:
                pass
        self._stdout.flush()
        self._stderr.flush()
        self._scratch_ptr = 0
        self._funcs.clear()
        self._memory = None
        self._store = None
        self._dead = True

    @property
    def alive(self) -> bool:
        return self._store is not None and not self._dead

    # -- calls into the guest ----------------------------------------------------------------------

    def tick(self) -> int:
        """Call `__exocore_tick`; the absolute time (ns) of the tick the app wants next, 0 if none."""
        result = self._call("__exocore_tick")
        return int(result) & _U64 if result is not None else 0

    def deliver(self, message: runtime_pb2.InMessage | bytes) -> int:
        """Deliver an InMessage (or its encoding); the MessageStatus the guest returned."""
        data = message if isinstance(message, bytes | bytearray) else message.SerializeToString()
        size = max(len(data), 1)
        if size > self._scratch_size:
            if self._scratch_ptr:
                self._call("__exocore_free", self._scratch_ptr, self._scratch_size)
                self._scratch_ptr = self._scratch_size = 0
            want = max(size, 4096)
            ptr = int(self._call("__exocore_alloc", want) or 0) & 0xFFFFFFFF
            if ptr == 0:
                mem = self._memory_bytes()
                raise self._die(
                    AppFault(
                        FaultKind.OUT_OF_MEMORY,
                        f"out of memory: __exocore_alloc({want}) failed with {mem} bytes of linear memory "
                        f"(cap {self.limits.memory_max_bytes})",
                    )
                )
            self._scratch_ptr, self._scratch_size = ptr, want
        assert self._memory is not None and self._store is not None
        try:
            self._memory.write(self._store, data, self._scratch_ptr)
        except IndexError:
            raise self._die(
                AppFault(FaultKind.TRAP, f"__exocore_alloc returned {self._scratch_ptr}, outside the memory")
            ) from None
        return int(self._call("__exocore_in_message", self._scratch_ptr, len(data)))

    def _call(self, name: str, *args: int) -> int | None:
        if not self.alive:
            raise AppFault(FaultKind.TRAP, f"{self.name}: the instance is dead")
        store = self._store
        assert store is not None
        fuel = self.limits.fuel_per_call
        store.set_fuel(fuel)
        store.set_epoch_deadline(self._epoch_ticks)
        try:
            result = self._funcs[name](*args)
        except Trap as trap:
            raise self._die(self._fault or self._fault_of_trap(trap, name)) from None
        except ExitTrap as exc:
            raise self._die(AppFault(FaultKind.EXIT, f"the app exited with status {exc.code} in {name}")) from None
        except WasmtimeError as exc:
            raise self._die(AppFault(FaultKind.TRAP, f"{name}: {_first_line(str(exc))}")) from None
        finally:
            self.stats.calls += 1
            if self._store is not None:
                self.stats.fuel_consumed += fuel - store.get_fuel()
        if self._fault is not None:
            raise self._die(self._fault)
        return result  # type: ignore[no-any-return]

    def _die(self, fault: AppFault) -> AppFault:
        self.stats.memory_bytes = self._memory_bytes()
        self._dead = True
        return fault

    def _memory_bytes(self) -> int:
        if self._memory is None or self._store is None:
            return 0
        return int(self._memory.data_len(self._store))

    def memory_bytes(self) -> int:
        """The current size of the linear memory."""
        self.stats.memory_bytes = self._memory_bytes()
        return self.stats.memory_bytes

    def _fault_of_trap(self, trap: Trap, where: str) -> AppFault:
        code = trap.trap_code
        if code == TrapCode.OUT_OF_FUEL:
            return AppFault(
                FaultKind.OUT_OF_FUEL, f"out of fuel: {where} used more than {self.limits.fuel_per_call} fuel"
            )
        if code == TrapCode.INTERRUPT:
            return AppFault(
                FaultKind.DEADLINE, f"deadline exceeded: {where} ran longer than {self.limits.call_timeout_ms} ms"
            )
        text = _trap_text(trap)
        if self._memory_bytes() + WASM_PAGE > self.limits.memory_max_bytes:
            return AppFault(
                FaultKind.OUT_OF_MEMORY,
                f"out of memory: linear memory at its cap of {self.limits.memory_max_bytes} bytes, "
                f"then {where} trapped: {text}",
            )
        return AppFault(FaultKind.TRAP, f"trap in {where}: {text}")

    # -- host functions (run inside a guest call, on the runner thread) -----------------------------

    def _guarded(
        self, name: str, method: Callable[..., int | None], on_failure: int | None
    ) -> Callable[..., int | None]:
        """`method` made safe to call from wasm: it never raises. A failure (an `AppFault` for a
        guest error, anything else is a host bug) is recorded as the call's fault and the store's
        fuel is emptied, so the guest traps at its next instructions and `_call` reports the fault."""

        def host_function(*args: int) -> int | None:
            try:
                return method(*args)
            except AppFault as fault:
                self._fault = self._fault or fault
            except Exception as exc:
                log.exception("host function %s failed", name)
                self._fault = self._fault or AppFault(FaultKind.TRAP, f"host error in {name}: {exc!r}")
            if self._store is not None:
                self._store.set_fuel(0)
            return on_failure

        return host_function

    def _read(self, ptr: int, length: int, what: str) -> bytes:
        store, memory = self._store, self._memory
        if store is None or memory is None:
            raise AppFault(FaultKind.TRAP, f"{what} called before the instance was ready")
        ptr &= 0xFFFFFFFF
        length &= 0xFFFFFFFF
        size = memory.data_len(store)
        if ptr + length > size:
            raise AppFault(
                FaultKind.BAD_MESSAGE, f"{what}: bytes {ptr}..{ptr + length} are outside the linear memory ({size})"
            )
        if length == 0:
            return b""
        return bytes(memory.get_buffer_ptr(store, length, ptr))

    def _host_log(self, level: int, ptr: int, length: int) -> None:
        data = self._read(ptr, min(length & 0xFFFFFFFF, LOG_LINE_MAX_BYTES), "__exocore_host_log")
        self._on_log(level if LOG_ERROR <= level <= LOG_TRACE else LOG_INFO, data.decode("utf-8", "replace"))

    def _host_now(self) -> int:
        return self._clock_ns()

    def _host_out_message(self, ptr: int, length: int) -> int:
        if length & 0xFFFFFFFF > OUT_MESSAGE_MAX_BYTES:
            self._fault = AppFault(
                FaultKind.BAD_MESSAGE, f"bad out-message: {length} bytes (limit {OUT_MESSAGE_MAX_BYTES})"
            )
            return MESSAGE_STATUS_DECODE_ERROR
        data = self._read(ptr, length, "__exocore_host_out_message")
        try:
            message = OutMessage.FromString(data)
        except DecodeError as exc:
            self._fault = AppFault(FaultKind.BAD_MESSAGE, f"bad out-message: not an OutMessage ({exc})")
            return MESSAGE_STATUS_DECODE_ERROR
        payload = OUT_MESSAGE_PAYLOADS.get(message.type)
        if payload is None:
            self._fault = AppFault(FaultKind.BAD_MESSAGE, f"bad out-message: unknown type {message.type}")
            return MESSAGE_STATUS_DECODE_ERROR
        try:
            payload.FromString(message.data)
        except DecodeError as exc:
            type_name = runtime_pb2.OutMessageType.Name(message.type)
            self._fault = AppFault(
                FaultKind.BAD_MESSAGE, f"bad out-message: {type_name} data is not a {payload.__name__} ({exc})"
            )
            return MESSAGE_STATUS_DECODE_ERROR
        self._on_out_message(message)
        return MESSAGE_STATUS_OK
