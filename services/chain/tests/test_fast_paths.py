"""The structures and paths added for throughput, each checked against the slow, obvious way:

* the commit manager's incremental `CommitIndex` equals a full rescan after random sequences of puts,
  commits, deletes, chain writes and truncations;
* the pending store's change journal (`changes_since`) and its gap;
* batch signature checks (`SignatureChecker.verify_many`) agree with one check per operation;
* bytes written by hand (`wire`, `BlockView.encode`, pending sync requests, events) equal what the
  protobuf API serialises;
* the engine's commit settings: several rounds per tick, a proposer signing its proposal last, a
  proposal a quorum signed followed by a node that signed a concurrent one, blocks capped by bytes;
* fork recovery emits the re-inserted operations as new pending operations.
"""

from __future__ import annotations

import random

import pytest

from exochain import wire
from exochain.core.commit_manager import CommitIndex, CommitManager, PendingBlockStatus
from exochain.core.common import (
    NS_PER_S,
    ChainCell,
    ChainSyncStatus,
    CommitManagerConfig,
    EngineConfig,
    LocalChainNode,
)
from exochain.core.engine import ChainTruncated, Engine, NewPendingOperations
from exochain.core.pending_sync import UNBOUNDED, OperationDetails, SyncBound, SyncRangesBuilder
from exochain.model import (
    BlockView,
    SignatureChecker,
    SignedOp,
    block_event_bytes,
    build_block_header,
    build_genesis,
    new_block_proposal,
    new_block_sign,
    new_entry,
    pending_batch_event_bytes,
    sign_block,
    sign_operations,
)
from exochain.storage.base import CommitStatus
from exochain.storage.memory import JOURNAL_LEN_MIN, MemoryChainStore, MemoryMetaStore, MemoryPendingStore
from exocommon.clock import Clock, MockTimeSource
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2

START_NS = 1_699_999_998 * NS_PER_S


def node_id_of(keypair: Keypair) -> str:
    return str(PeerId.from_public_key(keypair.public_key))


class Cell:
    def __init__(self, n: int = 3, seed: int = 1) -> None:
        self.keypairs = [Keypair.from_seed(bytes([seed, i]) * 16) for i in range(n)]
        self.ids = [node_id_of(k) for k in self.keypairs]
        self.cell_keypair = Keypair.from_seed(bytes([seed, 99]) * 16)
        self.cell_id = node_id_of(self.cell_keypair)
        keys = {node_id: kp.public_key for node_id, kp in zip(self.ids, self.keypairs, strict=True)}
        self.cell = ChainCell(self.cell_id, self.cell_keypair.public_key, keys, keys)
        self.genesis = build_genesis(self.cell_id, self.cell_keypair)
        self.time = MockTimeSource(START_NS)
        self.clock = Clock(7, self.time)

    def entries(self, index: int, count: int, size: int = 20) -> list[SignedOp]:
        operations = [
            new_entry(self.clock.consistent_time(), self.ids[index], bytes([i % 256]) * size) for i in range(count)
        ]
        return sign_operations(operations, self.keypairs[index])

    def block(self, previous: BlockView, ops: list[SignedOp], signers: tuple[int, ...] = (0, 1)) -> BlockView:
        head = build_block_header(self.cell_id, previous.head, self.clock.consistent_time(), self.ids[0], ops)
        signatures = [sign_block(head, self.ids[i], self.keypairs[i]) for i in signers]
        return BlockView(head, tuple(ops)).with_signatures(signatures)

    def proposal(self, index: int, previous: BlockView, ops: list[SignedOp]) -> SignedOp:
        proposal_id = self.clock.consistent_time()
        head = build_block_header(self.cell_id, previous.head, proposal_id, self.ids[index], ops)
        [op] = sign_operations(
            [new_block_proposal(proposal_id, self.ids[index], head.header_bytes)], self.keypairs[index]
        )
        return op

    def signature(self, index: int, proposal: SignedOp) -> SignedOp:
        from exochain.model import BlockHeaderView

        head = BlockHeaderView.parse(proposal.operation.block_propose.header_bytes)
        signature = sign_block(head, self.ids[index], self.keypairs[index]).signature
        operation = new_block_sign(self.clock.consistent_time(), self.ids[index], proposal.operation_id, signature)
        [op] = sign_operations([operation], self.keypairs[index])
        return op


# -- CommitIndex ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_commit_index_stays_equal_to_a_full_rescan(seed):
    rng = random.Random(seed)
    cell = Cell(seed=seed + 1)
    pending, chain = MemoryPendingStore(), MemoryChainStore()
    chain.write_block(cell.genesis)
    index = CommitIndex(pending, chain)
    index.refresh()
    for _ in range(150):
        action = rng.random()
        ids = [entry.op.operation_id for entry in pending.range()]
        if action < 0.3:
            pending.put(cell.entries(rng.randrange(3), rng.randint(1, 6)))
        elif action < 0.4:
            # A proposal of some pending entries (sorted), maybe with a vote.
            entries = sorted(
                (e.op for e in pending.range() if e.op.operation.WhichOneof("kind") == "entry" and rng.random() < 0.5),
                key=lambda op: op.operation_id,
            )
            last = chain.last_block()
            assert last is not None
            proposal = cell.proposal(rng.randrange(3), last, entries)
            pending.put([proposal] + ([cell.signature(1, proposal)] if rng.random() < 0.5 else []))
        elif action < 0.55 and ids:
            chosen = rng.sample(ids, min(len(ids), rng.randint(1, 5)))
            status = CommitStatus(rng.randrange(1000), rng.randint(2, 9)) if rng.random() < 0.8 else None
            pending.set_committed(chosen, status)
        elif action < 0.7 and ids:
            pending.delete(rng.sample(ids, min(len(ids), rng.randint(1, 4))))
        elif action < 0.85:
            # A block of fresh entries and maybe of some pending ones (written by chain sync, say).
            last = chain.last_block()
            assert last is not None
            ops = cell.entries(2, rng.randint(0, 3))
            pending_entries = [e.op for e in pending.range() if e.op.operation.WhichOneof("kind") == "entry"]
            ops += rng.sample(pending_entries, min(len(pending_entries), rng.randint(0, 3)))
            in_chain = {i for h in chain.headers_from(0) for i in h.operation_ids}
            ops = sorted(
                {op.operation_id: op for op in ops if op.operation_id not in in_chain}.values(),
                key=lambda o: o.operation_id,
            )
            chain.write_block(cell.block(last, ops))
            if rng.random() < 0.3:
                pending.put(ops)  # revived after the block was written
        elif chain.block_count() > 1:
            offsets = [h.offset for h in chain.headers_from(1)]
            chain.truncate_from(rng.choice(offsets))
        if rng.random() < 0.4:
            index.refresh()
            index.check()
    index.refresh()
    index.check()


def test_commit_index_rebuilds_when_the_journal_no_longer_reaches_back():
    cell = Cell()
    pending, chain = MemoryPendingStore(), MemoryChainStore()
    chain.write_block(cell.genesis)
    index = CommitIndex(pending, chain)
    index.refresh()
    ops = cell.entries(0, 50)
    pending.put(ops)
    for _ in range(2 * JOURNAL_LEN_MIN // 100 + 1):
        pending.set_committed([op.operation_id for op in ops], CommitStatus(1, 2))
        pending.set_committed([op.operation_id for op in ops], None)
    assert pending.changes_since(0) is None
    index.refresh()
    index.check()
    assert index.uncommitted == {op.operation_id for op in ops}


def test_pending_journal_lists_each_change_with_its_group():
    cell = Cell()
    pending = MemoryPendingStore()
    start = pending.version()
    ops = cell.entries(0, 3)
    pending.put(ops)
    pending.set_committed([ops[0].operation_id], CommitStatus(5, 2))
    pending.delete([ops[1].operation_id])
    ids, groups = pending.changes_since(start)  # type: ignore[misc]
    first, second, third = (op.operation_id for op in ops)
    assert ids == [first, second, third, first, second]
    assert groups == ids  # entries are their own group
    assert pending.changes_since(pending.version()) == ([], [])
    assert pending.changes_since(pending.version() + 1) is None


# -- signatures -------------------------------------------------------------------------------------


def test_verify_many_agrees_with_one_check_per_operation():
    cell = Cell()
    checker = SignatureChecker(cell.cell.member_key)
    whole = cell.entries(0, 37)
    partial = cell.entries(1, 9)[2:7]
    stranger = sign_operations([new_entry(cell.clock.consistent_time(), cell.ids[0], b"x")] * 1, Keypair.generate())
    # A batch whose proofs were swapped: its root is right, but each proof is another operation's.
    swapped = cell.entries(2, 8)
    swapped[0], swapped[1] = (
        SignedOp(
            *[getattr(swapped[0], f) for f in ("operation", "operation_bytes", "hash", "signature")],
            swapped[1].batch_proof,
            0,
            8,
        ),
        SignedOp(
            *[getattr(swapped[1], f) for f in ("operation", "operation_bytes", "hash", "signature")],
            swapped[0].batch_proof,
            1,
            8,
        ),
    )
    ops = whole + partial + stranger + swapped
    random.Random(3).shuffle(ops)
    expected = [SignatureChecker(cell.cell.member_key).verify(op) for op in ops]
    assert checker.verify_many(ops) == expected
    assert sum(expected) == 37 + 5 + 6


# -- bytes written by hand --------------------------------------------------------------------------


def test_wire_varints_match_protobuf():
    for value in (1, 127, 128, 300, 2**32, 2**64 - 1):
        message = chain_pb2.ChainSyncRequest(from_offset=value)
        assert wire.varint_field(wire.tag(1, wire.WIRE_VARINT), value) == message.SerializeToString()


def test_hand_written_blocks_and_events_match_protobuf():
    cell = Cell()
    ops = cell.entries(0, 40, size=300)
    block = cell.block(cell.genesis, ops)
    assert block.encode() == block.to_proto().SerializeToString()
    assert BlockView.decode(block.encode()).encode() == block.encode()
    assert chain_pb2.ChainEvent.FromString(block_event_bytes(block)) == chain_pb2.ChainEvent(block=block.to_proto())
    expected = chain_pb2.ChainEvent(pending_batch=chain_pb2.PendingOperations(operations=[op.to_proto() for op in ops]))
    assert chain_pb2.ChainEvent.FromString(pending_batch_event_bytes(ops)) == expected
    assert all(op.encode() == op.to_proto().SerializeToString() for op in ops)


def test_hand_written_sync_requests_match_protobuf():
    cell = Cell()
    ops = cell.entries(0, 70)
    builder = SyncRangesBuilder(5)
    builder.push_new_range(SyncBound(ops[0].operation_id, True))
    for number, op in enumerate(ops):
        builder.push_operation(op, list(OperationDetails)[number % 3])
    builder.set_last_range_upper(UNBOUNDED)
    builder.push_hashed_range(SyncBound(10, False), SyncBound(20, True), b"\x16 " + b"h" * 32, 4)
    for height in (0, 9):
        expected = chain_pb2.PendingSyncRequest(ranges=builder.build(), from_block_height=height)
        assert builder.request(height) == expected


# -- commit manager in engine mode ----------------------------------------------------------------


class Nodes:
    """Three commit managers in engine mode; `deliver` copies operations between pending stores."""

    def __init__(self, max_block_bytes: int = 2 * 1024 * 1024) -> None:
        self.cell = Cell()
        self.pendings = [MemoryPendingStore() for _ in range(3)]
        self.chains = [MemoryChainStore() for _ in range(3)]
        for chain in self.chains:
            chain.write_block(self.cell.genesis)
        self.managers = [
            CommitManager(
                CommitManagerConfig(),
                LocalChainNode(self.cell.ids[i], self.cell.keypairs[i]),
                self.cell.cell,
                self.pendings[i],
                self.chains[i],
                MemoryMetaStore(),
                Clock(i + 1, self.cell.time).consistent_time,
                max_block_bytes=max_block_bytes,
                rounds_per_tick=4,
                proposer_signs_last=True,
            )
            for i in range(3)
        ]

    def now(self) -> int:
        return self.cell.time.now_ns()

    def turn_of(self) -> int:
        return next(i for i in range(3) if self.managers[i].is_my_turn(self.now()))

    def deliver(self, ops: list[SignedOp], to: list[int]) -> None:
        for index in to:
            self.pendings[index].put(ops)


def test_proposer_signs_last_and_a_tick_runs_until_the_commit():
    nodes = Nodes()
    proposer = nodes.turn_of()
    a, b = [i for i in range(3) if i != proposer]
    entries = nodes.cell.entries(proposer, 3)
    nodes.deliver(entries, to=[0, 1, 2])
    result = nodes.managers[proposer].tick(nodes.now())
    [proposal] = result.new_operations  # proposed, not signed by its proposer yet
    nodes.deliver([proposal], to=[a, b])
    voted = nodes.managers[a].tick(nodes.now())
    [signature] = voted.new_operations
    assert not voted.committed_blocks  # one signature is not a quorum of three
    nodes.deliver([signature], to=[proposer])
    # The proposer signs and, with that quorum, commits in the same tick.
    done = nodes.managers[proposer].tick(nodes.now())
    assert len(done.committed_blocks) == 1
    assert nodes.chains[proposer].block_count() == 2


def test_a_node_that_signed_a_concurrent_proposal_follows_the_one_a_quorum_signed():
    nodes = Nodes()
    entries = nodes.cell.entries(0, 2)
    nodes.deliver(entries, to=[0, 1, 2])
    genesis = nodes.cell.genesis
    mine = nodes.cell.proposal(2, genesis, entries)
    theirs = nodes.cell.proposal(0, genesis, entries)
    # Node 2 signed its own proposal; nodes 0 and 1 signed the other one (a quorum).
    nodes.deliver([mine, nodes.cell.signature(2, mine)], to=[2])
    nodes.deliver([theirs, nodes.cell.signature(0, theirs), nodes.cell.signature(1, theirs)], to=[2])
    result = nodes.managers[2].tick(nodes.now())
    [block] = result.committed_blocks
    assert block.header.proposed_operation_id == theirs.operation_id
    assert not any(op.operation.WhichOneof("kind") == "block_sign" for op in result.new_operations)
    blocks = nodes.managers[2].pending_blocks(nodes.now()).blocks
    assert blocks[mine.operation_id].status is PendingBlockStatus.PAST_REFUSED


def test_proposals_are_capped_by_bytes():
    nodes = Nodes(max_block_bytes=10_000)
    proposer = nodes.turn_of()
    entries = nodes.cell.entries(proposer, 100, size=500)
    nodes.deliver(entries, to=[proposer])
    [proposal] = nodes.managers[proposer].tick(nodes.now()).new_operations
    blocks = nodes.managers[proposer].pending_blocks(nodes.now()).blocks
    ids = blocks[proposal.operation_id].operation_ids
    assert 0 < len(ids) < 100
    assert ids == tuple(op.operation_id for op in entries[: len(ids)])  # the oldest first
    assert sum(op.encoded_size_max for op in entries[: len(ids)]) <= 10_000


# -- engine ---------------------------------------------------------------------------------------


def test_fork_recovery_emits_the_removed_entries_as_pending_again():
    cell = Cell(n=1)
    chain, pending = MemoryChainStore(), MemoryPendingStore()
    chain.write_block(cell.genesis)
    engine = Engine(
        EngineConfig(),
        LocalChainNode(cell.ids[0], cell.keypairs[0]),
        cell.cell,
        chain,
        pending,
        MemoryMetaStore(),
        cell.time,
    )
    ops = cell.entries(0, 4)
    block = cell.block(cell.genesis, ops, signers=(0,))
    chain.write_block(block)
    removed = chain.truncate_from(block.offset)
    engine._on_truncated(removed)
    events = engine.take_events()
    assert [type(event) for event in events] == [ChainTruncated, NewPendingOperations]
    assert events[1].ops == ops  # type: ignore[union-attr]
    assert all(pending.get(op.operation_id) is not None for op in ops)


@pytest.mark.parametrize("count", [0, 1, 30, 31, 32, 62, 100])
def test_whole_store_request_is_what_the_ranges_builder_makes(count):
    from exochain.core.common import PendingSyncConfig
    from exochain.core.pending_sync import PendingSynchronizer

    cell = Cell()
    pending = MemoryPendingStore()
    pending.put(cell.entries(0, count))
    config = PendingSyncConfig()
    local = LocalChainNode(cell.ids[0], cell.keypairs[0])
    sync = PendingSynchronizer(
        config, local, cell.cell, pending, MemoryChainStore(), MemoryMetaStore(), SignatureChecker(cell.cell.member_key)
    )
    now = cell.time.now_ns() + 10 * NS_PER_S
    builder = SyncRangesBuilder(config.max_operations_per_range)
    builder.push_new_range(UNBOUNDED)
    for entry in pending.range():
        builder.push_operation(entry.op, OperationDetails.HASH)
    builder.set_last_range_upper(SyncBound(sync.push_horizon(now), True))
    assert sync._whole_store_request(now) == builder.request(0)


def test_local_entries_the_peers_may_not_hold_wait_for_the_next_proposal():
    nodes = Nodes()
    proposer = nodes.turn_of()
    other = (proposer + 1) % 3
    mine = nodes.cell.entries(proposer, 3)
    theirs = nodes.cell.entries(other, 2)
    nodes.deliver(mine, to=[proposer])
    nodes.deliver(theirs, to=[proposer])
    manager = nodes.managers[proposer]
    manager.set_peers_received_up_to(mine[0].operation_id)  # only the first push arrived
    [proposal] = manager.tick(nodes.now()).new_operations
    ids = manager.pending_blocks(nodes.now()).blocks[proposal.operation_id].operation_ids
    assert set(ids) == {mine[0].operation_id} | {op.operation_id for op in theirs}
    # Unknown again (or old enough): nothing waits.
    manager.set_peers_received_up_to(None)
    nodes.cell.time.advance(10 * NS_PER_S)
    manager.tick(nodes.now())  # the first proposal expires
    nodes.cell.time.advance(10 * NS_PER_S)
    proposals = [op for op in manager.tick(nodes.now()).new_operations]
    assert proposals, "a new proposal takes the entries that waited"


def test_engine_reports_what_a_quorum_of_peers_received():
    cell = Cell(n=5)
    chain, pending = MemoryChainStore(), MemoryPendingStore()
    chain.write_block(cell.genesis)
    local = LocalChainNode(cell.ids[0], cell.keypairs[0])
    engine = Engine(EngineConfig(), local, cell.cell, chain, pending, MemoryMetaStore(), cell.time)
    now = cell.time.now_ns()
    engine.peer_received(cell.ids[1], 100, now)
    assert engine.commit_manager._peers_received_up_to is None  # a quorum of 5 needs 2 peers
    engine.peer_received(cell.ids[2], 50, now)
    assert engine.commit_manager._peers_received_up_to == 50
    engine.peer_received(cell.ids[3], 80, now)
    assert engine.commit_manager._peers_received_up_to == 80  # the second highest
    engine.peer_received(cell.ids[3], 70, now)  # never goes back
    assert engine.commit_manager._peers_received_up_to == 80


def test_engine_runs_a_commit_round_only_when_what_a_quorum_received_moves(monkeypatch):
    cell = Cell(n=3)
    chain = MemoryChainStore()
    chain.write_block(cell.genesis)
    local = LocalChainNode(cell.ids[0], cell.keypairs[0])
    engine = Engine(EngineConfig(), local, cell.cell, chain, MemoryPendingStore(), MemoryMetaStore(), cell.time)
    monkeypatch.setattr(engine.chain_sync, "_status", ChainSyncStatus.SYNCHRONIZED)
    monkeypatch.setattr(engine.commit_manager, "is_my_turn", lambda now_ns: True)
    rounds: list[int] = []
    monkeypatch.setattr(engine, "_run_commit_manager", lambda now_ns, cleanup=True: rounds.append(now_ns))
    now = cell.time.now_ns()
    engine.peer_received(cell.ids[1], 100, now)  # one peer makes a quorum of 3 with us
    assert engine.commit_manager.peers_received_up_to == 100 and len(rounds) == 1
    engine.peer_received(cell.ids[2], 50, now)  # the other one is behind: nothing new to propose
    assert engine.commit_manager.peers_received_up_to == 100 and len(rounds) == 1
    engine.peer_received(cell.ids[2], 150, now)
    assert engine.commit_manager.peers_received_up_to == 150 and len(rounds) == 2
