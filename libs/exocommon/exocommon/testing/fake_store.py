"""An in-memory `exocore.store.v1.EntityStore` for tests of clients and gateways (not a store).

    store = FakeEntityStore("replica-1")
    async with fake_store_server(store) as server:     # a ServiceServer on 127.0.0.1:<free port>
        ...  server.address, store.calls, store.metadata

What it does: `Mutate` applies put-trait, delete-trait and delete-entity mutations to a dict of
entities (ids generated when empty; `TestMutation{success: false}` -> INVALID_ARGUMENT), answering
one operation id per mutation and the entities if asked; `Query` supports `all`, `ids`, `trait`
(by trait type), `match` (substring of a trait's text) and `test` (`success: false` ->
INVALID_ARGUMENT); `WatchQuery` sends the results right away and again whenever they change (by
hash). Every call is recorded in `calls` (method name) and `metadata` (the call's metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from exocommon.grpc_util import ServiceServer
from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exocore.store.v1 import entity_store_pb2_grpc

__all__ = ["FakeEntityStore", "FakeState", "fake_store_server"]

SERVICE = "exocore.store.v1.EntityStore"


class FakeState:
    """The data of a fake store; replicas made with ``shared_with=`` serve the same data."""

    def __init__(self) -> None:
        self.entities: dict[str, entity_pb2.Entity] = {}
        self.operation_ids = itertools.count(1)
        self.ids = itertools.count(1)
        self.changed = asyncio.Event()

    def notify_changed(self) -> None:
        event, self.changed = self.changed, asyncio.Event()
        event.set()


class FakeEntityStore(entity_store_pb2_grpc.EntityStoreServicer):
    def __init__(
        self, name: str = "fake", *, query_delay_s: float = 0.0, shared_with: FakeEntityStore | None = None
    ) -> None:
        self.name = name
        self.query_delay_s = query_delay_s
        self.state = shared_with.state if shared_with is not None else FakeState()
        self.calls: list[str] = []
        self.metadata: list[dict[str, str]] = []
        self.open_streams = 0

    @property
    def entities(self) -> dict[str, entity_pb2.Entity]:
        return self.state.entities

    def _record(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls.append(method)
        self.metadata.append({k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)})

    # --- mutations ------------------------------------------------------------------------------------

    async def Mutate(
        self, request: mutation_pb2.MutationRequest, context: grpc.aio.ServicerContext
    ) -> mutation_pb2.MutationResult:
        self._record("Mutate", context)
        if any(m.WhichOneof("mutation") == "test" and not m.test.success for m in request.mutations):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "test mutation failed")
        result = mutation_pb2.MutationResult()
        touched: list[str] = []
        previous = ""
        for mutation in request.mutations:
            entity_id = mutation.entity_id or (previous if request.common_entity_id and previous else "")
            entity_id = entity_id or f"et{self.name}{next(self.state.ids)}"
            previous = entity_id
            operation_id = next(self.state.operation_ids)
            entity = self.entities.setdefault(entity_id, entity_pb2.Entity(id=entity_id))
            kind = mutation.WhichOneof("mutation")
            if kind == "put_trait":
                trait = entity_pb2.Trait()
                trait.CopyFrom(mutation.put_trait.trait)
                trait.id = trait.id or f"trt{next(self.state.ids)}"
                trait.last_operation_id = operation_id
                kept = [t for t in entity.traits if t.id != trait.id]
                del entity.traits[:]
                entity.traits.extend([*kept, trait])
            elif kind == "delete_trait":
                kept = [t for t in entity.traits if t.id != mutation.delete_trait.trait_id]
                del entity.traits[:]
                entity.traits.extend(kept)
            elif kind == "delete_entity":
                del entity.traits[:]
            entity.last_operation_id = operation_id
            result.operation_ids.append(operation_id)
            touched.append(entity_id)
        if request.return_entities:
            result.entities.extend(self.entities[e] for e in dict.fromkeys(touched))
        self.state.notify_changed()
        return result

    # --- queries --------------------------------------------------------------------------------------

    def _results(self, query: query_pb2.EntityQuery) -> query_pb2.EntityResults:
        kind = query.WhichOneof("predicate")
        entities = [e for e in self.entities.values() if e.traits]
        if kind == "ids":
            entities = [e for e in entities if e.id in set(query.ids.ids)]
        elif kind == "trait":
            name = query.trait.trait_name
            entities = [e for e in entities if any(t.message.type_url.endswith("/" + name) for t in e.traits)]
        elif kind == "match":
            text = query.match.query.encode()
            entities = [e for e in entities if any(text in t.message.value for t in e.traits)]
        if query.paging.count:
            entities = entities[: query.paging.count]
        results = query_pb2.EntityResults(estimated_count=len(entities))
        digest = hashlib.sha256()
        for entity in entities:
            encoded = entity.SerializeToString(deterministic=True)
            digest.update(encoded)
            results.entities.add(
                entity=entity, source=query_pb2.PENDING, hash=int.from_bytes(hashlib.sha256(encoded).digest()[:8])
            )
        results.hash = int.from_bytes(digest.digest()[:8]) or 1
        return results

    async def _check_query(self, query: query_pb2.EntityQuery, context: grpc.aio.ServicerContext) -> None:
        if query.WhichOneof("predicate") == "test" and not query.test.success:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "test predicate failed")

    async def Query(
        self, request: query_pb2.EntityQuery, context: grpc.aio.ServicerContext
    ) -> query_pb2.EntityResults:
        self._record("Query", context)
        await self._check_query(request, context)
        if self.query_delay_s:
            await asyncio.sleep(self.query_delay_s)
        return self._results(request)

    async def WatchQuery(
        self, request: query_pb2.EntityQuery, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[query_pb2.EntityResults]:
        self._record("WatchQuery", context)
        await self._check_query(request, context)
        self.open_streams += 1
        try:
            last_hash = None
            while True:
                changed = self.state.changed
                results = self._results(request)
                if results.hash != last_hash:
                    last_hash = results.hash
                    yield results
                await changed.wait()
        finally:
            self.open_streams -= 1


@contextlib.asynccontextmanager
async def fake_store_server(
    store: FakeEntityStore, bind: str = "127.0.0.1:0", **kwargs: Any
) -> AsyncIterator[ServiceServer]:
    """A started `ServiceServer` (health SERVING, reflection) serving `store`; stopped on exit."""
    kwargs.setdefault("drain_delay_s", 0)
    kwargs.setdefault("grace_s", 0.5)
    server = ServiceServer(
        f"fake-store-{store.name}",
        bind,
        [(entity_store_pb2_grpc.add_EntityStoreServicer_to_server, store, SERVICE)],
        **kwargs,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
