"""Fixtures of the app host's tests: the compiled example apps, WAT guests, a shared engine."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exoapphost.runtime import WasmEngine

APPHOST = Path(__file__).resolve().parents[1]
SDK = APPHOST / "sdk"
EXAMPLES = APPHOST / "examples"
# Same flags as the Makefile's `apps` target.
APP_CFLAGS = [
    "--target=wasm32-freestanding",
    "-O2",
    "-s",
    "-nostdlib",
    "-mbulk-memory",
    "-Wall",
    "-Wextra",
    "-Werror",
    f"-I{SDK}",
    "-Wl,--no-entry",
    "-Wl,-z,stack-size=65536",
]


def build_c_app(source: Path, output: Path, extra_flags: list[str] | None = None) -> Path:
    """Compile `source` + the SDK to `output` unless it is newer than both (`make apps` does the
    same; this keeps `pytest` alone working on a fresh clone)."""
    inputs = [source, SDK / "exocore.c", SDK / "exocore.h"]
    if output.exists() and all(output.stat().st_mtime >= p.stat().st_mtime for p in inputs):
        return output
    flags = APP_CFLAGS if extra_flags is None else extra_flags
    cmd = [sys.executable, "-m", "ziglang", "cc", *flags, "-o", str(output), str(source), str(SDK / "exocore.c")]
    subprocess.run(cmd, check=True, timeout=120)
    return output


@pytest.fixture(scope="session")
def build_guest() -> Callable[..., Path]:
    """`build_guest(source, output, extra_flags=(), target_flags=APP_CFLAGS)`: compile a C guest with the SDK."""

    def build(source: Path, output: Path, extra_flags: tuple[str, ...] = (), target_flags: list[str] | None = None):
        return build_c_app(source, output, [*(APP_CFLAGS if target_flags is None else target_flags), *extra_flags])

    return build


@pytest.fixture(scope="session")
def example_wasm() -> Path:
    return build_c_app(EXAMPLES / "example" / "example.c", EXAMPLES / "example" / "example.wasm")


@pytest.fixture(scope="session")
def bench_wasm() -> Path:
    return build_c_app(EXAMPLES / "bench" / "bench.c", EXAMPLES / "bench" / "bench.wasm")


@pytest.fixture
def engine() -> Iterator[WasmEngine]:
    engine = WasmEngine()
    yield engine
    engine.close()


# A guest implementing the ABI by hand; `{tick}` is the body of __exocore_tick (before it returns
# now + 10 ms), `{data}` extra data segments, `{boot}` the body of __exocore_app_boot.
WAT_GUEST = """
(module
  (import "exocore" "__exocore_host_log" (func $log (param i32 i32 i32)))
  (import "exocore" "__exocore_host_now" (func $now (result i64)))
  (import "exocore" "__exocore_host_out_message" (func $out (param i32 i32) (result i32)))
  {imports}
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (global $ticks (mut i32) (i32.const 0))
  (data (i32.const 16) "tick")
  (data (i32.const 32) "booted")
  {data}
  (func (export "__exocore_init"))
  (func (export "__exocore_app_init"))
  (func (export "__exocore_app_boot") (call $log (i32.const 3) (i32.const 32) (i32.const 6)) {boot})
  (func (export "__exocore_tick") (result i64)
    (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
    (call $log (i32.const 3) (i32.const 16) (i32.const 4))
    {tick}
    (i64.add (call $now) (i64.const 10000000)))
  (func (export "__exocore_in_message") (param i32 i32) (result i32) (i32.const 0))
  (func (export "__exocore_alloc") (param i32) (result i32) (global.get $heap))
  (func (export "__exocore_free") (param i32 i32))
)
"""


@pytest.fixture
def wat_guest() -> Callable[..., bytes]:
    """`wat_guest(tick=..., data=..., boot=..., imports=...)` -> wasm bytes."""
    from wasmtime import wat2wasm

    def make(tick: str = "", data: str = "", boot: str = "", imports: str = "") -> bytes:
        return bytes(wat2wasm(WAT_GUEST.format(tick=tick, data=data, boot=boot, imports=imports)))

    return make


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`exo` commands run in process configure logging globally: undo it after each test."""
    import logging

    yield
    logging.disable(logging.NOTSET)
