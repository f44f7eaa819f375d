"""The store service: `exocore.store.v1.EntityStore` over the entity index (SPEC 3.2, 3.7-3.9).

* **Mutate**: the whole request is validated and gets its ids (`mutations.prepare_mutations`);
  each `EntityMutation` is sealed with the cell data key and all of them go to the chain in **one**
  `ChainLog.Append` (durable on the chain node when it answers), shared with the concurrent
  requests' mutations (group commit: `mutations.AppendBatcher`). `wait_indexed` / `return_entities`
  then wait until the pending index has every operation (`INDEX_TIMEOUT_S`, else
  DEADLINE_EXCEEDED naming the written operation ids); `wait_committed` waits until they are in a
  committed block (block events of the tail, and a `GetOperations` poll in case the tail lags);
  `return_entities` runs an `operations` query on the ids.
* **Query**: `EntitySearcher` on the query pool (`query_parallelism` threads); a non-programmatic
  query delays deferred chain indexing.
* **WatchQuery**: `watches.WatchRegistry` (first result at once, then on hash changes, routed).
* **Garbage collection**: every `run_interval_secs`, once the chain index holds a block, the
  flagged entities' `DeleteOperations` mutations go through the same path as a client's (sealed,
  appended), so every replica prunes identically.

All index work happens on two executors: one indexing thread (writes, owned by the tailer) and
the query pool (reads). The event loop only routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor

import grpc
import grpc.aio

from exocommon.errors import DeadlineExceeded, ExocoreError, Unavailable
from exocommon.grpc_util import DEFAULT_DEADLINE_S, exception_from_rpc_error, exception_from_status
from exocommon.grpc_util.link import CHAIN_APPEND_METHOD as APPEND_METHOD
from exocommon.grpc_util.link import LinkBroken, LinkCallError, LinkClient
from exocommon.sealed import seal
from exocore.chain.v1 import chain_pb2, chain_pb2_grpc
from exocore.store import mutation_pb2, query_pb2
from exocore.store.v1 import entity_store_pb2, entity_store_pb2_grpc
from exostore.entity_index import EntityIndex, IndexUpdate
from exostore.gc import GarbageCollector
from exostore.mutations import AppendBatcher, OperationTracker, prepare_mutations
from exostore.registry import TraitRegistry
from exostore.watches import WatchRegistry

log = logging.getLogger(__name__)

INDEX_TIMEOUT_S = 5.0  # SPEC mutation_tracker_timeout
COMMIT_TIMEOUT_S = 30.0  # wait_committed, unless the client's deadline is shorter
COMMIT_POLL_S = 0.5
APPEND_DEADLINE_S = DEFAULT_DEADLINE_S
# Under load (8+ Mutate calls appending), an Append waits this long for more entries (`AppendBatcher`).
# Measured with 32 clients: ~4 -> ~7 entries an Append, chain CPU per mutation -10%; few callers never wait.
APPEND_GATHER_S = 0.001
# An Append that failed so: the chain service is down or stuck, the store's request is not at fault.
_CHAIN_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
ERROR_IDS_SHOWN = 10
INLINE_QUERY_MAX_COUNT = 50  # Query pages up to this many entities run on the event loop (0: default 10)

SERVICE_NAME = entity_store_pb2.DESCRIPTOR.services_by_name["EntityStore"].full_name


class StoreService:
    def __init__(
        self,
        index: EntityIndex,
        chain: chain_pb2_grpc.ChainLogStub,
        data_key: bytes,
        registry: TraitRegistry,
        query_executor: Executor,
        *,
        query_parallelism: int = 4,
        gc: GarbageCollector | None = None,
        index_timeout_s: float = INDEX_TIMEOUT_S,
        chain_link: LinkClient | None = None,
        append_gather_s: float = APPEND_GATHER_S,
    ) -> None:
        self.index = index
        self.chain = chain
        self.chain_link = chain_link
        self.registry = registry
        self._key = data_key
        self._queries = query_executor
        self.gc = gc
        self.index_timeout_s = index_timeout_s
        self.tracker = OperationTracker()
        # Concurrent Mutate calls share one chain Append (group commit, see `AppendBatcher`).
        self.appends = AppendBatcher(self._append_entries, gather_s=append_gather_s)
        self.watches = WatchRegistry(self._search, registry, query_parallelism, mapping_of=index.schema.mapping)

    # -- index updates (from the tailer, on the event loop) ---------------------------------------

    def on_update(self, update: IndexUpdate) -> None:
        if update.committed:
            self.tracker.mark_committed(update.committed)
        if update.indexed:
            self.tracker.mark_indexed(update.indexed)
        if update.changed:
            self.watches.on_update(update)

    # -- queries --------------------------------------------------------------------------------

    async def _search(self, query: query_pb2.EntityQuery) -> query_pb2.EntityResults:
        return await asyncio.get_running_loop().run_in_executor(self._queries, self.index.search, query)

    async def query(self, query: query_pb2.EntityQuery) -> query_pb2.EntityResults:
        self.index.note_query(query.programmatic)
        if query.paging.count <= INLINE_QUERY_MAX_COUNT:
            # A page of a few entities takes about a millisecond, all of it holding the GIL: handing it
            # to the query pool and back costs two thread switches (a third of an echo round trip)
            # without letting anything else run meanwhile.
            return self.index.search(query)
        return await self._search(query)

    def watch(self, query: query_pb2.EntityQuery) -> AsyncIterator[query_pb2.EntityResults]:
        self.index.note_query(query.programmatic)
        return self.watches.stream(query)

    # -- mutations ------------------------------------------------------------------------------

    async def mutate(
        self, request: mutation_pb2.MutationRequest, time_remaining: float | None = None
    ) -> mutation_pb2.MutationResult:
        mutations = prepare_mutations(request, self.registry)
        if not mutations:
            return mutation_pb2.MutationResult()
        operation_ids = await self.append(mutations)
        result = mutation_pb2.MutationResult(operation_ids=operation_ids)
        if request.wait_indexed or request.return_entities:
            missing = await self.tracker.wait_indexed(operation_ids, self.index_timeout_s)
            if missing:
                raise DeadlineExceeded(
                    f"operations {_ids_text(operation_ids)} were written, but {len(missing)} of them were not "
                    f"indexed after {self.index_timeout_s:g} s"
                )
        if request.wait_committed:
            timeout = COMMIT_TIMEOUT_S if time_remaining is None else max(0.1, min(COMMIT_TIMEOUT_S, time_remaining))
            await self._wait_committed(operation_ids, timeout)
        if request.return_entities:
            query = query_pb2.EntityQuery(
                operations=query_pb2.OperationsPredicate(operation_ids=operation_ids),
                paging=query_pb2.Paging(count=len(operation_ids)),
                programmatic=True,
            )
            results = await self._search(query)
            seen: set[str] = set()
            for entity_result in results.entities:
                if entity_result.entity.id not in seen:
                    seen.add(entity_result.entity.id)
                    result.entities.append(entity_result.entity)
        return result

    async def append(self, mutations: Sequence[mutation_pb2.EntityMutation]) -> list[int]:
        """Seals prepared mutations and appends them together (in one `Append`, maybe with other
        requests' mutations); their operation ids."""
        key = self._key
        payloads = [m.SerializeToString() for m in mutations]
        entries = [seal(key, p) for p in payloads]
        self.index.remember_appended(entries, payloads, mutations)
        return await self.appends.append(entries)

    async def _append_entries(self, entries: list[bytes]) -> list[int]:
        link = self.chain_link
        if link is not None and not link.unsupported:
            return await self._append_over_link(link, entries)
        try:
            response = await self.chain.Append(chain_pb2.AppendRequest(entries=entries), timeout=APPEND_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _CHAIN_GONE:
                raise Unavailable(f"the chain service is not available: {exc.details()}") from None
            raise exception_from_rpc_error(exc) from None
        return list(response.operation_ids)

    async def _append_over_link(self, link: LinkClient, entries: list[bytes]) -> list[int]:
        """`ChainLog.Append` over the chain node's `ChainLogLink`: one stream message instead of a call
        (measured, a 3-entry Append: chain 740 -> 450 µs of CPU, store 130 -> 57). A chain without the
        link (UNIMPLEMENTED, so nothing ran): calls from then on."""
        request = chain_pb2.AppendRequest(entries=entries).SerializeToString()
        try:
            body = await link.call(APPEND_METHOD, request, APPEND_DEADLINE_S)
        except LinkBroken as exc:
            if exc.unsupported:
                log.info("the chain service has no ChainLogLink (an older version): Append calls instead")
                return await self._append_entries(entries)
            raise Unavailable(f"the chain service is not available: {exc.details}") from None
        except LinkCallError as exc:
            if exc.code in _CHAIN_GONE:
                raise Unavailable(f"the chain service is not available: {exc.details}") from None
            raise exception_from_status(exc.code, exc.details) from None
        return list(chain_pb2.AppendResponse.FromString(body).operation_ids)

    async def _wait_committed(self, operation_ids: list[int], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        remaining = set(operation_ids)
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            remaining = await self.tracker.wait_committed(remaining, min(COMMIT_POLL_S, left))
            if not remaining:
                return
            try:  # the tail may lag (replaying, reconnecting): ask the chain
                response = await self.chain.GetOperations(
                    chain_pb2.GetOperationsRequest(operation_ids=sorted(remaining)), timeout=min(5.0, max(left, 0.1))
                )
            except grpc.aio.AioRpcError:
                continue
            committed = [
                chain_pb2.Operation.FromString(op.operation.operation_bytes).operation_id
                for op in response.operations
                if op.status == chain_pb2.OPERATION_STATUS_COMMITTED
            ]
            self.tracker.mark_committed(committed)
            remaining -= set(committed)
            if not remaining:
                return
        raise DeadlineExceeded(
            f"operations {_ids_text(operation_ids)} were written, but {len(remaining)} of them were not "
            f"committed after {timeout:g} s"
        )

    # -- garbage collection ---------------------------------------------------------------------

    async def run_gc(self, interval_s: float) -> None:
        if self.gc is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.collect_garbage()
            except ExocoreError as exc:
                log.warning("garbage collection failed: %s", exc)

    async def collect_garbage(self) -> list[int]:
        """One GC pass; the operation ids of the DeleteOperations mutations written."""
        if self.gc is None or self.index.chain_indexed is None:
            return []
        mutations = await asyncio.get_running_loop().run_in_executor(self._queries, self.gc.collect)
        if not mutations:
            return []
        ids = await self.append(mutations)
        log.info(
            "garbage collection: %d entity(ies), %d operation(s) to delete",
            len(mutations),
            sum(len(m.delete_operations.operation_ids) for m in mutations),
        )
        return ids


def _ids_text(operation_ids: Sequence[int], shown: int = ERROR_IDS_SHOWN) -> str:
    """Operation ids for an error message: the first `shown` (a status message travels in a header, which
    gRPC caps at 8 KiB: a request of 500 mutations listed whole would not even reach the client)."""
    if len(operation_ids) <= shown:
        return str(list(operation_ids))
    return f"[{', '.join(map(str, operation_ids[:shown]))}, ... ({len(operation_ids)} in all)]"


class EntityStoreServicer(entity_store_pb2_grpc.EntityStoreServicer):
    """The gRPC glue: every method forwards to `StoreService`."""

    def __init__(self, service: StoreService) -> None:
        self._service = service

    async def Mutate(
        self, request: mutation_pb2.MutationRequest, context: grpc.aio.ServicerContext
    ) -> mutation_pb2.MutationResult:
        return await self._service.mutate(request, context.time_remaining())

    async def Query(self, request: query_pb2.EntityQuery, context: grpc.aio.ServicerContext) -> query_pb2.EntityResults:
        return await self._service.query(request)

    async def WatchQuery(
        self, request: query_pb2.EntityQuery, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[query_pb2.EntityResults]:
        async for results in self._service.watch(request):
            yield results


def registrations(service: StoreService) -> list[tuple[Callable[..., None], object, str]]:
    return [(entity_store_pb2_grpc.add_EntityStoreServicer_to_server, EntityStoreServicer(service), SERVICE_NAME)]


__all__ = ["SERVICE_NAME", "EntityStoreServicer", "StoreService", "registrations"]
