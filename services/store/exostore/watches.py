"""Watched queries (SPEC 3.8) with change routing.

A watch sends its first result at once, then a new result only when the result hash changes. A
failing execution ends the stream with the error; closing the stream unregisters the watch.

Routing: re-running every watch on every write would make 1,000 idle watches slow every write down.
A change (`IndexChange`: operation id, entity id, put trait type) can only alter a watch's page if

* its entity is in the watch's last result (its hash, traits or deletion changed), or
* its operation's document could match the watch's predicate: a put of the trait type of a `trait`
  predicate, an entity listed by an `ids` predicate, an operation listed by an `operations`
  predicate; `match`, `query_string`, `reference` and `all` predicates (and `boolean` ones without a
  positive clause) can match anything and are re-run on every change.
* narrower for a `trait` predicate whose trait query is an equality on indexed exact strings
  (`field{field, string}`, operator EQUAL, not ordered by score): only a put of that type whose field
  holds that value can match, so such watches are found by (type, field, value): the put's message is
  decoded once per change, and only when a watch routes on its type's fields. 1,000 watches of
  "notes in folder N" do not all re-run on every note written.

A document that does not match cannot enter a page, and removing or changing an entity outside the
page cannot change the page (entities rank by their own best matching mutation). So each watch
registers its routes (trait types, ids, operation ids, the entity ids of its last result, or
"everything"), and a batch of changes re-runs only the watches found through those maps. A
replaced pending index (`IndexUpdate.reset`) re-runs every watch.

Executions are coalesced (a watch already running is re-run once after, whatever the number of
changes in between) and bounded (`parallelism` at once). Only the newest result waits to be sent:
a slow client gets the latest state, not a backlog.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from exocommon.errors import ExocoreError, Internal
from exocore.store import query_pb2
from exostore.entity_index import IndexChange, IndexUpdate
from exostore.registry import TraitRegistry
from exostore.schema import MappedField, TraitMapping, ValueKind, field_values

MappingOf = Callable[[str], TraitMapping | None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """What a watch's predicate can match (besides the entities of its last result)."""

    everything: bool = False
    trait_types: frozenset[str] = frozenset()
    entity_ids: frozenset[str] = frozenset()
    operation_ids: frozenset[int] = frozenset()
    # (trait type, mapped field path, value): puts of that type whose (exact string) field holds the value
    field_values: frozenset[tuple[str, str, str]] = frozenset()

    def union(self, other: Route) -> Route:
        return Route(
            self.everything or other.everything,
            self.trait_types | other.trait_types,
            self.entity_ids | other.entity_ids,
            self.operation_ids | other.operation_ids,
            self.field_values | other.field_values,
        )


EVERYTHING = Route(everything=True)


def _field_route(trait_type: str, predicate: query_pb2.TraitPredicate, mapping_of: MappingOf | None) -> Route | None:
    """The (type, field, value) route of an exact string equality trait query; None if it is not one."""
    if mapping_of is None or not predicate.HasField("query") or predicate.query.WhichOneof("predicate") != "field":
        return None
    field = predicate.query.field
    if field.WhichOneof("value") != "string" or field.operator != query_pb2.TraitFieldPredicate.EQUAL:
        return None
    mapping = mapping_of(trait_type)
    if mapping is None:
        return None
    mapped = mapping.resolve(field.field)
    # (the query compiler also tries other cases of the name: only the plain resolution is routed)
    if not mapped or any(m.value_kind is not ValueKind.STRING for m in mapped):
        return None
    return Route(field_values=frozenset((trait_type, m.path, field.string) for m in mapped))


def _route_of(
    kind: str | None, predicate: object, registry: TraitRegistry, mapping_of: MappingOf | None = None
) -> Route:
    if kind == "trait":
        assert isinstance(predicate, query_pb2.TraitPredicate)
        name = predicate.trait_name
        full = registry.resolve_type_name(name) or name
        return _field_route(full, predicate, mapping_of) or Route(trait_types=frozenset({full}))
    if kind == "ids":
        assert isinstance(predicate, query_pb2.IdsPredicate)
        return Route(entity_ids=frozenset(predicate.ids))
    if kind == "operations":
        assert isinstance(predicate, query_pb2.OperationsPredicate)
        return Route(operation_ids=frozenset(predicate.operation_ids))
    if kind == "boolean":
        assert isinstance(predicate, query_pb2.BooleanPredicate)
        positive = [q for q in predicate.queries if q.occur != query_pb2.BooleanPredicate.MUST_NOT]
        if not positive:
            return EVERYTHING
        route = Route()
        for sub in positive:
            sub_kind = sub.WhichOneof("predicate")
            sub_route = _route_of(sub_kind, getattr(sub, sub_kind) if sub_kind else None, registry, mapping_of)
            route = route.union(sub_route)
        return route
    return EVERYTHING


def route_of(query: query_pb2.EntityQuery, registry: TraitRegistry, mapping_of: MappingOf | None = None) -> Route:
    """What `query`'s results depend on. `mapping_of` (the index's trait mappings) enables the
    (type, field, value) routes; a score ordering keeps type routes (any put changes BM25 statistics)."""
    kind = query.WhichOneof("predicate")
    if query.ordering.WhichOneof("value") == "score":
        mapping_of = None
    return _route_of(kind, getattr(query, kind) if kind else None, registry, mapping_of)


@dataclass(eq=False)
class Watch:
    id: int
    query: query_pb2.EntityQuery
    route: Route
    entity_ids: frozenset[str] = frozenset()
    last_hash: int | None = None
    latest: query_pb2.EntityResults | None = None
    error: ExocoreError | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    running: bool = False
    dirty: bool = False
    closed: bool = False
    runs: int = 0


class WatchRegistry:
    """Registered watches, their routes and their executions (event loop only)."""

    def __init__(
        self,
        run_query: Callable[[query_pb2.EntityQuery], Awaitable[query_pb2.EntityResults]],
        registry: TraitRegistry,
        parallelism: int = 4,
        mapping_of: MappingOf | None = None,
    ) -> None:
        """`mapping_of`: the index's trait mappings (`IndexSchema.mapping`), for field value routes."""
        self._run_query = run_query
        self._registry = registry
        self._mapping_of = mapping_of
        self._slots = asyncio.Semaphore(max(1, parallelism))
        self._ids = itertools.count(1)
        self.watches: dict[int, Watch] = {}
        self._everything: set[Watch] = set()
        self._by_type: dict[str, set[Watch]] = {}
        self._by_entity: dict[str, set[Watch]] = {}
        self._by_operation: dict[int, set[Watch]] = {}
        # trait type -> field path -> (mapped field, value -> watches)
        self._by_field: dict[str, dict[str, tuple[MappedField, dict[str, set[Watch]]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.executions = 0

    # -- registration ---------------------------------------------------------------------------

    def register(self, query: query_pb2.EntityQuery) -> Watch:
        copy = query_pb2.EntityQuery()
        copy.CopyFrom(query)
        copy.result_hash = 0
        watch = Watch(next(self._ids), copy, route_of(copy, self._registry, self._mapping_of))
        self.watches[watch.id] = watch
        route = watch.route
        if route.everything:
            self._everything.add(watch)
        for trait_type in route.trait_types:
            self._by_type.setdefault(trait_type, set()).add(watch)
        for entity_id in route.entity_ids:
            self._by_entity.setdefault(entity_id, set()).add(watch)
        for operation_id in route.operation_ids:
            self._by_operation.setdefault(operation_id, set()).add(watch)
        for trait_type, path, value in route.field_values:
            mapping = self._mapping_of(trait_type) if self._mapping_of is not None else None
            mapped = mapping.fields.get(path) if mapping is not None else None
            assert mapped is not None, (trait_type, path)
            paths = self._by_field.setdefault(trait_type, {})
            paths.setdefault(path, (mapped, {}))[1].setdefault(value, set()).add(watch)
        self.schedule(watch)
        return watch

    def unregister(self, watch: Watch) -> None:
        if watch.closed:
            return
        watch.closed = True
        self.watches.pop(watch.id, None)
        self._everything.discard(watch)
        route = watch.route
        for trait_type in route.trait_types:
            self._discard(self._by_type, trait_type, watch)
        for entity_id in route.entity_ids | watch.entity_ids:
            self._discard(self._by_entity, entity_id, watch)
        for operation_id in route.operation_ids:
            self._discard(self._by_operation, operation_id, watch)
        for trait_type, path, value in route.field_values:
            paths = self._by_field.get(trait_type)
            if paths is None or path not in paths:
                continue
            self._discard(paths[path][1], value, watch)
            if not paths[path][1]:
                del paths[path]
            if not paths:
                del self._by_field[trait_type]

    @staticmethod
    def _discard(index: dict, key: object, watch: Watch) -> None:  # type: ignore[type-arg]
        watches = index.get(key)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del index[key]

    def _set_result_entities(self, watch: Watch, entity_ids: frozenset[str]) -> None:
        if watch.closed or entity_ids == watch.entity_ids:
            return
        for entity_id in watch.entity_ids - entity_ids - watch.route.entity_ids:
            self._discard(self._by_entity, entity_id, watch)
        for entity_id in entity_ids - watch.entity_ids:
            self._by_entity.setdefault(entity_id, set()).add(watch)
        watch.entity_ids = entity_ids

    # -- routing --------------------------------------------------------------------------------

    def affected(self, update: IndexUpdate) -> set[Watch]:
        """The watches `update` may have changed the result of."""
        if update.reset:
            return set(self.watches.values())
        if not update.changes:
            return set()
        found: set[Watch] = set(self._everything)
        by_type, by_entity, by_operation = self._by_type, self._by_entity, self._by_operation
        for change in update.changes:
            if change.trait_type is not None:
                watches = by_type.get(change.trait_type)
                if watches:
                    found.update(watches)
                if self._by_field:
                    self._add_field_routes(change, found)
            watches = by_entity.get(change.entity_id)
            if watches:
                found.update(watches)
            if by_operation:
                watches = by_operation.get(change.operation_id)
                if watches:
                    found.update(watches)
        return found

    def _add_field_routes(self, change: IndexChange, found: set[Watch]) -> None:
        paths = self._by_field.get(change.trait_type or "")
        if not paths:
            return
        message = self._registry.unpack_trait(change.message) if change.message is not None else None
        if message is None:  # unknown payload: any of the type's field watches may be affected
            for _, by_value in paths.values():
                for watches in by_value.values():
                    found.update(watches)
            return
        for mapped, by_value in paths.values():
            for value in field_values(message, mapped):  # a repeated field: any of its elements
                watches = by_value.get(value)  # type: ignore[arg-type]
                if watches:
                    found.update(watches)

    def on_update(self, update: IndexUpdate) -> int:
        """Schedules the affected watches; how many."""
        affected = self.affected(update)
        for watch in affected:
            self.schedule(watch)
        return len(affected)

    # -- execution ------------------------------------------------------------------------------

    def schedule(self, watch: Watch) -> None:
        if watch.closed:
            return
        if watch.running:
            watch.dirty = True
            return
        watch.running = True
        task = asyncio.get_running_loop().create_task(self._execute(watch), name=f"watch-{watch.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, watch: Watch) -> None:
        try:
            while not watch.closed:
                watch.dirty = False
                query = query_pb2.EntityQuery()
                query.CopyFrom(watch.query)
                if watch.last_hash is not None:
                    query.result_hash = watch.last_hash
                try:
                    async with self._slots:
                        if watch.closed:
                            return
                        self.executions += 1
                        watch.runs += 1
                        results = await self._run_query(query)
                except ExocoreError as exc:
                    self._fail(watch, exc)
                    return
                except Exception as exc:
                    log.exception("watched query %d failed", watch.id)
                    self._fail(watch, Internal(f"watched query failed: {type(exc).__name__}"))
                    return
                if not results.skipped_hash and results.hash != watch.last_hash:
                    watch.last_hash = results.hash
                    self._set_result_entities(watch, frozenset(r.entity.id for r in results.entities))
                    watch.latest = results
                    watch.ready.set()
                if not watch.dirty:
                    return
        finally:
            watch.running = False

    def _fail(self, watch: Watch, error: ExocoreError) -> None:
        watch.error = error
        watch.ready.set()
        self.unregister(watch)

    async def stream(self, query: query_pb2.EntityQuery) -> AsyncIterator[query_pb2.EntityResults]:
        """The results of a watched query, until the consumer stops or the query fails."""
        watch = self.register(query)
        try:
            while True:
                await watch.ready.wait()
                watch.ready.clear()
                latest, watch.latest = watch.latest, None
                if latest is not None:
                    yield latest
                if watch.error is not None:
                    raise watch.error
        finally:
            self.unregister(watch)

    async def close(self) -> None:
        for watch in list(self.watches.values()):
            self.unregister(watch)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def watch_ids(self) -> Iterable[int]:
        return list(self.watches)


__all__ = ["EVERYTHING", "Route", "Watch", "WatchRegistry", "route_of"]
