"""The C SDK's own checks (tests/guests/sdk_test.c: allocator, text, protobuf, tasks and timers,
store request timeout), built for wasm32-freestanding and for wasm32-wasi (libc malloc, printf to
the app's log, a WASI reactor's `_initialize`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exoapphost.runtime import AppInstance, WasmEngine
from exoapphost.settings import AppLimits

# The first wasm32-wasi build compiles wasi-libc into zig's cache (~20 s on 2 cores).
pytestmark = pytest.mark.timeout(120)

GUEST = Path(__file__).with_name("guests") / "sdk_test.c"
SDK = Path(__file__).resolve().parents[1] / "sdk"
TEST_FLAGS = ("-DEXO_STORE_TIMEOUT_NS=(50*EXO_NS_PER_MS)",)


def run_guest(engine: WasmEngine, wasm: Path) -> list[str]:
    lines: list[str] = []
    instance = AppInstance(
        engine,
        engine.load_module(wasm),
        AppLimits(),
        on_log=lambda _level, text: lines.append(text),
        on_out_message=lambda message: None,
    )
    instance.start()
    deadline = time.monotonic() + 5
    while "sdk tests done" not in lines and time.monotonic() < deadline:
        instance.tick()
        time.sleep(0.005)
    instance.close()
    return lines


def check_lines(lines: list[str]) -> None:
    assert "sdk tests done" in lines, lines
    failures = [line for line in lines if line.startswith("FAIL")]
    assert not failures, failures
    assert len([line for line in lines if line.startswith("ok: ")]) >= 12


def test_sdk_freestanding(engine: WasmEngine, tmp_path: Path, build_guest):
    wasm = build_guest(GUEST, tmp_path / "sdk_test.wasm", TEST_FLAGS)
    lines = run_guest(engine, wasm)
    check_lines(lines)
    assert "ok: a freed block of the same class is reused" in lines


def test_sdk_wasi(engine: WasmEngine, tmp_path: Path, build_guest):
    wasi = [
        "--target=wasm32-wasi",
        "-mexec-model=reactor",
        "-O2",
        "-s",
        "-mbulk-memory",
        "-Wall",
        "-Wextra",
        "-Werror",
        f"-I{SDK}",
        "-Wl,-z,stack-size=65536",
    ]
    wasm = build_guest(GUEST, tmp_path / "sdk_test_wasi.wasm", TEST_FLAGS, wasi)
    lines = run_guest(engine, wasm)
    check_lines(lines)
    assert "hello from libc" in lines
