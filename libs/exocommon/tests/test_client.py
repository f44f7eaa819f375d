"""The client library: builders, Any packing, typed errors, deadlines, watch re-subscription, sync use."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading

import grpc
import pytest

from exocommon.client import (
    MUTATION_TIMEOUT_S,
    QUERY_TIMEOUT_S,
    Client,
    MutationBuilder,
    QueryBuilder,
    SyncClient,
    TraitQueryBuilder,
    TypeRegistry,
    normalize_endpoint,
    pack_any,
    projection,
    unpack_any,
)
from exocommon.errors import DeadlineExceeded, InvalidArgument, Unavailable
from exocommon.net import free_ports
from exocommon.testing.fake_store import FakeEntityStore, fake_store_server
from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exocore.test import test_pb2

# --- builders ---------------------------------------------------------------------------------------------------


def test_mutation_builder_builds_each_kind_of_mutation():
    request = (
        MutationBuilder()
        .put_trait("e1", test_pb2.TestMessage(string1="hello"), trait_id="t1")
        .put_trait(None, entity_pb2.Trait(id="t2", message=pack_any(test_pb2.TestMessage2(string1="x"))))
        .delete_trait("e2", "t3")
        .delete_entity("e3")
        .delete_operations("e4", [7, 8])
        .use_common_entity_id()
        .return_entities()
        .wait_indexed()
        .wait_committed()
        .build()
    )
    kinds = [m.WhichOneof("mutation") for m in request.mutations]
    assert kinds == ["put_trait", "put_trait", "delete_trait", "delete_entity", "delete_operations"]
    first = request.mutations[0]
    assert first.entity_id == "e1" and first.put_trait.trait.id == "t1"
    assert first.put_trait.trait.message.type_url == "type.googleapis.com/exocore.test.TestMessage"
    assert request.mutations[1].entity_id == "" and request.mutations[1].put_trait.trait.id == "t2"
    assert request.mutations[2].delete_trait.trait_id == "t3"
    assert list(request.mutations[4].delete_operations.operation_ids) == [7, 8]
    assert request.common_entity_id and request.return_entities and request.wait_indexed and request.wait_committed


def test_build_returns_independent_copies():
    builder = MutationBuilder().put_trait("e1", test_pb2.TestMessage())
    first = builder.build()
    builder.delete_entity("e2")
    assert len(first.mutations) == 1 and len(builder.build().mutations) == 2


def test_query_builder_predicates():
    assert QueryBuilder.match("hello", no_fuzzy=True).build().match == query_pb2.MatchPredicate(
        query="hello", no_fuzzy=True
    )
    assert QueryBuilder.trait(test_pb2.TestMessage).build().trait.trait_name == "exocore.test.TestMessage"
    assert QueryBuilder.trait("exocore.test.TestMessage2").build().trait.trait_name == "exocore.test.TestMessage2"
    assert list(QueryBuilder.ids("a", "b").build().ids.ids) == ["a", "b"]
    assert list(QueryBuilder.ids(["a", "b"]).build().ids.ids) == ["a", "b"]
    assert QueryBuilder.references("e1", "t1").build().reference == query_pb2.ReferencePredicate(
        entity_id="e1", trait_id="t1"
    )
    assert QueryBuilder.all().build().WhichOneof("predicate") == "all"
    assert QueryBuilder.query_string("hello type:test").build().query_string.query == "hello type:test"
    assert list(QueryBuilder.operations([1, 2]).build().operations.operation_ids) == [1, 2]


def test_query_builder_options():
    query = (
        QueryBuilder.all()
        .count(5)
        .offset(2)
        .order_by_field("uint3", ascending=True)
        .project(projection("exocore.test", field_ids=[1, 2]), projection(skip=True))
        .include_deleted()
        .programmatic()
        .result_hash(42)
        .watch_token(7)
        .build()
    )
    assert query.paging.count == 5 and query.paging.offset == 2
    assert query.ordering.field == "uint3" and query.ordering.ascending
    assert list(query.projections[0].package) == ["exocore.test"] and list(query.projections[0].field_ids) == [1, 2]
    assert query.projections[1].skip
    assert query.include_deleted and query.programmatic and query.result_hash == 42 and query.watch_token == 7
    assert QueryBuilder.all().order_by_operation_ids().build().ordering.operation_id
    ordering = QueryBuilder.all().order_by_score(recency_boost=False).build().ordering
    assert ordering.score and ordering.no_recency_boost and not ordering.no_reference_boost
    assert QueryBuilder.all().order_by_created_at(True).build().ordering.created_at
    assert QueryBuilder.all().order_by_updated_at().build().ordering.updated_at


def test_trait_query_builder():
    field = TraitQueryBuilder.field("string3", "abc").build().field
    assert field.field == "string3" and field.string == "abc" and field.operator == query_pb2.TraitFieldPredicate.EQUAL
    assert TraitQueryBuilder.field("uint3", 5, ">=").build().field.int64 == 5
    assert TraitQueryBuilder.field("uint3", 2**64 - 1).build().field.uint64 == 2**64 - 1
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    date = TraitQueryBuilder.field("date3", when, "<").build().field
    assert date.date.ToDatetime(tzinfo=dt.UTC) == when and date.operator == query_pb2.TraitFieldPredicate.LT
    with pytest.raises(ValueError):
        TraitQueryBuilder.field("date3", dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        TraitQueryBuilder.field("f", 1, "!=")
    with pytest.raises(TypeError):
        TraitQueryBuilder.field("f", True)
    reference = TraitQueryBuilder.reference("ref1", "e1", "t1").build().reference
    assert reference.field == "ref1" and reference.reference.entity_id == "e1"
    assert TraitQueryBuilder.match("x").build().match.query == "x"
    assert TraitQueryBuilder.query_string("x").build().query_string.query == "x"
    query = QueryBuilder.trait(test_pb2.TestMessage, TraitQueryBuilder.field("string3", "abc")).build()
    assert query.trait.query.field.string == "abc"


# --- registry ---------------------------------------------------------------------------------------------------


def test_any_packing_round_trips_and_unknown_types_give_none():
    message = test_pb2.TestMessage(string1="hello", uint1=3)
    packed = pack_any(message)
    assert packed.type_url == "type.googleapis.com/exocore.test.TestMessage"
    assert unpack_any(packed) == message
    registry = TypeRegistry()
    assert registry.unpack_as(packed, test_pb2.TestMessage) == message
    with pytest.raises(InvalidArgument, match="not a exocore.test.TestMessage2"):
        registry.unpack_as(packed, test_pb2.TestMessage2)
    unknown = packed.__class__(type_url="type.googleapis.com/my.app.Note", value=b"\x0a\x01x")
    assert registry.unpack(unknown) is None
    broken = packed.__class__(type_url=packed.type_url, value=b"\xff\xff")
    with pytest.raises(InvalidArgument):
        registry.unpack(broken)
    # Project types are known without registering them (every generated module is loaded).
    assert registry.message_class("exocore.store.Reference") is entity_pb2.Reference
    registry.register(test_pb2.TestStruct)
    assert registry.message_class("exocore.test.TestStruct") is test_pb2.TestStruct


def test_endpoints_are_normalized():
    assert normalize_endpoint("127.0.0.1:3330") == "127.0.0.1:3330"
    assert normalize_endpoint("http://127.0.0.1:3330/") == "127.0.0.1:3330"
    assert normalize_endpoint("grpc://[::1]:3330") == "[::1]:3330"
    for bad in ("localhost", "http://", ":80", "host:port"):
        with pytest.raises(InvalidArgument):
            normalize_endpoint(bad)


# --- calls --------------------------------------------------------------------------------------------------------


async def test_calls_send_the_token_and_use_the_default_deadlines():
    store = FakeEntityStore()
    async with fake_store_server(store) as server, Client(server.address, "TOKEN") as client:
        assert (client.mutation_timeout_s, client.query_timeout_s) == (MUTATION_TIMEOUT_S, QUERY_TIMEOUT_S) == (10, 5)
        result = await client.mutate(MutationBuilder().put_trait("e1", test_pb2.TestMessage(string1="a")))
        assert len(result.operation_ids) == 1
        results = await client.query(QueryBuilder.all())
        assert [r.entity.id for r in results.entities] == ["e1"]
        assert [m["authorization"] for m in store.metadata] == ["Bearer TOKEN", "Bearer TOKEN"]


async def test_errors_are_typed_and_deadlines_apply():
    store = FakeEntityStore(query_delay_s=1.0)
    async with fake_store_server(store) as server:
        async with Client(server.address, query_timeout_s=0.2) as client:
            with pytest.raises(DeadlineExceeded):
                await client.query(QueryBuilder.all())
            with pytest.raises(InvalidArgument, match="test mutation failed"):
                request = mutation_pb2.MutationRequest()
                request.mutations.add(entity_id="e").test.success = False
                await client.mutate(request)
    port = free_ports(1)[0]
    async with Client(f"127.0.0.1:{port}") as client:
        with pytest.raises(Unavailable):
            await client.mutate(MutationBuilder().delete_entity("e"), timeout=1)


async def test_watch_resubscribes_when_its_server_dies_and_catches_up_without_repeating():
    port = free_ports(1)[0]
    store = FakeEntityStore("first")
    client = Client(f"127.0.0.1:{port}", resubscribe_backoff_initial_s=0.05, resubscribe_backoff_max_s=0.2)
    async with client:
        async with fake_store_server(store, bind=f"127.0.0.1:{port}") as server:
            await client.mutate(MutationBuilder().put_trait("e1", test_pb2.TestMessage(string1="a")))
            watch = client.watch(QueryBuilder.all())
            first = await watch.__anext__()
            assert [r.entity.id for r in first.entities] == ["e1"]
            await server.stop(0)
        # A new server (same data, plus a write made while the watch was disconnected).
        revived = FakeEntityStore("second", shared_with=store)
        async with fake_store_server(revived, bind=f"127.0.0.1:{port}"):
            await client.mutate(MutationBuilder().put_trait("e2", test_pb2.TestMessage(string1="b")))
            second = await asyncio.wait_for(watch.__anext__(), 10)
            assert sorted(r.entity.id for r in second.entities) == ["e1", "e2"]
            assert watch.resubscriptions >= 1
            assert watch.latest is second
            await watch.aclose()
            with pytest.raises(StopAsyncIteration):
                await watch.__anext__()


async def test_watch_does_not_repeat_the_latest_results_after_resubscribing():
    port = free_ports(1)[0]
    store = FakeEntityStore("first")
    client = Client(f"127.0.0.1:{port}", resubscribe_backoff_initial_s=0.05, resubscribe_backoff_max_s=0.2)
    async with client:
        async with fake_store_server(store, bind=f"127.0.0.1:{port}") as server:
            await client.mutate(MutationBuilder().put_trait("e1", test_pb2.TestMessage(string1="a")))
            watch = client.watch(QueryBuilder.all())
            await watch.__anext__()
            await server.stop(0)
        async with fake_store_server(FakeEntityStore("second", shared_with=store), bind=f"127.0.0.1:{port}"):
            pending = asyncio.ensure_future(watch.__anext__())
            for _ in range(100):  # wait until the watch subscribed again
                if watch.subscriptions >= 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            assert not pending.done()  # the same results again are not delivered
            await client.mutate(MutationBuilder().put_trait("e2", test_pb2.TestMessage(string1="b")))
            results = await asyncio.wait_for(pending, 5)
            assert len(results.entities) == 2
            await watch.aclose()


async def test_watch_ends_with_the_error_of_a_bad_query():
    async with fake_store_server(FakeEntityStore()) as server, Client(server.address) as client:
        watch = client.watch(query_pb2.EntityQuery(test=query_pb2.TestPredicate(success=False)))
        with pytest.raises(InvalidArgument):
            await watch.__anext__()
        with pytest.raises(StopAsyncIteration):
            await watch.__anext__()


def test_sync_client():
    address: list[str] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with fake_store_server(FakeEntityStore()) as server:
            address.append(server.address)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()))
    thread.start()
    try:
        assert ready.wait(10)
        with SyncClient(address[0], "T") as client:
            watch = client.watch(QueryBuilder.all())
            assert len(next(watch).entities) == 0
            client.mutate(MutationBuilder().put_trait("e1", test_pb2.TestMessage(string1="x")))
            assert [r.entity.id for r in next(watch).entities] == ["e1"]
            watch.close()
            assert [r.entity.id for r in client.query(QueryBuilder.ids("e1")).entities] == ["e1"]
            with pytest.raises(InvalidArgument):
                client.query(query_pb2.EntityQuery(test=query_pb2.TestPredicate(success=False)))
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_grpc_status_codes_retried_by_watch_are_transient_ones():
    from exocommon.client.client import _RESUBSCRIBE_CODES

    assert grpc.StatusCode.UNAVAILABLE in _RESUBSCRIBE_CODES
    assert grpc.StatusCode.INVALID_ARGUMENT not in _RESUBSCRIBE_CODES
    assert grpc.StatusCode.UNAUTHENTICATED not in _RESUBSCRIBE_CODES
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in _RESUBSCRIBE_CODES
