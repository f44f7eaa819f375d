"""Peer links over real gRPC against fake peers: `DeliverStream` delivery and acknowledgements, the
fallback to `Deliver` for a peer without streams, giving up on a silent peer; and the receiving
side (`ChainService.deliver_stream`): envelopes handled in order, acknowledged, a forged one refused."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from exochain.core.common import ChainCell, EngineConfig, LocalChainNode
from exochain.core.engine import Engine
from exochain.model import build_genesis
from exochain.service import DELIVER_ACK_EVERY, ChainService, EnvelopeSigner, PeerLink, ShellConfig
from exochain.storage.memory import MemoryChainStore, MemoryMetaStore, MemoryPendingStore
from exocommon.clock import MockTimeSource
from exocommon.errors import Unauthenticated
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2, chain_pb2_grpc


def node_id_of(keypair: Keypair) -> str:
    return str(PeerId.from_public_key(keypair.public_key))


def push(first: int) -> chain_pb2.PeerMessage:
    ranges = [chain_pb2.PendingSyncRange(from_operation=first, to_operation=first, operations_count=1)]
    return chain_pb2.PeerMessage(pending_sync=chain_pb2.PendingSyncRequest(ranges=ranges))


def firsts_of(envelopes: list[chain_pb2.PeerEnvelope]) -> list[int]:
    messages = [chain_pb2.PeerMessage.FromString(e.message_bytes) for e in envelopes]
    return [r.from_operation for m in messages for r in m.pending_sync.ranges]


class FakePeer(chain_pb2_grpc.ChainPeerServicer):
    """Records what arrives; acknowledges each envelope unless `silent`; no DeliverStream if `unary_only`."""

    def __init__(self, silent: bool = False, unary_only: bool = False) -> None:
        self.silent = silent
        self.unary_only = unary_only
        self.streamed: list[chain_pb2.PeerEnvelope] = []
        self.called: list[chain_pb2.PeerEnvelope] = []
        self.streams = 0

    async def Deliver(self, request: chain_pb2.PeerEnvelope, context: grpc.aio.ServicerContext) -> object:
        self.called.append(request)
        return chain_pb2.DeliverResponse()

    async def DeliverStream(
        self, request_iterator: AsyncIterator[chain_pb2.PeerEnvelope], context: grpc.aio.ServicerContext
    ) -> None:
        if self.unary_only:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.streams += 1
        handled = 0
        async for envelope in request_iterator:
            self.streamed.append(envelope)
            handled += 1
            if not self.silent:
                await context.write(chain_pb2.DeliverAck(handled=handled))


async def serve(peer: FakePeer, port: int = 0) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    chain_pb2_grpc.add_ChainPeerServicer_to_server(peer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def signer() -> EnvelopeSigner:
    key = Keypair.generate()
    return EnvelopeSigner("cell", LocalChainNode(node_id_of(key), key), MockTimeSource(time.time_ns()))


async def run_link(
    peer: FakePeer, config: ShellConfig
) -> tuple[PeerLink, list[int], asyncio.Task[None], grpc.aio.Server]:
    server, address = await serve(peer)
    delivered: list[int] = []
    link = PeerLink("peer", address, signer(), config, on_delivered=lambda _node, up_to: delivered.append(up_to))
    return link, delivered, asyncio.create_task(link.run()), server


async def stop(task: asyncio.Task[None], server: grpc.aio.Server) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.stop(None)


async def test_envelopes_go_over_two_streams_in_order_and_acknowledged_pushes_count_as_delivered():
    peer = FakePeer()
    link, delivered, task, server = await run_link(peer, ShellConfig())
    try:
        for first in (10, 20, 30):
            link.offer(push(first), own_up_to=first)
            await asyncio.sleep(0)  # a push at a time, like separate appends
        link.offer(push(99), urgent=True)
        await until(lambda: delivered and delivered[-1] == 30 and any(e.urgent for e in peer.streamed))
        assert peer.streams == 2 and not peer.called  # one urgent stream, one bulk stream, no unary call
        bulk = [e for e in peer.streamed if not e.urgent]
        urgent = [e for e in peer.streamed if e.urgent]
        firsts = [
            r.from_operation
            for e in bulk
            for r in chain_pb2.PeerMessage.FromString(e.message_bytes).pending_sync.ranges
        ]
        assert firsts == [10, 20, 30]  # in order (queued pushes may be merged into one envelope)
        assert [
            chain_pb2.PeerMessage.FromString(e.message_bytes).pending_sync.ranges[0].from_operation for e in urgent
        ] == [99]
        assert all(e.to_node_id == "peer" for e in peer.streamed)
        await until(lambda: link.backlog() == 0)
        assert link.sent == len(peer.streamed) and link.failed == 0
    finally:
        await stop(task, server)


async def test_a_peer_without_streams_gets_one_deliver_call_per_envelope():
    peer = FakePeer(unary_only=True)
    link, delivered, task, server = await run_link(peer, ShellConfig())
    try:
        link.offer(push(10), own_up_to=10)
        # The envelope the refused stream carried is given up on, as a failed call's (anti-entropy
        # repairs it); the link switches to calls.
        await until(lambda: not link.streams and delivered == [10])
        link.offer(push(20), own_up_to=20)
        link.offer(push(5), urgent=True)
        await until(lambda: delivered[-1] == 20 and len(peer.called) == 2)
        assert {e.urgent for e in peer.called} == {True, False} and not peer.streamed
    finally:
        await stop(task, server)


async def test_a_peer_that_acknowledges_nothing_is_given_up_on_and_the_stream_opened_again():
    peer = FakePeer(silent=True)
    link, delivered, task, server = await run_link(peer, ShellConfig(peer_deadline_s=0.3))
    try:
        link.offer(push(10), own_up_to=10)
        # Given up after the deadline: counted as failed, and reported so the engine does not wait.
        await until(lambda: delivered == [10])
        assert link.failed == 1 and link.sent == 0 and link.backlog() == 0
        link.offer(push(20), own_up_to=20)
        await until(lambda: peer.streams == 2 and len(peer.streamed) == 2)
    finally:
        await stop(task, server)


async def test_what_waits_for_a_peer_that_comes_up_is_delivered_not_given_up_on():
    with socket.socket() as probe:  # a free port, where the peer is not listening yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    delivered: list[int] = []
    link = PeerLink(
        "peer", f"127.0.0.1:{port}", signer(), ShellConfig(), on_delivered=lambda _node, up_to: delivered.append(up_to)
    )
    task = asyncio.create_task(link.run())
    peer = FakePeer()
    server: grpc.aio.Server | None = None
    try:
        link.offer(push(10), own_up_to=10)
        await until(lambda: delivered == [10])  # refused: given up on (the peer is down)
        assert link.failed == 1
        # The peer comes up 0.3 s later (as a node that starts after this one). What the link had to
        # send meanwhile waits for the connection; it used to go on a stream that failed at once.
        link.offer(push(20), own_up_to=20)
        await asyncio.sleep(0.3)
        server, _ = await serve(peer, port)
        await until(lambda: delivered == [10, 20])
        assert firsts_of(peer.streamed) == [20] and link.failed == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if server is not None:
            await server.stop(None)


# -- receiving ------------------------------------------------------------------------------------


def two_node_cell() -> tuple[ChainService, EnvelopeSigner, str, Keypair]:
    cell_key, a_key, b_key = Keypair.generate(), Keypair.generate(), Keypair.generate()
    a, b, cell_id = node_id_of(a_key), node_id_of(b_key), node_id_of(cell_key)
    cell = ChainCell(cell_id, cell_key.public_key, {a: a_key.public_key, b: b_key.public_key}, {})
    chain = MemoryChainStore()
    chain.write_block(build_genesis(cell_id, cell_key))
    time_source = MockTimeSource(time.time_ns())
    engine = Engine(
        EngineConfig(), LocalChainNode(b, b_key), cell, chain, MemoryPendingStore(), MemoryMetaStore(), time_source
    )
    service = ChainService(engine, {}, time_source, ShellConfig())
    return service, EnvelopeSigner(cell_id, LocalChainNode(a, a_key), time_source), b, a_key


CHAIN_SYNC = chain_pb2.PeerMessage(chain_sync_request=chain_pb2.ChainSyncRequest(from_offset=0))


async def one_by_one(items: list[chain_pb2.PeerEnvelope]) -> AsyncIterator[chain_pb2.PeerEnvelope]:
    for item in items:
        await asyncio.sleep(0.01)  # arriving one by one: each is acknowledged on its own
        yield item


async def at_once(items: list[chain_pb2.PeerEnvelope]) -> AsyncIterator[chain_pb2.PeerEnvelope]:
    for item in items:
        yield item  # no pause: the receiver never finds its queue empty until the end


async def deliver(service: ChainService, envelopes: AsyncIterator[chain_pb2.PeerEnvelope], acks: list[int]) -> None:
    """Feeds `envelopes` to `service`'s stream handler; `acks` gets the `handled` counts it acknowledged."""

    async def acknowledge(ack: chain_pb2.DeliverAck) -> None:
        acks.append(ack.handled)

    await service.deliver_stream(envelopes, acknowledge)


async def test_received_stream_envelopes_are_handled_in_order_and_acknowledged():
    service, sender, b, _ = two_node_cell()
    acks: list[int] = []
    await deliver(service, one_by_one([sender.seal(b, CHAIN_SYNC) for _ in range(5)]), acks)
    assert acks == [1, 2, 3, 4, 5]


async def test_a_steady_flow_is_acknowledged_every_so_often():
    service, sender, b, _ = two_node_cell()
    count = DELIVER_ACK_EVERY * 2 + 5
    acks: list[int] = []
    await deliver(service, at_once([sender.seal(b, CHAIN_SYNC) for _ in range(count)]), acks)
    assert acks == [DELIVER_ACK_EVERY, DELIVER_ACK_EVERY * 2, count]


async def test_a_forged_envelope_ends_the_stream_unauthenticated_after_the_good_ones():
    service, sender, b, _ = two_node_cell()
    forged = sender.seal(b, CHAIN_SYNC)
    forged.signature = bytes(64)
    acks: list[int] = []
    with pytest.raises(Unauthenticated, match="does not verify"):
        await deliver(service, one_by_one([sender.seal(b, CHAIN_SYNC), forged, sender.seal(b, CHAIN_SYNC)]), acks)
    assert acks == [1]  # the good one before it was handled and acknowledged; nothing after


# -- ChainLogLink: a store's appends over one stream ----------------------------------------------


async def test_appends_over_the_chain_log_link_are_durable_appends_with_chain_log_errors():
    from exochain.service import APPEND_METHOD, CHAIN_LOG_LINK_SERVICE, registrations
    from exocommon.grpc_util.link import LinkCallError, LinkClient

    service, _, _, _ = two_node_cell()
    server = grpc.aio.server()
    for add, servicer, _name in registrations(service):
        add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    link = LinkClient(channel, CHAIN_LOG_LINK_SERVICE)
    try:
        request = chain_pb2.AppendRequest(entries=[b"one", b"two"]).SerializeToString()
        ids = list(chain_pb2.AppendResponse.FromString(await link.call(APPEND_METHOD, request, 5.0)).operation_ids)
        assert len(ids) == 2 and ids == sorted(ids)
        stored = service.get_operations(ids)
        # In the pending store, as ChainLog.Append puts them.
        assert [chain_pb2.Operation.FromString(s.operation.operation_bytes).entry.data for s in stored] == [
            b"one",
            b"two",
        ]
        with pytest.raises(LinkCallError) as refused:
            await link.call(APPEND_METHOD, chain_pb2.AppendRequest().SerializeToString(), 5.0)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "at least one entry" in refused.value.details
    finally:
        await link.close()
        await channel.close()
        await server.stop(None)
