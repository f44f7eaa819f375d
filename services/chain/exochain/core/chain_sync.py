"""Chain synchronization (SPEC 2.9): the local chain follows the chain a quorum of chain nodes hold.

Theory of operation
-------------------
Per other chain node we keep a `NodeSyncInfo`: what we know of its chain relative to ours (the last
block we have in common, the first of its blocks we do not have, its last block) and a
`RequestTracker` that paces the metadata (headers) requests we send it.

1. *Metadata.* Every tick, each peer whose tracker allows it gets a headers request from our last
   common block with it. The answer is a sample of its headers (the first and last few, and every
   k-th); walking it in order finds the new last common block and the first non-common block (the
   *fork header*). While the two are not adjacent in height, we ask again for the headers between
   them (each answer narrows the gap about tenfold). Then the peer is `SYNCHRONIZED` (its metadata
   is known) until it fails to answer `meta_sync_max_failures` requests in a row.
2. *Leader.* When a quorum of chain nodes (self included) have known metadata and a quorum of them
   are non-divergent from us, the leader is the node with the highest chain among us and the
   non-divergent peers. If it is us, or we hold its whole chain, we are `SYNCHRONIZED`.
3. *Download.* Otherwise we ask the leader for blocks after our last block (`DOWNLOADING`); every
   answer is validated block by block (hash chain, operations and their hash, operation signatures,
   a quorum of chain node signatures; the genesis against the cell key) before anything is written,
   and the next batch is asked for at once until we hold the leader's last known block.

Divergence: a peer is divergent when its fork header conflicts with our chain (we hold another block
at its offset, or a block spanning it). Comparing the fork header with what we hold *now*, rather
than comparing heights, keeps metadata that became stale while we downloaded from counting as a fork.

Where this port differs from the original, and why:

* Blocks are validated before they are written (SPEC 11, gap 2). An invalid answer writes nothing,
  counts a failure in the peer's tracker and is logged; a peer that keeps failing loses its
  `SYNCHRONIZED` status, so it stops counting for quorums and stops being elected.
* A node on a minority fork recovers instead of stopping the engine (SPEC 2.10 case 1, SPEC 11 gap 1).
  When the non-divergent nodes lack a quorum, we look for a quorum of synchronized *peers* that report
  the same last common block with us *and* the same fork header: they hold the same chain up to a block
  that replaced ours, so our blocks after the common one can never be held by a quorum. We then ask
  the highest of them for blocks from the common block on; only when that answer validates against
  the common block (and its first block is the fork header the quorum reported) is the local chain
  truncated after the common block and the new blocks written, in one call. The removed blocks are
  returned so the engine marks their operations uncommitted again (they are re-proposed: nothing
  acknowledged is lost). We never truncate when a quorum is non-divergent from us (we are part of the
  majority), never truncate the genesis (a peer with another genesis has no common block, so it is
  never a recovery leader) and re-check the quorum at the moment of truncating. If no quorum agrees on
  anything, the status stays `UNKNOWN` and metadata keeps being refreshed: no exception.
* A `SYNCHRONIZED` node also re-checks divergence every tick, so a node that stays leader of a fork
  (SPEC 11, quirk 5) notices when the majority moved on.
* Blocks requests are paced on their own (one outstanding per leader and offset, re-sent after
  `request_min_interval_ns`), and a late duplicate answer is recognised (blocks we already hold with
  the same hash are skipped) rather than rejected.
* Catch-up cost: blocks are served as stored (`ChainStore.encoded_blocks_from`: parsed by protobuf,
  never decoded operation by operation), a received block keeps its serialisation (written as is),
  and operation signatures are checked a batch at a time (`SignatureChecker.verify_many`). They are
  still checked although a quorum signed the block (its signers checked them when they voted): a
  cheap second line of defence against a quorum of faulty nodes.
* A headers answer that no longer starts at our last common block (one side truncated, SPEC 2.10 case
  2) makes us forget that peer's metadata and ask again from the genesis.
* The chain store has no segments, so headers are always sampled (first, every k-th, last).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from exochain.core.common import ChainCell, ChainSyncConfig, ChainSyncStatus, LocalChainNode, Outgoing, RequestTracker
from exochain.model import (
    BlockHeaderView,
    BlockView,
    InvalidBlock,
    InvalidOperation,
    SignatureChecker,
    validate_block,
    validate_genesis,
)
from exochain.storage.base import ChainStore
from exocore.chain.v1 import chain_pb2

log = logging.getLogger(__name__)

HEADERS = chain_pb2.ChainSyncRequest.RequestedDetails.HEADERS
BLOCKS = chain_pb2.ChainSyncRequest.RequestedDetails.BLOCKS

# A headers answer we serve holds at most begin + end + sampled (+1) headers; a peer sending far more
# is misbehaving, and walking its answer would cost one store read per header.
MAX_HEADERS_PER_RESPONSE = 1_000


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What sync needs of a block it may not hold: where it is, its height and its hash."""

    offset: int
    height: int
    block_hash: bytes
    next_offset: int

    @classmethod
    def from_partial(cls, header: chain_pb2.BlockPartialHeader) -> BlockMeta:
        return cls(header.offset, header.height, bytes(header.block_hash), header.offset + header.block_size)

    @classmethod
    def from_header(cls, head: BlockHeaderView) -> BlockMeta:
        return cls(head.offset, head.height, head.hash, head.next_offset)


@dataclass
class NodeSyncInfo:
    """What we know of one peer's chain, relative to ours."""

    node_id: str
    tracker: RequestTracker
    # Highest block of its chain that we hold too (None: not even the genesis).
    last_common_block: BlockMeta | None = None
    # The block following `last_common_block` on its chain, which we do not hold (None: it has none).
    # Exact (adjacent in height) once `last_common_is_known`, unless the peer misbehaved.
    first_non_common_block: BlockMeta | None = None
    last_known_block: BlockMeta | None = None
    last_common_is_known: bool = False

    def is_synchronized(self, config: ChainSyncConfig) -> bool:
        return self.last_common_is_known and self.tracker.failures < config.meta_sync_max_failures

    def chain_fully_downloaded(self) -> bool:
        """We hold its last block."""
        known, common = self.last_known_block, self.last_common_block
        return known is not None and common is not None and known.offset == common.offset

    def common_blocks_height_delta(self) -> int:
        if self.last_common_block is None or self.last_known_block is None:
            return 0
        return self.last_known_block.height - self.last_common_block.height

    def forget_chain(self) -> None:
        self.last_common_block = None
        self.first_non_common_block = None
        self.last_known_block = None
        self.last_common_is_known = False


@dataclass(frozen=True, slots=True)
class PeerSyncStatus:
    """One line of the Status RPC."""

    node_id: str
    status: ChainSyncStatus
    last_common_offset: int | None
    last_known_height: int | None


@dataclass(slots=True)
class ChainSyncResult:
    """What handling a message produced: messages to send, blocks written (in order, for events) and,
    after a fork recovery, the blocks removed from the local chain (oldest first)."""

    outgoing: list[Outgoing] = field(default_factory=list)
    written: list[BlockView] = field(default_factory=list)
    truncated: list[BlockView] = field(default_factory=list)
    # Why the message was refused (None: accepted).
    rejected: str | None = None


@dataclass(frozen=True, slots=True)
class _ForkRecovery:
    """The decision to replace our blocks after `common` with the leader's."""

    leader_node_id: str
    common: BlockMeta
    fork: BlockMeta


@dataclass(frozen=True, slots=True)
class _DownloadRequest:
    leader_node_id: str
    from_offset: int
    sent_ns: int


class ChainSynchronizer:
    """Sans-IO chain synchronizer of one chain node; see the module docstring."""

    def __init__(self, config: ChainSyncConfig, local: LocalChainNode, cell: ChainCell, chain: ChainStore) -> None:
        assert cell.is_chain_node(local.node_id), "chain sync runs on chain nodes only"
        self._config = config
        self._local = local
        self._cell = cell
        self._chain = chain
        self._signatures = SignatureChecker(cell.member_key)
        self._status = ChainSyncStatus.UNKNOWN
        self._leader: str | None = None
        self._fork: _ForkRecovery | None = None
        self._download: _DownloadRequest | None = None
        self._peers: dict[str, NodeSyncInfo] = {}
        self._reset_peers()

    # -- public surface ---------------------------------------------------------------------------

    @property
    def status(self) -> ChainSyncStatus:
        return self._status

    @property
    def leader(self) -> str | None:
        """Node id of the leader (ours when we lead), None while there is none."""
        return self._leader

    def is_leader(self, node_id: str) -> bool:
        return self._leader == node_id

    def peer_info(self, node_id: str) -> NodeSyncInfo:
        return self._peers[node_id]

    def peer_statuses(self) -> list[PeerSyncStatus]:
        statuses = []
        for node_id, info in sorted(self._peers.items()):
            synchronized = info.is_synchronized(self._config)
            statuses.append(
                PeerSyncStatus(
                    node_id=node_id,
                    status=ChainSyncStatus.SYNCHRONIZED if synchronized else ChainSyncStatus.UNKNOWN,
                    last_common_offset=info.last_common_block.offset if info.last_common_block else None,
                    last_known_height=info.last_known_block.height if info.last_known_block else None,
                )
            )
        return statuses

    def reset(self) -> None:
        """Forget everything learnt from peers (the commit manager found us out of sync)."""
        log.info("chain sync reset", extra={"status": self._status.value})
        self._become_unknown()
        self._reset_peers()

    def tick(self, now_ns: int) -> list[Outgoing]:
        status_start = self._status
        self._refresh_peers()
        synchronized = [node_id for node_id, info in sorted(self._peers.items()) if info.is_synchronized(self._config)]
        majority = self._cell.has_quorum(1 + len(synchronized))

        if self._status is ChainSyncStatus.SYNCHRONIZED:
            reason = self._lost_synchronization(synchronized, majority)
            if reason is not None:
                log.info("chain sync lost synchronization", extra={"reason": reason, "leader": self._leader})
                self._become_unknown()
        if status_start is ChainSyncStatus.SYNCHRONIZED and self._status is not ChainSyncStatus.SYNCHRONIZED:
            # Resynchronize fast rather than waiting for the trackers' backoff.
            for info in self._peers.values():
                info.tracker.reset()

        outgoing: list[Outgoing] = []
        if self._status is not ChainSyncStatus.SYNCHRONIZED and majority:
            outgoing += self._converge(synchronized, now_ns)
        outgoing += self._metadata_requests(now_ns)
        if status_start is not self._status:
            log.info(
                "chain sync status changed",
                extra={"from_status": status_start.value, "to_status": self._status.value, "leader": self._leader},
            )
        return outgoing

    def handle_request(self, from_node_id: str, request: chain_pb2.ChainSyncRequest, now_ns: int) -> list[Outgoing]:
        info = self._peers.get(from_node_id)
        if info is None:
            log.warning("chain sync request from a node that is not a chain peer", extra={"node_id": from_node_id})
            return []
        # A request proves the peer is alive as much as an answer does. If our last request to it got
        # no answer (the peer was down: a node that started before its peers, say), ask again now
        # rather than after the backoff (5 s to 30 s): our synchronization waits for its answer. Once
        # per unanswered request: the peer answers ours before it sees it (one lane, in order).
        if info.tracker.unanswered():
            info.tracker.force_next()
        info.tracker.responded(now_ns)
        response = chain_pb2.ChainSyncResponse(from_offset=request.from_offset, to_offset=request.to_offset)
        if request.requested_details == BLOCKS:
            blocks = self._blocks_to_send(request.from_offset, request.to_offset)
            if not blocks:
                # Nothing starts at that offset: an empty answer would read as "no headers"; let it time out.
                log.info(
                    "chain sync blocks request for an offset we do not hold",
                    extra={"node_id": from_node_id, "from_offset": request.from_offset},
                )
                return []
            response.blocks.extend(blocks)
        else:
            response.headers.extend(self._sample_headers(request.from_offset, request.to_offset))
        return [Outgoing(from_node_id, chain_pb2.PeerMessage(chain_sync_response=response))]

    def handle_response(self, from_node_id: str, response: chain_pb2.ChainSyncResponse, now_ns: int) -> ChainSyncResult:
        info = self._peers.get(from_node_id)
        if info is None:
            log.warning("chain sync response from a node that is not a chain peer", extra={"node_id": from_node_id})
            return ChainSyncResult(rejected=f"{from_node_id} is not a chain peer")
        if response.blocks:
            return self._on_blocks(info, response, now_ns)
        return self._on_headers(info, response, now_ns)

    # -- tick -------------------------------------------------------------------------------------

    def _refresh_peers(self) -> None:
        for info in self._peers.values():
            if info.last_common_is_known and not info.is_synchronized(self._config):
                log.info("chain peer stopped answering", extra={"node_id": info.node_id})
                info.last_common_is_known = False
            common = info.last_common_block
            if common is not None and not self._holds(common):
                # Our chain changed under that metadata: learn it again.
                info.forget_chain()
                info.tracker.force_next()

    def _lost_synchronization(self, synchronized: list[str], majority: bool) -> str | None:
        if not majority:
            return "lost the majority of synchronized nodes"
        divergent = [node_id for node_id in synchronized if self._is_divergent(self._peers[node_id])]
        if not self._cell.has_quorum(1 + len(synchronized) - len(divergent)):
            return "a quorum of nodes is divergent from us"
        if self._leader is None or self._leader == self._local.node_id:
            return None
        leader = self._peers[self._leader]
        if not leader.is_synchronized(self._config):
            return "leader is not synchronized anymore"
        if self._leader in divergent:
            return "leader is divergent"
        if leader.common_blocks_height_delta() > self._config.max_leader_common_block_height_delta:
            return "leader is too far ahead"
        return None

    def _converge(self, synchronized: list[str], now_ns: int) -> list[Outgoing]:
        """Not synchronized, with a majority of known metadata: pick a leader and follow it."""
        divergent = {node_id for node_id in synchronized if self._is_divergent(self._peers[node_id])}
        if not self._cell.has_quorum(1 + len(synchronized) - len(divergent)):
            return self._recover_fork(now_ns)
        self._fork = None
        if (
            self._leader is not None
            and self._leader != self._local.node_id
            and (self._leader not in synchronized or self._leader in divergent)
        ):
            self._leader = None
        if self._leader is None:
            self._leader = self._elect_leader([n for n in synchronized if n not in divergent])
            if self._leader is None:
                return []  # Empty chain and no peer with blocks: nothing to follow yet.
            log.info("chain sync elected a leader", extra={"leader": self._leader})
        if self._leader == self._local.node_id:
            self._status = ChainSyncStatus.SYNCHRONIZED
            return []
        leader = self._peers[self._leader]
        if leader.chain_fully_downloaded():
            self._status = ChainSyncStatus.SYNCHRONIZED
            return []
        self._status = ChainSyncStatus.DOWNLOADING
        return self._request_blocks(leader, self._chain.next_offset(), now_ns)

    def _elect_leader(self, candidates: list[str]) -> str | None:
        """The highest chain among us and `candidates` (sorted ids: ties go to the smallest id)."""
        known = [self._peers[node_id] for node_id in candidates if self._peers[node_id].last_known_block is not None]
        best = max(known, key=_known_height, default=None)  # max keeps the first of equals
        last = self._chain.last_block()
        if best is None:
            return self._local.node_id if last is not None else None
        if last is not None and last.height > _known_height(best):
            return self._local.node_id
        return best.node_id

    def _recover_fork(self, now_ns: int) -> list[Outgoing]:
        recovery = self._fork_recovery()
        if recovery is None:
            if self._status is not ChainSyncStatus.UNKNOWN or self._fork is not None:
                log.warning("chain diverged from a quorum of nodes, and no quorum agrees on another chain")
            self._become_unknown()
            return []
        if recovery != self._fork:
            log.warning(
                "chain is on a minority fork: will replace our blocks after the common one with the leader's",
                extra={
                    "leader": recovery.leader_node_id,
                    "common_offset": recovery.common.offset,
                    "common_height": recovery.common.height,
                },
            )
        self._fork = recovery
        self._leader = recovery.leader_node_id
        self._status = ChainSyncStatus.DOWNLOADING
        return self._request_blocks(self._peers[recovery.leader_node_id], recovery.common.next_offset, now_ns)

    def _fork_recovery(self) -> _ForkRecovery | None:
        """The chain to switch to when we are on a minority fork, or None if we must not truncate."""
        synchronized = [node_id for node_id, info in sorted(self._peers.items()) if info.is_synchronized(self._config)]
        divergent = [node_id for node_id in synchronized if self._is_divergent(self._peers[node_id])]
        if self._cell.has_quorum(1 + len(synchronized) - len(divergent)):
            return None  # We are part of the majority.
        groups: dict[tuple[bytes, bytes], list[NodeSyncInfo]] = {}
        for node_id in divergent:
            info = self._peers[node_id]
            common, fork = info.last_common_block, info.first_non_common_block
            if common is None or fork is None:
                continue  # No common block: another genesis, which we never replace.
            groups.setdefault((common.block_hash, fork.block_hash), []).append(info)
        agreeing = [group for group in groups.values() if self._cell.has_quorum(len(group))]
        if not agreeing:
            return None
        # Two quorums of peers cannot hold different blocks at one offset, so there is one group.
        assert len(agreeing) == 1, "two quorums agree on different forks"
        group = agreeing[0]
        leader = max(group, key=_known_height)
        assert leader.last_common_block is not None and leader.first_non_common_block is not None
        return _ForkRecovery(leader.node_id, leader.last_common_block, leader.first_non_common_block)

    def _request_blocks(self, leader: NodeSyncInfo, from_offset: int, now_ns: int) -> list[Outgoing]:
        pending = self._download
        if (
            pending is not None
            and pending.leader_node_id == leader.node_id
            and pending.from_offset == from_offset
            and now_ns - pending.sent_ns < self._config.request_min_interval_ns
        ):
            return []  # Already asked; avoid duplicate answers.
        to_offset = leader.last_known_block.offset if leader.last_known_block is not None else 0
        self._download = _DownloadRequest(leader.node_id, from_offset, now_ns)
        request = chain_pb2.ChainSyncRequest(from_offset=from_offset, to_offset=to_offset, requested_details=BLOCKS)
        return [Outgoing(leader.node_id, chain_pb2.PeerMessage(chain_sync_request=request))]

    def _metadata_requests(self, now_ns: int) -> list[Outgoing]:
        outgoing = []
        for _node_id, info in sorted(self._peers.items()):
            if info.tracker.can_send(now_ns):
                from_offset = info.last_common_block.offset if info.last_common_block is not None else 0
                outgoing.append(self._headers_request(info, from_offset, 0, now_ns))
        return outgoing

    def _headers_request(self, info: NodeSyncInfo, from_offset: int, to_offset: int, now_ns: int) -> Outgoing:
        info.tracker.sent(now_ns)
        request = chain_pb2.ChainSyncRequest(from_offset=from_offset, to_offset=to_offset, requested_details=HEADERS)
        return Outgoing(info.node_id, chain_pb2.PeerMessage(chain_sync_request=request))

    # -- serving ----------------------------------------------------------------------------------

    def _sample_headers(self, from_offset: int, to_offset: int) -> list[chain_pb2.BlockPartialHeader]:
        """The first `begin` and last `end` headers of the range and every k-th between (SPEC 2.9)."""
        first = self._chain.get_header(from_offset)
        if to_offset:
            last = self._chain.get_header(to_offset)
        else:
            last_block = self._chain.last_block()
            last = last_block.head if last_block is not None else None
        if first is None or last is None or last.offset < first.offset:
            return []  # The range does not start and end at blocks we hold: the asker starts over.
        count = last.height - first.height + 1
        step = max(1, count // self._config.metadata_sync_sampled_count)
        begin, end = self._config.metadata_sync_begin_count, self._config.metadata_sync_end_count
        headers = []
        for index, head in enumerate(self._chain.headers_from(from_offset)):
            if index >= count:
                break
            if index < begin or index >= count - end or index % step == 0:
                headers.append(head.partial_header())
        return headers

    def _blocks_to_send(self, from_offset: int, to_offset: int) -> list[chain_pb2.Block]:
        """Blocks from `from_offset` up to `to_offset` (inclusive, 0: the end) within the send size,
        at least one."""
        if self._chain.get_header(from_offset) is None:
            return []
        blocks: list[chain_pb2.Block] = []
        total_size = 0
        # Stored bytes, parsed by protobuf only: decoding every operation to encode it again was most
        # of the cost of serving a catch-up.
        for offset, data in self._chain.encoded_blocks_from(from_offset):
            if to_offset and offset > to_offset:
                break
            size = len(data)
            if blocks and total_size + size > self._config.blocks_max_send_size:
                break
            blocks.append(chain_pb2.Block.FromString(data))
            total_size += size
        return blocks

    # -- answers ----------------------------------------------------------------------------------

    def _on_headers(self, info: NodeSyncInfo, response: chain_pb2.ChainSyncResponse, now_ns: int) -> ChainSyncResult:
        if len(response.headers) > MAX_HEADERS_PER_RESPONSE:
            return self._reject(info, f"{len(response.headers)} headers is more than we ever ask for")
        headers = [BlockMeta.from_partial(h) for h in response.headers]
        if any(b.offset <= a.offset or b.height <= a.height for a, b in zip(headers, headers[1:], strict=False)):
            return self._reject(info, "headers are not in chain order")
        info.tracker.responded(now_ns)

        from_offset, to_offset = response.from_offset, response.to_offset
        if from_offset > 0 and not (headers and headers[0].offset == from_offset and self._holds(headers[0])):
            # The block we had in common is gone on one side (a truncation): start over from the genesis.
            log.info("chain peer no longer shares our common block", extra={"node_id": info.node_id})
            info.forget_chain()
            return ChainSyncResult(outgoing=[self._headers_request(info, 0, 0, now_ns)])

        common: BlockMeta | None = None
        fork: BlockMeta | None = None
        for header in headers:
            if not self._holds(header):
                fork = header
                break
            common = header
        info.last_common_block = common
        info.first_non_common_block = fork
        if to_offset == 0:
            info.last_known_block = headers[-1] if headers else None
        elif headers and (info.last_known_block is None or headers[-1].offset > info.last_known_block.offset):
            info.last_known_block = headers[-1]

        exact = fork is None or fork.height == (common.height + 1 if common is not None else 1)
        narrowed = (
            to_offset == 0
            or (common is not None and common.offset > from_offset)
            or (fork is not None and fork.offset < to_offset)
        )
        if not exact and narrowed:
            # The fork is somewhere between two sampled headers: ask for the headers between them.
            assert common is not None and fork is not None
            info.last_common_is_known = False
            return ChainSyncResult(outgoing=[self._headers_request(info, common.offset, fork.offset, now_ns)])
        if not info.last_common_is_known:
            info.last_common_is_known = True
            info.tracker.force_next()
            log.debug(
                "chain peer metadata known",
                extra={
                    "node_id": info.node_id,
                    "last_common_height": common.height if common else None,
                    "last_known_height": info.last_known_block.height if info.last_known_block else None,
                },
            )
        return ChainSyncResult()

    def _on_blocks(self, info: NodeSyncInfo, response: chain_pb2.ChainSyncResponse, now_ns: int) -> ChainSyncResult:
        if not self.is_leader(info.node_id):
            # Likely a late answer from a former leader: not the peer's fault, but nothing to write.
            log.info("chain sync blocks from a node that is not our leader", extra={"node_id": info.node_id})
            return ChainSyncResult(rejected=f"blocks from {info.node_id}, which is not our leader")
        try:
            blocks = [BlockView.from_proto(block, block.SerializeToString()) for block in response.blocks]
        except (InvalidBlock, InvalidOperation) as exc:
            return self._reject(info, f"a block does not parse: {exc}")

        # Skip blocks we already hold (the answer to a re-sent request, or the commit manager was faster).
        skipped = 0
        while skipped < len(blocks) and self._holds(BlockMeta.from_header(blocks[skipped].head)):
            skipped += 1
        new_blocks = blocks[skipped:]
        truncate_offset: int | None = None
        if new_blocks:
            first_offset, next_offset = new_blocks[0].offset, self._chain.next_offset()
            if first_offset < next_offset and self._may_truncate(info.node_id, new_blocks[0]):
                truncate_offset = first_offset
            elif first_offset != next_offset:
                return self._reject(
                    info, f"block at offset {first_offset} does not follow our chain (next offset {next_offset})"
                )
            reason = self._invalid_blocks_reason(new_blocks, truncate_offset)
            if reason is not None:
                return self._reject(info, reason)

        info.tracker.responded(now_ns)
        self._download = None
        result = ChainSyncResult()
        if truncate_offset is not None:
            result.truncated = self._chain.truncate_from(truncate_offset)
            log.warning(
                "chain truncated to leave a minority fork",
                extra={"from_offset": truncate_offset, "removed_blocks": len(result.truncated)},
            )
            self._after_truncation(result.truncated)
        for block in new_blocks:
            self._chain.write_block(block)
            result.written.append(block)
        if blocks:
            self._advance_common(info, BlockMeta.from_header(blocks[-1].head))

        if info.chain_fully_downloaded():
            if self._status is not ChainSyncStatus.SYNCHRONIZED:
                log.info("chain downloaded from the leader", extra={"leader": info.node_id})
            self._status = ChainSyncStatus.SYNCHRONIZED
        elif self._status is ChainSyncStatus.DOWNLOADING and new_blocks:
            # Only after progress: a leader answering with blocks we hold must not keep us ping-ponging.
            result.outgoing = self._request_blocks(info, self._chain.next_offset(), now_ns)
        return result

    def _may_truncate(self, leader_node_id: str, first_block: BlockView) -> bool:
        """The fork recovery decided in a tick still holds now and this block starts it."""
        recovery = self._fork
        if recovery is None or recovery.leader_node_id != leader_node_id:
            return False
        # The common block is one we hold, so the truncation starts after it: the genesis always stays.
        if first_block.offset != recovery.common.next_offset or not self._holds(recovery.common):
            return False
        assert first_block.offset > 0
        # Re-check the quorum now (metadata may have changed since the tick); the leader may differ
        # if another peer of the same quorum got higher meanwhile.
        current = self._fork_recovery()
        return current is not None and (current.common, current.fork) == (recovery.common, recovery.fork)

    def _invalid_blocks_reason(self, blocks: list[BlockView], truncate_offset: int | None) -> str | None:
        """Why these blocks may not follow our chain (at `truncate_offset` if set), None if they may."""
        previous: BlockHeaderView | None
        if truncate_offset is not None:
            assert self._fork is not None
            previous = self._chain.get_header(self._fork.common.offset)
            fork = self._fork.fork
            if fork.offset == blocks[0].offset and fork.block_hash != blocks[0].hash:
                return f"block at offset {fork.offset} is not the one a quorum of nodes reported"
        else:
            last = self._chain.last_block()
            previous = last.head if last is not None else None
        for block in blocks:
            try:
                if previous is None:
                    validate_genesis(block, self._cell.cell_id, self._cell.cell_public_key)
                else:
                    validate_block(block, previous, self._cell.chain_node_keys, self._cell.has_quorum)
            except InvalidBlock as exc:
                return str(exc)
            verified = self._signatures.verify_many(block.operations)
            unsigned = [op.operation_id for op, ok in zip(block.operations, verified, strict=True) if not ok]
            if unsigned:
                return f"block at offset {block.offset}: operation(s) {unsigned[:5]} not signed by a cell member"
            previous = block.head
        return None

    def _after_truncation(self, removed: list[BlockView]) -> None:
        """Peers whose common block with us was removed hold our new last block and, after it, the
        first removed block."""
        assert removed, "a truncation removes at least one block"
        last = self._chain.last_block()
        assert last is not None, "the genesis is never truncated"
        new_common, fork = BlockMeta.from_header(last.head), BlockMeta.from_header(removed[0].head)
        for info in self._peers.values():
            if info.last_common_block is not None and info.last_common_block.offset >= fork.offset:
                info.last_common_block = new_common
                info.first_non_common_block = fork
        self._fork = None

    def _advance_common(self, leader: NodeSyncInfo, block: BlockMeta) -> None:
        """`block`, just received from the leader, is ours now: the leader's common block advances."""
        common = leader.last_common_block
        if common is not None and common.offset >= block.offset:
            return  # A late answer with blocks we already had in common.
        leader.last_common_block = block
        fork = leader.first_non_common_block
        if fork is not None and fork.offset <= block.offset:
            leader.first_non_common_block = None
        if leader.last_known_block is None or block.offset > leader.last_known_block.offset:
            leader.last_known_block = block

    def _reject(self, info: NodeSyncInfo, reason: str) -> ChainSyncResult:
        log.warning("chain sync answer rejected", extra={"node_id": info.node_id, "reason": reason})
        # Counted like a missing answer, so a peer sending bad data loses its synchronized status.
        info.tracker.failures += 1
        return ChainSyncResult(rejected=reason)

    # -- helpers ----------------------------------------------------------------------------------

    def _holds(self, block: BlockMeta) -> bool:
        head = self._chain.get_header(block.offset)
        return head is not None and head.hash == block.block_hash

    def _is_divergent(self, info: NodeSyncInfo) -> bool:
        """Its chain has a block where ours has another: its fork header conflicts with what we hold."""
        fork = info.first_non_common_block
        if fork is None:
            return False  # Its chain is a prefix of ours (or empty).
        head = self._chain.get_header(fork.offset)
        if head is not None:
            return head.hash != fork.block_hash
        # No block of ours starts there: divergent if one of ours spans that offset.
        return self._chain.next_offset() > fork.offset

    def _become_unknown(self) -> None:
        self._status = ChainSyncStatus.UNKNOWN
        self._leader = None
        self._fork = None
        self._download = None

    def _reset_peers(self) -> None:
        self._peers = {
            node_id: NodeSyncInfo(
                node_id,
                RequestTracker(self._config.request_min_interval_ns, self._config.request_max_interval_ns),
            )
            for node_id in self._cell.chain_node_ids
            if node_id != self._local.node_id
        }


def _known_height(info: NodeSyncInfo) -> int:
    return info.last_known_block.height if info.last_known_block is not None else 0
