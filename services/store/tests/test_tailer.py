"""The chain tail's batching (`ChainTailer._follow`) against a fake Subscribe stream and a recording
index: an event after a quiet spell is applied at once, and events that keep coming are gathered into
few batches (each one is a commit of the pending index) without any being lost or reordered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from exocore.chain.v1 import chain_pb2
from exostore.tailer import ChainTailer


def pending(number: int) -> chain_pb2.ChainEvent:
    # The recording index only needs to tell events apart: the number rides in the signature bytes.
    signed = chain_pb2.SignedOperation(signature=number.to_bytes(4, "big"))
    return chain_pb2.ChainEvent(pending=chain_pb2.PendingOperation(operation=signed))


class FakeStub:
    """Subscribe yields `events` `gap_s` apart, then ends."""

    def __init__(self, events: list[chain_pb2.ChainEvent], gap_s: float) -> None:
        self.events = events
        self.gap_s = gap_s

    def Subscribe(self, request: object, timeout: float | None = None) -> AsyncIterator[chain_pb2.ChainEvent]:
        stub = self

        class Call:
            def __aiter__(self) -> AsyncIterator[chain_pb2.ChainEvent]:
                return stub._stream()

            def cancel(self) -> None:
                pass

        return Call()  # type: ignore[return-value]

    async def _stream(self) -> AsyncIterator[chain_pb2.ChainEvent]:
        for event in self.events:
            await asyncio.sleep(self.gap_s)
            yield event


class RecordingIndex:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def apply_chain_events(self, events: list[chain_pb2.ChainEvent]) -> SimpleNamespace:
        self.batches.append([int.from_bytes(e.pending.operation.signature, "big") for e in events])
        return SimpleNamespace(caught_up=False)


def pending_batch(size: int) -> chain_pb2.ChainEvent:
    operations = [chain_pb2.SignedOperation() for _ in range(size)]
    return chain_pb2.ChainEvent(pending_batch=chain_pb2.PendingOperations(operations=operations))


async def follow(
    events: list[chain_pb2.ChainEvent],
    gap_s: float,
    interval_s: float,
    busy_interval_s: float = 0.0,
    busy_entries: int = 16,
    batch_operations: int = 20_000,
    index: RecordingIndex | None = None,
) -> list[list[int]]:
    index = index if index is not None else RecordingIndex()
    with ThreadPoolExecutor(1) as executor:
        tailer = ChainTailer(
            FakeStub(events, gap_s),  # type: ignore[arg-type]
            index,  # type: ignore[arg-type]
            executor,
            lambda update: None,
            min_batch_interval_s=interval_s,
            busy_batch_interval_s=busy_interval_s,
            busy_batch_entries=busy_entries,
            batch_operations=batch_operations,
        )
        with pytest.raises(grpc.aio.AioRpcError):  # the fake stream ends: UNAVAILABLE, as a real one
            await tailer._follow(chain_pb2.SubscribeRequest())
    return index.batches


async def test_events_that_keep_coming_are_applied_in_few_batches_in_order():
    ids = list(range(1, 31))
    batches = await follow([pending(i) for i in ids], gap_s=0.002, interval_s=0.3)
    assert [i for batch in batches for i in batch] == ids
    assert batches[0] == [1]  # the first one after a quiet spell at once
    assert len(batches) <= 3  # 30 events within ~0.1 s: the rest waited for the interval together


async def test_without_an_interval_each_event_can_be_its_own_batch():
    ids = list(range(1, 11))
    batches = await follow([pending(i) for i in ids], gap_s=0.05, interval_s=0.0)
    assert [i for batch in batches for i in batch] == ids
    assert len(batches) >= 5  # 50 ms apart and nothing holding them: (nearly) one batch each


async def test_after_a_busy_batch_the_next_waits_longer():
    # a batch of 5 operations (>= 3): what follows within the busy interval is gathered into one batch
    ids = list(range(1, 11))
    batches = await follow([pending_batch(5), *(pending(i) for i in ids)], gap_s=0.01, interval_s=0.0,
                           busy_interval_s=1.0, busy_entries=3)
    assert [i for batch in batches for i in batch] == [0, *ids]
    assert len(batches) == 2 and batches[0][0] == 0  # the busy batch at once, the rest gathered


async def test_sparse_writes_are_not_held_by_the_busy_interval():
    ids = list(range(1, 11))
    batches = await follow([pending(i) for i in ids], gap_s=0.03, interval_s=0.0, busy_interval_s=1.0,
                           busy_entries=4)
    assert [i for batch in batches for i in batch] == ids
    assert len(batches) >= 5  # one operation a batch is no busy batch: (nearly) one batch each


class SizeIndex(RecordingIndex):
    """Records the operations of each event of a batch."""

    def apply_chain_events(self, events: list[chain_pb2.ChainEvent]) -> SimpleNamespace:
        self.batches.append([len(e.pending_batch.operations) or len(e.block.operations) for e in events])
        return SimpleNamespace(caught_up=False)


@pytest.mark.parametrize("cap", [1000, 100_000])
async def test_a_batch_stops_at_its_operation_cap(cap: int):
    # 12 events of 400 operations arrive while the first batch's interval holds the rest back
    batches = await follow([pending_batch(400) for _ in range(12)], gap_s=0.001, interval_s=0.3,
                           batch_operations=cap, index=SizeIndex())
    assert sum(map(len, batches)) == 12  # nothing lost
    assert batches[0] == [400]  # the first at once
    if cap == 1000:
        # a batch takes events until it holds 1,000 operations or more: 400 + 400 + 400
        assert [len(b) for b in batches[1:]] == [3, 3, 3, 2]
    else:
        assert [len(b) for b in batches[1:]] == [11]


def block_of(count: int) -> chain_pb2.ChainEvent:
    operations = [chain_pb2.SignedOperation() for _ in range(count)]
    return chain_pb2.ChainEvent(block=chain_pb2.Block(operations=operations))


async def test_the_cap_counts_the_operations_of_blocks_beyond_the_pending_ones_received():
    # A block's operations came as pending ones first: 401 pending, then a block of 401 counts for nothing,
    # and the next block of 200 (no pending ones left to match) for 200: 400 + 200 >= 500 ends the batch.
    events = [pending_batch(1), pending_batch(200), pending_batch(200), block_of(401), *(block_of(200) for _ in "abc")]
    batches = await follow(events, gap_s=0.001, interval_s=0.3, batch_operations=500, index=SizeIndex())
    assert batches == [[1], [200, 200, 401, 200], [200, 200]]


class BacklogIndex:
    """Deferred indexing with `rounds` capped rounds waiting; records what the timer loop does."""

    def __init__(self, rounds: int) -> None:
        self.settings = SimpleNamespace(chain_index_deferred_interval_secs=3600)
        self.left = rounds
        self.log: list[str] = []

    def deferred_indexing_due(self) -> bool:
        return True

    def start_chain_indexing(self) -> Future[int] | None:
        if not self.left:
            return None
        self.left -= 1
        self.log.append("round")
        future: Future[int] = Future()
        future.set_result(1)
        return future

    def finish_chain_indexing(self) -> SimpleNamespace:
        return SimpleNamespace(changed=False, indexed=[])

    @property
    def chain_backlog(self) -> bool:
        return self.left > 0


def test_deferred_rounds_of_a_backlog_follow_one_another(monkeypatch):
    index = BacklogIndex(rounds=3)
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        index.log.append("sleep")
        if index.log.count("sleep") > 1:
            await real_sleep(3600)  # the second interval: the test ends here

    async def run() -> None:
        with ThreadPoolExecutor(1) as executor:
            tailer = ChainTailer(None, index, executor, lambda update: None)  # type: ignore[arg-type]
            monkeypatch.setattr("exostore.tailer.asyncio.sleep", sleep)
            task = asyncio.create_task(tailer.run_deferred_indexing())
            while index.log.count("sleep") < 2:
                await real_sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    # one interval, then the three rounds back to back, then (backlog gone) the next interval
    assert index.log == ["sleep", "round", "round", "round", "sleep"]
