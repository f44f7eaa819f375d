"""Group commit of the Mutate path: concurrent requests share one chain Append (`AppendBatcher`),
each gets its own operation ids and entities, a failing Append fails every request of its batch with
the right error, and an invalid request still writes nothing."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2

from exocommon.config import EntityIndexSettings
from exocommon.errors import InvalidArgument, Unavailable
from exocommon.sealed import open_sealed
from exocore.chain.v1 import chain_pb2
from exocore.store import entity_pb2, mutation_pb2
from exocore.test import test_pb2
from exostore.entity_index import CaughtUpEvent, ChainEntry, EntityIndex, PendingEvent
from exostore.mutations import AppendBatcher
from exostore.payloads import PayloadStore
from exostore.registry import TraitRegistry
from exostore.service import StoreService

KEY = bytes(range(32))
FIRST_ID = 1_800_000_000 * 10**9

# --- AppendBatcher alone ------------------------------------------------------------------------------


class FakeSend:
    """An Append that holds each call until `release()` (or answers at once when `hold` is False)."""

    def __init__(self, hold: bool = True) -> None:
        self.calls: list[list[bytes]] = []
        self.hold = hold
        self.gate = asyncio.Event()
        self.fail: Exception | None = None
        self.next_id = 1000

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, entries: list[bytes]) -> list[int]:
        self.calls.append(list(entries))
        if self.hold:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        if any(entry == b"bad" for entry in entries):
            raise InvalidArgument("entry 'bad' refused")
        ids = list(range(self.next_id, self.next_id + len(entries)))
        self.next_id += len(entries)
        return ids


async def _settle_loop() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_append_alone_is_sent_at_once():
    send = FakeSend(hold=False)
    batcher = AppendBatcher(send)
    assert await batcher.append([b"a", b"b"]) == [1000, 1001]
    assert send.calls == [[b"a", b"b"]]


async def test_appends_waiting_behind_one_in_flight_leave_together_each_with_its_ids():
    send = FakeSend()
    batcher = AppendBatcher(send)
    first = asyncio.ensure_future(batcher.append([b"first"]))
    await _settle_loop()
    assert send.calls == [[b"first"]]  # sent at once, nothing to wait for
    others = [asyncio.ensure_future(batcher.append([f"{i}a".encode(), f"{i}b".encode()])) for i in range(10)]
    await _settle_loop()
    assert len(send.calls) == 1  # they wait for the Append in flight
    send.release()
    assert await first == [1000]
    results = await asyncio.gather(*others)
    assert len(send.calls) == 2
    assert send.calls[1] == [f"{i}{s}".encode() for i in range(10) for s in "ab"]
    assert results == [[1001 + 2 * i, 1002 + 2 * i] for i in range(10)]
    assert batcher.appends_sent == 2


async def test_a_failing_append_fails_every_caller_of_its_batch():
    send = FakeSend()
    batcher = AppendBatcher(send)
    first = asyncio.ensure_future(batcher.append([b"first"]))
    await _settle_loop()
    batch = [asyncio.ensure_future(batcher.append([b"x"])) for _ in range(5)]
    await _settle_loop()
    send.fail = Unavailable("the chain service is not available")
    send.release()
    results = await asyncio.gather(first, *batch, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    assert len(send.calls) == 2
    # The batcher keeps working after a failure.
    send.fail = None
    assert await batcher.append([b"again"]) == [1000]


async def test_an_invalid_append_in_a_batch_fails_alone():
    send = FakeSend()
    batcher = AppendBatcher(send)
    first = asyncio.ensure_future(batcher.append([b"first"]))
    await _settle_loop()
    good1 = asyncio.ensure_future(batcher.append([b"g1"]))
    bad = asyncio.ensure_future(batcher.append([b"ok", b"bad"]))
    good2 = asyncio.ensure_future(batcher.append([b"g2"]))
    await _settle_loop()
    send.release()
    await first
    with pytest.raises(InvalidArgument):
        await bad
    assert len(await good1) == 1
    assert len(await good2) == 1
    # The batch, then each of its appends alone.
    assert send.calls[1] == [b"g1", b"ok", b"bad", b"g2"]
    assert sorted(map(tuple, send.calls[2:])) == [(b"g1",), (b"g2",), (b"ok", b"bad")]


async def test_a_cancelled_caller_is_left_out_of_the_batch():
    send = FakeSend()
    batcher = AppendBatcher(send)
    first = asyncio.ensure_future(batcher.append([b"first"]))
    await _settle_loop()
    cancelled = asyncio.ensure_future(batcher.append([b"gone"]))
    kept = asyncio.ensure_future(batcher.append([b"kept"]))
    await _settle_loop()
    cancelled.cancel()
    send.release()
    await first
    assert await kept == [1001]
    assert send.calls == [[b"first"], [b"kept"]]


async def test_batches_respect_the_entry_and_byte_limits_but_an_append_is_never_split():
    send = FakeSend()
    batcher = AppendBatcher(send, max_entries=3, max_bytes=100)
    first = asyncio.ensure_future(batcher.append([b"first"]))
    await _settle_loop()
    waiting = [
        asyncio.ensure_future(batcher.append(entries))
        for entries in ([b"a", b"b"], [b"c", b"d"], [b"e"], [b"x" * 150], [b"f"])
    ]
    await _settle_loop()
    send.release()
    await asyncio.gather(first, *waiting)
    assert send.calls[1:] == [[b"a", b"b"], [b"c", b"d", b"e"], [b"x" * 150], [b"f"]]


async def test_with_enough_callers_a_batch_waits_for_more_appends_before_it_leaves():
    send = FakeSend()
    batcher = AppendBatcher(send, gather_s=0.5, gather_min_callers=3)
    first = asyncio.ensure_future(batcher.append([b"first"]))  # alone: sent at once
    await _settle_loop()
    assert send.calls == [[b"first"]]
    early = [asyncio.ensure_future(batcher.append([f"early {i}".encode()])) for i in range(3)]
    await _settle_loop()
    send.release()
    await first
    await _settle_loop()
    # Without the gathering, the early appends would have left together as soon as `first` was answered.
    assert len(send.calls) == 1
    late = asyncio.ensure_future(batcher.append([b"late"]))
    assert await asyncio.gather(*early, late) == [[1001], [1002], [1003], [1004]]
    assert send.calls[1:] == [[b"early 0", b"early 1", b"early 2", b"late"]]


async def test_a_caller_alone_does_not_wait_for_the_gathering():
    batcher = AppendBatcher(FakeSend(hold=False), gather_s=60.0, gather_min_callers=2)
    for i in range(3):  # a 60 s wait would miss the 5 s
        assert await asyncio.wait_for(batcher.append([b"x"]), 5) == [1000 + i]


async def test_an_empty_append_is_refused():
    with pytest.raises(InvalidArgument):
        await AppendBatcher(FakeSend(hold=False)).append([])


# --- through StoreService -------------------------------------------------------------------------


def put(text: str) -> mutation_pb2.EntityMutation:
    packed = any_pb2.Any()
    packed.Pack(test_pb2.TestMessage(string1=text))
    return mutation_pb2.EntityMutation(put_trait=mutation_pb2.PutTraitMutation(trait=entity_pb2.Trait(message=packed)))


class SlowChain:
    """ChainLog.Append taking a little while, as a real one (disk sync), so concurrent requests pile
    up; appended entries reach the index as the tail would deliver them."""

    def __init__(self) -> None:
        self.appends: list[list[bytes]] = []
        self.next_id = FIRST_ID
        self.fail: grpc.StatusCode | None = None
        self.on_append = None  # (ids, entries) -> None, set by the fixture

    async def Append(self, request: chain_pb2.AppendRequest, timeout: float | None = None) -> chain_pb2.AppendResponse:
        await asyncio.sleep(0.02)
        if self.fail is not None:
            raise grpc.aio.AioRpcError(self.fail, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        entries = list(request.entries)
        self.appends.append(entries)
        ids = []
        for _ in entries:
            self.next_id += 1_000_000
            ids.append(self.next_id)
        if self.on_append is not None:
            asyncio.get_running_loop().call_soon(self.on_append, ids, entries)
        return chain_pb2.AppendResponse(operation_ids=ids)


@pytest.fixture
async def slow_env(tmp_path):
    payloads = PayloadStore(tmp_path / "payloads")
    registry = TraitRegistry()
    index = EntityIndex(tmp_path, registry, EntityIndexSettings(chain_index_deferred_interval_secs=None), payloads, KEY)
    index.start_replay()
    index.apply_events([CaughtUpEvent(0, 0)])
    chain = SlowChain()
    service = StoreService(index, chain, KEY, registry, ThreadPoolExecutor(2))  # type: ignore[arg-type]

    def deliver(ids: list[int], entries: list[bytes]) -> None:
        update = index.apply_events([PendingEvent(ChainEntry(i, e)) for i, e in zip(ids, entries, strict=True)])
        service.on_update(update)

    chain.on_append = deliver
    yield service, chain, index
    await service.watches.close()


async def test_concurrent_mutations_share_appends_and_each_gets_its_own_ids_and_entities(slow_env):
    service, chain, _ = slow_env
    requests = [
        mutation_pb2.MutationRequest(mutations=[put(f"text {i}"), put(f"more {i}")], return_entities=True)
        for i in range(40)
    ]
    results = await asyncio.gather(*(service.mutate(r) for r in requests))
    assert len(chain.appends) < len(requests)  # batched
    all_ids = [op for result in results for op in result.operation_ids]
    assert len(set(all_ids)) == 80
    for i, result in enumerate(results):
        assert len(result.operation_ids) == 2
        # Each request's ids are its own mutations, in order.
        texts = [
            mutation_pb2.EntityMutation.FromString(open_sealed(KEY, _entry_of(chain, op))).put_trait.trait
            for op in result.operation_ids
        ]
        assert [_text(t) for t in texts] == [f"text {i}", f"more {i}"]
        entity_texts = sorted(_text(t) for e in result.entities for t in e.traits)
        assert entity_texts == sorted([f"text {i}", f"more {i}"])


async def test_a_chain_down_fails_every_request_of_the_batch_with_unavailable(slow_env):
    service, chain, _ = slow_env
    chain.fail = grpc.StatusCode.UNAVAILABLE
    results = await asyncio.gather(
        *(service.mutate(mutation_pb2.MutationRequest(mutations=[put(f"t{i}")])) for i in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, Unavailable) for r in results), results


async def test_a_request_with_one_invalid_mutation_writes_nothing_while_others_are_written(slow_env):
    service, chain, _ = slow_env
    bad = mutation_pb2.MutationRequest(mutations=[put("fine"), mutation_pb2.EntityMutation(entity_id="e")])
    good = [mutation_pb2.MutationRequest(mutations=[put(f"good {i}")]) for i in range(5)]
    results = await asyncio.gather(
        service.mutate(good[0]), service.mutate(bad), *(service.mutate(r) for r in good[1:]), return_exceptions=True
    )
    assert isinstance(results[1], InvalidArgument)
    written = [mutation_pb2.EntityMutation.FromString(open_sealed(KEY, e)) for a in chain.appends for e in a]
    assert sorted(_text(m.put_trait.trait) for m in written) == [f"good {i}" for i in range(5)]


def _entry_of(chain: SlowChain, operation_id: int) -> bytes:
    flat = [entry for append in chain.appends for entry in append]
    return flat[(operation_id - FIRST_ID) // 1_000_000 - 1]


def _text(trait: entity_pb2.Trait) -> str:
    message = test_pb2.TestMessage()
    trait.message.Unpack(message)
    return message.string1
