"""The chain engine: the three cores behind one sans-IO surface (SPEC 2.6).

The shell (gRPC) calls `append`, `on_message` and `tick` with the current time, then sends what
`take_outbox()` returns and publishes what `take_events()` returns. Storage is written before
anything is returned (the shell may make it durable with one sync for several inputs before it
sends or answers: group commit), so what a caller was told is durable.

Order inside a tick, as the original: chain sync first; the commit manager and the pending sync
only run while the chain is synchronized (so a node that is behind never signs or revives stale
operations); an out-of-sync verdict from the commit manager resets chain sync.

Beyond the original, the commit manager also runs right after an append (`after_append`, with the
push of the new entries to the peers; the shell runs it once the append is answered) and after a
message that brought new pending operations (a proposal, a vote; entries when they matter to it),
without its cleanup: each step of a commit (propose, sign, commit, next proposal) then follows the
message that enables it instead of waiting for the next tick of the node concerned. Its rounds cost
what changed (see `CommitIndex`), so running it that often is cheap. Its own new operations
(proposals, votes) are pushed as urgent messages.

Clocks (SPEC 11 gap 18): operation ids are consistent timestamps of their author's wall clock, and
the newest id of a trait wins, so a write made through a node whose clock is behind, after a write
made through another, can sort before it. Nothing here synchronizes clocks; an operation received
dated more than `CLOCK_AHEAD_WARN_NS` after this node's clock (it cannot have been made in the
future: the two clocks disagree) is logged as a warning, at most once a minute per author.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from exochain.core.chain_sync import ChainSynchronizer
from exochain.core.commit_manager import ENGINE_ROUNDS_PER_TICK, CommitManager
from exochain.core.common import (
    META_CLEANUP_HEIGHT,
    META_CLEANUP_OFFSET,
    NS_PER_MS,
    NS_PER_S,
    ChainCell,
    ChainSyncStatus,
    EngineConfig,
    LocalChainNode,
    Outgoing,
)
from exochain.core.pending_sync import PendingSynchronizer
from exochain.model import BlockView, SignatureChecker, SignedOp, new_entry, sign_operations
from exochain.storage.base import ChainStore, CommitStatus, MetaStore, PendingStore
from exocommon.clock import Clock, TimeSource
from exocommon.errors import FailedPrecondition, InvalidArgument
from exocore.chain.v1 import chain_pb2

log = logging.getLogger(__name__)

MAX_ENTRY_BYTES = 4 * 1024 * 1024
# Local entries appended while not synchronized that are pushed once synchronized (see `Engine._hold`).
HELD_PUSHES_MAX = 10_000
CLOCK_AHEAD_WARN_NS = 2 * NS_PER_S
CLOCK_WARN_INTERVAL_NS = 60 * NS_PER_S


@dataclass(frozen=True, slots=True)
class NewPendingOperations:
    """Operations that entered the pending store (local appends, or received from peers)."""

    ops: list[SignedOp]


@dataclass(frozen=True, slots=True)
class NewBlocks:
    """Blocks appended to the local chain (committed here, or downloaded)."""

    blocks: list[BlockView]


@dataclass(frozen=True, slots=True)
class ChainTruncated:
    """Blocks from `from_offset` on were removed (fork recovery); their entries are pending again (a
    `NewPendingOperations` with them follows)."""

    from_offset: int
    blocks: list[BlockView]


EngineEvent = NewPendingOperations | NewBlocks | ChainTruncated


@dataclass(frozen=True)
class PeerSyncStatus:
    node_id: str
    status: str
    last_common_offset: int | None
    last_known_height: int | None


@dataclass(frozen=True)
class EngineStatus:
    node_id: str
    cell_id: str
    height: int
    last_offset: int
    next_offset: int
    sync_status: ChainSyncStatus
    pending_operations: int
    peers: list[PeerSyncStatus] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        local: LocalChainNode,
        cell: ChainCell,
        chain: ChainStore,
        pending: PendingStore,
        meta: MetaStore,
        time_source: TimeSource,
    ) -> None:
        self.config = config
        self.local = local
        self.cell = cell
        self.chain = chain
        self.pending = pending
        self.meta = meta
        # After a restart, ids must stay above everything this node may already have issued.
        self.clock = Clock(cell.clock_slot(local.node_id), time_source, issued_after=self._highest_known_id())
        self.checker = SignatureChecker(cell.member_key)
        self.chain_sync = ChainSynchronizer(config.chain_sync, local, cell, chain)
        self.pending_sync = PendingSynchronizer(config.pending_sync, local, cell, pending, chain, meta, self.checker)
        self.commit_manager = CommitManager(
            config.commit_manager,
            local,
            cell,
            pending,
            chain,
            meta,
            self.clock.consistent_time,
            max_block_bytes=config.chain_sync.blocks_max_send_size,
            rounds_per_tick=ENGINE_ROUNDS_PER_TICK,
            proposer_signs_last=True,
        )
        self._outbox: list[Outgoing] = []
        # Batches of local entries appended with `deferred`, not pushed yet (see `after_append`).
        self._unpushed: list[list[SignedOp]] = []
        # Ids of the batches appended while not synchronized, oldest first (see `_hold`).
        self._held: deque[list[int]] = deque()
        self._held_count = 0
        self._events: list[EngineEvent] = []
        # Per chain peer: the highest local entry id the shell delivered to it (`peer_received`).
        self._peers_received: dict[str, int] = {}
        # Per author: when its clock was last reported ahead of ours (see module docstring).
        self._clock_warned_ns: dict[str, int] = {}
        if chain.last_block() is None:
            log.warning("chain of cell %s has no genesis block; waiting to download it", cell.cell_id)

    # -- inputs -------------------------------------------------------------------------------

    def append(self, entries: Sequence[bytes], now_ns: int, deferred: bool = False) -> list[int]:
        """New entries of this node: signed as one batch and stored durably before returning their ids,
        then pushed to the peers and followed by a commit round (`after_append`). `deferred`: the
        caller runs `after_append` itself (a shell answers the append first: the pushes and the
        round are not needed for the answer, and cost a tenth of an idle node's append)."""
        if not entries:
            raise InvalidArgument("append needs at least one entry")
        for index, data in enumerate(entries):
            if len(data) > MAX_ENTRY_BYTES:
                raise InvalidArgument(f"entry {index} has {len(data)} bytes, over the {MAX_ENTRY_BYTES} limit")
        if not self.cell.is_chain_node(self.local.node_id):
            raise FailedPrecondition(f"node {self.local.node_id} is not a chain node of cell {self.cell.cell_id}")
        operations = [new_entry(self.clock.consistent_time(), self.local.node_id, data) for data in entries]
        ops = sign_operations(operations, self.local.keypair)
        self.pending.put(ops)
        self._events.append(NewPendingOperations(ops))
        self._unpushed.append(ops)
        if not deferred:
            self.after_append(now_ns)
        return [op.operation_id for op in ops]

    def after_append(self, now_ns: int) -> None:
        """Pushes the entries appended since the last call (one push per append, as they were
        signed), then runs `commit_round`."""
        batches, self._unpushed = self._unpushed, []
        # Pushed right away while synchronized; otherwise once synchronized (`_hold`).
        ids = [[op.operation_id for op in ops] for ops in batches]
        if self.chain_sync.status is ChainSyncStatus.SYNCHRONIZED:
            self._push_held(now_ns)
            self._push(ids, now_ns)
        else:
            self._hold(ids)
        self.commit_round(now_ns)

    def _push(self, batches: Iterable[Sequence[int]], now_ns: int) -> None:
        """One push per batch of local entry ids, of those still in the pending store: a cleanup
        between an append and its push only removes entries committed meanwhile (the peers have them)."""
        pending = self.pending
        for ids in batches:
            entries = (pending.get(op_id) for op_id in ids)
            stored = [entry.op for entry in entries if entry is not None]
            self._outbox.extend(self.pending_sync.handle_new_operations(stored, now_ns))

    def _hold(self, batches: list[list[int]]) -> None:
        """Local entries appended while not synchronized (pending sync waits for that, on both sides)
        are pushed as soon as this node is: the periodic check would carry them only after up to an
        interval (5 s, more after failures), since it leaves out ids newer than half an interval.
        Seen at a cell's start-up, where a node's first writes reached its peers 5 s late. At most
        `HELD_PUSHES_MAX` entries, oldest dropped (the periodic check carries those)."""
        for ids in batches:
            self._held.append(ids)
            self._held_count += len(ids)
        while self._held_count > HELD_PUSHES_MAX and len(self._held) > 1:
            self._held_count -= len(self._held.popleft())

    def _push_held(self, now_ns: int) -> None:
        if self._held and self.chain_sync.status is ChainSyncStatus.SYNCHRONIZED:
            held, self._held, self._held_count = self._held, deque(), 0
            self._push(held, now_ns)

    def commit_round(self, now_ns: int) -> None:
        """After local appends: if it is our turn and enough entries wait, the proposal goes out now,
        not at the next tick (new local entries change nothing else for the commit manager)."""
        if self.chain_sync.status is ChainSyncStatus.SYNCHRONIZED and self.commit_manager.is_my_turn(now_ns):
            self._run_commit_manager(now_ns, cleanup=False)

    def on_message(self, from_node_id: str, message: chain_pb2.PeerMessage, now_ns: int) -> None:
        """A message from another chain node (already authenticated by the shell)."""
        if from_node_id == self.local.node_id or not self.cell.is_chain_node(from_node_id):
            log.warning("dropping message from %s: not another chain node of the cell", from_node_id)
            return
        kind = message.WhichOneof("kind")
        if kind == "pending_sync":
            # As the original: pending sync waits until the chain is synchronized, so a node that is
            # behind does not revive operations others already cleaned up.
            if self.chain_sync.status is not ChainSyncStatus.SYNCHRONIZED:
                return
            outgoing, new_ops = self.pending_sync.handle_request(from_node_id, message.pending_sync, now_ns)
            self._outbox.extend(outgoing)
            if new_ops:
                self._check_clocks(new_ops, now_ns)
                self._events.append(NewPendingOperations(new_ops))
                # A proposal or a vote arrived: sign or commit now rather than at the next tick (each
                # step of a commit would otherwise wait for a tick of the node concerned). Entries only
                # matter to the proposer, or to a proposal waiting for them.
                if (
                    self.commit_manager.waits_for_operations()
                    or self.commit_manager.is_my_turn(now_ns)
                    or any(op.operation.WhichOneof("kind") != "entry" for op in new_ops)
                ):
                    self._run_commit_manager(now_ns, cleanup=False)
        elif kind == "chain_sync_request":
            self._outbox.extend(self.chain_sync.handle_request(from_node_id, message.chain_sync_request, now_ns))
        elif kind == "chain_sync_response":
            result = self.chain_sync.handle_response(from_node_id, message.chain_sync_response, now_ns)
            self._outbox.extend(result.outgoing)
            if result.truncated:
                self._on_truncated(result.truncated)
            if result.written:
                self._on_downloaded(result.written)
            self._push_held(now_ns)
        else:
            log.warning("dropping message of unknown kind from %s", from_node_id)

    def tick(self, now_ns: int) -> None:
        self._outbox.extend(self.chain_sync.tick(now_ns))
        self._push_held(now_ns)
        if self.chain_sync.status is ChainSyncStatus.SYNCHRONIZED:
            self._run_commit_manager(now_ns)
        if self.chain_sync.status is ChainSyncStatus.SYNCHRONIZED:
            self._outbox.extend(self.pending_sync.tick(now_ns))

    # -- outputs ------------------------------------------------------------------------------

    def take_outbox(self) -> list[Outgoing]:
        outbox, self._outbox = self._outbox, []
        return outbox

    def take_events(self) -> list[EngineEvent]:
        events, self._events = self._events, []
        return events

    def peer_received(self, node_id: str, up_to: int, now_ns: int) -> None:
        """The shell delivered to `node_id` every push of local entries up to that id. Local entries
        are proposed once enough peers to make a quorum with this node hold them (see
        `CommitManager._propose`); this may make a proposal possible now."""
        if node_id == self.local.node_id or not self.cell.is_chain_node(node_id):
            return
        if up_to <= self._peers_received.get(node_id, 0):
            return
        self._peers_received[node_id] = up_to
        peers = len(self.cell.chain_node_keys) - 1
        needed = next((k for k in range(peers + 1) if self.cell.has_quorum(k + 1)), peers)
        marks = sorted(self._peers_received.values(), reverse=True)
        quorum_mark = marks[needed - 1] if 0 < needed <= len(marks) else None
        if quorum_mark == self.commit_manager.peers_received_up_to:
            # A peer beyond the quorum caught up (the second of two, say): no entry became
            # proposable, so a commit round would find nothing new (half the rounds of a light load).
            return
        self.commit_manager.set_peers_received_up_to(quorum_mark)
        if self.chain_sync.status is ChainSyncStatus.SYNCHRONIZED and self.commit_manager.is_my_turn(now_ns):
            self._run_commit_manager(now_ns, cleanup=False)

    def uncommitted_entries(self) -> int:
        """Entries of the pending store neither committed nor in the chain (as of the last commit
        manager round; the shell's flow control reads it)."""
        return len(self.commit_manager.index.uncommitted)

    def status(self) -> EngineStatus:
        last = self.chain.last_block()
        peers = [
            PeerSyncStatus(p.node_id, p.status.value, p.last_common_offset, p.last_known_height)
            for p in self.chain_sync.peer_statuses()
        ]
        return EngineStatus(
            node_id=self.local.node_id,
            cell_id=self.cell.cell_id,
            height=last.height if last else 0,
            last_offset=last.offset if last else 0,
            next_offset=self.chain.next_offset(),
            sync_status=self.chain_sync.status,
            pending_operations=self.pending.count(),
            peers=peers,
        )

    # -- internals ----------------------------------------------------------------------------

    def _run_commit_manager(self, now_ns: int, cleanup: bool = True) -> None:
        """One commit manager round (only while synchronized); its new operations are pushed at once.
        The cleanup only runs on ticks: between the messages of a commit it would only delay them."""
        result = self.commit_manager.tick(now_ns, cleanup)
        if result.new_operations:
            self._events.append(NewPendingOperations(result.new_operations))
            self._outbox.extend(self.pending_sync.handle_new_operations(result.new_operations, now_ns, urgent=True))
        if result.committed_blocks:
            self._events.append(NewBlocks(result.committed_blocks))
        if result.out_of_sync:
            log.info("commit manager found the chain out of sync; resynchronizing")
            self.chain_sync.reset()

    def _check_clocks(self, ops: Sequence[SignedOp], now_ns: int) -> None:
        ahead: dict[str, int] = {}
        for op in ops:
            dated = op.operation_id - op.operation_id % NS_PER_MS
            if dated - now_ns > CLOCK_AHEAD_WARN_NS:
                author = op.operation.node_id
                ahead[author] = max(ahead.get(author, 0), dated - now_ns)
        for author, by_ns in ahead.items():
            last = self._clock_warned_ns.get(author)
            if last is not None and now_ns - last < CLOCK_WARN_INTERVAL_NS:
                continue
            self._clock_warned_ns[author] = now_ns
            log.warning(
                "operations of node %s are dated %.1f s after this node's clock: the two clocks disagree "
                "(synchronize them, e.g. with NTP); until then a write through this node made after one "
                "through %s may sort before it and lose",
                author,
                by_ns / NS_PER_S,
                author,
                extra={"peer": author, "clock_ahead_ms": by_ns // NS_PER_MS},
            )

    def _highest_known_id(self) -> int:
        highest = 0
        for entry in self.pending.range():
            highest = max(highest, entry.op.operation_id)
        last = self.chain.last_block()
        if last is not None:
            highest = max([highest, last.header.proposed_operation_id, *last.head.operation_ids])
        return highest

    def _on_downloaded(self, blocks: list[BlockView]) -> None:
        for block in blocks:
            status = CommitStatus(block.offset, block.height)
            present = [i for i in block.head.operation_ids if self.pending.get(i) is not None]
            if present:
                self.pending.set_committed(present, status)
        self._events.append(NewBlocks(blocks))

    def _on_truncated(self, blocks: list[BlockView]) -> None:
        # The removed blocks' entries go back to (or stay in) the pending store, uncommitted, so the
        # commit manager proposes them again on the majority's chain: nothing acknowledged is lost.
        ops = [op for block in blocks for op in block.operations]
        # Pending sync refuses operations committed below the last cleanup; the cleanup happened on
        # blocks that are gone, so it moves back to the last block both chains share.
        first = blocks[0]
        cleanup_height = self.meta.get_int(META_CLEANUP_HEIGHT)
        if cleanup_height is not None and cleanup_height >= first.height:
            self.meta.set_int(META_CLEANUP_OFFSET, first.header.previous_offset)
            self.meta.set_int(META_CLEANUP_HEIGHT, first.height - 1)
        if ops:
            self.pending.put(ops)
            self.pending.set_committed([op.operation_id for op in ops], None)
        log.warning("fork recovery: removed %d block(s) from offset %d", len(blocks), blocks[0].offset)
        self._events.append(ChainTruncated(blocks[0].offset, blocks))
        if ops:
            # Subscribers saw them committed: they are pending again.
            self._events.append(NewPendingOperations(ops))
