"""Three chain services as real processes on loopback: replication, SIGKILL and restart, a node
wiped back to its genesis, peer authentication, resumable subscriptions."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest
from cluster import COMMITTED, ChainClient, Cluster, entry_ids, wait_until

from exochain.model import BlockView
from exocommon import canonical
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2

pytestmark = pytest.mark.timeout(60)


def test_entries_appended_on_any_node_are_committed_on_all(cluster: Cluster):
    ids: list[int] = []
    for index, node in enumerate(cluster.nodes):
        ids += node.client().append([f"entry {index}.{i}".encode() for i in range(3)])
    assert len(set(ids)) == 9

    offsets = cluster.wait_committed(ids)

    chain = cluster.wait_same_chain()
    committed = entry_ids(chain)
    assert sorted(committed) == sorted(set(committed)), "an operation is twice in the chain"
    assert set(ids) <= set(committed)
    by_offset = {block.offset: block for block in chain}
    for operation_id, offset in offsets.items():
        assert operation_id in [op.operation_id for op in by_offset[offset].operations]
    entry = cluster.nodes[2].client().operations([ids[0]])[ids[0]]
    assert chain_pb2.Operation.FromString(entry.operation.operation_bytes).entry.data == b"entry 0.0"


class Writer(threading.Thread):
    """Appends small batches to one node as fast as it answers; records what was acknowledged."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.index = index
        self.acknowledged: list[int] = []
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        sequence = 0
        while not self.stopping.is_set():
            client = ChainClient(self.cluster.nodes[self.index].address)
            try:
                while not self.stopping.is_set():
                    batch = [f"w{sequence}.{i}".encode() for i in range(1 + sequence % 3)]
                    sequence += 1
                    self.acknowledged += client.append(batch, timeout=2)
                    time.sleep(0.01)
            except grpc.RpcError:
                self.failures += 1  # unknown outcome: neither acknowledged nor counted as lost
                time.sleep(0.05)
            finally:
                client.close()


def test_sigkilled_node_loses_nothing_it_acknowledged(cluster: Cluster):
    writer = Writer(cluster, 0)
    writer.start()
    try:
        wait_until(lambda: len(writer.acknowledged) >= 20, 15, "the writer to get acknowledgements")
        cluster.nodes[0].kill()
        before_restart = len(writer.acknowledged)
        time.sleep(1.0)
        cluster.nodes[0].start()
        wait_until(lambda: len(writer.acknowledged) >= before_restart + 20, 15, "acknowledgements after restart")
    finally:
        writer.stopping.set()
        writer.join(10)
    assert writer.failures >= 1, "the writer never saw the node die"

    cluster.wait_committed(writer.acknowledged, timeout=30)
    chain = cluster.wait_same_chain()
    counts = Counter(entry_ids(chain))
    assert [op for op, n in counts.items() if n > 1] == [], "operations committed more than once"
    assert set(writer.acknowledged) <= set(counts)


def test_wiped_node_catches_up_from_the_genesis(cluster: Cluster):
    ids = cluster.nodes[0].client().append([f"before {i}".encode() for i in range(10)])
    cluster.wait_committed(ids)
    wiped = cluster.nodes[2]
    wiped.kill()
    ids += cluster.nodes[1].client().append([f"while down {i}".encode() for i in range(10)])
    cluster.wait_committed(ids)

    wiped.wipe_chain(cluster.cell_keypair)
    wiped.start()
    assert len(wiped.client().blocks()) >= 1

    cluster.wait_committed(ids)
    chain = cluster.wait_same_chain()
    assert len(chain) > 2 and set(ids) <= set(entry_ids(chain))
    status = wiped.client().status()
    assert status.height == chain[-1].height and status.sync_status == "synchronized"


def _envelope(
    cluster: Cluster,
    keypair: Keypair,
    from_node_id: str,
    to_node_id: str,
    *,
    cell_id: str | None = None,
    sent_at: int | None = None,
) -> chain_pb2.PeerEnvelope:
    message = chain_pb2.PeerMessage(chain_sync_request=chain_pb2.ChainSyncRequest(from_offset=0)).SerializeToString()
    cell_id = cluster.cell_id if cell_id is None else cell_id
    sent_at = time.time_ns() if sent_at is None else sent_at
    payload = canonical.peer_envelope_payload(cell_id, from_node_id, to_node_id, sent_at, message)
    return chain_pb2.PeerEnvelope(
        cell_id=cell_id,
        from_node_id=from_node_id,
        to_node_id=to_node_id,
        sent_at=sent_at,
        message_bytes=message,
        signature=keypair.sign(payload),
    )


def test_deliver_refuses_envelopes_not_from_a_chain_node_of_the_cell(cluster: Cluster):
    sender, receiver = cluster.nodes[1], cluster.nodes[0]
    client = receiver.client()
    stranger = Keypair.generate()
    stranger_id = str(PeerId.from_public_key(stranger.public_key))
    minutes = 60 * 1_000_000_000
    refused = {
        "unknown node": (_envelope(cluster, stranger, stranger_id, receiver.node_id), "not a chain node"),
        "forged signature": (
            _envelope(cluster, stranger, sender.node_id, receiver.node_id),
            "signature does not verify",
        ),
        "other cell": (
            _envelope(cluster, sender.keypair, sender.node_id, receiver.node_id, cell_id=stranger_id),
            "is for cell",
        ),
        "other receiver": (_envelope(cluster, sender.keypair, sender.node_id, sender.node_id), "addressed to"),
        "too old": (
            _envelope(cluster, sender.keypair, sender.node_id, receiver.node_id, sent_at=time.time_ns() - 6 * minutes),
            "sent_at",
        ),
    }
    for case, (envelope, message) in refused.items():
        with pytest.raises(grpc.RpcError) as info:
            client.deliver(envelope)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
        assert message in info.value.details(), (case, info.value.details())

    tampered = _envelope(cluster, sender.keypair, sender.node_id, receiver.node_id)
    tampered.message_bytes = chain_pb2.PeerMessage(
        chain_sync_request=chain_pb2.ChainSyncRequest(from_offset=1)
    ).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        client.deliver(tampered)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The same message properly signed by a chain node of the cell is accepted.
    client.deliver(_envelope(cluster, sender.keypair, sender.node_id, receiver.node_id))


def _collect_until_caught_up(stream) -> tuple[list[chain_pb2.ChainEvent], chain_pb2.CaughtUp]:
    events = []
    for event in stream:
        if event.WhichOneof("event") == "caught_up":
            return events, event.caught_up
        events.append(event)
    raise AssertionError("stream ended before CaughtUp")


def _block_of(event: chain_pb2.ChainEvent) -> BlockView:
    return BlockView.from_proto(event.block)


def _op_id(signed: chain_pb2.SignedOperation) -> int:
    return chain_pb2.Operation.FromString(signed.operation_bytes).operation_id


def test_subscribe_replays_then_streams_live_and_resumes(cluster: Cluster):
    client = cluster.nodes[0].client()
    first = client.append([f"first {i}".encode() for i in range(5)])
    cluster.wait_committed(first)

    stream = client.subscribe(chain_pb2.SubscribeRequest())
    replay, caught_up = _collect_until_caught_up(stream)
    blocks = [_block_of(e) for e in replay if e.WhichOneof("event") == "block"]
    assert blocks[0].offset == 0 and [b.offset for b in blocks] == sorted({b.offset for b in blocks})
    assert set(first) <= set(entry_ids(blocks))
    assert caught_up.last_block_offset == blocks[-1].offset

    # Live: new entries arrive as pending operations, then in a block.
    live = client.append([f"live {i}".encode() for i in range(3)])
    seen_pending: set[int] = set()
    seen_blocks: list[BlockView] = []
    for event in stream:
        kind = event.WhichOneof("event")
        if kind == "pending":
            seen_pending.add(_op_id(event.pending.operation))
        elif kind == "block":
            seen_blocks.append(_block_of(event))
            if set(live) <= set(entry_ids(seen_blocks)):
                break
    stream.cancel()
    assert set(live) <= seen_pending
    assert seen_blocks[0].offset > blocks[-1].offset
    last_offset = seen_blocks[-1].offset
    last_pending = max(seen_pending)

    # Resume from what we have: only what came after is replayed, nothing is missed.
    later = cluster.nodes[1].client().append([f"later {i}".encode() for i in range(4)])
    cluster.wait_committed(later)
    pending_later = client.append([b"still pending?"])
    stream = client.subscribe(
        chain_pb2.SubscribeRequest(
            has_from_block_offset=True, from_block_offset=last_offset, from_pending_operation_id=last_pending
        )
    )
    replay, caught_up = _collect_until_caught_up(stream)
    resumed_blocks = [_block_of(e) for e in replay if e.WhichOneof("event") == "block"]
    resumed_pending = {_op_id(e.pending.operation) for e in replay if e.WhichOneof("event") == "pending"}
    assert all(b.offset > last_offset for b in resumed_blocks)
    got = set(entry_ids(resumed_blocks)) | resumed_pending
    # Committed before the resume: in the replayed blocks. The last one: in a block or still pending.
    assert set(later) <= set(entry_ids(resumed_blocks))
    if pending_later[0] not in got:
        for event in stream:
            if event.WhichOneof("event") == "block" and pending_later[0] in entry_ids([_block_of(event)]):
                break
            if event.WhichOneof("event") == "pending" and _op_id(event.pending.operation) == pending_later[0]:
                break
    stream.cancel()
    assert not set(entry_ids(resumed_blocks)) & set(entry_ids(blocks + seen_blocks)), "a block was sent twice"
    assert caught_up.last_block_offset >= last_offset


def test_operations_not_in_the_chain_nor_pending_are_left_out(cluster: Cluster):
    client = cluster.nodes[0].client()
    (operation_id,) = client.append([b"x"])
    found = client.operations([operation_id, 12345])
    assert list(found) == [operation_id]
    with pytest.raises(grpc.RpcError) as info:
        client.append([])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    cluster.wait_committed([operation_id])
    op = client.operations([operation_id])[operation_id]
    assert op.status == COMMITTED and op.block_height >= 2
