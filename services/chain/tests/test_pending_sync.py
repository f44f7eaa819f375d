"""Pending store synchronization (SPEC 2.7, acceptance cases of SPEC 9.3) with real signed operations.

Conversations are driven by `converse`, which delivers every `Outgoing` to its synchronizer until nobody
has anything left to say, counting the messages in each direction.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from exochain.core import pending_sync as pending_sync_module
from exochain.core.common import (
    META_CLEANUP_HEIGHT,
    META_CLEANUP_OFFSET,
    NS_PER_S,
    ChainCell,
    LocalChainNode,
    Outgoing,
    PendingSyncConfig,
)
from exochain.core.pending_sync import (
    UNBOUNDED,
    OperationDetails,
    PendingSynchronizer,
    SyncBound,
    SyncRangesBuilder,
    passes_height_filter,
    store_range_arguments,
)
from exochain.model import (
    BlockView,
    SignatureChecker,
    SignedOp,
    build_block_header,
    build_genesis,
    new_entry,
    sign_operations,
)
from exochain.storage.base import CommitStatus, PendingEntry
from exochain.storage.memory import MemoryChainStore, MemoryMetaStore, MemoryPendingStore
from exocommon import canonical
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2

NOW = 1_000 * NS_PER_S


class CountingPendingStore(MemoryPendingStore):
    """Counts `put` calls: one request must be stored by one durable batch."""

    def __init__(self) -> None:
        super().__init__()
        self.put_calls = 0

    def put(self, ops):
        self.put_calls += 1
        return super().put(ops)


def keypair(seed: int) -> Keypair:
    return Keypair.from_seed(bytes([seed]) * 32)


def node_id_of(kp: Keypair) -> str:
    return str(PeerId.from_public_key(kp.public_key))


@dataclass
class Node:
    local: LocalChainNode
    pending: CountingPendingStore
    chain: MemoryChainStore
    meta: MemoryMetaStore
    sync: PendingSynchronizer

    @property
    def node_id(self) -> str:
        return self.local.node_id

    def ops(self, ids, data: bytes = b"") -> list[SignedOp]:
        """Operations of this node, signed as one batch."""
        return sign_operations(
            [new_entry(i, self.node_id, data or f"entry {i}".encode()) for i in ids], self.local.keypair
        )

    def store(self, ops) -> None:
        self.pending.put(ops)

    def snapshot(self) -> list[tuple[int, bytes]]:
        return [(entry.op.operation_id, entry.op.hash) for entry in self.pending.range()]


class Cluster:
    """`chain_nodes` chain nodes plus `other_members` members without the chain role."""

    def __init__(self, chain_nodes: int, other_members: int = 0, config: PendingSyncConfig | None = None) -> None:
        self.cell_keypair = keypair(200)
        self.cell_id = node_id_of(self.cell_keypair)
        chain_keypairs = [keypair(i + 1) for i in range(chain_nodes)]
        self.member_keypairs = [keypair(100 + i) for i in range(other_members)]
        self.cell = ChainCell(
            cell_id=self.cell_id,
            cell_public_key=self.cell_keypair.public_key,
            chain_node_keys={node_id_of(kp): kp.public_key for kp in chain_keypairs},
            member_keys={node_id_of(kp): kp.public_key for kp in chain_keypairs + self.member_keypairs},
        )
        self.config = config or PendingSyncConfig()
        self.nodes = [self._node(kp) for kp in chain_keypairs]

    def _node(self, kp: Keypair) -> Node:
        local = LocalChainNode(node_id_of(kp), kp)
        pending, chain, meta = CountingPendingStore(), MemoryChainStore(), MemoryMetaStore()
        checker = SignatureChecker(self.cell.member_key)
        sync = PendingSynchronizer(self.config, local, self.cell, pending, chain, meta, checker)
        return Node(local, pending, chain, meta, sync)

    def by_id(self, node_id: str) -> Node:
        return next(node for node in self.nodes if node.node_id == node_id)


def converse(cluster: Cluster, sender: Node, first: list[Outgoing], now_ns: int = NOW) -> Counter:
    """Delivers messages until none is left; counts them per (from, to) node id."""
    counts: Counter = Counter()
    queue = [(sender.node_id, outgoing) for outgoing in first]
    while queue:
        from_id, outgoing = queue.pop(0)
        counts[(from_id, outgoing.to_node_id)] += 1
        assert sum(counts.values()) < 100, "conversation does not end"
        receiver = cluster.by_id(outgoing.to_node_id)
        replies, _new = receiver.sync.handle_request(from_id, outgoing.message.pending_sync, now_ns)
        queue.extend((receiver.node_id, reply) for reply in replies)
    return counts


def sync_nodes(cluster: Cluster, a: Node, b: Node, now_ns: int = NOW) -> tuple[int, int]:
    """A's periodic whole-store request to B, and the conversation it starts: (a->b, b->a) counts."""
    first = a.sync.tick(now_ns)
    assert [o.to_node_id for o in first] == [b.node_id]
    counts = converse(cluster, a, first, now_ns)
    return counts[(a.node_id, b.node_id)], counts[(b.node_id, a.node_id)]


def only_request(outgoing: list[Outgoing]) -> chain_pb2.PendingSyncRequest:
    assert len(outgoing) == 1
    return outgoing[0].message.pending_sync


# --- tick ------------------------------------------------------------------------------------


def test_tick_sends_nothing_in_a_one_node_cell():
    cluster = Cluster(1)
    assert cluster.nodes[0].sync.tick(NOW) == []


def test_tick_sends_one_request_in_a_two_node_cell():
    cluster = Cluster(2)
    a, b = cluster.nodes
    outgoing = a.sync.tick(NOW)
    assert [o.to_node_id for o in outgoing] == [b.node_id]
    request = outgoing[0].message.pending_sync
    assert len(request.ranges) == 1 and request.ranges[0].operations_count == 0
    assert request.ranges[0].operations_hash == canonical.operations_hash([])


def test_tick_sends_one_request_per_chain_peer_and_none_to_other_members():
    cluster = Cluster(3, other_members=2)
    a, b, c = cluster.nodes
    a.store(a.ops(range(1, 5)))
    outgoing = a.sync.tick(NOW)
    assert sorted(o.to_node_id for o in outgoing) == sorted([b.node_id, c.node_id])
    members = {node_id_of(kp) for kp in cluster.member_keypairs}
    new = a.ops([10])
    a.store(new)
    pushed = a.sync.handle_new_operations(new, NOW)
    assert sorted(o.to_node_id for o in pushed) == sorted([b.node_id, c.node_id])
    assert not members & {o.to_node_id for o in outgoing + pushed}


def test_request_from_a_member_without_the_chain_role_is_dropped():
    cluster = Cluster(2, other_members=1)
    a, b = cluster.nodes
    a.store(a.ops(range(1, 5)))
    request = only_request(a.sync.tick(NOW))
    stranger = node_id_of(cluster.member_keypairs[0])
    assert b.sync.handle_request(stranger, request, NOW) == ([], [])
    assert b.pending.count() == 0 and b.sync.statistics().requests_dropped == 1


# --- building ranges -------------------------------------------------------------------------


def test_100_operations_make_4_chained_ranges_from_unbounded_to_the_push_horizon():
    cluster = Cluster(2)
    a, _ = cluster.nodes
    ops = a.ops(range(1, 101))
    a.store(ops)
    recent = a.ops([NOW - 1])  # being pushed: left to the next check
    a.store(recent)
    ranges = only_request(a.sync.tick(NOW)).ranges
    assert len(ranges) == 4
    assert [r.operations_count for r in ranges] == [31, 31, 31, 7]
    assert (ranges[0].from_operation, ranges[0].from_included) == (0, False)
    horizon = NOW - cluster.config.request_min_interval_ns // 2
    assert a.sync.push_horizon(NOW) == horizon
    assert (ranges[-1].to_operation, ranges[-1].to_included) == (horizon, True)
    for previous, following in zip(ranges, ranges[1:], strict=False):
        assert previous.to_operation == following.from_operation
        assert previous.to_included and not following.from_included
    hashes = [op.hash for op in ops]
    assert [r.operations_hash for r in ranges] == [
        canonical.operations_hash(hashes[i : i + 31]) for i in range(0, 100, 31)
    ]
    assert all(not r.operations and not r.operations_headers for r in ranges)


def test_whole_store_request_filters_operations_committed_before_the_cleanup_height():
    cluster = Cluster(2)
    a, b = cluster.nodes
    ops = a.ops(range(1, 101))
    a.store(ops)
    a.pending.set_committed([op.operation_id for op in ops], CommitStatus(10, 10))

    request = only_request(a.sync.tick(NOW))
    assert request.from_block_height == 0
    assert len(request.ranges) > 1

    a.meta.set_int(META_CLEANUP_OFFSET, 0)
    a.meta.set_int(META_CLEANUP_HEIGHT, 1000)
    request = only_request(a.sync.tick(NOW + 30 * NS_PER_S))
    assert request.from_block_height == 1000 + cluster.config.operations_depth_after_cleanup
    assert len(request.ranges) == 1
    assert request.ranges[0].operations_count == 0


def test_from_block_height_is_the_higher_of_the_request_and_the_cleanup_state():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    assert node.sync.from_block_height(0) is None
    assert node.sync.from_block_height(7) == 7
    node.meta.set_int(META_CLEANUP_HEIGHT, 10)
    assert node.sync.from_block_height(0) == 12
    assert node.sync.from_block_height(20) == 20
    # A request from a node whose cleanup is behind ours: we cannot hand over what we cleaned up.
    assert node.sync.from_block_height(5) == 12


def test_height_filter_keeps_uncommitted_and_recently_committed_operations():
    cluster = Cluster(1)
    op = cluster.nodes[0].ops([1])[0]
    assert passes_height_filter(PendingEntry(op), None)
    assert passes_height_filter(PendingEntry(op), 2)
    assert passes_height_filter(PendingEntry(op, CommitStatus(0, 2)), 2)
    assert not passes_height_filter(PendingEntry(op, CommitStatus(0, 2)), 3)
    assert passes_height_filter(PendingEntry(op, CommitStatus(0, 2)), None)


@pytest.mark.parametrize(
    ("lower", "upper", "expected"),
    [
        (UNBOUNDED, UNBOUNDED, (None, None)),
        (SyncBound(5, True), UNBOUNDED, (4, None)),
        (SyncBound(5, False), SyncBound(9, True), (5, 9)),
        (SyncBound(5, False), SyncBound(9, False), (5, 8)),
        (SyncBound(1, True), SyncBound(1, True), (None, 1)),
        (SyncBound(5, False), SyncBound(5, True), None),
        (UNBOUNDED, SyncBound(1, False), None),
    ],
)
def test_store_range_arguments_map_sync_bounds(lower, upper, expected):
    assert store_range_arguments(lower, upper) == expected


def test_ranges_builder_chains_ranges_and_ends_at_the_last_operation():
    cluster = Cluster(1)
    ops = cluster.nodes[0].ops(range(1, 91))
    builder = SyncRangesBuilder(30)
    for op in ops:
        builder.push_operation(op, OperationDetails.HASH)
    ranges = builder.build()
    assert len(ranges) == 3
    assert (ranges[0].from_operation, ranges[0].from_included) == (0, False)
    for previous, following in zip(ranges, ranges[1:], strict=False):
        assert (previous.to_operation, previous.to_included) == (following.from_operation, True)
        assert not following.from_included
    assert (ranges[-1].to_operation, ranges[-1].to_included) == (90, True)
    assert ranges[0].operations_hash != ranges[1].operations_hash
    assert all(not r.operations and not r.operations_headers for r in ranges)


def test_ranges_builder_header_mode_carries_group_ids_and_full_mode_decodable_operations():
    cluster = Cluster(1)
    ops = cluster.nodes[0].ops(range(1, 11))
    headers = SyncRangesBuilder(30)
    full = SyncRangesBuilder(30)
    for op in ops:
        headers.push_operation(op, OperationDetails.HEADER)
        full.push_operation(op, OperationDetails.FULL)
    (header_range,) = headers.build()
    assert not header_range.operations
    assert [(h.group_id, h.operation_id, h.operation_hash) for h in header_range.operations_headers] == [
        (op.group_id, op.operation_id, op.hash) for op in ops
    ]
    (full_range,) = full.build()
    assert not full_range.operations_headers
    decoded = [SignedOp.from_proto(signed) for signed in full_range.operations]
    assert decoded == ops and decoded[0].entry_data == b"entry 1"


# --- conversations (SPEC 2.7 message counts) ---------------------------------------------------


def fill(cluster: Cluster, case: str) -> None:
    a, b = cluster.nodes
    ops = a.ops(range(1, 101))
    if case == "equal":
        a.store(ops)
        b.store(ops)
    elif case == "full_to_empty":
        a.store(ops)
    elif case == "empty_to_full":
        b.store(ops)
    elif case == "full_to_half":
        a.store(ops)
        b.store([op for op in ops if op.operation_id % 2 == 0])
    elif case == "half_to_full":
        a.store([op for op in ops if op.operation_id % 2 == 0])
        b.store(ops)
    elif case == "disjoint":
        a.store([op for op in ops[:10] if op.operation_id % 2 == 0])
        b.store([op for op in ops[:10] if op.operation_id % 2 == 1 and op.operation_id % 3 == 0])


@pytest.mark.parametrize(
    ("case", "a_to_b", "b_to_a"),
    [
        ("equal", 1, 0),
        ("full_to_empty", 2, 1),
        ("empty_to_full", 1, 1),
        ("full_to_half", 2, 1),
        ("half_to_full", 2, 2),
        ("disjoint", 2, 2),
    ],
)
def test_conversation_message_counts_and_convergence(case, a_to_b, b_to_a):
    cluster = Cluster(2)
    a, b = cluster.nodes
    fill(cluster, case)
    before = set(a.snapshot()) | set(b.snapshot())
    assert sync_nodes(cluster, a, b) == (a_to_b, b_to_a)
    assert a.snapshot() == b.snapshot()
    assert set(a.snapshot()) == before


def test_operations_new_to_the_store_are_returned_once():
    cluster = Cluster(2)
    a, b = cluster.nodes
    ops = a.ops(range(1, 41))
    a.store(ops)
    first = a.sync.tick(NOW)
    returned: list[SignedOp] = []
    queue = [(a, b, o) for o in first]
    while queue:
        sender, receiver, outgoing = queue.pop(0)
        replies, new = receiver.sync.handle_request(sender.node_id, outgoing.message.pending_sync, NOW)
        if receiver is b:
            returned.extend(new)
        else:
            assert new == []
        queue.extend((receiver, sender, reply) for reply in replies)
    assert returned == ops
    assert b.sync.statistics().operations_stored == 40


@pytest.mark.parametrize(
    ("existing", "new_id"),
    [(list(range(1, 51)), 52), (list(range(2, 101, 2)), 51)],
    ids=["after_last", "among_existing"],
)
def test_new_local_operation_is_pushed_directly(existing, new_id):
    cluster = Cluster(2)
    a, b = cluster.nodes
    ops = a.ops(existing)
    a.store(ops)
    b.store(ops)
    new = a.ops([new_id])
    a.store(new)
    pushed = a.sync.handle_new_operations(new, NOW)
    request = only_request(pushed)
    assert (request.ranges[0].from_operation, request.ranges[0].from_included) == (new_id, True)
    assert [SignedOp.from_proto(s) for r in request.ranges for s in r.operations] == new
    counts = converse(cluster, a, pushed)
    assert (counts[(a.node_id, b.node_id)], counts[(b.node_id, a.node_id)]) == (1, 0)
    assert b.pending.get(new_id).op == new[0]
    assert a.snapshot() == b.snapshot()


def test_a_batch_of_new_operations_is_one_request_with_the_rest_hashed():
    cluster = Cluster(2, config=PendingSyncConfig(max_operations_per_range=3))
    a, b = cluster.nodes
    old = a.ops([1, 2, 3, 5, 8, 13])
    a.store(old)
    b.store(old)
    new = a.ops([4, 6, 7, 20])
    a.store(new)
    request = only_request(a.sync.handle_new_operations(new, NOW))
    # The push covers [first new, last new]: nothing after it.
    assert (request.ranges[0].from_operation, request.ranges[0].from_included) == (4, True)
    assert (request.ranges[-1].to_operation, request.ranges[-1].to_included) == (20, True)
    assert sum(r.operations_count for r in request.ranges) == 7  # 4 5 6 7 8 13 20
    assert [SignedOp.from_proto(s) for r in request.ranges for s in r.operations] == new
    assert all(not r.operations_headers for r in request.ranges)
    counts = converse(cluster, a, [Outgoing(b.node_id, chain_pb2.PeerMessage(pending_sync=request))])
    assert sum(counts.values()) == 1
    assert a.snapshot() == b.snapshot()


def test_push_that_shows_fewer_operations_than_it_counts_gets_the_missing_ones_asked_for():
    # B missed operation 20 (say, a lost push); A's next push covers [10, 30] and counts 20 in its hash.
    cluster = Cluster(2)
    a, b = cluster.nodes
    old = a.ops([1, 2, 3, 20])
    a.store(old)
    b.store(old[:3])
    new = a.ops([10, 30])
    a.store(new)
    counts = converse(cluster, a, a.sync.handle_new_operations(new, NOW))
    assert (counts[(a.node_id, b.node_id)], counts[(b.node_id, a.node_id)]) == (2, 1)
    assert a.snapshot() == b.snapshot()


def test_push_leaves_out_what_follows_its_range():
    # B missed operation 20; a push of [10, 10] does not cover it: B answers nothing (the periodic
    # whole-store check finds 20), and the push does not grow with the operations after it.
    cluster = Cluster(2)
    a, b = cluster.nodes
    old = a.ops([1, 2, 3, *range(20, 120)])
    a.store(old)
    b.store(old[:3])
    new = a.ops([10])
    a.store(new)
    request = only_request(a.sync.handle_new_operations(new, NOW))
    assert [(r.from_operation, r.to_operation, r.operations_count) for r in request.ranges] == [(10, 10, 1)]
    counts = converse(cluster, a, [Outgoing(b.node_id, chain_pb2.PeerMessage(pending_sync=request))])
    assert sum(counts.values()) == 1
    assert b.pending.get(10) is not None and b.pending.get(20) is None
    converse(cluster, a, a.sync.tick(NOW))
    assert a.snapshot() == b.snapshot()


def test_big_batches_are_pushed_in_several_requests(monkeypatch):
    monkeypatch.setattr(pending_sync_module, "PUSH_BYTES_MAX", 2_000)
    cluster = Cluster(2)
    a, b = cluster.nodes
    new = a.ops(list(range(1, 41)))
    a.store(new)
    pushed = a.sync.handle_new_operations(new, NOW)
    requests = [out.message.pending_sync for out in pushed]
    assert len(requests) > 1
    for request in requests:
        assert sum(len(s.SerializeToString()) for r in request.ranges for s in r.operations) <= 2_000
    counts = converse(cluster, a, pushed)
    assert counts[(b.node_id, a.node_id)] == 0
    assert a.snapshot() == b.snapshot()


def test_replies_carry_a_bounded_size_of_full_operations_and_still_converge(monkeypatch):
    monkeypatch.setattr(pending_sync_module, "REPLY_FULL_BYTES_MAX", 3_000)
    cluster = Cluster(2)
    a, b = cluster.nodes
    a.store(a.ops(list(range(1, 101))))
    replies: list[chain_pb2.PendingSyncRequest] = []
    original = a.sync.handle_request

    def recording(from_node_id, request, now_ns):
        outgoing, new_ops = original(from_node_id, request, now_ns)
        replies.extend(out.message.pending_sync for out in outgoing)
        return outgoing, new_ops

    monkeypatch.setattr(a.sync, "handle_request", recording)
    converse(cluster, b, b.sync.tick(NOW))  # B, empty, asks A: A's answers carry everything over rounds
    assert a.snapshot() == b.snapshot()
    full_bytes = [sum(len(op.SerializeToString()) for r in reply.ranges for op in r.operations) for reply in replies]
    assert len(replies) > 5 and 0 < max(full_bytes) <= 3_000


def test_new_operations_must_be_stored_before_they_are_pushed():
    cluster = Cluster(2)
    a, _ = cluster.nodes
    with pytest.raises(ValueError, match="pending store"):
        a.sync.handle_new_operations(a.ops([5]), NOW)
    b_ops = cluster.nodes[1].ops([6])
    a.store(b_ops)
    with pytest.raises(ValueError, match="local"):
        a.sync.handle_new_operations(b_ops, NOW)


def test_cleaned_up_operations_are_not_synchronized_nor_revived():
    cluster = Cluster(2)
    a, b = cluster.nodes
    ops = a.ops(range(1, 101))
    a.store(ops)
    for op in ops:
        height = op.operation_id // 10
        a.pending.set_committed([op.operation_id], CommitStatus(height, height))

    sync_nodes(cluster, a, b, NOW)
    assert b.pending.count() == 100

    b.pending.delete([op.operation_id for op in ops])
    a.meta.set_int(META_CLEANUP_OFFSET, 3)
    a.meta.set_int(META_CLEANUP_HEIGHT, 3)
    sync_nodes(cluster, a, b, NOW + 30 * NS_PER_S)
    assert b.pending.count() == 51  # ids 50-100: committed at height >= 3 + 2
    assert [op_id for op_id, _ in b.snapshot()] == list(range(50, 101))

    assert sync_nodes(cluster, b, a, NOW + 60 * NS_PER_S) == (1, 0)
    assert b.pending.count() == 51 and a.pending.count() == 100


def test_operation_cleaned_up_from_the_pending_store_is_not_stored_again():
    cluster = Cluster(2)
    a, b = cluster.nodes
    genesis = build_genesis(cluster.cell_id, cluster.cell_keypair)
    committed = b.ops([5, 6])
    block = BlockView(build_block_header(cluster.cell_id, genesis.head, 7, b.node_id, committed), tuple(committed))
    for node in (a, b):
        node.chain.write_block(genesis)
        node.chain.write_block(block)
    # A committed and cleaned up block 2 (height 2); B still has its operations, plus a newer one.
    a.meta.set_int(META_CLEANUP_OFFSET, block.offset)
    a.meta.set_int(META_CLEANUP_HEIGHT, block.height)
    newer = b.ops([9])
    b.store(committed + newer)
    counts = converse(cluster, b, b.sync.tick(NOW))
    assert sum(counts.values()) >= 2
    assert [op_id for op_id, _ in a.snapshot()] == [9]


# --- invalid input -----------------------------------------------------------------------------


def test_operations_with_bad_signatures_or_from_strangers_are_dropped_and_the_rest_stored(caplog):
    cluster = Cluster(2, other_members=1)
    a, b = cluster.nodes
    good = a.ops([1, 2])
    forged = sign_operations([new_entry(3, a.node_id, b"forged")], b.local.keypair)  # claims A, signed by B
    outsider_keypair = keypair(150)
    outsider = sign_operations([new_entry(4, node_id_of(outsider_keypair), b"x")], outsider_keypair)
    member_keypair = cluster.member_keypairs[0]
    member = sign_operations([new_entry(5, node_id_of(member_keypair), b"m")], member_keypair)
    garbage = chain_pb2.SignedOperation(operation_bytes=b"\xff\xff", batch_size=1)
    all_ops = [good[0], forged[0], outsider[0], good[1], member[0]]
    sync_range = chain_pb2.PendingSyncRange(
        operations_hash=canonical.operations_hash([op.hash for op in all_ops]),
        operations_count=len(all_ops),
        operations=[op.to_proto() for op in all_ops] + [garbage],
    )
    request = chain_pb2.PendingSyncRequest(ranges=[sync_range])
    with caplog.at_level(logging.WARNING, logger="exochain.core.pending_sync"):
        replies, new = b.sync.handle_request(a.node_id, request, NOW)
    assert new == [good[0], good[1], member[0]]
    assert [op_id for op_id, _ in b.snapshot()] == [1, 2, 5]
    assert b.pending.put_calls == 1
    assert b.sync.statistics().operations_dropped == 3
    assert sum("dropped" in record.getMessage() for record in caplog.records) == 3
    # Every operation the range counts came in full: asking for more could not help, so no reply.
    assert replies == []


def test_request_with_a_range_ending_before_it_starts_is_dropped():
    cluster = Cluster(2)
    a, b = cluster.nodes
    good = a.ops([1])
    bad = chain_pb2.PendingSyncRange(from_operation=10, to_operation=5, to_included=True, operations_count=1)
    bad.operations.append(good[0].to_proto())
    assert b.sync.handle_request(a.node_id, chain_pb2.PendingSyncRequest(ranges=[bad]), NOW) == ([], [])
    assert b.pending.count() == 0


def test_conflicting_operations_under_one_id_end_the_conversation():
    cluster = Cluster(2)
    a, b = cluster.nodes
    shared = a.ops(range(1, 10))
    a.store(shared + a.ops([20], b"a's version"))
    b.store(shared + a.ops([20], b"b's version"))
    a_to_b, b_to_a = sync_nodes(cluster, a, b)
    assert a_to_b + b_to_a <= 4
    assert a.pending.get(20).op.entry_data == b"a's version"
    assert b.pending.get(20).op.entry_data == b"b's version"


# --- periodic checks ---------------------------------------------------------------------------


def tick_times(cluster: Cluster, seconds: int, b_ticks: bool) -> list[int]:
    """Ticks every second; returns when A's periodic request went to B (all messages delivered)."""
    a, b = cluster.nodes
    sent_at = []
    for second in range(seconds):
        now = NOW + second * NS_PER_S
        outgoing = a.sync.tick(now)
        if outgoing:
            sent_at.append(second)
            converse(cluster, a, outgoing, now)
        if b_ticks:
            converse(cluster, b, b.sync.tick(now), now)
    return sent_at


def intervals(times: list[int]) -> list[int]:
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def test_periodic_check_stays_at_the_min_interval_while_the_peer_talks_to_us():
    cluster = Cluster(2)
    a, b = cluster.nodes
    a.store(a.ops(range(1, 20)))
    b.store(a.ops(range(1, 20)))
    assert set(intervals(tick_times(cluster, 120, b_ticks=True))) == {5}


def test_periodic_check_backs_off_up_to_the_max_interval_when_the_peer_is_silent():
    cluster = Cluster(2)
    a, _ = cluster.nodes
    sent_at = []
    for second in range(200):
        if a.sync.tick(NOW + second * NS_PER_S):  # never delivered: the peer never answers
            sent_at.append(second)
    assert intervals(sent_at)[:6] == [5, 10, 15, 25, 30, 30]
    assert max(intervals(sent_at)) == 30


def test_periodic_check_returns_to_the_min_interval_once_the_peer_answers():
    cluster = Cluster(2)
    a, b = cluster.nodes
    for second in range(60):  # silent peer: backed off
        a.sync.tick(NOW + second * NS_PER_S)
    sent_at = []
    for second in range(60, 200):
        now = NOW + second * NS_PER_S
        outgoing = a.sync.tick(now)
        if outgoing:
            sent_at.append(second)
            converse(cluster, a, outgoing, now)
        converse(cluster, b, b.sync.tick(now), now)
    assert set(intervals(sent_at)[1:]) == {5}


# --- convergence under random states -----------------------------------------------------------


def random_cluster(rng: random.Random, conflicts: bool) -> Cluster:
    """2-4 nodes holding random subsets of operations written by random nodes; with `conflicts`, also
    same ids with other content, commit states that differ between nodes, and cleanup heights."""
    config = PendingSyncConfig(max_operations_per_range=rng.choice([1, 2, 3, 5, 30]))
    cluster = Cluster(rng.randint(2, 4), config=config)
    ids = rng.sample(range(1, 400), rng.randint(0, 120))
    ops = [op for i in ids for op in cluster.nodes[rng.randrange(len(cluster.nodes))].ops([i])]
    for node in cluster.nodes:
        node.store([op for op in ops if rng.random() < 0.5])
    if conflicts:
        for node in cluster.nodes:
            node.store(node.ops([i for i in ids if rng.random() < 0.1], b"another version"))
            for entry in list(node.pending.range()):
                if rng.random() < 0.2:
                    height = rng.randint(1, 8)
                    node.pending.set_committed([entry.op.operation_id], CommitStatus(height, height))
            if rng.random() < 0.5:
                node.meta.set_int(META_CLEANUP_HEIGHT, rng.randint(1, 5))
    return cluster


def deliver_in_random_order(cluster: Cluster, rng: random.Random, outgoing: list[tuple[str, Outgoing]]) -> int:
    """Every node's messages at once, delivered in a random order (crossing conversations)."""
    queue = list(outgoing)
    delivered = 0
    while queue:
        from_id, message = queue.pop(rng.randrange(len(queue)))
        delivered += 1
        assert delivered < 2000, "conversations do not end"
        receiver = cluster.by_id(message.to_node_id)
        replies, _ = receiver.sync.handle_request(from_id, message.message.pending_sync, NOW)
        queue.extend((receiver.node_id, reply) for reply in replies)
    return delivered


def test_four_nodes_converge_after_each_ticks_once():
    cluster = Cluster(4, config=PendingSyncConfig(max_operations_per_range=4))
    shared = cluster.nodes[0].ops(range(1, 11))
    for index, node in enumerate(cluster.nodes):
        node.store(shared + node.ops(range(100 + index, 200, 4)))
    for node in cluster.nodes:
        converse(cluster, node, node.sync.tick(NOW))
    snapshots = [node.snapshot() for node in cluster.nodes]
    assert all(snapshot == snapshots[0] for snapshot in snapshots)
    assert len(snapshots[0]) == 110


@pytest.mark.parametrize("seed", range(30))
def test_random_stores_converge_after_each_node_ticks_once(seed):
    rng = random.Random(seed)
    cluster = random_cluster(rng, conflicts=False)
    expected = sorted(set().union(*(node.snapshot() for node in cluster.nodes)))
    if seed % 2:
        for node in cluster.nodes:
            converse(cluster, node, node.sync.tick(NOW))
        assert sum(node.sync.statistics().replies_suppressed for node in cluster.nodes) == 0
    else:
        deliver_in_random_order(cluster, rng, [(n.node_id, o) for n in cluster.nodes for o in n.sync.tick(NOW)])
    assert all(node.snapshot() == expected for node in cluster.nodes)


@pytest.mark.parametrize("seed", range(30))
def test_conversations_end_despite_conflicts_and_differing_commit_states(seed):
    # Stores cannot fully converge here, but no conversation may go on forever (the helpers assert it).
    rng = random.Random(seed)
    cluster = random_cluster(rng, conflicts=True)
    for node in cluster.nodes:
        converse(cluster, node, node.sync.tick(NOW))
    later = NOW + 60 * NS_PER_S
    deliver_in_random_order(cluster, rng, [(n.node_id, o) for n in cluster.nodes for o in n.sync.tick(later)])


def test_commit_states_that_differ_between_nodes_end_the_conversation():
    # Each node holds an operation the other filters out (committed below cleanup height + 2 there):
    # sending it again cannot help, so the repeated reply is not sent.
    cluster = Cluster(2)
    a, b = cluster.nodes
    ops = a.ops([10, 20])
    for node in (a, b):
        node.store(ops)
        node.meta.set_int(META_CLEANUP_HEIGHT, 5)
    a.pending.set_committed([20], CommitStatus(1, 1))
    b.pending.set_committed([10], CommitStatus(1, 1))
    assert sync_nodes(cluster, a, b) == (2, 2)  # hash, headers [20], full 10, full 20, (full 10 again: not sent)
    assert a.sync.statistics().replies_suppressed == 1
