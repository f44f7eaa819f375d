"""The store service over a real entity index and a fake chain: Mutate (whole-request validation,
ids, one Append, wait_indexed / wait_committed / return_entities), queries, watched queries and
their routing, garbage collection through the mutation path."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2

from exochain.model import new_entry, sign_operations
from exocommon.config import EntityIndexSettings
from exocommon.errors import DeadlineExceeded, InvalidArgument, Unavailable
from exocommon.keys import Keypair
from exocommon.sealed import open_sealed
from exocore.chain.v1 import chain_pb2
from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exocore.test import test_pb2
from exostore.entity_index import BlockEvent, CaughtUpEvent, ChainEntry, EntityIndex, PendingEvent
from exostore.gc import GarbageCollector, GcConfig
from exostore.mutations import MAX_MUTATION_BYTES, OperationTracker, prepare_mutations
from exostore.payloads import BlockRef, PayloadStore
from exostore.registry import TraitRegistry
from exostore.schema import IndexSchema
from exostore.service import StoreService
from exostore.watches import EVERYTHING, Route, route_of

KEY = bytes(range(32))
NODE_KEY = Keypair.generate()
TYPE1 = "exocore.test.TestMessage"
TYPE2 = "exocore.test.TestMessage2"


def any_of(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def put(text: str = "", entity: str = "", trait: str = "", message=None) -> mutation_pb2.EntityMutation:
    msg = message if message is not None else test_pb2.TestMessage(string1=text)
    return mutation_pb2.EntityMutation(
        entity_id=entity,
        put_trait=mutation_pb2.PutTraitMutation(trait=entity_pb2.Trait(id=trait, message=any_of(msg))),
    )


class FakeChain:
    """ChainLog.Append / GetOperations; appended entries reach the index like the tail would
    (unless `deliver` is False), committed when `commit()` is called."""

    def __init__(self) -> None:
        self.appends: list[list[bytes]] = []
        self.next_id = 1_800_000_000 * 10**9
        self.deliver = True
        self.fail: grpc.StatusCode | None = None
        self.committed: set[int] = set()
        self.ops: dict[int, chain_pb2.SignedOperation] = {}
        self.on_append = None  # set by the fixture: (ids, entries) -> None

    async def Append(self, request, timeout=None):
        if self.fail is not None:
            raise grpc.aio.AioRpcError(self.fail, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        entries = list(request.entries)
        self.appends.append(entries)
        ids = []
        for data in entries:
            self.next_id += 1_000_000
            ids.append(self.next_id)
            (signed,) = sign_operations([new_entry(self.next_id, "node", data)], NODE_KEY)
            self.ops[self.next_id] = signed.to_proto()
        if self.deliver and self.on_append is not None:
            asyncio.get_running_loop().call_soon(self.on_append, ids, entries)
        return chain_pb2.AppendResponse(operation_ids=ids)

    async def GetOperations(self, request, timeout=None):
        return chain_pb2.GetOperationsResponse(
            operations=[
                chain_pb2.StoredOperation(
                    operation=self.ops[i],
                    status=chain_pb2.OPERATION_STATUS_COMMITTED if i in self.committed else 1,
                )
                for i in request.operation_ids
                if i in self.ops
            ]
        )


@pytest.fixture
async def env(tmp_path):
    payloads = PayloadStore(tmp_path / "payloads")
    registry = TraitRegistry()
    services: list[StoreService] = []
    index = EntityIndex(
        tmp_path,
        registry,
        EntityIndexSettings(chain_index_deferred_interval_secs=None),
        payloads,
        KEY,
        gc_flagger=lambda agg: services[0].gc.flag(agg) if services[0].gc else None,
    )
    index.start_replay()
    index.apply_events([CaughtUpEvent(0, 0)])
    chain = FakeChain()
    executor = ThreadPoolExecutor(2)
    gc = GarbageCollector(GcConfig(), index.entity_mutations, lambda: 0)
    service = StoreService(index, chain, KEY, registry, executor, gc=gc, index_timeout_s=0.5)  # type: ignore[arg-type]
    services.append(service)

    def deliver(ids, entries):
        update = index.apply_events([PendingEvent(ChainEntry(i, e)) for i, e in zip(ids, entries, strict=True)])
        service.on_update(update)

    chain.on_append = deliver
    yield service, chain, index
    await service.watches.close()
    executor.shutdown()
    index.close()
    payloads.close()


# --- validation --------------------------------------------------------------------------------


def prepare(*mutations, **flags):
    return prepare_mutations(mutation_pb2.MutationRequest(mutations=list(mutations), **flags), TraitRegistry())


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (mutation_pb2.EntityMutation(entity_id="e"), "mutation 1 has no mutation set"),
        (
            mutation_pb2.EntityMutation.FromString(b"\x0a\x01e\x2a\x00"),
            r"mutation 1 has an unknown mutation kind.*\[5\]",
        ),
        (mutation_pb2.EntityMutation(test=mutation_pb2.TestMutation(success=True)), "mutation 1 is a test mutation"),
        (mutation_pb2.EntityMutation(entity_id="e", put_trait=mutation_pb2.PutTraitMutation()), "has no trait"),
        (
            mutation_pb2.EntityMutation(put_trait=mutation_pb2.PutTraitMutation(trait=entity_pb2.Trait(id="t"))),
            "mutation 1: the trait has no message",
        ),
        (
            mutation_pb2.EntityMutation(
                put_trait=mutation_pb2.PutTraitMutation(
                    trait=entity_pb2.Trait(message=any_pb2.Any(type_url="exocore.test.TestMessage"))
                )
            ),
            "mutation 1: malformed trait message: type_url 'exocore.test.TestMessage'",
        ),
        (
            mutation_pb2.EntityMutation(
                put_trait=mutation_pb2.PutTraitMutation(
                    trait=entity_pb2.Trait(message=any_pb2.Any(type_url=f"type.googleapis.com/{TYPE1}", value=b"\xff"))
                )
            ),
            f"mutation 1: the trait message does not parse as {TYPE1}",
        ),
        (mutation_pb2.EntityMutation(entity_id="e", delete_trait=mutation_pb2.DeleteTraitMutation()), "trait_id"),
        (mutation_pb2.EntityMutation(delete_entity=mutation_pb2.DeleteEntityMutation()), "needs an entity_id"),
        (
            mutation_pb2.EntityMutation(
                entity_id="e", delete_operations=mutation_pb2.DeleteOperationsMutation(operation_ids=[1])
            ),
            "reserved to the store's garbage collector",
        ),
        (put("x" * (MAX_MUTATION_BYTES + 1)), "mutation 1 is .* bytes encoded; at most"),
    ],
)
def test_an_invalid_mutation_fails_the_request_naming_it(bad, message):
    with pytest.raises(InvalidArgument, match=message):
        prepare(put("fine"), bad, put("fine too"))


def test_ids_are_generated_and_common_entity_id_reuses_the_previous_one():
    first, second, third = prepare(put("a"), put("b", trait="mine"), put("c", entity="given"))
    assert first.entity_id.startswith("et") and len(first.entity_id) == 34
    assert first.put_trait.trait.id.startswith("trt") and len(first.put_trait.trait.id) == 35
    assert second.entity_id != first.entity_id and second.put_trait.trait.id == "mine"
    assert third.entity_id == "given"

    a, b, c = prepare(
        put("a"),
        put("b"),
        mutation_pb2.EntityMutation(delete_trait=mutation_pb2.DeleteTraitMutation(trait_id="t")),
        common_entity_id=True,
    )
    assert a.entity_id == b.entity_id == c.entity_id
    x, y = prepare(put("x", entity="e1"), put("y"), common_entity_id=True)
    assert y.entity_id == "e1"
    assert prepare() == []


def test_unknown_trait_types_are_accepted():
    mutation = mutation_pb2.EntityMutation(
        put_trait=mutation_pb2.PutTraitMutation(
            trait=entity_pb2.Trait(message=any_pb2.Any(type_url="type.googleapis.com/my.Unknown", value=b"\xff"))
        )
    )
    (prepared,) = prepare(mutation)
    assert prepared.put_trait.trait.message.type_url.endswith("my.Unknown")


async def test_an_invalid_request_writes_nothing(env):
    service, chain, _ = env
    request = mutation_pb2.MutationRequest(mutations=[put("ok"), put("ok"), mutation_pb2.EntityMutation()])
    with pytest.raises(InvalidArgument, match="mutation 2"):
        await service.mutate(request)
    assert chain.appends == []


# --- mutate -----------------------------------------------------------------------------------------


async def test_mutations_are_sealed_and_appended_in_one_call(env):
    service, chain, index = env
    result = await service.mutate(mutation_pb2.MutationRequest(mutations=[put("one"), put("two"), put("three")]))
    assert len(chain.appends) == 1 and len(chain.appends[0]) == 3
    assert len(result.operation_ids) == 3 and not result.entities
    decoded = [mutation_pb2.EntityMutation.FromString(open_sealed(KEY, e)) for e in chain.appends[0]]
    assert [test_pb2.TestMessage.FromString(m.put_trait.trait.message.value).string1 for m in decoded] == [
        "one",
        "two",
        "three",
    ]
    assert all(b"one" not in e for e in chain.appends[0]), "entries leave the store encrypted"


async def test_return_entities_waits_for_the_index_and_runs_an_operations_query(env):
    service, _, _ = env
    result = await service.mutate(
        mutation_pb2.MutationRequest(mutations=[put("alpha"), put("beta")], return_entities=True, common_entity_id=True)
    )
    assert len(result.operation_ids) == 2
    (entity,) = result.entities
    assert sorted(test_pb2.TestMessage.FromString(t.message.value).string1 for t in entity.traits) == ["alpha", "beta"]
    found = await service.query(query_pb2.EntityQuery(match=query_pb2.MatchPredicate(query="alpha")))
    assert [r.entity.id for r in found.entities] == [entity.id]


async def test_small_pages_run_inline_and_large_ones_on_the_query_pool(env, monkeypatch):
    service, _, _ = env
    await service.mutate(mutation_pb2.MutationRequest(mutations=[put(f"word{i}") for i in range(3)], wait_indexed=True))
    pooled: list[query_pb2.EntityQuery] = []
    search = service._search

    async def counting(query: query_pb2.EntityQuery) -> query_pb2.EntityResults:
        pooled.append(query)
        return await search(query)

    monkeypatch.setattr(service, "_search", counting)
    small = query_pb2.EntityQuery(all=query_pb2.AllPredicate())
    large = query_pb2.EntityQuery(all=query_pb2.AllPredicate(), paging=query_pb2.Paging(count=1000))
    inline, on_pool = await service.query(small), await service.query(large)
    assert pooled == [large]
    assert [r.entity.id for r in inline.entities] == [r.entity.id for r in on_pool.entities]
    assert len(inline.entities) == 3
    with pytest.raises(InvalidArgument):  # errors come out the same way
        await service.query(query_pb2.EntityQuery(test=query_pb2.TestPredicate()))


async def test_wait_indexed_times_out_with_deadline_exceeded(env):
    service, chain, _ = env
    chain.deliver = False
    with pytest.raises(DeadlineExceeded, match="were written, but 1 of them were not indexed"):
        await service.mutate(mutation_pb2.MutationRequest(mutations=[put("lost")], wait_indexed=True))
    assert len(chain.appends) == 1


async def test_wait_committed_polls_the_chain(env):
    service, chain, _ = env
    task = asyncio.create_task(service.mutate(mutation_pb2.MutationRequest(mutations=[put("c")], wait_committed=True)))
    await asyncio.sleep(0.2)
    assert not task.done()
    chain.committed.update(chain.ops)
    result = await asyncio.wait_for(task, 5)
    assert len(result.operation_ids) == 1
    with pytest.raises(DeadlineExceeded, match="not committed"):
        await service.mutate(mutation_pb2.MutationRequest(mutations=[put("d")], wait_committed=True), 0.3)


async def test_a_chain_that_is_down_is_unavailable(env):
    service, chain, _ = env
    chain.fail = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(Unavailable, match="chain service is not available"):
        await service.mutate(mutation_pb2.MutationRequest(mutations=[put("x")]))


async def test_tracker_remembers_operations_indexed_before_the_wait():
    tracker = OperationTracker(memory=3)
    tracker.mark_indexed([1, 2])
    assert await tracker.wait_indexed([1, 2], 0.01) == set()
    waiting = asyncio.create_task(tracker.wait_indexed([2, 3, 4], 1))
    await asyncio.sleep(0)
    tracker.mark_indexed([3])
    tracker.mark_indexed([4])
    assert await waiting == set()
    tracker.mark_indexed([5, 6, 7])
    assert not tracker.is_indexed(1) and tracker.is_indexed(7)
    assert await tracker.wait_indexed([8], 0.01) == {8}


# --- watched queries ----------------------------------------------------------------------------------


class Reader:
    """Consumes a watch stream into a queue (cancelling a pending `__anext__` would close it)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for results in self.stream:
                await self.queue.put(results)
        except Exception as exc:
            await self.queue.put(exc)

    async def next(self, timeout: float = 3.0):
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.stream.aclose()


def trait_query(name: str = TYPE1) -> query_pb2.EntityQuery:
    return query_pb2.EntityQuery(trait=query_pb2.TraitPredicate(trait_name=name))


async def test_a_watch_sees_a_matching_write_and_not_a_non_matching_one(env):
    service, _, _ = env
    reader = Reader(service.watch(trait_query()))
    first = await reader.next()
    assert list(first.entities) == []

    await service.mutate(mutation_pb2.MutationRequest(mutations=[put(message=test_pb2.TestMessage2(string1="no"))]))
    with pytest.raises(TimeoutError):
        await reader.next(0.5)
    await service.mutate(mutation_pb2.MutationRequest(mutations=[put("yes")]))
    second = await reader.next()
    assert [test_pb2.TestMessage.FromString(r.entity.traits[0].message.value).string1 for r in second.entities] == [
        "yes"
    ]
    await reader.close()
    assert service.watches.watches == {}, "closing the stream unregisters the watch"


async def test_a_failing_watched_query_ends_the_stream_with_its_error(env):
    service, _, _ = env
    reader = Reader(service.watch(query_pb2.EntityQuery(test=query_pb2.TestPredicate())))
    with pytest.raises(InvalidArgument, match="test predicate"):
        await reader.next()
    assert service.watches.watches == {}


async def test_writes_only_rerun_the_watches_they_can_affect(env):
    service, _, _ = env
    idle = [Reader(service.watch(trait_query(TYPE2))) for _ in range(1000)]
    for reader in idle:
        await reader.next()
    watched = Reader(service.watch(trait_query(TYPE1)))
    await watched.next()
    executions = service.watches.executions

    await service.mutate(mutation_pb2.MutationRequest(mutations=[put("hello")], wait_indexed=True))
    update = await watched.next()
    assert len(update.entities) == 1
    assert service.watches.executions == executions + 1, "only the TestMessage watch ran"

    # A TestMessage2 trait on the watched entity changes its hash: routed through the result's entity
    # ids (and to every TestMessage2 watch: a put of their type could match them).
    entity_id = update.entities[0].entity.id
    await service.mutate(
        mutation_pb2.MutationRequest(mutations=[put(entity=entity_id, message=test_pb2.TestMessage2(string1="x"))])
    )
    changed = await watched.next()
    assert changed.hash != update.hash and len(changed.entities[0].entity.traits) == 2
    for reader in idle:
        assert len((await reader.next()).entities) == 1
    assert service.watches.executions == executions + 1 + 1001
    for reader in [*idle, watched]:
        await reader.close()
    assert service.watches.watches == {}


def test_routes_of_predicates():
    registry = TraitRegistry()
    assert route_of(trait_query("test"), registry) == Route(trait_types=frozenset({TYPE1}))
    assert route_of(trait_query("some.Unknown"), registry) == Route(trait_types=frozenset({"some.Unknown"}))
    assert route_of(query_pb2.EntityQuery(ids=query_pb2.IdsPredicate(ids=["a"])), registry) == Route(
        entity_ids=frozenset({"a"})
    )
    assert route_of(
        query_pb2.EntityQuery(operations=query_pb2.OperationsPredicate(operation_ids=[7])), registry
    ) == Route(operation_ids=frozenset({7}))
    for query in (
        query_pb2.EntityQuery(match=query_pb2.MatchPredicate(query="x")),
        query_pb2.EntityQuery(query_string=query_pb2.QueryStringPredicate(query="x")),
        query_pb2.EntityQuery(all=query_pb2.AllPredicate()),
        query_pb2.EntityQuery(reference=query_pb2.ReferencePredicate(entity_id="e")),
    ):
        assert route_of(query, registry) == EVERYTHING
    sub = query_pb2.BooleanPredicate.SubQuery
    occur = query_pb2.BooleanPredicate
    boolean = query_pb2.EntityQuery(
        boolean=query_pb2.BooleanPredicate(
            queries=[
                sub(occur=occur.MUST, trait=query_pb2.TraitPredicate(trait_name=TYPE1)),
                sub(occur=occur.SHOULD, ids=query_pb2.IdsPredicate(ids=["b"])),
                sub(occur=occur.MUST_NOT, all=query_pb2.AllPredicate()),
            ]
        )
    )
    assert route_of(boolean, registry) == Route(trait_types=frozenset({TYPE1}), entity_ids=frozenset({"b"}))
    only_not = query_pb2.EntityQuery(
        boolean=query_pb2.BooleanPredicate(queries=[sub(occur=occur.MUST_NOT, ids=query_pb2.IdsPredicate(ids=["b"]))])
    )
    assert route_of(only_not, registry) == EVERYTHING


def field_query(folder: str, name: str = TYPE1, field: str = "string3") -> query_pb2.EntityQuery:
    return query_pb2.EntityQuery(
        trait=query_pb2.TraitPredicate(
            trait_name=name,
            query=query_pb2.TraitQuery(field=query_pb2.TraitFieldPredicate(field=field, string=folder)),
        )
    )


def test_routes_of_exact_string_equalities_name_the_value():
    registry = TraitRegistry()
    mapping_of = IndexSchema(registry).mapping
    assert route_of(field_query("f1"), registry, mapping_of) == Route(
        field_values=frozenset({(TYPE1, "string3", "f1")})
    )
    assert route_of(field_query("f1"), registry) == Route(trait_types=frozenset({TYPE1})), "no mappings: by type"
    # a text field (token match), a numeric field, a range, a score ordering: by type, as before
    by_type = Route(trait_types=frozenset({TYPE1}))
    assert route_of(field_query("f1", field="string1"), registry, mapping_of) == by_type
    assert route_of(field_query("5", field="uint1"), registry, mapping_of) == by_type
    ranged = field_query("f1")
    ranged.trait.query.field.operator = query_pb2.TraitFieldPredicate.GT
    assert route_of(ranged, registry, mapping_of) == by_type
    scored = field_query("f1")
    scored.ordering.score = True
    assert route_of(scored, registry, mapping_of) == by_type


async def test_a_write_reruns_only_the_watches_of_its_field_value(env):
    service, _, _ = env
    folders = [Reader(service.watch(field_query(f"folder{i}"))) for i in range(300)]
    for reader in folders:
        assert list((await reader.next()).entities) == []
    executions = service.watches.executions

    message = test_pb2.TestMessage(string1="note", string3="folder7")
    await service.mutate(mutation_pb2.MutationRequest(mutations=[put(message=message)], wait_indexed=True))
    update = await folders[7].next()
    assert [r.entity.traits[0].message for r in update.entities] == [any_of(message)]
    assert service.watches.executions == executions + 1, "only the folder7 watch ran"

    # Moving the note to another folder: the old folder's watch sees it leave (its result held the
    # entity), the new folder's watch sees it arrive; the 298 others stay idle.
    entity = update.entities[0].entity
    moved = test_pb2.TestMessage(string1="note", string3="folder9")
    await service.mutate(
        mutation_pb2.MutationRequest(mutations=[put(entity=entity.id, trait=entity.traits[0].id, message=moved)])
    )
    assert list((await folders[7].next()).entities) == []
    assert [r.entity.id for r in (await folders[9].next()).entities] == [entity.id]
    assert service.watches.executions == executions + 3
    for reader in folders:
        await reader.close()
    assert service.watches.watches == {} and service.watches._by_field == {}


async def test_deadline_error_names_at_most_ten_operation_ids(env):
    service, chain, _ = env
    chain.deliver = False
    with pytest.raises(DeadlineExceeded) as raised:
        await service.mutate(
            mutation_pb2.MutationRequest(mutations=[put(f"lost {i}") for i in range(500)], wait_indexed=True)
        )
    message = str(raised.value)
    assert "500 of them were not indexed" in message and "(500 in all)" in message
    assert len(message) < 400, "a status message travels in an 8 KiB header"


# --- garbage collection -------------------------------------------------------------------------------


async def test_garbage_collection_goes_through_the_mutation_path(env):
    service, chain, index = env
    assert await service.collect_garbage() == [], "nothing before the chain index has a block"
    service.gc = GarbageCollector(GcConfig(deleted_entity_collection_ns=0), index.entity_mutations, lambda: 2**63)
    put_result = await service.mutate(
        mutation_pb2.MutationRequest(mutations=[put("doomed", entity="e1")], wait_indexed=True)
    )
    delete = mutation_pb2.EntityMutation(entity_id="e1", delete_entity=mutation_pb2.DeleteEntityMutation())
    delete_result = await service.mutate(mutation_pb2.MutationRequest(mutations=[delete], wait_indexed=True))
    written = [*put_result.operation_ids, *delete_result.operation_ids]

    # The entity's operations get committed and chain-indexed (GC leaves pending entities alone).
    entries = tuple(ChainEntry(i, e) for i, e in zip(written, [a[0] for a in chain.appends], strict=True))
    index.settings = EntityIndexSettings(
        chain_index_min_depth=0, chain_index_depth_leeway=0, chain_index_deferred_interval_secs=None
    )
    index.apply_events([BlockEvent(BlockRef(0, 1, "g"), ()), BlockEvent(BlockRef(100, 2, "b"), entries)])
    assert index.chain_indexed is not None and index.pending_operation_ids() == set()

    found = await service.query(query_pb2.EntityQuery(ids=query_pb2.IdsPredicate(ids=["e1"]), include_deleted=True))
    assert found.entities[0].entity.HasField("deletion_date")
    assert service.gc.queued == ["e1"], "the search flagged the deleted entity"
    ids = await service.collect_garbage()
    assert len(ids) == 1 and len(chain.appends) == 3
    (gc_mutation,) = [mutation_pb2.EntityMutation.FromString(open_sealed(KEY, e)) for e in chain.appends[-1]]
    assert gc_mutation.entity_id == "e1"
    assert list(gc_mutation.delete_operations.operation_ids) == sorted(written)
    assert service.gc.queued == []


async def test_a_watch_on_a_repeated_field_value_routes_on_any_element(tagged_registry):
    from google.protobuf import any_pb2

    from exostore.entity_index import IndexChange, IndexUpdate
    from exostore.schema import IndexSchema
    from exostore.watches import WatchRegistry

    registry = tagged_registry
    schema = IndexSchema(registry)

    async def run_query(query: query_pb2.EntityQuery) -> query_pb2.EntityResults:
        return query_pb2.EntityResults()

    watches = WatchRegistry(run_query, registry, mapping_of=schema.mapping)

    def tag_query(tag: str) -> query_pb2.EntityQuery:
        field = query_pb2.TraitFieldPredicate(field="tags", string=tag)
        return query_pb2.EntityQuery(trait=query_pb2.TraitPredicate(trait_name="rep.Tagged", query={"field": field}))

    red, green = watches.register(tag_query("red")), watches.register(tag_query("green"))
    assert ("rep.Tagged", "tags", "red") in red.route.field_values  # a value route, not a type route
    tagged = registry.message_class("rep.Tagged")
    assert tagged is not None
    packed = any_pb2.Any()
    packed.Pack(tagged(tags=["blue", "red"]))
    update = IndexUpdate(changes=[IndexChange(1, "e1", "rep.Tagged", packed)])
    assert watches.affected(update) == {red}
    for watch in (red, green):
        watches.unregister(watch)
    await asyncio.sleep(0)
