"""The gateway in one process against in-memory store replicas: auth, routing, limits, HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import grpc.aio
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exocommon.auth_token import AuthToken
from exocommon.base58 import b58encode
from exocommon.client import Client, MutationBuilder, QueryBuilder
from exocommon.clock import now_ns
from exocommon.errors import InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocommon.testing.fake_store import FakeEntityStore, fake_store_server
from exocore.store import mutation_pb2, query_pb2
from exocore.store.v1 import entity_store_pb2_grpc
from exocore.test import test_pb2
from exogateway.gateway import CellView, Gateway, GatewaySettings
from exogateway.limits import LimitSettings

NS = 1_000_000_000


@dataclass
class Setup:
    gateway: Gateway
    stores: list[FakeEntityStore]
    servers: list
    node: Keypair
    cell_id: str
    token: str

    @property
    def address(self) -> str:
        return self.gateway.grpc_address

    @property
    def http(self) -> str:
        assert self.gateway.http_url is not None
        return self.gateway.http_url

    def store_calls(self) -> list[str]:
        return [call for store in self.stores for call in store.calls]


def _peer(keypair: Keypair) -> str:
    return str(PeerId.from_public_key(keypair.public_key))


@contextlib.asynccontextmanager
async def gateway_for(
    addresses: tuple[str, ...], settings: GatewaySettings | None = None
) -> AsyncIterator[tuple[Gateway, str, Keypair, str]]:
    """A started gateway of a new cell whose store replicas are at `addresses`: the gateway, a valid token
    for it, the node key that signed it and the cell id."""
    node = Keypair.generate()
    cell_id = _peer(Keypair.generate())
    view = CellView(cell_id, "test", {_peer(node): node.public_key}, addresses)
    gateway = Gateway(settings or GatewaySettings(grpc_bind="127.0.0.1:0", health_interval_s=0.2), lambda: view)
    await gateway.start()
    gateway.grpc_server.drain_delay_s = 0
    try:
        yield gateway, AuthToken.create(cell_id, node, now_ns(), now_ns() + 3600 * NS).encode_base58(), node, cell_id
    finally:
        await gateway.stop()


@contextlib.asynccontextmanager
async def gateway_setup(replicas: int = 2, limits: LimitSettings | None = None, shared: bool = True):
    stores: list[FakeEntityStore] = []
    for index in range(replicas):
        stores.append(FakeEntityStore(f"r{index}", shared_with=stores[0] if stores and shared else None))
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(fake_store_server(store)) for store in stores]
        settings = GatewaySettings(
            grpc_bind="127.0.0.1:0", http_bind="127.0.0.1:0", limits=limits or LimitSettings(), health_interval_s=0.2
        )
        started = gateway_for(tuple(s.address for s in servers), settings)
        gateway, token, node, cell_id = await stack.enter_async_context(started)
        yield Setup(gateway, stores, servers, node, cell_id, token)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    async with gateway_setup() as value:
        yield value


def bad_tokens(setup: Setup) -> dict[str, str | None]:
    now = now_ns()
    good = AuthToken.create(setup.cell_id, setup.node, now)
    return {
        "missing": None,
        "malformed": "definitely-not-a-token",
        "garbage base58": b58encode(b"\x08\x01garbage"),
        "expired": AuthToken.create(setup.cell_id, setup.node, now - 10 * NS, now - NS).encode_base58(),
        "foreign cell": AuthToken.create(_peer(Keypair.generate()), setup.node, now).encode_base58(),
        "unknown node": AuthToken.create(setup.cell_id, Keypair.generate(), now).encode_base58(),
        "bad signature": AuthToken(good.cell_id, good.node_id, now, None, good.data, bytes(64)).encode_base58(),
    }


# --- authentication ---------------------------------------------------------------------------------------------


async def test_bad_tokens_get_unauthenticated_on_every_method_and_never_reach_a_store(setup):
    channel = grpc.aio.insecure_channel(setup.address)
    stub = entity_store_pb2_grpc.EntityStoreStub(channel)
    query = QueryBuilder.all().build()
    try:
        for kind, token in bad_tokens(setup).items():
            metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
            calls = [
                stub.Query(query, metadata=metadata, timeout=5),
                stub.Mutate(
                    MutationBuilder().put_trait("e", test_pb2.TestMessage()).build(), metadata=metadata, timeout=5
                ),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, kind
                assert info.value.details(), kind
            stream = stub.WatchQuery(query, metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.read()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, kind
        # A non-Bearer authorization value is refused too.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(query, metadata=(("authorization", f"Basic {setup.token}"),), timeout=5)
        assert "Bearer" in info.value.details()
    finally:
        await channel.close()
    assert setup.store_calls() == []


async def test_error_messages_say_what_is_wrong_with_the_token(setup):
    expected = {
        "missing": "missing auth token",
        "malformed": "malformed auth token",
        "expired": "expired",
        "foreign cell": "for cell",
        "unknown node": "not a node of the cell",
        "bad signature": "signature does not verify",
    }
    for kind, fragment in expected.items():
        async with Client(setup.address, bad_tokens(setup)[kind]) as client:
            with pytest.raises(Unauthenticated, match=fragment):
                await client.query(QueryBuilder.all())
    assert setup.store_calls() == []


async def test_a_valid_token_reaches_the_store_and_results_come_back(setup):
    async with Client(setup.address, setup.token) as client:
        result = await client.mutate(
            MutationBuilder().put_trait("e1", test_pb2.TestMessage(string1="hello")).return_entities()
        )
        assert result.entities[0].id == "e1"
        results = await client.query(QueryBuilder.ids("e1"))
        assert [r.entity.id for r in results.entities] == ["e1"]
    assert sorted(setup.store_calls()) == ["Mutate", "Query"]


async def test_store_errors_are_relayed_with_their_code_and_message(setup):
    async with Client(setup.address, setup.token) as client:
        with pytest.raises(InvalidArgument, match="test predicate failed"):
            await client.query(query_pb2.EntityQuery(test=query_pb2.TestPredicate(success=False)))


# --- routing ------------------------------------------------------------------------------------------------------


async def test_calls_are_spread_round_robin_over_healthy_replicas(setup):
    async with Client(setup.address, setup.token) as client:
        for _ in range(10):
            await client.query(QueryBuilder.all())
    assert [len(store.calls) for store in setup.stores] == [5, 5]


async def test_unary_calls_fail_over_when_a_replica_goes_away(setup):
    await setup.servers[0].stop(0)  # health checks have not noticed yet: the call itself fails over
    async with Client(setup.address, setup.token) as client:
        for _ in range(6):
            await client.query(QueryBuilder.all())
            await client.mutate(MutationBuilder().put_trait("e", test_pb2.TestMessage(string1="x")))
    assert setup.stores[0].calls == []
    assert len(setup.stores[1].calls) == 12
    assert setup.gateway.router.healthy_addresses() == [setup.servers[1].address]


async def test_no_replica_left_gives_unavailable(setup):
    for server in setup.servers:
        await server.stop(0)
    async with Client(setup.address, setup.token) as client:
        with pytest.raises(Unavailable, match="no store replica"):
            await client.query(QueryBuilder.all(), timeout=2)


async def test_health_says_whether_a_store_replica_is_available(setup):
    from exocommon.grpc_util import check_health

    async with grpc.aio.insecure_channel(setup.address) as channel:
        assert await check_health(channel, "exocore.store.v1.EntityStore")
        for server in setup.servers:
            await server.stop(0)
        for _ in range(50):
            if not await check_health(channel, "exocore.store.v1.EntityStore"):
                break
            await asyncio.sleep(0.1)
        assert not await check_health(channel, "exocore.store.v1.EntityStore")
        assert await check_health(channel, "")  # the gateway itself still answers


async def test_a_watch_is_proxied_and_ends_with_unavailable_when_its_replica_dies(setup):
    channel = grpc.aio.insecure_channel(setup.address)
    stub = entity_store_pb2_grpc.EntityStoreStub(channel)
    metadata = (("authorization", f"Bearer {setup.token}"),)
    try:
        stream = stub.WatchQuery(QueryBuilder.all().build(), metadata=metadata)
        first = await stream.read()
        assert len(first.entities) == 0
        async with Client(setup.address, setup.token) as client:
            await client.mutate(MutationBuilder().put_trait("e1", test_pb2.TestMessage(string1="x")))
        second = await asyncio.wait_for(stream.read(), 5)
        assert [r.entity.id for r in second.entities] == ["e1"]
        serving = next(i for i, store in enumerate(setup.stores) if store.open_streams == 1)
        await setup.servers[serving].stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(stream.read(), 5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "went away" in info.value.details()
    finally:
        await channel.close()


async def test_reload_changes_members_and_replicas(setup):
    gateway = setup.gateway
    other = Keypair.generate()
    view = CellView(setup.cell_id, "test", {_peer(other): other.public_key}, (setup.servers[1].address,))
    gateway._cell_source = lambda: view
    await gateway.reload()
    assert [r.address for r in gateway.router.replicas] == [setup.servers[1].address]
    async with Client(setup.address, setup.token) as client:
        with pytest.raises(Unauthenticated, match="not a node of the cell"):
            await client.query(QueryBuilder.all())
    token = AuthToken.create(setup.cell_id, other, now_ns()).encode_base58()
    async with Client(setup.address, token) as client:
        await client.query(QueryBuilder.all())
    assert len(setup.stores[1].calls) == 1 and setup.stores[0].calls == []


# --- limits -------------------------------------------------------------------------------------------------------


async def test_limits_answer_resource_exhausted():
    limits = LimitSettings(request_bytes_max=1000, streams_per_token_max=2)
    async with gateway_setup(limits=limits) as setup:
        async with Client(setup.address, setup.token) as client:
            big = MutationBuilder().put_trait("e", test_pb2.TestMessage(string1="x" * 2000))
            with pytest.raises(ResourceExhausted, match="larger than the gateway's limit"):
                await client.mutate(big)
            watches = [client.watch(QueryBuilder.all()) for _ in range(2)]
            for watch in watches:
                await watch.__anext__()
            third = client.watch(QueryBuilder.all())
            with pytest.raises(ResourceExhausted, match="too many concurrent WatchQuery streams"):
                await third.__anext__()
            # Another token has its own allowance.
            other_token = AuthToken.create(setup.cell_id, setup.node, now_ns() - 1).encode_base58()
            async with Client(setup.address, other_token) as other:
                other_watch = other.watch(QueryBuilder.all())
                await other_watch.__anext__()
                await other_watch.aclose()
            # Closing a stream frees its slot.
            await watches[0].aclose()
            for _ in range(50):
                if setup.gateway.limits.statistics()["open_streams"] < 2:
                    break
                await asyncio.sleep(0.05)
            again = client.watch(QueryBuilder.all())
            await again.__anext__()
            await again.aclose()
            await watches[1].aclose()
        assert "Mutate" not in setup.store_calls()


async def test_too_many_concurrent_calls_per_token_answer_resource_exhausted_and_free_their_slots():
    async with gateway_setup(replicas=1, limits=LimitSettings(calls_per_token_max=2)) as setup:
        setup.stores[0].query_delay_s = 0.3
        async with Client(setup.address, setup.token) as client:
            results = await asyncio.gather(
                *(client.query(QueryBuilder.all()) for _ in range(4)), return_exceptions=True
            )
            refused = [r for r in results if isinstance(r, ResourceExhausted)]
            assert len(refused) == 2, results
            assert "too many concurrent calls" in str(refused[0])
            assert setup.gateway.limits.statistics()["calls_in_flight"] == 0
            # Calls the store fails free their slots too.
            setup.stores[0].query_delay_s = 0
            failing = query_pb2.EntityQuery(test=query_pb2.TestPredicate(success=False))
            for _ in range(3):
                with pytest.raises(InvalidArgument):
                    await client.query(failing)
            await asyncio.gather(*(client.query(QueryBuilder.all()) for _ in range(2)))
            assert setup.gateway.limits.statistics()["calls_in_flight"] == 0


# --- reflection ---------------------------------------------------------------------------------------------------


async def test_reflection_lists_the_entity_store(setup):
    channel = grpc.aio.insecure_channel(setup.address)
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        await call.done_writing()
        names = {s.name for s in response.list_services_response.service}
        assert {"exocore.store.v1.EntityStore", "grpc.health.v1.Health"} <= names
    finally:
        await channel.close()


# --- HTTP ---------------------------------------------------------------------------------------------------------


async def test_http_bad_tokens_get_401_or_404_and_never_reach_a_store(setup):
    expected = {
        "missing": 401,
        "malformed": 401,
        "garbage base58": 401,
        "expired": 401,
        "bad signature": 401,
        "foreign cell": 404,  # as the original: no store for the token's cell
        "unknown node": 404,  # as the original: the token's node is not in the cell
    }
    body = QueryBuilder.all().build().SerializeToString()
    async with aiohttp.ClientSession() as session:
        for kind, token in bad_tokens(setup).items():
            params = {"token": token} if token is not None else {}
            async with session.post(f"{setup.http}/store/query", params=params, data=body) as response:
                assert response.status == expected[kind], kind
                assert response.headers["Access-Control-Allow-Origin"] == "*"
                assert (await response.text()).strip()
    assert setup.store_calls() == []


async def test_http_protobuf_bodies(setup):
    request = MutationBuilder().put_trait("e1", test_pb2.TestMessage(string1="hello")).return_entities().build()
    async with aiohttp.ClientSession() as session:
        url = f"{setup.http}/store/mutate?token={setup.token}"
        async with session.post(url, data=request.SerializeToString()) as response:
            assert response.status == 200
            assert response.content_type == "application/protobuf"
            result = mutation_pb2.MutationResult.FromString(await response.read())
        assert result.entities[0].id == "e1"
        # Any method works (as the original), and the token may come as a Bearer header.
        headers = {"Authorization": f"Bearer {setup.token}"}
        body = QueryBuilder.ids("e1").build().SerializeToString()
        async with session.put(f"{setup.http}/store/query", data=body, headers=headers) as response:
            assert response.status == 200
            results = query_pb2.EntityResults.FromString(await response.read())
        assert [r.entity.id for r in results.entities] == ["e1"]


async def test_http_json_bodies_resolve_traits(setup):
    mutation = {
        "mutations": [
            {
                "entityId": "e1",
                "putTrait": {
                    "trait": {"message": {"@type": "type.googleapis.com/exocore.test.TestMessage", "string1": "hi"}}
                },
            }
        ],
        "returnEntities": True,
    }
    async with aiohttp.ClientSession() as session:
        url = f"{setup.http}/store/mutate?token={setup.token}"
        async with session.post(url, json=mutation) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            result = await response.json()
        trait = result["entities"][0]["traits"][0]
        assert trait["message"] == {"@type": "type.googleapis.com/exocore.test.TestMessage", "string1": "hi"}
        url = f"{setup.http}/store/query?token={setup.token}"
        async with session.post(url, json={"ids": {"ids": ["e1"]}}) as response:
            assert response.status == 200
            results = await response.json()
        assert results["entities"][0]["entity"]["id"] == "e1"


async def test_http_bad_bodies_and_store_errors_get_400(setup):
    async with aiohttp.ClientSession() as session:
        url = f"{setup.http}/store/query?token={setup.token}"
        async with session.post(url, data=b"\xff\xff\xff garbage") as response:
            assert response.status == 400
            assert "exocore.store.EntityQuery" in await response.text()
        headers = {"Content-Type": "application/json"}
        async with session.post(url, data=b"{not json", headers=headers) as response:
            assert response.status == 400
            assert "error" in await response.json()
        async with session.post(url, json={"unknownField": 1}) as response:
            assert response.status == 400
        async with session.post(url, json={"test": {"success": False}}) as response:
            assert response.status == 400
            assert "test predicate failed" in (await response.json())["error"]
    assert setup.store_calls() == ["Query"]  # only the valid (test) query reached a store


async def test_http_unknown_paths_cors_and_preflight(setup):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{setup.http}/store/other?token={setup.token}") as response:
            assert response.status == 404
            assert response.headers["Access-Control-Allow-Origin"] == "*"
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        }
        async with session.options(f"{setup.http}/store/query", headers=preflight) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            assert response.headers["Access-Control-Allow-Headers"] == "content-type, authorization"


async def test_http_limits_and_unavailable():
    async with gateway_setup(limits=LimitSettings(request_bytes_max=100)) as setup:
        async with aiohttp.ClientSession() as session:
            url = f"{setup.http}/store/mutate?token={setup.token}"
            async with session.post(url, data=b"\x0a" * 500) as response:
                assert response.status == 413
                assert response.headers["Access-Control-Allow-Origin"] == "*"
            for server in setup.servers:
                await server.stop(0)
            body = QueryBuilder.all().build().SerializeToString()
            async with session.post(f"{setup.http}/store/query?token={setup.token}", data=body) as response:
                assert response.status == 503
                assert "no store replica" in await response.text()
        assert setup.store_calls() == []


async def test_http_json_error_bodies_are_json(setup):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{setup.http}/store/query?token=nope", json={"all": {}}) as response:
            assert response.status == 401
            assert "malformed auth token" in json.loads(await response.text())["error"]


# --- store names resolved to every replica (Kubernetes headless Service) -------------------------------------


async def test_a_store_name_stands_for_every_address_it_resolves_to(monkeypatch):
    import socket

    from exogateway.routing import Router

    answers: dict[str, list[str]] = {}

    async def fake_getaddrinfo(host: str, port: int, **kwargs: object) -> list[tuple[object, ...]]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    first, second = FakeEntityStore("a"), FakeEntityStore("b")
    async with fake_store_server(first, "127.0.0.1:0") as server_a:
        port = server_a.bound_port
        async with fake_store_server(second, f"127.0.0.2:{port}"):
            monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
            answers["stores.test"] = ["127.0.0.1", "127.0.0.2", "127.0.0.1"]
            router = Router([f"stores.test:{port}"], resolve_names=True, health_interval_s=0.05, resolve_interval_s=0)
            await router.start()
            try:
                assert router.healthy_addresses() == [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]
                request = QueryBuilder.all().build().SerializeToString()
                for _ in range(4):
                    await router.unary("/exocore.store.v1.EntityStore/Query", request, timeout=5)
                assert (len(first.calls), len(second.calls)) == (2, 2)  # calls, not connections, spread

                answers["stores.test"] = ["127.0.0.2"]  # a pod went away: looked up again
                await asyncio.sleep(0.3)
                assert [r.address for r in router.replicas] == [f"127.0.0.2:{port}"]

                del answers["stores.test"]  # DNS trouble: the last answer is kept
                await asyncio.sleep(0.3)
                assert [r.address for r in router.replicas] == [f"127.0.0.2:{port}"]
            finally:
                await router.close()


async def test_without_resolution_a_store_name_is_one_replica():
    from exogateway.routing import Router

    router = Router(["localhost:1", "127.0.0.1:2"], health_interval_s=10)
    try:
        await router.set_addresses(["localhost:1", "127.0.0.1:2"])
        assert [r.address for r in router.replicas] == ["localhost:1", "127.0.0.1:2"]
    finally:
        await router.close()


# --- store links ----------------------------------------------------------------------------------------------------


async def test_unary_calls_go_over_the_store_link_when_the_replica_serves_one():
    from exocommon.grpc_util import ServiceServer
    from exocommon.grpc_util.link import link_registration
    from exocommon.testing.fake_store import SERVICE

    linked: list[str] = []

    async def query(body: bytes, remaining: float | None) -> bytes:
        request = query_pb2.EntityQuery.FromString(body)
        linked.append("Query")
        if request.HasField("test") and not request.test.success:
            raise InvalidArgument("test predicate failed (over the link)")
        result = query_pb2.EntityResults()
        result.entities.add().entity.id = "linked"
        return result.SerializeToString()

    async def mutate(body: bytes, remaining: float | None) -> bytes:
        linked.append("Mutate")
        return mutation_pb2.MutationResult(operation_ids=[7]).SerializeToString()

    store = FakeEntityStore("linked")
    handlers = {f"/{SERVICE}/Query": query, f"/{SERVICE}/Mutate": mutate}
    server = ServiceServer(
        "fake-linked-store",
        "127.0.0.1:0",
        [(entity_store_pb2_grpc.add_EntityStoreServicer_to_server, store, SERVICE), link_registration(handlers)],
        drain_delay_s=0,
        grace_s=0.2,
    )
    await server.start()
    try:
        async with gateway_for((server.address,)) as (gateway, token, _, _):
            async with Client(gateway.grpc_address, token) as client:
                results = await client.query(QueryBuilder.all())
                assert [r.entity.id for r in results.entities] == ["linked"]
                result = await client.mutate(MutationBuilder().put_trait("e", test_pb2.TestMessage(string1="x")))
                assert list(result.operation_ids) == [7]
                with pytest.raises(InvalidArgument, match="over the link"):
                    await client.query(query_pb2.EntityQuery(test=query_pb2.TestPredicate(success=False)))
                async with Client(gateway.grpc_address, "definitely-not-a-token") as bad:
                    with pytest.raises(Unauthenticated):
                        await bad.query(QueryBuilder.all())
            assert linked == ["Query", "Mutate", "Query"]
            assert store.calls == []  # nothing went to EntityStore itself
            assert gateway.statistics()["replicas"][0]["link"] is True
            await server.stop(0)
            async with Client(gateway.grpc_address, token) as client:
                with pytest.raises(Unavailable):
                    await client.query(QueryBuilder.all(), timeout=2)
    finally:
        await server.stop()


async def test_unavailable_answered_over_a_store_link_fails_over():
    # a replica whose chain node is down answers UNAVAILABLE over its link: the call goes to the next one
    from exocommon.grpc_util import ServiceServer
    from exocommon.grpc_util.link import link_registration
    from exocommon.testing.fake_store import SERVICE

    answered: list[str] = []

    def linked_store(name: str, chain_down: bool) -> ServiceServer:
        async def mutate(body: bytes, remaining: float | None) -> bytes:
            answered.append(name)
            if chain_down:
                raise Unavailable("the chain service is not available: connection refused")
            return mutation_pb2.MutationResult(operation_ids=[7]).SerializeToString()

        return ServiceServer(
            f"fake-{name}",
            "127.0.0.1:0",
            [
                (entity_store_pb2_grpc.add_EntityStoreServicer_to_server, FakeEntityStore(name), SERVICE),
                link_registration({f"/{SERVICE}/Mutate": mutate}),
            ],
            drain_delay_s=0,
            grace_s=0.2,
        )

    servers = [linked_store("down", True), linked_store("up", False)]
    for server in servers:
        await server.start()
    try:
        async with gateway_for(tuple(s.address for s in servers)) as (gateway, token, _, _):
            async with Client(gateway.grpc_address, token) as client:
                for _ in range(4):
                    result = await client.mutate(MutationBuilder().put_trait("e", test_pb2.TestMessage(string1="x")))
                    assert list(result.operation_ids) == [7]
            assert "down" in answered and answered.count("up") == 4
            assert gateway.statistics()["replicas"][0]["link"] is True
    finally:
        for server in servers:
            await server.stop()


async def test_replicas_without_a_link_are_called_directly(setup):
    async with Client(setup.address, setup.token) as client:
        await client.query(QueryBuilder.all())
    called = [replica for replica in setup.gateway.statistics()["replicas"] if replica["calls"]]
    assert [replica["link"] for replica in called] == [False]  # it answered UNIMPLEMENTED: no link
    assert setup.store_calls() == ["Query"]
