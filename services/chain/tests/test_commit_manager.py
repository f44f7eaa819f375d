"""Commit manager (SPEC 2.8): every scenario of SPEC 9.4, with real keys and signatures, plus
quorum checks on signatures and a three-node run.

Heights: the original's test chains start at height 0; here every chain starts with the genesis of
`model.build_genesis`, at height **1**, so the first committed block has height 2 and each expected
height is one more than the original's (the lagging-node case still ends at 4: the original starts
from a 2-block dummy chain at heights 0-1, this one from the genesis alone).

Nodes never talk to each other here: "delivering" an operation is putting it in another node's
pending store, which is what the pending synchronizer does in the engine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from exochain.core import commit_manager as commit_manager_module
from exochain.core.commit_manager import (
    CommitManager,
    CommitResult,
    NotChainNode,
    PendingBlockStatus,
    commit_turn_node_id,
)
from exochain.core.common import (
    META_CLEANUP_HEIGHT,
    META_CLEANUP_OFFSET,
    NS_PER_MS,
    NS_PER_S,
    ChainCell,
    CommitManagerConfig,
    LocalChainNode,
)
from exochain.model import (
    BlockHeaderView,
    BlockView,
    OperationKind,
    SignedOp,
    build_block_header,
    build_genesis,
    new_block_proposal,
    new_block_refuse,
    new_block_sign,
    new_entry,
    sign_block,
    sign_operations,
)
from exochain.storage.base import CommitStatus
from exochain.storage.memory import MemoryChainStore, MemoryMetaStore, MemoryPendingStore
from exocommon.clock import Clock, MockTimeSource
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2

CONFIG = CommitManagerConfig()
INTERVAL = CONFIG.commit_maximum_interval_ns
DEPTH = CONFIG.operations_cleanup_after_block_depth
# A multiple of 6 s, so turn windows of 2 s and 3 s both start here.
START_NS = 1_699_999_998 * NS_PER_S


def node_id_of(keypair: Keypair) -> str:
    return str(PeerId.from_public_key(keypair.public_key))


@dataclass
class Node:
    local: LocalChainNode
    clock: Clock
    pending: MemoryPendingStore
    chain: MemoryChainStore
    meta: MemoryMetaStore
    manager: CommitManager

    @property
    def node_id(self) -> str:
        return self.local.node_id

    @property
    def keypair(self) -> Keypair:
        return self.local.keypair

    def last(self) -> BlockView:
        block = self.chain.last_block()
        assert block is not None
        return block


class Cluster:
    """`n` nodes of one cell sharing a mock wall clock, each with its own stores and manager."""

    def __init__(self, n: int, chain_nodes: list[int] | None = None, config: CommitManagerConfig = CONFIG) -> None:
        self.time = MockTimeSource(START_NS)
        self.cell_keypair = Keypair.generate()
        self.cell_id = node_id_of(self.cell_keypair)
        keypairs = [Keypair.generate() for _ in range(n)]
        chain_indices = list(range(n)) if chain_nodes is None else chain_nodes
        self.cell = ChainCell(
            self.cell_id,
            self.cell_keypair.public_key,
            {node_id_of(keypairs[i]): keypairs[i].public_key for i in chain_indices},
            {node_id_of(k): k.public_key for k in keypairs},
        )
        self.genesis = build_genesis(self.cell_id, self.cell_keypair)
        self.nodes: list[Node] = []
        for index, keypair in enumerate(keypairs):
            local = LocalChainNode(node_id_of(keypair), keypair)
            clock = Clock(index + 1, self.time)
            pending, chain, meta = MemoryPendingStore(), MemoryChainStore(), MemoryMetaStore()
            chain.write_block(self.genesis)
            manager = CommitManager(config, local, self.cell, pending, chain, meta, clock.consistent_time)
            self.nodes.append(Node(local, clock, pending, chain, meta, manager))

    def now(self) -> int:
        return self.time.now_ns()

    def advance_ms(self, ms: int) -> None:
        self.time.advance_ms(ms)

    def advance_ns(self, ns: int) -> None:
        self.time.advance(ns)

    def tick(self, index: int) -> CommitResult:
        return self.nodes[index].manager.tick(self.now())

    def entries(self, index: int, count: int, data: bytes = b"hello world") -> list[SignedOp]:
        node = self.nodes[index]
        operations = [new_entry(node.clock.consistent_time(), node.node_id, data) for _ in range(count)]
        return sign_operations(operations, node.keypair)

    def push_entry(self, index: int, data: bytes = b"hello world") -> int:
        [op] = self.entries(index, 1, data)
        self.nodes[index].pending.put([op])
        return op.operation_id

    def proposal(self, index: int, operation_ids: list[int], previous: BlockHeaderView | None = None) -> SignedOp:
        """A proposal by node `index` of these operations (from its pending store) after `previous`
        (default: its last block)."""
        node = self.nodes[index]
        ops = []
        for operation_id in sorted(operation_ids):
            entry = node.pending.get(operation_id)
            assert entry is not None
            ops.append(entry.op)
        previous = previous if previous is not None else node.last().head
        proposal_id = node.clock.consistent_time()
        head = build_block_header(self.cell_id, previous, proposal_id, node.node_id, ops)
        [op] = sign_operations([new_block_proposal(proposal_id, node.node_id, head.header_bytes)], node.keypair)
        return op

    def push_proposal(self, index: int, operation_ids: list[int]) -> int:
        op = self.proposal(index, operation_ids)
        self.nodes[index].pending.put([op])
        return op.operation_id

    def signature(self, index: int, proposal: SignedOp, signature: bytes | None = None) -> SignedOp:
        """A block_sign operation by node `index` (a real signature unless one is given)."""
        node = self.nodes[index]
        head = BlockHeaderView.parse(proposal.operation.block_propose.header_bytes)
        if signature is None:
            signature = sign_block(head, node.node_id, node.keypair).signature
        operation = new_block_sign(node.clock.consistent_time(), node.node_id, proposal.operation_id, signature)
        [op] = sign_operations([operation], node.keypair)
        return op

    def block(self, index: int, ops: list[SignedOp], signers: list[int]) -> BlockView:
        """A block by node `index` after its last block, signed by `signers` (not written)."""
        node = self.nodes[index]
        proposal_id = node.clock.consistent_time()
        head = build_block_header(self.cell_id, node.last().head, proposal_id, node.node_id, ops)
        signatures = [sign_block(head, self.nodes[i].node_id, self.nodes[i].keypair) for i in signers]
        return BlockView(head, tuple(sorted(ops, key=lambda op: op.operation_id))).with_signatures(signatures)

    def deliver(self, ops: list[SignedOp], to: list[int]) -> None:
        for index in to:
            self.nodes[index].pending.put(ops)

    def copy_pending(self, source: int, target: int) -> None:
        self.nodes[target].pending.put([entry.op for entry in self.nodes[source].pending.range()])

    def move_to_turn_of(self, index: int) -> None:
        """Advance the clock to the start of the next turn window of node `index`."""
        node_id = self.nodes[index].node_id
        for _ in range(len(self.cell.chain_node_ids) + 1):
            if commit_turn_node_id(self.cell.chain_node_ids, self.now(), INTERVAL) == node_id:
                return
            self.advance_ns(INTERVAL - self.now() % INTERVAL)
        raise AssertionError(f"node {index} never gets a turn")


def status_of(node: Node, group_id: int, now: int) -> PendingBlockStatus:
    return node.manager.pending_blocks(now).blocks[group_id].status


def commit_one_entry(cluster: Cluster, index: int = 0) -> int:
    """Single-node flow: a new entry, then a proposal tick and a sign-and-commit tick."""
    cluster.advance_ns(INTERVAL)
    operation_id = cluster.push_entry(index)
    cluster.tick(index)
    cluster.tick(index)
    assert cluster.nodes[index].chain.block_offset_of_operation(operation_id) is not None
    return operation_id


# -- SPEC 9.4 -----------------------------------------------------------------------------------


def test_single_node_proposes_then_signs_and_commits_then_rests():
    cluster = Cluster(1)
    node = cluster.nodes[0]

    # Nothing to do with an empty pending store.
    result = cluster.tick(0)
    assert result == CommitResult()
    assert node.pending.count() == 0

    cluster.push_entry(0)

    # Tick 1: a proposal (entry + proposal), not signed yet.
    result = cluster.tick(0)
    assert [op.kind for op in result.new_operations] == [OperationKind.BLOCK_PROPOSE]
    assert node.pending.count() == 2
    [block] = node.manager.pending_blocks(cluster.now()).blocks.values()
    assert block.status is PendingBlockStatus.NEXT_POTENTIAL and not block.has_my_signature
    assert result.committed_blocks == []

    # Tick 2: signed and committed (one chain node: its signature is a quorum).
    result = cluster.tick(0)
    assert [op.kind for op in result.new_operations] == [OperationKind.BLOCK_SIGN]
    assert node.pending.count() == 3
    [block] = node.manager.pending_blocks(cluster.now()).blocks.values()
    assert block.status is PendingBlockStatus.PAST_COMMITTED
    [committed] = result.committed_blocks
    assert node.last().offset != 0 and node.last().hash == committed.hash
    assert committed.height == 2  # genesis is height 1
    assert [s.node_id for s in committed.signatures] == [node.node_id]

    # Tick 3: nothing left to do.
    result = cluster.tick(0)
    assert result == CommitResult()
    assert node.pending.count() == 3


def test_node_without_chain_role_never_proposes():
    cluster = Cluster(2, chain_nodes=[1])
    cluster.push_entry(0)
    for _ in range(3):
        assert cluster.tick(0).new_operations == []
        cluster.advance_ns(INTERVAL)
    assert cluster.nodes[0].pending.count() == 1
    with pytest.raises(NotChainNode):
        cluster.nodes[0].manager.is_my_turn(cluster.now())


def test_only_the_node_whose_turn_it_is_proposes():
    cluster = Cluster(2)
    cluster.move_to_turn_of(0)
    [entry] = cluster.entries(0, 1)
    cluster.deliver([entry], to=[0, 1])

    cluster.tick(0)
    cluster.tick(0)
    cluster.tick(1)
    cluster.tick(1)

    # Node 0 proposed and signed; node 1 (not its turn) did nothing; with 2 chain nodes the quorum
    # is 2, so nobody committed yet.
    assert cluster.nodes[0].pending.count() == 3
    assert cluster.nodes[1].pending.count() == 1
    assert cluster.nodes[0].pending.count() != cluster.nodes[1].pending.count()
    assert all(node.chain.block_count() == 1 for node in cluster.nodes)

    # Once node 1 sees the proposal it signs and, with both signatures, commits; then node 0 too.
    cluster.copy_pending(0, 1)
    result = cluster.tick(1)
    assert len(result.committed_blocks) == 1
    cluster.deliver(result.new_operations, to=[0])
    assert len(cluster.tick(0).committed_blocks) == 1
    assert cluster.nodes[0].last().hash == cluster.nodes[1].last().hash
    assert cluster.nodes[0].last().header.proposed_node_id == cluster.nodes[0].node_id


def test_commit_at_interval():
    cluster = Cluster(1)
    node = cluster.nodes[0]

    # First block right away: the genesis' timestamp is 0.
    cluster.advance_ms(10)
    cluster.push_entry(0)
    cluster.tick(0)
    cluster.tick(0)
    first_offset = node.last().offset
    assert first_offset != 0

    # A new entry 10 ms later waits: interval not elapsed, fewer than 10 entries waiting.
    cluster.advance_ms(10)
    waiting = cluster.push_entry(0)
    assert cluster.tick(0).new_operations == []
    cluster.tick(0)
    assert node.last().offset == first_offset

    # After the interval it is committed.
    cluster.advance_ns(INTERVAL)
    cluster.tick(0)
    cluster.tick(0)
    assert node.last().offset != first_offset
    assert node.last().head.operation_ids == [waiting]


def test_commit_after_maximum_pending_operations():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    cluster.advance_ms(10)
    cluster.push_entry(0)
    cluster.tick(0)
    cluster.tick(0)
    first_offset = node.last().offset

    cluster.advance_ms(10)
    cluster.push_entry(0)
    cluster.tick(0)
    cluster.tick(0)
    assert node.last().offset == first_offset

    # 11 more (12 waiting >= 10): committed well before the interval.
    cluster.advance_ms(10)
    node.pending.put(cluster.entries(0, CONFIG.commit_maximum_pending_store_count + 1))
    cluster.tick(0)
    cluster.tick(0)
    assert node.last().offset != first_offset
    assert len(node.last().operations) == 12
    assert cluster.now() - node.last().header.proposed_operation_id < INTERVAL


def test_minimum_interval_holds_proposals_by_count_back_right_after_a_block():
    minimum_ms = 20
    config = CommitManagerConfig(
        commit_maximum_pending_store_count=1, commit_minimum_interval_ns=minimum_ms * NS_PER_MS
    )
    cluster = Cluster(1, config=config)
    node = cluster.nodes[0]
    cluster.advance_ms(10)
    cluster.push_entry(0)
    cluster.tick(0)
    cluster.tick(0)
    first = node.last()
    assert first.offset != 0

    # One entry waiting is enough (count 1), but the last block was proposed under 20 ms ago.
    cluster.advance_ms(5)
    early = cluster.push_entry(0)
    assert cluster.tick(0).new_operations == []
    cluster.advance_ms(10)
    later = cluster.push_entry(0)
    assert cluster.tick(0).new_operations == []
    assert node.last().offset == first.offset

    # Once the minimum interval elapsed, both go into one block.
    cluster.advance_ns(minimum_ms * NS_PER_MS - (cluster.now() - first.header.proposed_operation_id))
    [proposal] = cluster.tick(0).new_operations
    assert proposal.kind is OperationKind.BLOCK_PROPOSE
    cluster.tick(0)
    assert node.last().offset != first.offset
    assert node.last().head.operation_ids == [early, later]

    # The commit interval still wins over a minimum interval longer than it.
    slow = CommitManagerConfig(commit_minimum_interval_ns=2 * INTERVAL)
    cluster = Cluster(1, config=slow)
    node = cluster.nodes[0]
    cluster.advance_ms(10)
    cluster.push_entry(0)
    cluster.tick(0)
    cluster.tick(0)
    cluster.advance_ns(INTERVAL)
    waiting = cluster.push_entry(0)
    cluster.tick(0)
    cluster.tick(0)
    assert node.last().head.operation_ids == [waiting]


def test_without_a_minimum_interval_a_block_follows_the_last_at_once():
    config = CommitManagerConfig(commit_maximum_pending_store_count=1)
    assert config.commit_minimum_interval_ns == 0  # the original's behaviour by default
    cluster = Cluster(1, config=config)
    node = cluster.nodes[0]
    cluster.advance_ms(10)
    cluster.push_entry(0)
    cluster.tick(0)
    cluster.tick(0)
    first_offset = node.last().offset
    cluster.advance_ms(1)
    waiting = cluster.push_entry(0)
    cluster.tick(0)
    cluster.tick(0)
    assert node.last().offset != first_offset
    assert node.last().head.operation_ids == [waiting]


def test_commit_status_is_set_on_commit():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    cluster.advance_ms(10)
    operation_id = cluster.push_entry(0)
    entry = node.pending.get(operation_id)
    assert entry is not None and entry.committed is None
    cluster.tick(0)
    cluster.tick(0)
    last = node.last()
    entry = node.pending.get(operation_id)
    assert entry is not None and entry.committed == CommitStatus(last.offset, last.height)


def test_external_proposal_is_signed_and_committed_by_a_single_node():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    operation_id = cluster.push_entry(0)
    block_id = cluster.push_proposal(0, [operation_id])

    # One chain node: signing gives the quorum, so it commits in the same tick.
    result = cluster.tick(0)
    assert [op.kind for op in result.new_operations] == [OperationKind.BLOCK_SIGN]
    assert node.manager.pending_blocks(cluster.now()).blocks[block_id].has_my_signature
    assert node.last().header.proposed_operation_id == block_id


def test_external_proposal_is_signed_on_next_tick_and_committed_on_the_following():
    cluster = Cluster(3)
    a = cluster.nodes[0]
    [entry] = cluster.entries(1, 1)
    cluster.deliver([entry], to=[0, 1])
    proposal = cluster.proposal(1, [entry.operation_id])
    cluster.deliver([proposal], to=[0, 1])

    result = cluster.tick(0)
    assert [op.kind for op in result.new_operations] == [OperationKind.BLOCK_SIGN]
    block = a.manager.pending_blocks(cluster.now()).blocks[proposal.operation_id]
    assert block.has_my_signature and set(block.signatures) == {a.node_id}
    assert result.committed_blocks == [] and a.chain.block_count() == 1

    # The proposer's own signature arrives: 2 of 3 is a quorum.
    cluster.deliver([cluster.signature(1, proposal)], to=[0])
    result = cluster.tick(0)
    [committed] = result.committed_blocks
    assert committed.header.proposed_operation_id == proposal.operation_id
    assert committed.header.proposed_node_id == cluster.nodes[1].node_id
    assert {s.node_id for s in committed.signatures} == {a.node_id, cluster.nodes[1].node_id}
    assert result.new_operations == []


def test_potential_next_blocks_order():
    cluster = Cluster(3)
    me = cluster.nodes[0]
    [entry] = cluster.entries(0, 1)
    cluster.deliver([entry], to=[0, 1, 2])
    older = cluster.proposal(1, [entry.operation_id])
    younger = cluster.proposal(2, [entry.operation_id])
    me.pending.put([older, younger])

    # Same signature count: the older proposal first.
    order = [b.group_id for b in me.manager.pending_blocks(cluster.now()).potential_next_blocks()]
    assert order == [older.operation_id, younger.operation_id]

    # More signatures first.
    younger_by_1 = cluster.signature(1, younger)
    me.pending.put([younger_by_1])
    order = [b.group_id for b in me.manager.pending_blocks(cluster.now()).potential_next_blocks()]
    assert order == [younger.operation_id, older.operation_id]
    me.pending.put([cluster.signature(1, older), cluster.signature(2, older)])
    order = [b.group_id for b in me.manager.pending_blocks(cluster.now()).potential_next_blocks()]
    assert order == [older.operation_id, younger.operation_id]

    # The one I signed first, even with fewer signatures than the other (2 against 1).
    me.pending.delete([younger_by_1.operation_id])
    me.pending.put([cluster.signature(0, younger)])
    blocks = me.manager.pending_blocks(cluster.now())
    assert len(blocks.blocks[older.operation_id].signatures) == 2
    assert len(blocks.blocks[younger.operation_id].signatures) == 1
    assert blocks.blocks[younger.operation_id].has_my_signature
    assert [b.group_id for b in blocks.potential_next_blocks()] == [younger.operation_id, older.operation_id]
    assert blocks.best_next_block() is blocks.blocks[younger.operation_id]


def test_second_proposal_for_the_same_operation_is_refused():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    operation_id = cluster.push_entry(0)

    good = cluster.push_proposal(0, [operation_id])
    cluster.tick(0)  # signed (and, alone in the cell, committed)

    bad = cluster.push_proposal(0, [operation_id])  # after the new last block, with a committed entry
    result = cluster.tick(0)
    assert [op.kind for op in result.new_operations] == [OperationKind.BLOCK_REFUSE]

    blocks = node.manager.pending_blocks(cluster.now())
    assert blocks.blocks[good].has_my_signature and blocks.blocks[good].status is PendingBlockStatus.PAST_COMMITTED
    assert blocks.blocks[bad].has_my_refusal and blocks.blocks[bad].status is PendingBlockStatus.NEXT_REFUSED

    cluster.tick(0)
    assert node.last().header.proposed_operation_id == good
    assert node.chain.block_count() == 2


def test_competing_proposals_at_the_same_offset():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    operation_id = cluster.push_entry(0)
    first = cluster.push_proposal(0, [operation_id])
    second = cluster.push_proposal(0, [operation_id])

    # The older one is the best next block; once it is committed the other one's offset is taken.
    cluster.tick(0)
    assert node.last().header.proposed_operation_id == first
    assert status_of(node, second, cluster.now()) is PendingBlockStatus.PAST_REFUSED
    assert cluster.tick(0).new_operations == []


def test_proposal_expires_and_is_proposed_again():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    operation_id = cluster.push_entry(0)
    block_id = cluster.push_proposal(0, [operation_id])

    block = node.manager.pending_blocks(cluster.now()).blocks[block_id]
    assert not block.expired and block.status is PendingBlockStatus.NEXT_POTENTIAL

    cluster.advance_ns(CONFIG.block_proposal_timeout_ns)
    block = node.manager.pending_blocks(cluster.now()).blocks[block_id]
    assert block.expired and block.status is PendingBlockStatus.NEXT_EXPIRED

    cluster.advance_ms(10)
    result = cluster.tick(0)
    [proposal] = result.new_operations
    assert proposal.kind is OperationKind.BLOCK_PROPOSE
    potential = node.manager.pending_blocks(cluster.now()).potential_next_blocks()
    assert [b.group_id for b in potential] == [proposal.operation_id]
    assert potential[0].operation_ids == (operation_id,)


def test_expired_proposal_signed_by_a_quorum_is_still_committed():
    cluster = Cluster(3)
    late = cluster.nodes[2]
    [entry] = cluster.entries(0, 1)
    cluster.deliver([entry], to=[0, 1, 2])
    proposal = cluster.proposal(0, [entry.operation_id])
    signatures = [cluster.signature(0, proposal), cluster.signature(1, proposal)]
    cluster.advance_ns(CONFIG.block_proposal_timeout_ns)
    late.pending.put([proposal, *signatures])
    block = late.manager.pending_blocks(cluster.now()).blocks[proposal.operation_id]
    assert block.expired and block.status is PendingBlockStatus.NEXT_POTENTIAL

    [committed] = cluster.tick(2).committed_blocks
    assert committed.header.proposed_operation_id == proposal.operation_id

    # Without a quorum it expires as in the original.
    lonely = Cluster(3)
    [entry] = lonely.entries(0, 1)
    lonely.deliver([entry], to=[2])
    lonely.nodes[0].pending.put([entry])
    proposal = lonely.proposal(0, [entry.operation_id])
    lonely.advance_ns(CONFIG.block_proposal_timeout_ns)
    lonely.nodes[2].pending.put([proposal, lonely.signature(0, proposal)])
    assert status_of(lonely.nodes[2], proposal.operation_id, lonely.now()) is PendingBlockStatus.NEXT_EXPIRED


def test_commit_turns_with_two_nodes_and_a_two_second_interval():
    config = CommitManagerConfig(commit_maximum_interval_ns=2 * NS_PER_S)
    cluster = Cluster(2, config=config)
    first, second = sorted(cluster.nodes, key=lambda n: n.node_id)
    ids = cluster.cell.chain_node_ids
    for ms, expected in [(0, first), (1999, first), (2000, second), (3999, second)]:
        now = ms * NS_PER_MS
        assert commit_turn_node_id(ids, now, config.commit_maximum_interval_ns) == expected.node_id
        assert first.manager.is_my_turn(now) is (expected is first)
        assert second.manager.is_my_turn(now) is (expected is second)

    # The second node loses the chain role: the first always has the turn, the second has none.
    cell = ChainCell(
        cluster.cell_id,
        cluster.cell.cell_public_key,
        {first.node_id: first.keypair.public_key},
        cluster.cell.member_keys,
    )
    managers = {
        n.node_id: CommitManager(config, n.local, cell, n.pending, n.chain, n.meta, n.clock.consistent_time)
        for n in (first, second)
    }
    for ms in (0, 1999, 2000, 3999):
        assert managers[first.node_id].is_my_turn(ms * NS_PER_MS)
        with pytest.raises(NotChainNode):
            managers[second.node_id].is_my_turn(ms * NS_PER_MS)


def test_out_of_sync_when_the_previous_block_differs():
    cluster = Cluster(3)
    n0, n1, n2 = cluster.nodes
    # Nodes 0 and 1 share a chain; node 2 has another (shorter) block at the same height.
    shared = cluster.block(0, cluster.entries(0, 2), signers=[0, 1])
    n0.chain.write_block(shared)
    n1.chain.write_block(shared)
    n2.chain.write_block(cluster.block(2, cluster.entries(2, 1), signers=[2]))

    [entry] = cluster.entries(0, 1)
    cluster.deliver([entry], to=[0, 1])
    proposal = cluster.proposal(0, [entry.operation_id])
    cluster.deliver([proposal], to=[0, 1])

    cluster.advance_ms(10)
    cluster.deliver(cluster.tick(0).new_operations, to=[1])
    cluster.deliver(cluster.tick(1).new_operations, to=[0])
    cluster.tick(0)
    for node in (n0, n1):
        assert node.chain.block_offset_of_operation(proposal.operation_id) is not None
    assert n0.last().hash == n1.last().hash

    # Node 2 gets the pending operations: the proposal's previous block is not in its chain.
    head = BlockHeaderView.parse(proposal.operation.block_propose.header_bytes)
    assert n2.chain.next_offset() < head.offset
    cluster.copy_pending(1, 2)
    result = cluster.tick(2)
    assert result.out_of_sync
    assert result.new_operations == [] and result.committed_blocks == []
    assert n2.chain.block_count() == 2


def test_lagging_node_commits_one_block_per_tick():
    cluster = Cluster(3)
    n0, n1, n2 = cluster.nodes
    for _ in range(3):
        cluster.advance_ms(10)
        [entry] = cluster.entries(0, 1)
        cluster.deliver([entry], to=[0, 1])
        proposal = cluster.proposal(0, [entry.operation_id])
        cluster.deliver([proposal], to=[0, 1])
        cluster.deliver([cluster.signature(0, proposal), cluster.signature(1, proposal)], to=[0, 1])
        assert len(cluster.tick(0).committed_blocks) == 1
        assert len(cluster.tick(1).committed_blocks) == 1
    assert n0.last().height == 4 and n1.last().height == 4  # genesis (1) + 3

    cluster.copy_pending(0, 2)
    for height in (2, 3, 4):
        result = cluster.tick(2)
        assert len(result.committed_blocks) == 1
        assert n2.last().height == height
    assert [h.hash for h in n2.chain.headers_from(0)] == [h.hash for h in n0.chain.headers_from(0)]


def test_cleanup_at_depth():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    operation_ids = [commit_one_entry(cluster) for _ in range(DEPTH)]
    # Heights 2..7: the first block is 5 deep, nothing is cleaned yet.
    assert node.pending.get(operation_ids[0]) is not None
    assert node.meta.get_int(META_CLEANUP_HEIGHT) is None

    # The 7th block (height 8) puts the first one 6 deep: the tick that commits it cleans it up.
    operation_ids.append(commit_one_entry(cluster))
    first_offset = node.chain.block_offset_of_operation(operation_ids[0])
    assert first_offset is not None
    first = node.chain.get_block(first_offset)
    assert first is not None and first.height == 2
    assert node.pending.get(operation_ids[0]) is None
    assert node.pending.group(first.header.proposed_operation_id) == []
    assert node.pending.get(first.header.proposed_operation_id) is None
    assert node.meta.get_int(META_CLEANUP_OFFSET) == first.offset
    assert node.meta.get_int(META_CLEANUP_HEIGHT) == first.height
    for operation_id in operation_ids[1:]:
        assert node.pending.get(operation_id) is not None

    # Another tick cleans nothing more.
    assert cluster.tick(0).cleaned == 0
    assert node.pending.count() == 3 * DEPTH


def test_cleanup_counts_what_it_deletes():
    cluster = Cluster(1)
    for _ in range(DEPTH):
        commit_one_entry(cluster)
    cluster.advance_ns(INTERVAL)
    cluster.push_entry(0)
    cluster.tick(0)
    result = cluster.tick(0)
    assert len(result.committed_blocks) == 1
    assert result.cleaned == 3  # proposal, signature, entry of the first block


def test_proposal_at_an_occupied_offset_is_past_refused_and_its_operations_kept():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    # Genesis + 9 blocks (heights 2..10).
    for _ in range(9):
        cluster.advance_ms(10)
        node.chain.write_block(cluster.block(0, cluster.entries(0, 1), signers=[0]))
    third = node.chain.get_block(next(h.offset for h in node.chain.headers_from(0) if h.height == 3))
    assert third is not None

    waiting = cluster.entries(0, 10)
    node.pending.put(waiting)
    proposal = cluster.proposal(0, [op.operation_id for op in waiting], previous=third.head)  # height 4
    node.pending.put([proposal])
    assert status_of(node, proposal.operation_id, cluster.now()) is PendingBlockStatus.PAST_REFUSED

    # 10 - 4 >= 6: the refused proposal is cleaned up, its (uncommitted) entries stay.
    cluster.tick(0)
    assert node.pending.get(proposal.operation_id) is None
    assert all(node.pending.get(op.operation_id) is not None for op in waiting)


def test_dangling_committed_operation_is_removed():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    operation_ids = [commit_one_entry(cluster) for _ in range(DEPTH + 1)]

    node.pending.delete([entry.op.operation_id for entry in node.pending.range()])
    assert node.pending.count() == 0
    first_offset = node.chain.block_offset_of_operation(operation_ids[0])
    assert first_offset is not None
    first = node.chain.get_block(first_offset)
    assert first is not None
    node.pending.put([first.operations[0]])  # revived, e.g. by a node that was behind
    assert node.pending.count() == 1

    result = cluster.tick(0)
    assert result.cleaned == 1
    assert node.pending.count() == 0

    # A revived operation that is not deep enough stays.
    last_offset = node.chain.block_offset_of_operation(operation_ids[-1])
    assert last_offset is not None
    last = node.chain.get_block(last_offset)
    assert last is not None
    node.pending.put([last.operations[0]])
    assert cluster.tick(0).cleaned == 0
    assert node.pending.count() == 1


# -- beyond the original ------------------------------------------------------------------------


def test_forged_or_non_chain_signatures_do_not_count_toward_quorum():
    # Nodes 0, 1, 2 are chain nodes (quorum 2); node 3 is a member without the chain role.
    cluster = Cluster(4, chain_nodes=[0, 1, 2])
    me = cluster.nodes[0]
    [entry] = cluster.entries(1, 1)
    cluster.deliver([entry], to=[0, 1])
    proposal = cluster.proposal(1, [entry.operation_id])
    me.pending.put([proposal])

    n1, n2 = cluster.nodes[1], cluster.nodes[2]
    head = BlockHeaderView.parse(proposal.operation.block_propose.header_bytes)
    forged = cluster.signature(2, proposal, signature=bytes(64))  # not a signature at all
    other_block = cluster.block(1, [entry], signers=[])  # same entry, another header
    wrong_header = cluster.signature(
        2, proposal, signature=sign_block(other_block.head, n2.node_id, n2.keypair).signature
    )
    non_chain = cluster.signature(3, proposal)  # valid, but node 3 does not vote
    # Node 2 relaying node 1's valid signature in its own operation: the voter must be the author.
    relayed_operation = chain_pb2.Operation(
        group_id=proposal.operation_id,
        operation_id=n2.clock.consistent_time(),
        node_id=n2.node_id,
        block_sign=chain_pb2.OperationBlockSign(signature=sign_block(head, n1.node_id, n1.keypair)),
    )
    [relayed] = sign_operations([relayed_operation], n2.keypair)
    me.pending.put([forged, wrong_header, non_chain, relayed])

    result = cluster.tick(0)
    assert [op.kind for op in result.new_operations] == [OperationKind.BLOCK_SIGN]
    assert result.committed_blocks == []
    block = me.manager.pending_blocks(cluster.now()).blocks[proposal.operation_id]
    assert set(block.signatures) == {me.node_id}
    assert me.chain.block_count() == 1
    assert cluster.tick(0).committed_blocks == []

    # A valid signature of another chain node completes the quorum; only valid ones are in the block.
    me.pending.put([cluster.signature(1, proposal)])
    [committed] = cluster.tick(0).committed_blocks
    assert {s.node_id for s in committed.signatures} == {me.node_id, cluster.nodes[1].node_id}


def test_refusals_of_a_quorum_make_a_proposal_next_refused():
    cluster = Cluster(3)
    me = cluster.nodes[0]
    [entry] = cluster.entries(1, 1)
    me.pending.put([entry])
    proposal = cluster.proposal(0, [entry.operation_id])
    me.pending.put([proposal])
    refusals = [
        sign_operations([new_block_refuse(n.clock.consistent_time(), n.node_id, proposal.operation_id)], n.keypair)[0]
        for n in cluster.nodes[1:]
    ]
    me.pending.put(refusals)
    block = me.manager.pending_blocks(cluster.now()).blocks[proposal.operation_id]
    assert block.refusals == {cluster.nodes[1].node_id, cluster.nodes[2].node_id}
    assert block.status is PendingBlockStatus.NEXT_REFUSED


def test_waits_for_missing_operations_before_voting():
    cluster = Cluster(3)
    me = cluster.nodes[0]
    [entry] = cluster.entries(1, 1)
    cluster.nodes[1].pending.put([entry])
    proposal = cluster.proposal(1, [entry.operation_id])
    me.pending.put([proposal])

    # The entry has not reached this node: no vote yet, and no proposal of its own either.
    cluster.move_to_turn_of(0)
    assert cluster.tick(0) == CommitResult()
    me.pending.put([entry])
    assert [op.kind for op in cluster.tick(0).new_operations] == [OperationKind.BLOCK_SIGN]


def test_proposal_naming_an_id_held_by_another_operation_is_refused():
    # Two nodes whose consistent clocks collide can issue the same id (SPEC 11.16): a proposal whose
    # entry id is another operation here can never be verified, so it is refused, not waited on.
    cluster = Cluster(3)
    me = cluster.nodes[0]
    [entry] = cluster.entries(1, 1)
    cluster.nodes[1].pending.put([entry])
    proposal = cluster.proposal(1, [entry.operation_id])
    other = cluster.proposal(2, [])  # any other kind of operation under the entry's id
    clash = new_block_refuse(entry.operation_id, cluster.nodes[2].node_id, other.operation_id)
    me.pending.put([proposal, *sign_operations([clash], cluster.nodes[2].keypair)])
    result = cluster.tick(0)
    assert [op.kind for op in result.new_operations] == [OperationKind.BLOCK_REFUSE]


def test_malformed_and_stale_proposals_are_dropped():
    cluster = Cluster(1)
    node = cluster.nodes[0]
    node_id = node.node_id
    bad_id = node.clock.consistent_time()
    [malformed] = sign_operations([new_block_proposal(bad_id, node_id, b"\xff\xff not a header")], node.keypair)
    node.pending.put([malformed])
    blocks = node.manager.pending_blocks(cluster.now())
    assert blocks.malformed == [malformed] and blocks.blocks == {}
    assert cluster.tick(0).cleaned == 0  # kept until it expires, never voted on
    cluster.advance_ns(CONFIG.block_proposal_timeout_ns)
    assert cluster.tick(0).cleaned == 1
    assert node.pending.get(bad_id) is None

    # A proposal that expired at a height the chain left far behind, at an offset that is not a block
    # boundary (built on a block that never made it), is dropped; its entry is kept.
    operation_id = cluster.push_entry(0)
    phantom = cluster.block(0, cluster.entries(0, 5), signers=[0])
    stale = cluster.proposal(0, [operation_id], previous=phantom.head)
    node.pending.put([stale])
    cluster.advance_ns(CONFIG.block_proposal_timeout_ns)
    for _ in range(DEPTH + 2):  # the stale proposal has height 3; the chain reaches 3 + DEPTH
        node.chain.write_block(cluster.block(0, cluster.entries(0, 2), signers=[0]))
    assert node.chain.get_header(BlockHeaderView.parse(stale.operation.block_propose.header_bytes).offset) is None
    assert status_of(node, stale.operation_id, cluster.now()) is PendingBlockStatus.NEXT_EXPIRED
    cluster.tick(0)
    assert node.pending.get(stale.operation_id) is None
    assert node.pending.get(operation_id) is not None


def test_proposal_size_is_capped(monkeypatch):
    monkeypatch.setattr(commit_manager_module, "MAX_OPERATIONS_PER_BLOCK", 5)
    cluster = Cluster(1)
    node = cluster.nodes[0]
    ops = cluster.entries(0, 12)
    node.pending.put(ops)
    [proposal] = cluster.tick(0).new_operations
    head = BlockHeaderView.parse(proposal.operation.block_propose.header_bytes)
    assert head.operation_ids == [op.operation_id for op in ops[:5]]
    for _ in range(3):
        cluster.tick(0)
        cluster.advance_ns(INTERVAL)  # 7 then 2 left: fewer than 10, so each waits for the interval
        cluster.tick(0)
    assert node.chain.block_count() == 1 + 3
    assert all(node.pending.get(op.operation_id).committed is not None for op in ops)  # type: ignore[union-attr]


def test_three_nodes_exchanging_operations_commit_identical_blocks():
    rng = random.Random(42)
    cluster = Cluster(3)
    written: list[int] = []
    tick_ms = 250
    for step in range(200):
        if step < 120:
            writer = rng.randrange(3)
            ops = cluster.entries(writer, rng.randint(1, 30), data=rng.randbytes(40))
            written.extend(op.operation_id for op in ops)
            cluster.deliver(ops, to=[0, 1, 2])
        for index in rng.sample(range(3), 3):
            result = cluster.tick(index)
            assert not result.out_of_sync
            cluster.deliver(result.new_operations, to=[i for i in range(3) if i != index])
        cluster.advance_ms(tick_ms)

    chains = [[(b.hash, b.head.operation_ids) for b in node.chain.blocks_from(0)] for node in cluster.nodes]
    assert chains[0] == chains[1] == chains[2]
    committed = [operation_id for _, ids in chains[0] for operation_id in ids]
    assert len(committed) == len(set(committed))  # never twice
    assert sorted(committed) == sorted(written)  # everything
    assert len(chains[0]) > 5
    # Cleanup ran on every node: the oldest entries are gone from all pending stores.
    for node in cluster.nodes:
        assert node.pending.get(written[0]) is None
        assert node.meta.get_int(META_CLEANUP_HEIGHT) is not None
