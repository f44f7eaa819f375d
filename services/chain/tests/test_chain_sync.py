"""Chain synchronization (SPEC 9.5) on real signed chains, plus block validation and fork recovery.

Chains are built by `append_blocks`: the genesis signed by the cell key, then blocks whose entry
operations are signed by their proposer and whose header is signed by a quorum of chain nodes. A
block depends only on (previous block, seed, height), so two chains built with the same seeds are
byte-identical and a different seed from some height on makes them fork there. Conversations run
through `Harness.sync`, a tiny delivery loop between the synchronizers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest

from exochain.core.chain_sync import ChainSynchronizer, ChainSyncResult
from exochain.core.common import NS_PER_S, ChainCell, ChainSyncConfig, ChainSyncStatus, LocalChainNode, Outgoing
from exochain.model import (
    BlockHeaderView,
    BlockView,
    build_block_header,
    build_genesis,
    new_entry,
    sign_block,
    sign_operations,
)
from exochain.storage.memory import MemoryChainStore
from exocommon import canonical
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2

HEADERS = chain_pb2.ChainSyncRequest.RequestedDetails.HEADERS
BLOCKS = chain_pb2.ChainSyncRequest.RequestedDetails.BLOCKS
STEP_NS = 6 * NS_PER_S  # more than the trackers' minimum interval, so every sync round asks again


# -- signed chains ---------------------------------------------------------------------------------


@dataclass
class SignedCell:
    cell: ChainCell
    cell_keypair: Keypair
    node_ids: list[str]  # sorted: index i is node i in the tests
    keypairs: dict[str, Keypair]

    @property
    def quorum(self) -> int:
        return len(self.node_ids) // 2 + 1


def make_cell(node_count: int, cell_seed: bytes = b"\xce") -> SignedCell:
    keypairs = {str(PeerId.from_public_key(kp.public_key)): kp for kp in (_keypair(i) for i in range(node_count))}
    cell_keypair = Keypair.from_seed(cell_seed * 32)
    cell = ChainCell(
        cell_id=str(PeerId.from_public_key(cell_keypair.public_key)),
        cell_public_key=cell_keypair.public_key,
        chain_node_keys={node_id: kp.public_key for node_id, kp in keypairs.items()},
        member_keys={node_id: kp.public_key for node_id, kp in keypairs.items()},
    )
    return SignedCell(cell, cell_keypair, sorted(keypairs), keypairs)


def _keypair(index: int) -> Keypair:
    return Keypair.from_seed(bytes([index + 1]) * 32)


def make_block(
    tc: SignedCell,
    previous: BlockHeaderView,
    seed: int,
    op_size: int = 16,
    ops_count: int = 2,
    op_keypair: Keypair | None = None,
) -> BlockView:
    """The block after `previous`, proposed by a node picked by seed, signed by a quorum."""
    height = previous.height + 1
    proposer = tc.node_ids[(height + seed) % len(tc.node_ids)]
    data = [f"seed={seed} height={height} op={j}:".encode().ljust(op_size, b".") for j in range(ops_count)]
    ops = sign_operations(
        [new_entry(height * 1000 + j, proposer, d) for j, d in enumerate(data)], op_keypair or tc.keypairs[proposer]
    )
    head = build_block_header(tc.cell.cell_id, previous, height * 1000 + 999, proposer, ops)
    return signed_block(tc, head, tuple(ops))


def signed_block(tc: SignedCell, head: BlockHeaderView, ops: tuple = ()) -> BlockView:
    signatures = [sign_block(head, node_id, tc.keypairs[node_id]) for node_id in tc.node_ids[: tc.quorum]]
    return BlockView(head, ops).with_signatures(signatures)


def append_blocks(tc: SignedCell, chain: MemoryChainStore, count: int, seed: int, op_size: int = 16) -> None:
    """Appends `count` blocks (the genesis counts as one when the chain is empty)."""
    last = chain.last_block()
    if last is None and count > 0:
        last = build_genesis(tc.cell.cell_id, tc.cell_keypair)
        chain.write_block(last)
        count -= 1
    for _ in range(count):
        assert last is not None
        last = make_block(tc, last.head, seed, op_size)
        chain.write_block(last)


def chain_bytes(chain: MemoryChainStore) -> list[bytes]:
    return [block.encode() for block in chain.blocks_from(0)]


def heights(chain: MemoryChainStore) -> int:
    last = chain.last_block()
    return last.height if last is not None else 0


# -- delivery loop ---------------------------------------------------------------------------------


@dataclass
class Harness:
    tc: SignedCell
    chains: list[MemoryChainStore]
    syncs: list[ChainSynchronizer]
    now_ns: int = 0
    results: list[list[ChainSyncResult]] = field(default_factory=list)
    blocks_responses: int = 0

    @classmethod
    def create(cls, node_count: int, config: ChainSyncConfig | None = None) -> Harness:
        tc = make_cell(node_count)
        chains = [MemoryChainStore() for _ in range(node_count)]
        syncs = [
            ChainSynchronizer(
                config or ChainSyncConfig(), LocalChainNode(node_id, tc.keypairs[node_id]), tc.cell, chain
            )
            for node_id, chain in zip(tc.node_ids, chains, strict=True)
        ]
        return cls(tc, chains, syncs, results=[[] for _ in range(node_count)])

    def id(self, index: int) -> str:
        return self.tc.node_ids[index]

    def index(self, node_id: str) -> int:
        return self.tc.node_ids.index(node_id)

    def tick(self, index: int) -> list[Outgoing]:
        self.now_ns += STEP_NS
        return self.syncs[index].tick(self.now_ns)

    def sync(self, index: int, peers: set[int] | None = None, drop: set[int] | frozenset[int] = frozenset()) -> None:
        """One round: `index` ticks, then messages flow until none is left. `peers` limits whom it talks
        to (like the original's run_sync_1_to_1); messages to or from `drop` are lost."""
        outgoing = [o for o in self.tick(index) if peers is None or self.index(o.to_node_id) in peers]
        self.deliver(index, outgoing, drop)

    def deliver(self, sender: int, outgoing: list[Outgoing], drop: set[int] | frozenset[int] = frozenset()) -> None:
        queue = deque((sender, o) for o in outgoing)
        for _ in range(100_000):
            if not queue:
                return
            source, message = queue.popleft()
            target = self.index(message.to_node_id)
            if source in drop or target in drop:
                continue
            kind = message.message.WhichOneof("kind")
            if kind == "chain_sync_request":
                replies = self.syncs[target].handle_request(self.id(source), message.message.chain_sync_request, 0)
            else:
                response = message.message.chain_sync_response
                self.blocks_responses += bool(response.blocks)
                result = self.syncs[target].handle_response(self.id(source), response, self.now_ns)
                self.results[target].append(result)
                replies = result.outgoing
            queue.extend((target, reply) for reply in replies)
        raise AssertionError("conversation did not end")

    def written(self, index: int) -> list[BlockView]:
        return [block for result in self.results[index] for block in result.written]

    def truncated(self, index: int) -> list[BlockView]:
        return [block for result in self.results[index] for block in result.truncated]

    def rejections(self, index: int) -> list[str]:
        return [result.rejected for result in self.results[index] if result.rejected is not None]


def request_blocks(
    h: Harness, server: int, client: int, from_offset: int, to_offset: int = 0
) -> chain_pb2.ChainSyncResponse:
    request = chain_pb2.ChainSyncRequest(from_offset=from_offset, to_offset=to_offset, requested_details=BLOCKS)
    [reply] = h.syncs[server].handle_request(h.id(client), request, h.now_ns)
    return reply.message.chain_sync_response


def block_at_height(chain: MemoryChainStore, height: int) -> BlockView:
    return next(block for block in chain.blocks_from(0) if block.height == height)


# -- SPEC 9.5 ----------------------------------------------------------------------------------------


def test_blocks_are_accepted_only_from_the_leader_at_our_next_offset() -> None:
    h = Harness.create(3)
    append_blocks(h.tc, h.chains[0], 10, seed=1)
    append_blocks(h.tc, h.chains[1], 100, seed=1)
    append_blocks(h.tc, h.chains[2], 100, seed=1)
    h.sync(0)
    h.tick(0)  # elects node 1 (highest, smallest id) and asks it for blocks; not delivered
    assert h.syncs[0].status is ChainSyncStatus.DOWNLOADING
    assert h.syncs[0].leader == h.id(1)
    next_offset = h.chains[0].next_offset()

    result = h.syncs[0].handle_response(h.id(2), request_blocks(h, 2, 0, next_offset), h.now_ns)
    assert result.rejected is not None and "not our leader" in result.rejected
    assert not result.outgoing and not result.written and h.chains[0].block_count() == 10

    block_12 = block_at_height(h.chains[1], 12)
    result = h.syncs[0].handle_response(h.id(1), request_blocks(h, 1, 0, block_12.offset), h.now_ns)
    assert result.rejected is not None and "does not follow our chain" in result.rejected
    assert not result.written and h.chains[0].block_count() == 10

    result = h.syncs[0].handle_response(h.id(1), request_blocks(h, 1, 0, next_offset), h.now_ns)
    assert result.rejected is None
    assert [b.height for b in result.written] == list(range(11, 101))
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])


def test_a_late_duplicate_answer_skips_the_blocks_we_hold() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[0], 10, seed=1)
    append_blocks(h.tc, h.chains[1], 20, seed=1)
    h.sync(0)
    h.tick(0)
    result = h.syncs[0].handle_response(h.id(1), request_blocks(h, 1, 0, 0), h.now_ns)
    assert result.rejected is None
    assert [b.height for b in result.written] == list(range(11, 21))
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED


def test_empty_node_downloads_from_a_100_block_node() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[1], 100, seed=3434)

    h.sync(0)
    info = h.syncs[0].peer_info(h.id(1))
    assert info.is_synchronized(ChainSyncConfig())
    assert info.last_common_block is None
    assert info.last_known_block is not None and info.last_known_block.height == 100
    assert h.chains[0].block_count() == 0

    h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert h.syncs[0].leader == h.id(1)
    assert [b.height for b in h.written(0)] == list(range(1, 101))
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])

    # After a reset (the commit manager's OutOfSync), resync lands on Synchronized again.
    h.syncs[0].reset()
    assert h.syncs[0].status is ChainSyncStatus.UNKNOWN
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert len(h.written(0)) == 100
    assert h.rejections(0) == []


def test_full_node_leads_when_its_peer_is_empty() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[0], 100, seed=3434)
    for _ in range(2):
        h.sync(0)
        info = h.syncs[0].peer_info(h.id(1))
        assert info.is_synchronized(ChainSyncConfig())
        assert info.last_common_block is None and info.last_known_block is None
    assert h.syncs[0].leader == h.id(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED


def test_longer_node_leads_over_an_identical_prefix() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[0], 100, seed=3434)
    append_blocks(h.tc, h.chains[1], 50, seed=3434)
    for _ in range(2):
        h.sync(0)
        info = h.syncs[0].peer_info(h.id(1))
        assert info.is_synchronized(ChainSyncConfig())
        assert info.last_common_block is not None and info.last_common_block.height == 50
        assert info.last_known_block is not None and info.last_known_block.height == 50
    assert h.syncs[0].leader == h.id(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED


def test_shorter_node_downloads_the_rest_of_an_identical_chain() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[0], 50, seed=3434)
    append_blocks(h.tc, h.chains[1], 100, seed=3434)
    h.sync(0)
    info = h.syncs[0].peer_info(h.id(1))
    assert info.last_common_block is not None and info.last_common_block.height == 50
    assert info.last_known_block is not None and info.last_known_block.height == 100

    h.sync(0)
    assert h.syncs[0].leader == h.id(1)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])


def test_a_block_larger_than_the_send_size_still_transfers() -> None:
    config = ChainSyncConfig(blocks_max_send_size=1024)
    h = Harness.create(2, config)
    append_blocks(h.tc, h.chains[0], 1, seed=1)
    append_blocks(h.tc, h.chains[0], 2, seed=1, op_size=3000)
    assert all(block.encode().__len__() > 1024 for block in list(h.chains[0].blocks_from(0))[1:])

    h.sync(1)
    h.sync(1)
    assert chain_bytes(h.chains[1]) == chain_bytes(h.chains[0])
    assert h.blocks_responses == 3  # one block per answer
    assert h.syncs[1].status is ChainSyncStatus.SYNCHRONIZED


def test_empty_node_downloads_1024_blocks_in_many_round_trips() -> None:
    config = ChainSyncConfig(blocks_max_send_size=1024)
    h = Harness.create(2, config)
    append_blocks(h.tc, h.chains[1], 1024, seed=3434)
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert h.blocks_responses > 100
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])


def test_leader_that_loses_its_metadata_is_not_leader_anymore() -> None:
    h = Harness.create(4)
    append_blocks(h.tc, h.chains[0], 50, seed=3434)
    append_blocks(h.tc, h.chains[1], 100, seed=3434)
    append_blocks(h.tc, h.chains[2], 90, seed=3434)
    append_blocks(h.tc, h.chains[3], 90, seed=3434)
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].leader == h.id(1)

    info = h.syncs[0].peer_info(h.id(1))
    info.last_common_is_known = False
    info.last_known_block = None
    h.tick(0)
    assert h.syncs[0].leader != h.id(1)


def test_leader_a_few_blocks_ahead_is_followed_until_it_is_too_far() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[0], 50, seed=3434)
    append_blocks(h.tc, h.chains[1], 100, seed=3434)
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].leader == h.id(1)

    append_blocks(h.tc, h.chains[1], 2, seed=3434)
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert heights(h.chains[0]) == 100  # the commit manager adds blocks, not sync

    append_blocks(h.tc, h.chains[1], 10, seed=3434)
    h.sync(0)
    h.tick(0)
    assert h.syncs[0].status is ChainSyncStatus.DOWNLOADING


def test_quorum_lost_then_regained() -> None:
    h = Harness.create(4)
    append_blocks(h.tc, h.chains[0], 50, seed=3434)
    for index in (1, 2, 3):
        append_blocks(h.tc, h.chains[index], 100, seed=3434)
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED

    # Nodes 2 and 3 stop answering: once each failed twice, self + node 1 is no quorum of 4.
    for _ in range(8):
        h.now_ns += 30 * NS_PER_S
        h.sync(0, drop={2, 3})
    assert h.syncs[0].status is ChainSyncStatus.UNKNOWN
    assert h.syncs[0].leader is None
    statuses = {s.node_id: s.status for s in h.syncs[0].peer_statuses()}
    assert statuses == {
        h.id(1): ChainSyncStatus.SYNCHRONIZED,
        h.id(2): ChainSyncStatus.UNKNOWN,
        h.id(3): ChainSyncStatus.UNKNOWN,
    }

    for _ in range(3):
        h.now_ns += 30 * NS_PER_S
        h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED


def test_peer_statuses_report_common_offset_and_known_height() -> None:
    h = Harness.create(3)
    append_blocks(h.tc, h.chains[0], 30, seed=1)
    append_blocks(h.tc, h.chains[1], 40, seed=1)
    h.sync(0, peers={1})
    [one, two] = h.syncs[0].peer_statuses()
    assert one.node_id == h.id(1) and one.status is ChainSyncStatus.SYNCHRONIZED
    assert one.last_common_offset == block_at_height(h.chains[0], 30).offset and one.last_known_height == 40
    assert two.node_id == h.id(2) and two.status is ChainSyncStatus.UNKNOWN
    assert two.last_common_offset is None and two.last_known_height is None


# -- serving ---------------------------------------------------------------------------------------


def test_headers_are_sampled_first_every_kth_and_last() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[1], 100, seed=1)
    request = chain_pb2.ChainSyncRequest(requested_details=HEADERS)
    [reply] = h.syncs[1].handle_request(h.id(0), request, 0)
    sampled = [header.height for header in reply.message.chain_sync_response.headers]
    assert sampled == [1, 2, 3, 4, 5, 11, 21, 31, 41, 51, 61, 71, 81, 91, 96, 97, 98, 99, 100]
    first = h.chains[1].get_header(0)
    assert first is not None
    assert reply.message.chain_sync_response.headers[0] == first.partial_header()


def test_a_request_from_a_peer_counts_as_its_answer() -> None:
    h = Harness.create(2)
    tracker = h.syncs[0].peer_info(h.id(1)).tracker
    for _ in range(3):
        h.now_ns += 30 * NS_PER_S
        h.tick(0)
    assert tracker.failures == 2
    h.syncs[0].handle_request(h.id(1), chain_pb2.ChainSyncRequest(requested_details=HEADERS), h.now_ns)
    assert tracker.failures == 0


def test_blocks_request_for_an_offset_we_do_not_hold_gets_no_answer() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[1], 5, seed=1)
    request = chain_pb2.ChainSyncRequest(from_offset=7, requested_details=BLOCKS)
    assert h.syncs[1].handle_request(h.id(0), request, 0) == []


# -- divergence and fork recovery ------------------------------------------------------------------


def test_fully_divergent_pair_stays_unknown_and_writes_nothing() -> None:
    h = Harness.create(2)
    for index, seed in ((0, 1234), (1, 9876)):
        append_blocks(h.tc, h.chains[index], 1, seed=0)  # the same genesis
        append_blocks(h.tc, h.chains[index], 99, seed=seed)
    before = chain_bytes(h.chains[0])

    h.sync(0)
    info = h.syncs[0].peer_info(h.id(1))
    assert info.is_synchronized(ChainSyncConfig())
    assert info.last_common_block is not None and info.last_common_block.height == 1
    assert info.last_known_block is not None and info.last_known_block.height == 100

    for _ in range(3):
        h.sync(0)  # no quorum agrees on another chain: no exception, no truncation
    assert h.syncs[0].status is ChainSyncStatus.UNKNOWN
    assert h.syncs[0].leader is None
    assert chain_bytes(h.chains[0]) == before
    assert h.written(0) == [] and h.truncated(0) == []


def test_half_divergent_pair_never_truncates_without_a_quorum() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[0], 100, seed=1234)
    append_blocks(h.tc, h.chains[1], 50, seed=1234)
    append_blocks(h.tc, h.chains[1], 50, seed=4321)
    before = chain_bytes(h.chains[0])
    h.sync(0)
    info = h.syncs[0].peer_info(h.id(1))
    assert info.last_common_block is not None and info.last_common_block.height == 50
    assert info.last_known_block is not None and info.last_known_block.height == 100
    for _ in range(3):
        h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.UNKNOWN
    assert chain_bytes(h.chains[0]) == before


def fork_cluster() -> Harness:
    """3 nodes: 1 and 2 hold chain X; node 0 holds the same first 50 blocks, then its own 50."""
    h = Harness.create(3)
    append_blocks(h.tc, h.chains[0], 50, seed=1)
    append_blocks(h.tc, h.chains[0], 50, seed=2)
    for index in (1, 2):
        append_blocks(h.tc, h.chains[index], 50, seed=1)
        append_blocks(h.tc, h.chains[index], 50, seed=3)
    return h


def test_the_majority_never_truncates() -> None:
    h = fork_cluster()
    before = chain_bytes(h.chains[1])
    for _ in range(3):
        h.sync(1)
    assert h.syncs[1].status is ChainSyncStatus.SYNCHRONIZED
    assert h.syncs[1].leader == h.id(2)  # same height as us: the peer leads, and we hold all of it
    assert chain_bytes(h.chains[1]) == before
    assert h.truncated(1) == [] and h.written(1) == []


def test_minority_fork_truncates_to_the_common_block_and_downloads_the_majority_chain() -> None:
    h = fork_cluster()
    own_fork = [block.encode() for block in h.chains[0].blocks_from(0)][50:]

    h.sync(0)  # metadata (with a refinement: the fork lies between two sampled headers)
    for index in (1, 2):
        info = h.syncs[0].peer_info(h.id(index))
        assert info.last_common_block is not None and info.last_common_block.height == 50
        assert info.first_non_common_block is not None and info.first_non_common_block.height == 51
    h.sync(0)

    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert h.syncs[0].leader == h.id(1)
    assert [block.encode() for block in h.truncated(0)] == own_fork
    assert [b.height for b in h.written(0)] == list(range(51, 101))
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])

    # Stable afterwards.
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert len(h.truncated(0)) == 50 and h.rejections(0) == []


def test_fork_right_after_the_genesis_keeps_only_the_genesis() -> None:
    h = Harness.create(4)
    append_blocks(h.tc, h.chains[0], 1, seed=0)
    append_blocks(h.tc, h.chains[0], 99, seed=1234)
    for index in (1, 2, 3):
        append_blocks(h.tc, h.chains[index], 1, seed=0)
        append_blocks(h.tc, h.chains[index], 99, seed=9876)
    genesis = h.chains[0].get_block(0)
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert [b.height for b in h.truncated(0)] == list(range(2, 101))
    assert h.chains[0].get_block(0) == genesis
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])


def test_no_truncation_without_a_quorum_of_peers_on_the_other_chain() -> None:
    h = fork_cluster()
    before = chain_bytes(h.chains[0])
    for _ in range(4):
        h.sync(0, drop={2})  # node 2 is down: only node 1 shows chain X
    assert h.syncs[0].status is ChainSyncStatus.UNKNOWN
    assert chain_bytes(h.chains[0]) == before

    for _ in range(5):
        h.sync(0)  # node 2 back (once its tracker's backoff elapsed): now a quorum of peers agrees
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])


def test_a_quorum_on_another_genesis_never_truncates_ours() -> None:
    h = Harness.create(3)
    append_blocks(h.tc, h.chains[0], 20, seed=1)
    other = make_cell(3, cell_seed=b"\xcf")  # another cell key, so another genesis
    for index in (1, 2):
        append_blocks(other, h.chains[index], 40, seed=1)
    before = chain_bytes(h.chains[0])
    for _ in range(4):
        h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.UNKNOWN
    assert chain_bytes(h.chains[0]) == before


def test_minority_fork_keeps_its_blocks_when_the_replacement_is_invalid() -> None:
    h = fork_cluster()
    own = chain_bytes(h.chains[0])
    h.sync(0)
    [blocks_request] = [o for o in h.tick(0) if o.message.chain_sync_request.requested_details == BLOCKS]
    assert blocks_request.to_node_id == h.id(1) and h.syncs[0].status is ChainSyncStatus.DOWNLOADING
    common = block_at_height(h.chains[0], 50)
    assert blocks_request.message.chain_sync_request.from_offset == common.next_offset

    forged = request_blocks(h, 1, 0, common.next_offset)
    forged.blocks[0].signatures[0].signature = bytes(64)
    result = h.syncs[0].handle_response(h.id(1), forged, h.now_ns)
    assert result.rejected is not None and result.truncated == [] and chain_bytes(h.chains[0]) == own

    # A valid, quorum-signed block after the common one, but not the one the quorum reported.
    other = make_block(h.tc, common.head, seed=99)
    result = h.syncs[0].handle_response(
        h.id(1), chain_pb2.ChainSyncResponse(from_offset=other.offset, blocks=[other.to_proto()]), h.now_ns
    )
    assert result.rejected is not None and "not the one a quorum of nodes reported" in result.rejected
    assert chain_bytes(h.chains[0]) == own

    # Two rejections cost node 1 its synchronized status: no quorum to truncate until it answers again.
    assert not h.syncs[0].peer_info(h.id(1)).is_synchronized(ChainSyncConfig())
    for _ in range(6):
        h.sync(0)  # its tracker backs off 15 s after two failures, then its answer restores the quorum
    assert len(h.truncated(0)) == 50
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])


def test_a_synchronized_leader_of_a_fork_notices_the_majority_moved_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="exochain.core.chain_sync")
    h = fork_cluster()
    # Node 0 first only sees node 2, which is behind on the common prefix: node 0 leads.
    h.chains[2] = MemoryChainStore()
    append_blocks(h.tc, h.chains[2], 40, seed=1)
    h.syncs[2] = ChainSynchronizer(
        ChainSyncConfig(), LocalChainNode(h.id(2), h.tc.keypairs[h.id(2)]), h.tc.cell, h.chains[2]
    )
    h.sync(0, drop={1})
    h.sync(0, drop={1})
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED and h.syncs[0].leader == h.id(0)

    # Node 2 catches up on chain X; node 1 is back: a quorum is divergent from node 0.
    append_blocks(h.tc, h.chains[2], 10, seed=1)
    append_blocks(h.tc, h.chains[2], 50, seed=3)
    for _ in range(4):
        h.sync(0)
    assert chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    lost = [r for r in caplog.records if r.getMessage() == "chain sync lost synchronization"]
    reasons = [getattr(r, "reason", None) for r in lost]
    assert reasons == ["a quorum of nodes is divergent from us"]


# -- validation of received blocks -----------------------------------------------------------------


def downloading_pair() -> tuple[Harness, chain_pb2.ChainSyncResponse]:
    """Node 0 (50 blocks) downloading from node 1 (100 blocks); the leader's honest answer."""
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[0], 50, seed=7)
    append_blocks(h.tc, h.chains[1], 100, seed=7)
    h.sync(0)
    h.tick(0)
    assert h.syncs[0].status is ChainSyncStatus.DOWNLOADING
    return h, request_blocks(h, 1, 0, h.chains[0].next_offset())


def assert_rejected(h: Harness, response: chain_pb2.ChainSyncResponse, reason: str) -> None:
    before = chain_bytes(h.chains[0])
    tracker = h.syncs[0].peer_info(h.id(1)).tracker
    failures = tracker.failures
    result = h.syncs[0].handle_response(h.id(1), response, h.now_ns)
    assert result.rejected is not None and reason in result.rejected, result.rejected
    assert result.written == [] and result.outgoing == []
    assert chain_bytes(h.chains[0]) == before
    assert tracker.failures == failures + 1


def test_block_with_a_forged_signature_is_rejected() -> None:
    h, response = downloading_pair()
    forged = response.blocks[0].signatures[0]
    forged.signature = Keypair.from_seed(b"\x66" * 32).sign(canonical.block_payload(response.blocks[0].header_bytes))
    assert_rejected(h, response, "is not a quorum")


def test_block_breaking_the_hash_chain_is_rejected_even_if_signed() -> None:
    h, response = downloading_pair()
    head = BlockHeaderView.parse(response.blocks[0].header_bytes)
    header = chain_pb2.BlockHeader()
    header.CopyFrom(head.header)
    header.previous_hash = b"\x16\x20" + bytes(32)
    broken = signed_block(h.tc, BlockHeaderView.parse(canonical.deterministic_bytes(header)))
    del response.blocks[:]
    response.blocks.append(broken.to_proto())
    assert_rejected(h, response, "does not point to the hash of the previous block")


def test_block_with_a_tampered_operation_is_rejected() -> None:
    h, response = downloading_pair()
    block = BlockView.from_proto(response.blocks[0])
    op = block.operations[0]
    tampered = chain_pb2.Operation()
    tampered.CopyFrom(op.operation)
    tampered.entry.data = b"tampered"
    [resigned] = sign_operations([tampered], h.tc.keypairs[op.node_id])
    response.blocks[0].operations[0].CopyFrom(resigned.to_proto())
    assert_rejected(h, response, "operations do not match the header")


def test_block_with_an_operation_signed_by_a_stranger_is_rejected() -> None:
    h, response = downloading_pair()
    last = h.chains[0].last_block()
    assert last is not None
    stranger = make_block(h.tc, last.head, seed=7, op_keypair=Keypair.from_seed(b"\x77" * 32))
    del response.blocks[:]
    response.blocks.append(stranger.to_proto())
    assert_rejected(h, response, "not signed by a cell member")


def test_an_invalid_block_late_in_an_answer_writes_none_of_it() -> None:
    h, response = downloading_pair()
    assert len(response.blocks) > 3
    response.blocks[3].signatures[1].signature = bytes(64)
    assert_rejected(h, response, "is not a quorum")


def test_genesis_not_signed_by_the_cell_key_is_rejected() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[1], 3, seed=1)
    h.sync(0)
    h.tick(0)
    response = request_blocks(h, 1, 0, 0)
    response.blocks[0].signatures[0].signature = Keypair.from_seed(b"\x55" * 32).sign(b"whatever")
    before = h.syncs[0].peer_info(h.id(1)).tracker.failures
    result = h.syncs[0].handle_response(h.id(1), response, h.now_ns)
    assert result.rejected is not None and "not signed by the cell key" in result.rejected
    assert h.chains[0].block_count() == 0
    assert h.syncs[0].peer_info(h.id(1)).tracker.failures == before + 1


def test_honest_answer_after_rejections_is_accepted() -> None:
    h, response = downloading_pair()
    result = h.syncs[0].handle_response(h.id(1), response, h.now_ns)
    assert result.rejected is None and result.written
    assert h.syncs[0].peer_info(h.id(1)).tracker.failures == 0


@pytest.mark.parametrize("node_count", [1, 2, 3])
def test_alone_or_not_a_non_empty_node_ends_synchronized_with_identical_peers(node_count: int) -> None:
    h = Harness.create(node_count)
    for chain in h.chains:
        append_blocks(h.tc, chain, 10, seed=5)
    for _ in range(3):
        h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert h.written(0) == []


def test_peers_that_shared_our_fork_are_seen_divergent_after_we_truncate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="exochain.core.chain_sync")
    h = Harness.create(5)
    for index in (0, 4):  # the minority fork Y
        append_blocks(h.tc, h.chains[index], 50, seed=1)
        append_blocks(h.tc, h.chains[index], 50, seed=2)
    for index in (1, 2, 3):  # the majority chain X
        append_blocks(h.tc, h.chains[index], 50, seed=1)
        append_blocks(h.tc, h.chains[index], 50, seed=3)

    h.sync(4)  # node 4 learns node 0 holds its chain
    assert h.syncs[4].peer_info(h.id(0)).last_common_block == h.syncs[4].peer_info(h.id(0)).last_known_block
    h.sync(0)
    h.sync(0)
    assert len(h.truncated(0)) == 50 and chain_bytes(h.chains[0]) == chain_bytes(h.chains[1])
    info = h.syncs[0].peer_info(h.id(4))
    assert info.last_common_block is not None and info.last_common_block.height == 50
    assert info.first_non_common_block is not None and info.first_non_common_block.height == 51
    assert [s.status for s in h.syncs[0].peer_statuses()] == [ChainSyncStatus.SYNCHRONIZED] * 4

    # Node 4 asks node 0 for headers from a block node 0 dropped: it starts over, finds it is on the
    # minority fork now, and recovers too.
    caplog.clear()
    h.sync(4, peers={0})
    assert "chain peer no longer shares our common block" in [r.getMessage() for r in caplog.records]
    for _ in range(3):
        h.sync(4)
    assert len(h.truncated(4)) == 50 and chain_bytes(h.chains[4]) == chain_bytes(h.chains[1])
    info = h.syncs[4].peer_info(h.id(0))
    assert info.last_common_block == info.last_known_block and info.last_known_block.height == 100


def test_a_leader_that_forks_away_from_the_majority_is_dropped() -> None:
    h = Harness.create(3)
    for chain in h.chains:
        append_blocks(h.tc, chain, 60, seed=1)
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED and h.syncs[0].leader == h.id(1)

    # Node 1's chain now ends with 5 blocks nobody else has; node 2 still agrees with us.
    h.chains[1].truncate_from(block_at_height(h.chains[1], 56).offset)
    append_blocks(h.tc, h.chains[1], 5, seed=2)
    h.sync(0)
    h.sync(0)
    assert h.syncs[0].leader != h.id(1)
    assert h.syncs[0].status is ChainSyncStatus.SYNCHRONIZED
    assert heights(h.chains[0]) == 60 and h.truncated(0) == []


def test_blocks_requests_are_not_repeated_before_the_interval() -> None:
    h = Harness.create(2)
    append_blocks(h.tc, h.chains[1], 10, seed=1)
    h.sync(0)
    first = [o for o in h.tick(0) if o.message.chain_sync_request.requested_details == BLOCKS]
    again = h.syncs[0].tick(h.now_ns + NS_PER_S)
    later = h.syncs[0].tick(h.now_ns + 5 * NS_PER_S)
    assert len(first) == 1
    assert [o for o in again if o.message.chain_sync_request.requested_details == BLOCKS] == []
    assert [o.message for o in later if o.message.chain_sync_request.requested_details == BLOCKS] == [first[0].message]


def test_malformed_answers_and_strangers_are_refused() -> None:
    h, response = downloading_pair()
    response.blocks[0].header_bytes = b"\xff\xff\xff"
    assert_rejected(h, response, "does not parse")

    headers = chain_pb2.ChainSyncResponse(headers=[h.chains[1].get_header(0).partial_header()] * 2)
    assert_rejected(h, headers, "not in chain order")

    stranger = str(PeerId.from_public_key(Keypair.from_seed(b"\x42" * 32).public_key))
    assert h.syncs[0].handle_request(stranger, chain_pb2.ChainSyncRequest(), h.now_ns) == []
    result = h.syncs[0].handle_response(stranger, chain_pb2.ChainSyncResponse(), h.now_ns)
    assert result.rejected is not None and "not a chain peer" in result.rejected


def test_an_empty_cell_stays_unknown_without_a_leader() -> None:
    h = Harness.create(3)
    for _ in range(3):
        h.sync(0)
    assert h.syncs[0].status is ChainSyncStatus.UNKNOWN and h.syncs[0].leader is None
    assert [s.status for s in h.syncs[0].peer_statuses()] == [ChainSyncStatus.SYNCHRONIZED] * 2
