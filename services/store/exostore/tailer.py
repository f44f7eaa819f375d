"""The chain tail: keeps the entity index in step with the node's chain service (ARCHITECTURE
"store replicas tail the chain").

One loop, for as long as the store runs:

1. check the resume point: the block the chain index was built up to must still be the chain's
   block at that offset (`GetBlocks` header hash). If the chain does not have it yet (its node is
   catching up after being wiped) wait; if it has another block there, rebuild the chain index;
2. `EntityIndex.start_replay()` gives the `SubscribeRequest` (blocks after the chain-indexed one,
   every pending operation) and starts a new pending index;
3. read the stream: a reader task queues events (bounded), the indexing loop takes them in batches
   of up to `batch_size` (SPEC `chain_events_batch_size`) and applies each batch on the indexing
   thread, then hands the `IndexUpdate` to `on_update` (mutation tracker, watched queries) on the
   event loop. While events keep coming, batches are at least `min_batch_interval_s` apart unless a
   full one waits (each is a pending-index commit, costly whatever its size), and
   `busy_batch_interval_s` apart after a batch of `busy_batch_entries` operations or more (heavy
   writes: fewer, larger segments to merge); after a quiet spell an event is applied at once;
4. a `StreamDiscontinuity` resubscribes at once; a failed stream (the chain service restarted,
   UNAVAILABLE) resubscribes after a backoff (0.1 s doubling to 5 s, reset once events flow);
   `FullReindexNeeded` resets the chain index first.

Entries are decrypted by the index with the cell data key; one that does not decrypt or decode is
logged and skipped (`EntityIndex._decode`).

Deferred chain indexing: when `chain_index_deferred_interval_secs` is set, a timer asks the index
every interval whether indexing is due (`deferred_indexing_due`); then `start_chain_indexing` prepares
a round on the indexing thread and commits it on the index's committer thread, so that event batches
go on meanwhile, and `finish_chain_indexing` ends it on the indexing thread once committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

import grpc
import grpc.aio

from exocommon.grpc_util import DEFAULT_DEADLINE_S
from exocore.chain.v1 import chain_pb2, chain_pb2_grpc
from exostore.entity_index import EntityIndex, FullReindexNeeded, IndexUpdate

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH_SIZE = 50
# A batch also stops once it holds this many operations to index (pending ones, and those of blocks that
# the index lacks; an event of a 500-entry append carries 500): when the indexing thread fell behind a burst,
# 50 events were up to 50,000 operations, applied in ~5 s during which none of them was searchable. The
# operations of a block that came as pending ones first (most) cost next to nothing: counted, they cut a
# burst of 100,000 notes into ten ~10,000-document commits; uncounted, nine of up to 20,000 (fewer, larger
# segments for tantivy to merge).
BATCH_OPERATIONS = 20_000
# While events keep coming, a batch is applied at most this often (less when a full batch waits): each
# applied batch is a commit of the pending index, whose fixed cost (milliseconds of tantivy CPU, most of
# it merging the segment it adds) dwarfs a mutation's. A batch after a quiet spell goes at once.
MIN_BATCH_INTERVAL_S = 0.02
# Under heavy writes (the last batch carried BUSY_BATCH_ENTRIES operations or more), batches are further
# apart: tantivy merges the small segments of frequent commits over and over, and under 32 clients' single
# mutations (bench-gateway, ~30 operations a batch) merging cost the store ~300 µs per mutation; with 60 ms
# its CPU per mutation went 674-716 -> 397-447 µs. Sparse writes (watches, a user's edits) are not delayed.
BUSY_BATCH_INTERVAL_S = 0.06
BUSY_BATCH_ENTRIES = 16
QUEUE_SIZE = 1_000
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0

_END = object()


class _ChainBehind(Exception):
    """The chain does not have the block the chain index was built up to (yet)."""


class ChainTailer:
    def __init__(
        self,
        stub: chain_pb2_grpc.ChainLogStub,
        index: EntityIndex,
        executor: Executor,
        on_update: Callable[[IndexUpdate], None],
        *,
        batch_size: int = BATCH_SIZE,
        batch_operations: int = BATCH_OPERATIONS,
        min_batch_interval_s: float = MIN_BATCH_INTERVAL_S,
        busy_batch_interval_s: float = BUSY_BATCH_INTERVAL_S,
        busy_batch_entries: int = BUSY_BATCH_ENTRIES,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self._stub = stub
        self._index = index
        self._executor = executor
        self._on_update = on_update
        self._batch_size = batch_size
        self._batch_operations = batch_operations
        self._min_batch_interval_s = min_batch_interval_s
        self._busy_batch_interval_s = max(busy_batch_interval_s, min_batch_interval_s)
        self._busy_batch_entries = busy_batch_entries
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self.caught_up = asyncio.Event()
        self.connected = False
        self.subscriptions = 0

    async def _on_indexer(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- main loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = self._backoff_initial_s
        while True:
            try:
                await self._check_resume_point()
                request = await self._on_indexer(self._index.start_replay)
                self.subscriptions += 1
                progressed = await self._follow(request)
                if progressed:
                    backoff = self._backoff_initial_s
                continue  # discontinuity: resubscribe at once
            except FullReindexNeeded as exc:
                log.error("%s; rebuilding the chain index from the chain", exc)
                await self._on_indexer(self._index.reset_chain_index)
                continue
            except _ChainBehind as exc:
                log.info("%s; waiting for the chain service to catch up", exc)
            except grpc.aio.AioRpcError as exc:
                if self.connected or backoff == self._backoff_initial_s:
                    log.warning(
                        "chain subscription failed (%s: %s); retrying", exc.code().name, exc.details()
                    )
                self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max_s)

    async def _check_resume_point(self) -> None:
        indexed = self._index.chain_indexed
        if indexed is None:
            return
        response = await self._stub.GetBlocks(
            chain_pb2.GetBlocksRequest(from_offset=indexed.offset, max_count=1, headers_only=True),
            timeout=DEFAULT_DEADLINE_S,
        )
        headers = list(response.headers)
        if headers and headers[0].offset == indexed.offset:
            if headers[0].block_hash.hex() != indexed.hash:
                raise FullReindexNeeded(
                    f"the chain's block at offset {indexed.offset} is not the one the chain index was built from"
                )
            return
        status = await self._stub.Status(chain_pb2.StatusRequest(), timeout=DEFAULT_DEADLINE_S)
        if status.next_offset <= indexed.offset:
            raise _ChainBehind(
                f"the chain ends before offset {indexed.offset}, up to which the chain index was built"
            )
        raise FullReindexNeeded(f"the chain has no block at offset {indexed.offset}, where the chain index stops")

    async def _follow(self, request: chain_pb2.SubscribeRequest) -> bool:
        """Reads one subscription until it ends; True if any event came."""
        call = self._stub.Subscribe(request, timeout=None)
        queue: asyncio.Queue[object] = asyncio.Queue(QUEUE_SIZE)
        reader = asyncio.create_task(self._read(call, queue), name="chain-reader")
        progressed = False
        loop = asyncio.get_running_loop()
        last_applied = -self._busy_batch_interval_s
        interval = self._min_batch_interval_s  # after the last batch (see BUSY_BATCH_INTERVAL_S)
        credit = 0  # see `_to_index`
        try:
            while True:
                first = await queue.get()
                if isinstance(first, BaseException):
                    raise first
                if first is _END:
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "stream ended"
                    )
                wait = last_applied + interval - loop.time()
                if wait > 0 and queue.qsize() + 1 < self._batch_size:
                    await asyncio.sleep(wait)  # let the batch fill (see MIN_BATCH_INTERVAL_S)
                batch = [first]
                operations, credit = _to_index(first, credit)  # type: ignore[arg-type]
                ended: object | None = None
                while len(batch) < self._batch_size and operations < self._batch_operations and not queue.empty():
                    item = queue.get_nowait()
                    if item is _END or isinstance(item, BaseException):
                        ended = item
                        break
                    batch.append(item)
                    count, credit = _to_index(item, credit)  # type: ignore[arg-type]
                    operations += count
                discontinuity = any(e.WhichOneof("event") == "discontinuity" for e in batch)  # type: ignore[attr-defined]
                events = [e for e in batch if e.WhichOneof("event") != "discontinuity"]  # type: ignore[attr-defined]
                if events:
                    if not self.connected:
                        log.info("following the chain (subscription %d)", self.subscriptions)
                    self.connected = True
                    progressed = True
                    last_applied = loop.time()
                    busy = operations >= self._busy_batch_entries  # (with a discontinuity, unused: we resubscribe)
                    interval = self._busy_batch_interval_s if busy else self._min_batch_interval_s
                    update = await self._on_indexer(self._index.apply_chain_events, events)
                    if update.caught_up:
                        self.caught_up.set()
                    self._on_update(update)
                if discontinuity:
                    log.warning("the chain stream had a discontinuity (this store fell behind); resubscribing")
                    return progressed
                if ended is not None:
                    if isinstance(ended, BaseException):
                        raise ended
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "stream ended"
                    )
        finally:
            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    @staticmethod
    async def _read(call: grpc.aio.UnaryStreamCall, queue: asyncio.Queue[object]) -> None:
        try:
            async for event in call:
                await queue.put(event)
            await queue.put(_END)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)

    # -- deferred chain indexing ----------------------------------------------------------------

    async def run_deferred_indexing(self) -> None:
        interval = self._index.settings.chain_index_deferred_interval_secs
        if interval is None:
            return
        backlog = False
        while True:
            if not backlog:
                await asyncio.sleep(interval)
            backlog = False
            if self._index.deferred_indexing_due():
                # The commit runs on the index's own thread: the indexing thread keeps the pending index going.
                future = await self._on_indexer(self._index.start_chain_indexing)
                if future is not None:
                    await asyncio.wait([asyncio.wrap_future(future)])
                update = await self._on_indexer(self._index.finish_chain_indexing)
                if update.changed or update.indexed:
                    self._on_update(update)
                # A round takes at most CHAIN_ROUND_MAX_OPERATIONS: the next goes at once (the indexing
                # thread has applied the events queued meanwhile).
                backlog = future is not None and await self._on_indexer(lambda: self._index.chain_backlog)


def _to_index(event: chain_pb2.ChainEvent, credit: int) -> tuple[int, int]:
    """About how many operations applying `event` indexes, and the credit after it: the pending operations
    of the subscription that no block has matched yet. A block's operations came as pending ones first
    (unless the chain node caught up without them): as many as the credit count for nothing."""
    kind = event.WhichOneof("event")
    if kind == "pending_batch":
        count = len(event.pending_batch.operations)
        return count, credit + count
    if kind == "pending":
        return 1, credit + 1
    if kind == "block":
        count = len(event.block.operations)
        return max(0, count - credit), max(0, credit - count)
    return 1, credit


__all__ = ["ChainTailer"]
