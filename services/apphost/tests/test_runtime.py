"""The runtime driven directly (no threads): the example app's golden path (SPEC 5.5), the ABI
details (WASI output, scratch buffer, module checks) and the compiled-module cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exoapphost.runner import next_tick_delay_s
from exoapphost.runtime import (
    MESSAGE_STATUS_OK,
    MESSAGE_STATUS_UNHANDLED,
    AppFault,
    AppInstance,
    FaultKind,
    WasmEngine,
)
from exoapphost.settings import AppLimits
from exocore.apps import runtime_pb2
from exocore.store import mutation_pb2, query_pb2

pytestmark = pytest.mark.timeout(60)


class Guest:
    """An AppInstance with its log lines and out-messages collected (the fake store bridge)."""

    def __init__(self, engine: WasmEngine, wasm: bytes, limits: AppLimits | None = None) -> None:
        self.logs: list[tuple[int, str]] = []
        self.out: list[runtime_pb2.OutMessage] = []
        self.instance = AppInstance(
            engine,
            engine.compile(wasm),
            limits or AppLimits(),
            name="test",
            on_log=lambda level, text: self.logs.append((level, text)),
            on_out_message=self.out.append,
        )

    def texts(self) -> list[str]:
        return [text for _, text in self.logs]


def test_example_golden_path(engine: WasmEngine, example_wasm: Path):
    guest = Guest(engine, example_wasm.read_bytes())
    guest.instance.start()

    # First tick: everything up to the sleep.
    guest.instance.tick()
    texts = guest.texts()
    assert texts[:2] == ["application initialized", "task starting"]
    assert texts[2].startswith("before sleep ") and len(texts) == 3
    before_ns = int(texts[2].split()[-1])
    assert not guest.out

    # An immediate second tick: nothing new, and the app asks for a tick in more than 10 ms.
    requested = guest.instance.tick()
    assert len(guest.logs) == 3 and not guest.out
    delay = next_tick_delay_s(requested, time.time_ns())
    assert 0.010 < delay <= 0.100

    # After that delay: "after sleep", more than 100 ms later, and a mutation request.
    time.sleep(delay)
    guest.instance.tick()
    assert guest.texts()[3].startswith("after sleep ")
    assert int(guest.texts()[3].split()[-1]) - before_ns >= 100_000_000
    (mutation,) = guest.out
    assert mutation.type == runtime_pb2.STORE_MUTATION_REQUEST
    request = mutation_pb2.MutationRequest.FromString(mutation.data)
    assert request.mutations[0].entity_id == "entity1" and request.mutations[0].HasField("delete_entity")

    # Its result (same rendez-vous id, empty MutationResult) + a tick: success, and a query.
    reply = runtime_pb2.InMessage(
        type=runtime_pb2.STORE_MUTATION_RESULT,
        rendez_vous_id=mutation.rendez_vous_id,
        data=mutation_pb2.MutationResult().SerializeToString(),
    )
    assert guest.instance.deliver(reply) == MESSAGE_STATUS_OK
    guest.instance.tick()
    assert "mutation success" in guest.texts()
    query = guest.out[1]
    assert query.type == runtime_pb2.STORE_ENTITY_QUERY and query.rendez_vous_id != mutation.rendez_vous_id
    assert list(query_pb2.EntityQuery.FromString(query.data).ids.ids) == ["test"]

    # The results + a tick: success, and "task done" is the last line.
    results = runtime_pb2.InMessage(
        type=runtime_pb2.STORE_ENTITY_RESULTS,
        rendez_vous_id=query.rendez_vous_id,
        data=query_pb2.EntityResults().SerializeToString(),
    )
    assert guest.instance.deliver(results) == MESSAGE_STATUS_OK
    guest.instance.tick()
    assert guest.texts()[-2:] == ["query success", "task done"]

    # A reply nobody waits for is "unhandled"; store errors reach the app as errors.
    assert guest.instance.deliver(results) == MESSAGE_STATUS_UNHANDLED
    guest.instance.close()


def test_example_logs_store_errors(engine: WasmEngine, example_wasm: Path):
    guest = Guest(engine, example_wasm.read_bytes())
    guest.instance.start()
    guest.instance.tick()
    time.sleep(0.11)
    guest.instance.tick()
    (mutation,) = guest.out
    guest.instance.deliver(
        runtime_pb2.InMessage(
            type=runtime_pb2.STORE_MUTATION_RESULT, rendez_vous_id=mutation.rendez_vous_id, error="UNAVAILABLE: down"
        )
    )
    assert guest.texts()[-1] == "mutation error: UNAVAILABLE: down"


def test_example_counter_counts_every_page_then_writes_the_count(engine: WasmEngine, example_wasm: Path):
    guest = Guest(engine, example_wasm.read_bytes())
    guest.instance.start()
    guest.instance.tick()
    time.sleep(0.11)
    guest.instance.tick()
    for kind in (runtime_pb2.STORE_MUTATION_RESULT, runtime_pb2.STORE_ENTITY_RESULTS):
        guest.instance.deliver(runtime_pb2.InMessage(type=kind, rendez_vous_id=guest.out[-1].rendez_vous_id))
    guest.instance.tick()  # the counter starts
    count_query = query_pb2.EntityQuery.FromString(guest.out[-1].data)
    subs = count_query.boolean.queries
    assert subs[0].trait.trait_name == "exocore.test.TestMessage" and list(subs[1].ids.ids) == ["example-counter"]

    # Two pages: 2 entities with a next page, then 1 without.
    page = query_pb2.EntityResults(entities=[query_pb2.EntityResult(), query_pb2.EntityResult()])
    page.next_page.count = 2
    page.next_page.offset = 2
    guest.instance.deliver(
        runtime_pb2.InMessage(
            type=runtime_pb2.STORE_ENTITY_RESULTS,
            rendez_vous_id=guest.out[-1].rendez_vous_id,
            data=page.SerializeToString(),
        )
    )
    second = query_pb2.EntityQuery.FromString(guest.out[-1].data)
    assert second.paging.offset == 2
    last = query_pb2.EntityResults(entities=[query_pb2.EntityResult()])
    guest.instance.deliver(
        runtime_pb2.InMessage(
            type=runtime_pb2.STORE_ENTITY_RESULTS,
            rendez_vous_id=guest.out[-1].rendez_vous_id,
            data=last.SerializeToString(),
        )
    )
    write = guest.out[-1]
    assert write.type == runtime_pb2.STORE_MUTATION_REQUEST
    (mutation,) = mutation_pb2.MutationRequest.FromString(write.data).mutations
    assert mutation.entity_id == "example-counter"
    trait = mutation.put_trait.trait
    from exocore.test import test_pb2

    message = test_pb2.TestMessage()
    assert trait.message.Unpack(message)
    assert message.uint1 == 3
    guest.instance.deliver(
        runtime_pb2.InMessage(type=runtime_pb2.STORE_MUTATION_RESULT, rendez_vous_id=write.rendez_vous_id)
    )
    assert guest.texts()[-1] == "counter: example-counter = 3"


def test_wasi_stdout_and_stderr_go_to_the_app_log(engine: WasmEngine, wat_guest):
    wasm = wat_guest(
        imports='(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))',
        data='(data (i32.const 256) "hello from wasi\\npartial")'
        '(data (i32.const 512) "\\00\\01\\00\\00\\17\\00\\00\\00")'  # iovec {ptr 256, len 23}
        '(data (i32.const 520) "oops\\n")(data (i32.const 528) "\\08\\02\\00\\00\\05\\00\\00\\00")',  # {520, 5}
        boot="(drop (call $fd_write (i32.const 1) (i32.const 512) (i32.const 1) (i32.const 600)))"
        "(drop (call $fd_write (i32.const 2) (i32.const 528) (i32.const 1) (i32.const 600)))",
    )
    guest = Guest(engine, wasm)
    guest.instance.start()
    assert (3, "hello from wasi") in guest.logs
    assert (2, "oops") in guest.logs
    guest.instance.close()  # flushes the partial line
    assert (3, "partial") in guest.logs


def test_in_messages_reuse_one_guest_buffer(engine: WasmEngine, wat_guest):
    guest = Guest(engine, wat_guest())
    guest.instance.start()
    calls = guest.instance.stats.calls
    for _ in range(10):
        guest.instance.deliver(runtime_pb2.InMessage(type=runtime_pb2.STORE_ENTITY_RESULTS, rendez_vous_id=1))
    # one alloc for the first message, then one call per message
    assert guest.instance.stats.calls - calls == 11
    assert guest.instance.stats.fuel_consumed > 0


@pytest.mark.parametrize(
    ("wat", "message"),
    [
        ("(module)", "does not export its linear memory"),
        (
            '(module (memory (export "memory") 1) (func (export "__exocore_init")))',
            "does not export __exocore_app_init",
        ),
    ],
)
def test_modules_without_the_abi_are_refused(engine: WasmEngine, wat: str, message: str):
    from wasmtime import wat2wasm

    with pytest.raises(AppFault) as info:
        engine.compile(bytes(wat2wasm(wat)))
    assert info.value.kind is FaultKind.LOAD and message in info.value.reason


def test_foreign_imports_and_garbage_are_refused(engine: WasmEngine, wat_guest):
    with pytest.raises(AppFault, match="imports env.x, which the host does not provide"):
        engine.compile(wat_guest(imports='(import "env" "x" (func))'))
    with pytest.raises(AppFault, match="invalid wasm module"):
        engine.compile(b"\x00asm garbage")


def test_compiled_modules_are_cached_on_disk(tmp_path: Path, example_wasm: Path):
    first = WasmEngine(cache_dir=tmp_path)
    first.load_module(example_wasm, "key")
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith("key.") and cached.suffix == ".cwasm"
    first.close()

    second = WasmEngine(cache_dir=tmp_path)
    started = time.perf_counter()
    module = second.load_module(Path("/nonexistent.wasm"), "key")  # served by the cache, file not read
    assert time.perf_counter() - started < 0.5
    guest_logs: list[str] = []
    instance = AppInstance(
        second, module, AppLimits(), on_log=lambda _l, t: guest_logs.append(t), on_out_message=lambda m: None
    )
    instance.start()
    assert guest_logs == ["application initialized"]
    # A damaged cache entry is recompiled from the file.
    cached.write_bytes(b"garbage")
    third = WasmEngine(cache_dir=tmp_path)
    third.load_module(example_wasm, "key")
    assert cached.read_bytes() != b"garbage"
    second.close()
    third.close()


def test_a_host_failure_stops_the_app_without_unwinding_through_wasm(engine: WasmEngine, bench_wasm: Path):
    def broken_bridge(message: runtime_pb2.OutMessage) -> None:
        raise RuntimeError("bridge down")

    instance = AppInstance(
        engine,
        engine.compile(bench_wasm.read_bytes()),
        AppLimits(),
        on_log=lambda *a: None,
        on_out_message=broken_bridge,
    )
    with pytest.raises(AppFault) as info:
        instance.start()  # the bench guest sends its queries at boot
    assert info.value.kind is FaultKind.TRAP
    assert info.value.reason == "host error in __exocore_host_out_message: RuntimeError('bridge down')"
    assert not instance.alive


def test_golden_path_through_the_public_wasmtime_api(engine: WasmEngine, example_wasm: Path, monkeypatch):
    """The runtime works without the fast-call internals (another wasmtime-py)."""
    from exoapphost import _fastcall

    monkeypatch.setattr(_fastcall, "AVAILABLE", False)
    guest = Guest(engine, example_wasm.read_bytes())
    guest.instance.start()
    guest.instance.tick()
    time.sleep(0.11)
    guest.instance.tick()
    (mutation,) = guest.out
    reply = runtime_pb2.InMessage(type=runtime_pb2.STORE_MUTATION_RESULT, rendez_vous_id=mutation.rendez_vous_id)
    assert guest.instance.deliver(reply) == MESSAGE_STATUS_OK
    assert guest.texts()[-1] == "mutation success"
    # A trap surfaces the same way: a message "delivered" outside the memory.
    with pytest.raises(AppFault, match="trap in __exocore_in_message: memory fault .*; wasm trap: out of bounds"):
        guest.instance._call("__exocore_in_message", 70_000_000, 10)
