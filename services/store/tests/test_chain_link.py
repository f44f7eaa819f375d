"""The store's appends over its chain node's `ChainLogLink` (one stream instead of a call per Append),
against fake chain services over real gRPC: used when the chain serves it, with ChainLog's errors;
a chain without it (UNIMPLEMENTED) gets `ChainLog.Append` calls."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
import pytest

from exocommon.config import EntityIndexSettings
from exocommon.errors import InvalidArgument, Unavailable
from exocommon.grpc_util.link import CHAIN_LOG_LINK_SERVICE, LinkClient, link_registration
from exocore.chain.v1 import chain_pb2, chain_pb2_grpc
from exostore.entity_index import EntityIndex
from exostore.payloads import PayloadStore
from exostore.registry import TraitRegistry
from exostore.service import APPEND_METHOD, StoreService

KEY = bytes(range(32))


class FakeChainLog(chain_pb2_grpc.ChainLogServicer):
    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.linked: list[list[bytes]] = []
        self.link_error: Exception | None = None

    async def Append(self, request: chain_pb2.AppendRequest, context: grpc.aio.ServicerContext) -> object:
        self.calls.append(list(request.entries))
        return chain_pb2.AppendResponse(operation_ids=range(100, 100 + len(request.entries)))

    async def append_over_link(self, body: bytes, time_remaining: float | None) -> bytes:
        if self.link_error is not None:
            raise self.link_error
        request = chain_pb2.AppendRequest.FromString(body)
        self.linked.append(list(request.entries))
        return chain_pb2.AppendResponse(operation_ids=range(200, 200 + len(request.entries))).SerializeToString()


async def start(chain: FakeChainLog, with_link: bool) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    chain_pb2_grpc.add_ChainLogServicer_to_server(chain, server)
    if with_link:
        add, servicer, _ = link_registration({APPEND_METHOD: chain.append_over_link}, CHAIN_LOG_LINK_SERVICE)
        add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
def store_of(tmp_path):
    def make(channel: grpc.aio.Channel) -> StoreService:
        registry = TraitRegistry()
        index = EntityIndex(
            tmp_path,
            registry,
            EntityIndexSettings(chain_index_deferred_interval_secs=None),
            PayloadStore(tmp_path / "p"),
            KEY,
        )
        chain_link = LinkClient(channel, CHAIN_LOG_LINK_SERVICE)
        return StoreService(
            index, chain_pb2_grpc.ChainLogStub(channel), KEY, registry, ThreadPoolExecutor(1), chain_link=chain_link
        )

    return make


async def test_appends_go_over_the_link_and_keep_chain_log_errors(store_of):
    chain = FakeChainLog()
    server, channel = await start(chain, with_link=True)
    try:
        service = store_of(channel)
        assert await service.appends.append([b"a", b"b"]) == [200, 201]
        assert chain.linked == [[b"a", b"b"]] and chain.calls == []
        chain.link_error = InvalidArgument("entry 0 is too large")
        with pytest.raises(InvalidArgument, match="too large"):
            await service.appends.append([b"c"])
        chain.link_error = Unavailable("the chain storage failed")
        with pytest.raises(Unavailable, match="not available: the chain storage failed"):
            await service.appends.append([b"d"])
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_chain_without_the_link_gets_append_calls(store_of):
    chain = FakeChainLog()
    server, channel = await start(chain, with_link=False)
    try:
        service = store_of(channel)
        assert await service.appends.append([b"a"]) == [100]  # the link is refused: nothing ran, then a call
        assert await service.appends.append([b"b"]) == [100]
        assert chain.calls == [[b"a"], [b"b"]] and service.chain_link is not None and service.chain_link.unsupported
    finally:
        await channel.close()
        await server.stop(None)
