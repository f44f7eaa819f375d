"""The commit manager (SPEC 2.8): turns pending operations into blocks, sans-IO.

Theory of operation
-------------------
Everything goes through the pending store. A chain node proposes a block by storing a
`block_propose` operation (its id is the proposal's *group*); every node votes for it by storing a
`block_sign` (an Ed25519 signature over the proposed header) or a `block_refuse` in that group; the
pending synchronizer replicates all of them. Each node that signed a proposal writes the block to
its own chain as soon as it sees valid signatures of a quorum of the chain nodes. Nothing else is
exchanged: the manager only reads and writes the stores and returns what it created.

One `tick(now_ns)` does, in this order:

A. **Analyse** the proposals (`pending_blocks`): every proposal with its votes, a status
   (`PendingBlockStatus`) and, per entry, the proposals that hold it (`CommitIndex`, kept up to
   date from the pending store's change journal rather than by rescanning the store).
B. **Best next block**: among the `NEXT_POTENTIAL` proposals, the one I signed, else the one with
   the most valid signatures, else the oldest. If I have not voted on it yet, I sign it or refuse
   it (rules in `_vote`); if I have signed it and it has a quorum of valid chain-node signatures, I
   commit it. At most one block is committed per round (a lagging node catches up one per round).
C. **Otherwise propose**, when I am a chain node, it is my turn (`commit_turn_node_id`) and either
   enough entries wait or the last block is older than the commit interval (beyond the original,
   a configured minimum interval, `commit_minimum_interval_ns`, holds the former back right after a
   block).
D. **Clean up** what is buried `operations_cleanup_after_block_depth` blocks deep.

Rules that matter for safety:
* A node signs a proposal only if it extends its own last block (the proposal's previous block is
  present locally with the same hash), none of its entries is already in the chain or in another
  committed proposal, and the operations it holds locally hash to the header's operations hash.
  Hence a block never repeats an entry of the chain it extends.
* Only signatures that verify against the key of a chain node of the cell count toward a quorum
  (a forged signature, or one from a node without the chain role, counts for nothing).
* A previous block missing or different locally means this node is behind or forked: the tick
  reports `out_of_sync` and the engine restarts chain synchronisation. It never writes in that case.

Engine settings (constructor arguments; the defaults are the original's behaviour, which the
scenario tests step through tick by tick):
* `rounds_per_tick`: a tick runs rounds B-C while they make progress, so a commit is followed by the
  next proposal at once (the engine also runs a tick right after every append and received message:
  a commit takes a few message round trips, not a few ticks of each node);
* `proposer_signs_last`: a proposer signs its own proposal only once another node did (see
  `_on_next_block`), so that proposals made concurrently by two nodes (turns are time based) are
  settled by the others' choice instead of splitting the votes until they expire;
* `max_block_bytes`: a proposal takes the oldest waiting entries up to about this many encoded bytes.

Beyond the original (each marked in the code):
* a proposal a quorum already signed stays a potential next block after its timeout: the nodes that
  saw the quorum in time committed it, so the others must follow rather than stay a block behind
  (or forever behind if no further block comes);
* a vote counts only if its signer is the author of the `block_sign` operation carrying it;
* a proposal a quorum signed ranks first, and a node that signed a concurrent proposal for the same
  offset commits it without signing it (its signers committed it already; see `_on_next_block`);
* proposals a correct chain node cannot produce (other cell, header not naming its proposal,
  proposer without the chain role, unsorted operations, an operation id held here by another kind
  of operation) are refused instead of signed or waited on;
* proposals whose header does not parse are never voted on and are deleted once expired; refused or
  expired proposals left `operations_cleanup_after_block_depth` blocks behind are deleted even when
  their offset is not a block boundary (which would otherwise keep them forever).

Time: `now_ns` is wall time in ns; operation ids are consistent timestamps (ns with node and
counter in the sub-millisecond digits), so the age of a proposal is `now_ns` minus the millisecond
part of its id, and the last block's `proposed_operation_id` is its timestamp (0 for the genesis).

Cost per tick: proportional to what changed, not to the pending store. The `CommitIndex` handles
each operation that changed since the last tick (a chain index look-up for a new entry), and each
block appended to the chain since; a proposal is parsed once and its analysis is reused until its
votes or the chain change; signature verdicts are cached; a proposal waiting for some of its
operations looks at those only. At most one `put`, one `set_committed` and one `delete` call per
round. (The original rescanned the whole store every tick, and looked every waiting entry up in
the chain: under load, thousands of operations many times a second.)
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from exochain.core.common import (
    META_CLEANUP_HEIGHT,
    META_CLEANUP_OFFSET,
    NS_PER_MS,
    NS_PER_S,
    ChainCell,
    ChainSyncConfig,
    CommitManagerConfig,
    LocalChainNode,
)
from exochain.model import (
    BlockHeaderView,
    BlockView,
    InvalidBlock,
    OperationKind,
    SignedOp,
    build_block_header,
    new_block_proposal,
    new_block_refuse,
    new_block_sign,
    sign_block,
    sign_operations,
    validate_block,
)
from exochain.storage.base import ChainStore, CommitStatus, InvalidNextBlock, MetaStore, PendingEntry, PendingStore
from exocommon import canonical
from exocommon.errors import FailedPrecondition, Internal
from exocore.chain.v1 import chain_pb2

log = logging.getLogger(__name__)

# Most entries a proposal of this node holds (the oldest first; the rest wait for the next block).
# Not a CommitManagerConfig field (the contract is frozen); proposals of other nodes are not
# checked against it.
MAX_OPERATIONS_PER_BLOCK = 10_000

# Rounds (vote or commit, else propose) the engine lets one tick run while each makes progress: sign
# and commit, propose the next block (and, alone in a one-node cell, sign and commit it too).
ENGINE_ROUNDS_PER_TICK = 4

# A local entry the peers are not known to hold waits at most this long before being proposed anyway
# (a push lost, or the shell not reporting deliveries: see `CommitManager._propose`).
UNDELIVERED_WAIT_MAX_NS = NS_PER_S


class CommitManagerFatal(Internal):
    """A state that must not happen (e.g. a block this node signed does not match its own copies of
    the operations). The engine must stop rather than write a corrupted chain."""


class NotChainNode(FailedPrecondition):
    """The local node has no chain role, so it has no commit turn."""


class PendingBlockStatus(enum.Enum):
    """Where a proposal stands relative to the local chain (SPEC 2.8, A)."""

    PAST_COMMITTED = "past_committed"  # the chain holds this very proposal at its offset
    PAST_DIVERGED = "past_diverged"  # another block holds its offset, yet a quorum signed it
    PAST_REFUSED = "past_refused"  # its offset is behind the chain and it did not make it
    NEXT_REFUSED = "next_refused"  # refused by a quorum, or by this node
    NEXT_EXPIRED = "next_expired"  # older than block_proposal_timeout (and no quorum signed it)
    NEXT_POTENTIAL = "next_potential"  # may still become the next block


@dataclass(slots=True)
class PendingBlock:
    """A proposal in the pending store with its votes, as analysed at one instant."""

    proposal: SignedOp
    head: BlockHeaderView
    operation_ids: tuple[int, ...]
    # Sign and refuse operations of the group, whoever made them.
    votes: tuple[SignedOp, ...]
    # Valid signatures of chain nodes, by node id (what counts toward a quorum).
    signatures: dict[str, chain_pb2.BlockSignature]
    # Chain nodes that refused it.
    refusals: frozenset[str]
    has_my_signature: bool
    has_my_refusal: bool
    expired: bool
    status: PendingBlockStatus

    @property
    def group_id(self) -> int:
        return self.proposal.operation_id

    @property
    def proposer_node_id(self) -> str:
        return self.proposal.node_id

    @property
    def offset(self) -> int:
        return self.head.offset

    @property
    def height(self) -> int:
        return self.head.height


@dataclass(slots=True)
class PendingBlocks:
    """Every proposal of the pending store, plus the index the decisions need."""

    blocks: dict[int, PendingBlock]
    # Entry id -> group ids of the proposals holding it. Read only, and valid until the next analysis:
    # it is the manager's index, kept up to date across ticks rather than rebuilt.
    operations_blocks: dict[int, list[int]]
    # Proposals whose header does not parse (never voted on; removed once expired).
    malformed: list[SignedOp] = field(default_factory=list)
    # Entry operations in the pending store.
    entries_operations_count: int = 0

    def potential_next_blocks(self, has_quorum: Callable[[int], bool] | None = None) -> list[PendingBlock]:
        """`NEXT_POTENTIAL` proposals, most likely first: the one I signed, then the one with the
        most valid signatures, then the oldest. Beyond the original, with `has_quorum`: one that a
        quorum signed comes before all (its signers committed it; see `_on_next_block`)."""
        potential = [b for b in self.blocks.values() if b.status is PendingBlockStatus.NEXT_POTENTIAL]
        if has_quorum is None:
            potential.sort(key=lambda b: (not b.has_my_signature, -len(b.signatures), b.group_id))
        else:
            potential.sort(
                key=lambda b: (
                    not has_quorum(len(b.signatures)),
                    not b.has_my_signature,
                    -len(b.signatures),
                    b.group_id,
                )
            )
        return potential

    def best_next_block(self, has_quorum: Callable[[int], bool] | None = None) -> PendingBlock | None:
        potential = self.potential_next_blocks(has_quorum)
        return potential[0] if potential else None

    def in_committed_proposal(self, operation_id: int) -> bool:
        """Whether a `PAST_COMMITTED` proposal holds this operation."""
        blocks = self.blocks
        for group_id in self.operations_blocks.get(operation_id, ()):
            block = blocks.get(group_id)
            if block is not None and block.status is PendingBlockStatus.PAST_COMMITTED:
                return True
        return False


@dataclass(slots=True)
class CommitResult:
    """What one tick did. Everything in it is already in the stores."""

    # Proposals, signatures and refusals this node created (stored in the pending store; the engine
    # gives them to the pending synchronizer to broadcast).
    new_operations: list[SignedOp] = field(default_factory=list)
    # Blocks written to the chain (their entries' commit status is set).
    committed_blocks: list[BlockView] = field(default_factory=list)
    # The chain is behind or forked relative to a proposal: reset chain synchronisation.
    out_of_sync: bool = False
    # Pending operations deleted by the cleanup.
    cleaned: int = 0


def commit_turn_node_id(chain_node_ids: Sequence[str], now_ns: int, commit_maximum_interval_ns: int) -> str:
    """Whose turn it is to propose: chain nodes sorted by id string take turns of one interval each."""
    if not chain_node_ids:
        raise NotChainNode("the cell has no chain node")
    if commit_maximum_interval_ns <= 0:
        raise ValueError(f"commit interval must be positive, got {commit_maximum_interval_ns}")
    ordered = sorted(chain_node_ids)
    return ordered[(now_ns // commit_maximum_interval_ns) % len(ordered)]


def _time_ns(operation_id: int) -> int:
    """The time of a consistent timestamp: its millisecond part (the digits below carry the node and a
    counter, so an id made at wall time t is slightly *after* t)."""
    return operation_id - operation_id % NS_PER_MS


class _OutOfSync(Exception):
    """Internal: the chain does not hold the block a proposal builds on."""


class _Vote(enum.Enum):
    SIGN = "sign"
    REFUSE = "refuse"
    WAIT = "wait"  # some operations are not here yet: decide on a later tick


@dataclass(slots=True)
class _ParsedProposal:
    """Cache of what does not change for a given proposal operation."""

    proposal_hash: bytes
    head: BlockHeaderView | None  # None: the header does not parse
    operation_ids: tuple[int, ...]
    # (node id, signature bytes) -> whether it verifies for this header with that node's key.
    verdicts: dict[tuple[str, bytes], bool] = field(default_factory=dict)
    # Why no correct chain node could have made it (the reason, or None), once looked at.
    malformed: tuple[str | None] | None = None


class CommitIndex:
    """What the commit manager needs from the pending store, derived incrementally.

    A tick used to rescan the whole pending store (and look every waiting entry up in the chain); under
    load that store holds thousands of operations, and ticks come many times per second. This index is
    brought up to date at the start of each analysis from the store's change journal
    (`PendingStore.changes_since`) and from the blocks appended to the chain since the last update
    (their entries leave `uncommitted`); it rebuilds itself from a full scan when the journal no longer
    reaches back far enough or the chain was truncated. It never writes anything.

    Derived state (`check()` compares it with a full rescan, for tests):
    * `proposals`: proposal operations by id, with `parsed` headers and `operations_blocks` (entry
      id -> ids of the parsable proposals holding it, in proposal id order);
    * `entry_ids`: every entry operation;
    * `uncommitted`: entries neither committed locally nor held by the local chain;
    * `waiting`: uncommitted entries in no parsable proposal (what the proposer counts);
    * `heights`: entries committed locally, or uncommitted but held by the chain -> block height
      (`by_height` groups them), what the cleanup of dangling entries reads;
    * `changed_groups`: group ids touched since the last `take_changed_groups()`.
    """

    def __init__(self, pending: PendingStore, chain: ChainStore) -> None:
        self._pending = pending
        self._chain = chain
        self.version: int | None = None  # journal position reached; None: rebuild at the next refresh
        self.proposals: dict[int, SignedOp] = {}
        self.parsed: dict[int, _ParsedProposal] = {}
        self.operations_blocks: dict[int, list[int]] = {}
        self.entry_ids: set[int] = set()
        self.uncommitted: set[int] = set()
        self.waiting: set[int] = set()
        self.heights: dict[int, int] = {}
        self.by_height: dict[int, set[int]] = {}
        self.changed_groups: set[int] = set()
        # The last chain block this index has seen: (offset, hash, next offset).
        self._chain_seen: tuple[int, bytes, int] | None = None
        self._header_heights: dict[int, int] = {}

    # -- updating -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Brings the index up to date with the pending store and the chain."""
        if self.version is None or not self._follow_chain():
            self.rebuild()
            return
        version = self._pending.version()
        changes = self._pending.changes_since(self.version)
        if changes is None:
            self.rebuild()
            return
        self.version = version
        operation_ids, group_ids = changes
        if not operation_ids:
            return
        self.changed_groups.update(group_ids)
        # For each changed id: forget what was derived from it, derive again from its current state
        # (inlined: this loop sees every operation several times, when put, committed and deleted).
        get = self._pending.get
        entry_ids, uncommitted, waiting = self.entry_ids, self.uncommitted, self.waiting
        heights, by_height, parsed = self.heights, self.by_height, self.parsed
        for operation_id in dict.fromkeys(operation_ids):  # once each, in order
            entry = get(operation_id)
            if operation_id in entry_ids:  # was an entry: forget what was derived from it
                entry_ids.discard(operation_id)
                uncommitted.discard(operation_id)
                waiting.discard(operation_id)
                height = heights.pop(operation_id, None)
                if height is not None:
                    bucket = by_height[height]
                    bucket.discard(operation_id)
                    if not bucket:
                        del by_height[height]
            known = parsed.get(operation_id)
            if known is not None and (entry is None or entry.op.hash != known.proposal_hash):
                self.proposals.pop(operation_id, None)
                self._forget(operation_id)
            if entry is None:
                continue
            committed = entry.committed
            if committed is not None and entry.op.operation.WhichOneof("kind") == "entry":
                entry_ids.add(operation_id)
                height = committed.block_height
                heights[operation_id] = height
                bucket = by_height.get(height)
                if bucket is None:
                    by_height[height] = {operation_id}
                else:
                    bucket.add(operation_id)
            else:
                self._add(entry)

    def rebuild(self) -> None:
        """Derives everything again from a full scan of the pending store."""
        for group_id in list(self.parsed):
            self._forget(group_id)
        self.changed_groups.update(self.proposals)
        self.proposals.clear()
        self.entry_ids.clear()
        self.uncommitted.clear()
        self.waiting.clear()
        self.heights.clear()
        self.by_height.clear()
        self._header_heights.clear()
        self.version = self._pending.version()
        last = self._chain.last_block()
        self._chain_seen = (last.offset, last.hash, last.next_offset) if last is not None else None
        for entry in self._pending.range():
            self._add(entry)
        self.changed_groups.update(self.proposals)

    def take_changed_groups(self) -> set[int]:
        changed, self.changed_groups = self.changed_groups, set()
        return changed

    def _follow_chain(self) -> bool:
        """Entries of blocks appended since the last refresh leave `uncommitted`; False if the chain
        changed otherwise (truncated: rebuild)."""
        last = self._chain.last_block()
        seen = self._chain_seen
        if last is None or seen is None:
            return last is None and seen is None
        offset, block_hash, next_offset = seen
        if last.offset == offset:
            return last.hash == block_hash
        if last.offset < offset:
            return False
        head = self._chain.get_header(offset)
        if head is None or head.hash != block_hash:
            return False
        for header in self._chain.headers_from(next_offset):
            if self.uncommitted:
                for operation_id in header.operation_ids:
                    if operation_id in self.uncommitted:
                        self.uncommitted.discard(operation_id)
                        self.waiting.discard(operation_id)
                        self._set_height(operation_id, header.height)
            if header.offset >= last.offset:
                break
        self._chain_seen = (last.offset, last.hash, last.next_offset)
        return True

    def _add(self, entry: PendingEntry) -> None:
        operation = entry.op.operation
        kind = operation.WhichOneof("kind")
        operation_id = operation.operation_id
        if kind == "entry":
            self.entry_ids.add(operation_id)
            if entry.committed is not None:
                self._set_height(operation_id, entry.committed.block_height)
                return
            offset = self._chain.block_offset_of_operation(operation_id)
            height = self._block_height(offset) if offset is not None else None
            if height is not None:
                self._set_height(operation_id, height)  # e.g. revived by a peer after we committed it
            else:
                self.uncommitted.add(operation_id)
                if operation_id not in self.operations_blocks:
                    self.waiting.add(operation_id)
        elif kind == "block_propose":
            self.proposals[operation_id] = entry.op
            self._parse(entry.op)

    def _set_height(self, operation_id: int, height: int) -> None:
        self.heights[operation_id] = height
        bucket = self.by_height.get(height)
        if bucket is None:
            self.by_height[height] = {operation_id}
        else:
            bucket.add(operation_id)

    def _block_height(self, offset: int) -> int | None:
        height = self._header_heights.get(offset)
        if height is None:
            header = self._chain.get_header(offset)
            if header is None:
                return None
            height = header.height
            if len(self._header_heights) > 4096:
                self._header_heights.clear()
            self._header_heights[offset] = height
        return height

    def _parse(self, proposal: SignedOp) -> _ParsedProposal:
        """The proposal's header, parsed once per proposal operation (and indexed by operation)."""
        group_id = proposal.operation_id
        cached = self.parsed.get(group_id)
        if cached is not None and cached.proposal_hash == proposal.hash:
            return cached
        if cached is not None:
            self._forget(group_id)  # replaced by another operation under the same id
        try:
            head: BlockHeaderView | None = BlockHeaderView.parse(proposal.operation.block_propose.header_bytes)
        except InvalidBlock as exc:
            log.warning("proposal %d from %s: %s", group_id, proposal.node_id, exc)
            head = None
        parsed = _ParsedProposal(proposal.hash, head, tuple(head.operation_ids) if head is not None else ())
        self.parsed[group_id] = parsed
        operations_blocks = self.operations_blocks
        waiting = self.waiting
        for operation_id in parsed.operation_ids:
            holders = operations_blocks.get(operation_id)
            if holders is None:
                operations_blocks[operation_id] = [group_id]
                waiting.discard(operation_id)
            elif group_id not in holders:
                holders.append(group_id)
                holders.sort()
        return parsed

    def _forget(self, group_id: int) -> None:
        """Drops a proposal that left the pending store."""
        parsed = self.parsed.pop(group_id)
        operations_blocks = self.operations_blocks
        for operation_id in parsed.operation_ids:
            holders = operations_blocks.get(operation_id)
            if holders is not None and group_id in holders:
                holders.remove(group_id)
                if not holders:
                    del operations_blocks[operation_id]
                    if operation_id in self.uncommitted:
                        self.waiting.add(operation_id)

    # -- checking -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """The derived state, comparable between two indexes."""
        return {
            "proposals": {i: op.hash for i, op in self.proposals.items()},
            "parsed": {i: (p.proposal_hash, p.operation_ids) for i, p in self.parsed.items()},
            "operations_blocks": {i: sorted(g) for i, g in self.operations_blocks.items()},
            "entry_ids": set(self.entry_ids),
            "uncommitted": set(self.uncommitted),
            "waiting": set(self.waiting),
            "heights": dict(self.heights),
            "by_height": {h: set(ids) for h, ids in self.by_height.items()},
        }

    def check(self) -> None:
        """Asserts that this index equals one rebuilt from scratch (tests)."""
        fresh = CommitIndex(self._pending, self._chain)
        fresh.rebuild()
        mine, theirs = self.snapshot(), fresh.snapshot()
        for key in mine:
            assert mine[key] == theirs[key], f"commit index {key} differs from a full rescan"


class CommitManager:
    """Proposes, votes on, commits and cleans up blocks; see the module docstring."""

    def __init__(
        self,
        config: CommitManagerConfig,
        local: LocalChainNode,
        cell: ChainCell,
        pending: PendingStore,
        chain: ChainStore,
        meta: MetaStore,
        new_operation_id: Callable[[], int],
        max_block_bytes: int = ChainSyncConfig().blocks_max_send_size,
        rounds_per_tick: int = 1,
        proposer_signs_last: bool = False,
    ) -> None:
        """`max_block_bytes`: proposals of this node stop adding operations beyond about this many
        encoded bytes (one operation at least), so that any block fits in one chain sync answer.
        `rounds_per_tick`: see `tick` (the engine uses `ENGINE_ROUNDS_PER_TICK`).
        `proposer_signs_last`: see `_on_next_block` (the engine sets it)."""
        assert rounds_per_tick >= 1, "a tick runs one round at least"
        assert config.commit_maximum_interval_ns > 0, "commit interval must be positive"
        assert config.operations_cleanup_after_block_depth > 0, "cleanup depth must be positive"
        self.config = config
        self.local = local
        self.cell = cell
        self._pending = pending
        self._chain = chain
        self._meta = meta
        self._new_operation_id = new_operation_id
        self._max_block_bytes = max_block_bytes
        self._peers_received_up_to: int | None = None
        self._rounds_per_tick = rounds_per_tick
        self._proposer_signs_last = proposer_signs_last
        # Derived from the pending store and kept up to date across ticks (see `CommitIndex`).
        self.index = CommitIndex(pending, chain)
        # Per proposal: the analysis of the last tick and what it depended on (chain state, expiry).
        self._analysed: dict[int, tuple[tuple[int, bytes, bool], PendingBlock]] = {}
        # Per proposal being voted on: its operations still missing here at the last look.
        self._missing: dict[int, list[int]] = {}

    # -- public -------------------------------------------------------------------------------

    def tick(self, now_ns: int, cleanup: bool = True) -> CommitResult:
        """Rounds of SPEC 2.8 (analyse; vote or commit, else propose), then the cleanup. Beyond the
        original, a tick may go on while a round makes progress (at most `rounds_per_tick`; one, as
        the original, unless configured): a block is then committed right after this node's vote
        completes a quorum, and the next block proposed right after a commit, instead of one tick
        later each. Cheap when nothing
        changed: the engine also calls it right after appends and received operations, then without
        the cleanup (`cleanup=False`), which is never urgent: it is left to the periodic ticks."""
        result = CommitResult()
        if self._chain.last_block() is None:
            return result  # no genesis yet: chain sync must download it first
        blocks = self.pending_blocks(now_ns)
        try:
            for round_number in range(self._rounds_per_tick):
                if round_number:
                    blocks = self.pending_blocks(now_ns)
                progress = (len(result.new_operations), len(result.committed_blocks))
                last = self._chain.last_block()
                assert last is not None
                best = blocks.best_next_block(self.cell.has_quorum)
                if best is not None:
                    self._on_next_block(best, blocks, result)
                elif self._should_propose(now_ns, blocks, last.head):
                    self._propose(blocks, last.head, result, now_ns)
                    if not self.cell.has_quorum(1):
                        # The proposer signs its proposal on a later call (a peer's signature, a tick),
                        # as the original: meanwhile it may see a concurrent older proposal (turns are
                        # time based) and sign that one instead, so concurrent proposals do not split
                        # the votes. A lone chain node is a quorum by itself: it goes on.
                        break
                if progress == (len(result.new_operations), len(result.committed_blocks)):
                    break
        except _OutOfSync as exc:
            log.info("%s: out of sync: %s", self.local.node_id[-6:], exc)
            result.out_of_sync = True
            return result
        if cleanup:
            result.cleaned = self._cleanup(now_ns, blocks)
        return result

    def pending_blocks(self, now_ns: int) -> PendingBlocks:
        """Analyses the proposals of the pending store (SPEC 2.8, A)."""
        index = self.index
        index.refresh()
        changed = index.take_changed_groups()
        analysed = PendingBlocks({}, index.operations_blocks, entries_operations_count=len(index.entry_ids))
        last = self._chain.last_block()
        next_offset = last.next_offset if last is not None else 0
        last_hash = last.hash if last is not None else b""
        cache = self._analysed
        for group_id in [g for g in cache if g not in index.proposals or g in changed]:
            del cache[group_id]
        for group_id in [g for g in self._missing if g not in index.proposals]:
            del self._missing[group_id]
        for group_id in sorted(index.proposals):
            proposal = index.proposals[group_id]
            parsed = index.parsed[group_id]
            if parsed.head is None:
                analysed.malformed.append(proposal)
                continue
            expired = now_ns - _time_ns(group_id) >= self.config.block_proposal_timeout_ns
            key = (next_offset, last_hash, expired)
            cached = cache.get(group_id)
            if cached is not None and cached[0] == key:
                analysed.blocks[group_id] = cached[1]
                continue
            votes = tuple(
                entry.op
                for entry in self._pending.group(group_id)
                if entry.op.operation.WhichOneof("kind") in ("block_sign", "block_refuse")
            )
            block = self._analyse(proposal, parsed, votes, expired, next_offset)
            cache[group_id] = (key, block)
            analysed.blocks[group_id] = block
        return analysed

    def waits_for_operations(self) -> bool:
        """Whether a proposal this node means to vote on waits for some of its operations."""
        return any(self._missing.values())

    def is_my_turn(self, now_ns: int) -> bool:
        """Whether the local node may propose now; raises NotChainNode if it has no chain role."""
        if not self.cell.is_chain_node(self.local.node_id):
            raise NotChainNode(f"node {self.local.node_id} is not a chain node of cell {self.cell.cell_id}")
        turn = commit_turn_node_id(self.cell.chain_node_ids, now_ns, self.config.commit_maximum_interval_ns)
        return turn == self.local.node_id

    # -- A: analysis --------------------------------------------------------------------------

    def _analyse(
        self,
        proposal: SignedOp,
        parsed: _ParsedProposal,
        votes: tuple[SignedOp, ...],
        expired: bool,
        next_offset: int,
    ) -> PendingBlock:
        head = parsed.head
        assert head is not None
        me = self.local.node_id
        signatures: dict[str, chain_pb2.BlockSignature] = {}
        refusals: set[str] = set()
        has_my_signature = has_my_refusal = False
        for vote in votes:
            if vote.kind is OperationKind.BLOCK_SIGN:
                signature = vote.operation.block_sign.signature
                # The signer must be the operation's author (an operation signed by that node).
                if signature.node_id != vote.node_id or not self._verify(parsed, head, signature):
                    continue
                if signature.node_id == me:
                    has_my_signature = True
                if self.cell.is_chain_node(signature.node_id):
                    signatures[signature.node_id] = signature
            elif vote.kind is OperationKind.BLOCK_REFUSE:
                if vote.node_id == me:
                    has_my_refusal = True
                if self.cell.is_chain_node(vote.node_id):
                    refusals.add(vote.node_id)
        status = self._status(
            proposal.operation_id, head, len(signatures), len(refusals), has_my_refusal, expired, next_offset
        )
        return PendingBlock(
            proposal=proposal,
            head=head,
            operation_ids=parsed.operation_ids,
            votes=votes,
            signatures=signatures,
            refusals=frozenset(refusals),
            has_my_signature=has_my_signature,
            has_my_refusal=has_my_refusal,
            expired=expired,
            status=status,
        )

    def _verify(self, parsed: _ParsedProposal, head: BlockHeaderView, signature: chain_pb2.BlockSignature) -> bool:
        key = (signature.node_id, bytes(signature.signature))
        verdict = parsed.verdicts.get(key)
        if verdict is None:
            public_key = self.cell.chain_node_keys.get(signature.node_id)
            if public_key is None and signature.node_id == self.local.node_id:
                public_key = self.local.keypair.public_key  # my own vote, even without the chain role
            verdict = public_key is not None and public_key.verify(
                canonical.block_payload(head.header_bytes), signature.signature
            )
            parsed.verdicts[key] = verdict
        return verdict

    def _status(
        self,
        group_id: int,
        head: BlockHeaderView,
        signature_count: int,
        refusal_count: int,
        has_my_refusal: bool,
        expired: bool,
        next_offset: int,
    ) -> PendingBlockStatus:
        in_chain = self._chain.get_header(head.offset)
        if in_chain is not None:
            if in_chain.proposed_operation_id == group_id:
                return PendingBlockStatus.PAST_COMMITTED
            if self.cell.has_quorum(signature_count):
                return PendingBlockStatus.PAST_DIVERGED
            return PendingBlockStatus.PAST_REFUSED
        if self.cell.has_quorum(signature_count) and not has_my_refusal and head.offset >= next_offset:
            # Beyond the original: a quorum already signed it, so the nodes that saw that quorum in
            # time committed it; the timeout must not keep the others from following (else a node
            # that saw it expire stays a block behind until the next block, or forever if none comes).
            return PendingBlockStatus.NEXT_POTENTIAL
        if self.cell.has_quorum(refusal_count) or has_my_refusal:
            return PendingBlockStatus.NEXT_REFUSED
        if expired:
            return PendingBlockStatus.NEXT_EXPIRED
        if head.offset < next_offset:
            return PendingBlockStatus.PAST_REFUSED
        return PendingBlockStatus.NEXT_POTENTIAL

    # -- B: vote and commit -------------------------------------------------------------------

    def _on_next_block(self, block: PendingBlock, blocks: PendingBlocks, result: CommitResult) -> None:
        following = False
        if (
            self._proposer_signs_last
            and block.proposer_node_id == self.local.node_id
            and not block.signatures
            and not self.cell.has_quorum(1)
        ):
            # Beyond the original (engine setting): a proposer signs its proposal only once another
            # node did. Turns are time based, so two nodes may propose for the same offset; the
            # others sign the oldest they see first (`potential_next_blocks`) and each proposer
            # follows. A proposer signing its own at once made such races split the votes until
            # the proposals expired (seconds), each node stuck with its own.
            return
        if not block.has_my_signature and not block.has_my_refusal:
            vote = self._vote(block, blocks)
            if vote is _Vote.WAIT:
                return
            me = self.local.node_id
            if (
                vote is _Vote.SIGN
                and self.cell.has_quorum(len(block.signatures))
                and self._signed_another_at_offset(block, blocks)
            ):
                # Beyond the original: this node signed a concurrent proposal at this offset, and a
                # quorum signed this one (so it ranks first, see `potential_next_blocks`): its
                # signers committed it. Follow it, without a second signature at the same offset,
                # instead of waiting for the timeout or for chain sync.
                following = True
            elif vote is _Vote.SIGN:
                signature = sign_block(block.head, me, self.local.keypair)
                self.index.parsed[block.group_id].verdicts[(me, bytes(signature.signature))] = True
                operation = new_block_sign(self._new_operation_id(), me, block.group_id, signature.signature)
                self._store([operation], result)
                log.debug(
                    "signed block %d at offset %d from %s", block.height, block.offset, block.proposer_node_id[-6:]
                )
                block.has_my_signature = True
                if self.cell.is_chain_node(me):
                    block.signatures[me] = signature
            else:
                self._store([new_block_refuse(self._new_operation_id(), me, block.group_id)], result)
                block.has_my_refusal = True
                return
        if (block.has_my_signature or following) and self.cell.has_quorum(len(block.signatures)):
            committed = self._commit(block, blocks)
            if committed is not None:
                result.committed_blocks.append(committed)

    @staticmethod
    def _signed_another_at_offset(block: PendingBlock, blocks: PendingBlocks) -> bool:
        return any(
            other.has_my_signature and other.offset == block.offset and other.group_id != block.group_id
            for other in blocks.blocks.values()
        )

    def _vote(self, block: PendingBlock, blocks: PendingBlocks) -> _Vote:
        """Sign or refuse (SPEC 2.8, B.1); raises _OutOfSync when the previous block is not ours.

        A proposal often arrives before some of its operations (pushes of other nodes still on the
        way), and the engine calls the manager after every message: while some are missing, only
        those are looked at again (`_missing`), and the operations present are checked once all are."""
        h = block.head.header
        where = f"proposal {block.group_id} from {block.proposer_node_id[-6:]} at offset {h.offset}"
        # Beyond the original: what a correct chain node cannot have proposed is refused outright.
        malformed = self._malformed_reason(block)
        if malformed is not None:
            log.info("refusing %s: %s", where, malformed)
            return _Vote.REFUSE
        entry_ids = self.index.entry_ids
        known_missing = self._missing.get(block.group_id)
        if known_missing is None:
            missing = [i for i in block.operation_ids if i not in entry_ids]
            newly_missing = missing
        else:
            missing = [i for i in known_missing if i not in entry_ids]
            newly_missing = []
        self._missing[block.group_id] = missing
        for operation_id in newly_missing:
            if blocks.in_committed_proposal(operation_id) or self._in_chain(operation_id, blocks):
                log.info("refusing %s: operation %d is already committed", where, operation_id)
                return _Vote.REFUSE
        if missing:
            if not self._check_previous(block, where):
                return _Vote.REFUSE
            if any(self._pending.get(operation_id) is not None for operation_id in missing):
                # Another kind of operation holds that id here (ids of two nodes collided): it will
                # never be this entry, so waiting would only stall the chain.
                log.warning("refusing %s: an operation id of the block is another operation here", where)
                return _Vote.REFUSE
            log.debug("%s: waiting for %d of its operations", where, len(missing))
            return _Vote.WAIT
        for operation_id in block.operation_ids:
            if blocks.in_committed_proposal(operation_id) or self._in_chain(operation_id, blocks):
                log.info("refusing %s: operation %d is already committed", where, operation_id)
                return _Vote.REFUSE
        if not self._check_previous(block, where):
            return _Vote.REFUSE
        local = self._local_entries(block.operation_ids)
        if any(entry is None for entry in local):
            self._missing.pop(block.group_id, None)  # one went meanwhile: look at all of them again
            return _Vote.WAIT
        if not self._operations_match(block.head, [entry.op for entry in local if entry is not None]):
            log.info("refusing %s: its operations do not match the local ones", where)
            return _Vote.REFUSE
        return _Vote.SIGN

    def _check_previous(self, block: PendingBlock, where: str) -> bool:
        """False if the proposal does not follow its previous block; raises _OutOfSync when that block
        is not the one the local chain holds there."""
        h = block.head.header
        previous = self._chain.get_header(h.previous_offset)
        if previous is None or previous.hash != h.previous_hash:
            raise _OutOfSync(f"{where}: its previous block at offset {h.previous_offset} is not in the local chain")
        if h.offset != previous.next_offset or h.height != previous.height + 1:
            log.info("refusing %s: it does not follow its previous block", where)
            return False
        return True

    def _malformed_reason(self, block: PendingBlock) -> str | None:
        parsed = self.index.parsed.get(block.group_id)
        if parsed is None or parsed.proposal_hash != block.proposal.hash:
            return self._find_malformed_reason(block)
        if parsed.malformed is None:
            parsed.malformed = (self._find_malformed_reason(block),)
        return parsed.malformed[0]

    def _find_malformed_reason(self, block: PendingBlock) -> str | None:
        h = block.head.header
        if h.cell_id != self.cell.cell_id:
            return f"it is for cell {h.cell_id}"
        if h.proposed_operation_id != block.group_id or h.proposed_node_id != block.proposer_node_id:
            return "its header does not name its proposal"
        if not self.cell.is_chain_node(block.proposer_node_id):
            return "its proposer is not a chain node"
        ids = block.operation_ids
        if any(a >= b for a, b in pairwise(ids)):
            return "its operations are not sorted by id"
        return None

    def _local_entries(self, operation_ids: Sequence[int]) -> list[PendingEntry | None]:
        """The pending entry operations of these ids (None where the store has no entry of that id)."""
        entry_ids = self.index.entry_ids
        get = self._pending.get
        return [get(operation_id) if operation_id in entry_ids else None for operation_id in operation_ids]

    def _in_chain(self, operation_id: int, blocks: PendingBlocks) -> bool:
        index = self.index
        if operation_id in index.entry_ids:
            # An entry here is committed locally or in the chain exactly when the index knows its height.
            return operation_id in index.heights
        return self._chain.block_offset_of_operation(operation_id) is not None

    @staticmethod
    def _operations_match(head: BlockHeaderView, ops: Sequence[SignedOp]) -> bool:
        h = head.header
        if any(op.operation.WhichOneof("kind") != "entry" for op in ops):
            return False
        if [op.hash for op in ops] != [oh.operation_hash for oh in h.operations_header]:
            return False
        if sum(op.size for op in ops) != h.operations_size:
            return False
        return canonical.operations_hash([op.hash for op in ops]) == h.operations_hash

    def _commit(self, block: PendingBlock, blocks: PendingBlocks) -> BlockView | None:
        """Writes the block (SPEC 2.8, B.2); None if some operations are missing locally."""
        h = block.head.header
        local = self._local_entries(block.operation_ids)
        ops = [entry.op for entry in local if entry is not None]
        if len(ops) != len(local):
            log.warning("cannot commit proposal %d yet: some operations are missing locally", block.group_id)
            return None
        if canonical.operations_hash([op.hash for op in ops]) != h.operations_hash:
            raise CommitManagerFatal(f"proposal {block.group_id} was signed but its operations hash does not match")
        previous = self._chain.get_header(h.previous_offset)
        if previous is None or previous.hash != h.previous_hash:
            raise _OutOfSync(f"the block before proposal {block.group_id} is not in the local chain")
        view = BlockView(block.head, tuple(ops)).with_signatures(block.signatures.values())
        try:
            # Its signatures were verified when the votes were analysed (`_verify` keeps the verdicts).
            parsed = self.index.parsed[block.group_id]
            validate_block(
                view,
                previous,
                self.cell.chain_node_keys,
                self.cell.has_quorum,
                lambda _key, signature: parsed.verdicts.get((signature.node_id, bytes(signature.signature)), False),
            )
        except InvalidBlock as exc:
            raise CommitManagerFatal(f"proposal {block.group_id} was signed but does not validate: {exc}") from exc
        try:
            self._chain.write_block(view)
        except InvalidNextBlock as exc:
            raise _OutOfSync(str(exc)) from exc
        self._pending.set_committed(block.operation_ids, CommitStatus(view.offset, view.height))
        log.debug("committed block %d at offset %d with %d operations", view.height, view.offset, len(ops))
        return view

    # -- C: propose ---------------------------------------------------------------------------

    def _should_propose(self, now_ns: int, blocks: PendingBlocks, last: BlockHeaderView) -> bool:
        if not self.cell.is_chain_node(self.local.node_id) or not self.is_my_turn(now_ns):
            return False
        since_last = now_ns - _time_ns(last.proposed_operation_id)
        if since_last >= self.config.commit_maximum_interval_ns:
            return True
        if since_last < self.config.commit_minimum_interval_ns:
            # Beyond the original: too soon after the last block for a proposal by count (entries
            # arriving meanwhile go into the next block; a later round, at the latest the next
            # tick, proposes them).
            return False
        # Entries neither committed nor in the chain, and in no proposal.
        return len(self.index.waiting) >= self.config.commit_maximum_pending_store_count

    @property
    def peers_received_up_to(self) -> int | None:
        """What `set_peers_received_up_to` set last."""
        return self._peers_received_up_to

    def set_peers_received_up_to(self, operation_id: int | None) -> None:
        """Local entries up to this id are known to be held by enough peers to make a quorum with this
        node (the shell tracks its pushes; None: unknown, no restriction). See `_propose`."""
        self._peers_received_up_to = operation_id

    def _propose(self, blocks: PendingBlocks, last: BlockHeaderView, result: CommitResult, now_ns: int) -> None:
        """A proposal of the oldest entries neither committed nor in a committed proposal, within
        `MAX_OPERATIONS_PER_BLOCK` operations and about `max_block_bytes` bytes (one at least).

        Beyond the original: local entries the peers may not hold yet (pushed but not known delivered,
        see `set_peers_received_up_to`) wait for the next proposal, unless older than
        `UNDELIVERED_WAIT_MAX_NS`. The peers could not sign the block before those pushes arrived:
        under load, their backlog made every vote wait a good part of a block's cycle."""
        ops: list[SignedOp] = []
        size = 0
        get = self._pending.get
        received_up_to = self._peers_received_up_to
        me = self.local.node_id
        old_enough = now_ns - UNDELIVERED_WAIT_MAX_NS
        for operation_id in sorted(self.index.uncommitted):
            if blocks.in_committed_proposal(operation_id):
                continue
            entry = get(operation_id)
            assert entry is not None and entry.committed is None, "the commit index is out of date"
            if (
                received_up_to is not None
                and operation_id > received_up_to
                and _time_ns(operation_id) > old_enough
                and entry.op.operation.node_id == me
            ):
                continue
            op_size = entry.op.encoded_size_max
            if ops and size + op_size > self._max_block_bytes:
                break
            ops.append(entry.op)
            size += op_size
            if len(ops) >= MAX_OPERATIONS_PER_BLOCK:
                break
        if not ops:
            return
        me = self.local.node_id
        proposal_id = self._new_operation_id()
        head = build_block_header(self.cell.cell_id, last, proposal_id, me, ops)
        self._store([new_block_proposal(proposal_id, me, head.header_bytes)], result)
        log.debug("proposed block %d at offset %d with %d operations", head.height, head.offset, len(ops))

    def _store(self, operations: list[chain_pb2.Operation], result: CommitResult) -> None:
        signed = sign_operations(operations, self.local.keypair)
        self._pending.put(signed)
        result.new_operations.extend(signed)

    # -- D: cleanup ---------------------------------------------------------------------------

    def _cleanup(self, now_ns: int, blocks: PendingBlocks) -> int:
        """Deletes what is buried deep enough (SPEC 2.8, D); returns how many operations went."""
        last = self._chain.last_block()
        assert last is not None
        depth = self.config.operations_cleanup_after_block_depth
        deep_height = last.height - depth  # blocks at this height or below are deep enough
        next_offset = self._chain.next_offset()
        doomed: list[int] = []
        cleaned = 0
        cleanup_mark: tuple[int, int] | None = None  # (height, offset) of the deepest committed cleaned
        for block in blocks.blocks.values():
            if block.height > deep_height:
                continue
            status = block.status
            if status is PendingBlockStatus.PAST_COMMITTED:
                entry_ids = self.index.entry_ids
                present = [i for i in block.operation_ids if i in entry_ids]
                doomed.append(block.group_id)
                doomed.extend(present)
                cleaned += 1 + len(block.votes) + len(present)
                if cleanup_mark is None or (block.height, block.offset) > cleanup_mark:
                    cleanup_mark = (block.height, block.offset)
            elif status is PendingBlockStatus.PAST_REFUSED or (
                # Beyond the original: a refused/expired proposal deep behind the chain's end can never
                # become a block either (its offset may not even be a block boundary); drop its group.
                status in (PendingBlockStatus.NEXT_REFUSED, PendingBlockStatus.NEXT_EXPIRED)
                and block.offset < next_offset
            ):
                doomed.append(block.group_id)
                cleaned += 1 + len(block.votes)
        for proposal in blocks.malformed:
            if now_ns - _time_ns(proposal.operation_id) >= self.config.block_proposal_timeout_ns:
                doomed.append(proposal.operation_id)
                cleaned += 1
        cleaned += self._dangling(blocks, deep_height, doomed)
        if doomed:
            self._pending.delete(doomed)
        if cleanup_mark is not None:
            height, offset = cleanup_mark
            if height > (self._meta.get_int(META_CLEANUP_HEIGHT) or 0):
                self._meta.set_int(META_CLEANUP_OFFSET, offset)
                self._meta.set_int(META_CLEANUP_HEIGHT, height)
        return cleaned

    def _dangling(self, blocks: PendingBlocks, deep_height: int, doomed: list[int]) -> int:
        """Entries in no proposal that the chain holds deep enough (e.g. revived by a node that was
        behind); appends them to `doomed` and returns how many."""
        count = 0
        operations_blocks = blocks.operations_blocks
        for height, operation_ids in self.index.by_height.items():
            if height > deep_height:
                continue
            for operation_id in operation_ids:
                if operation_id not in operations_blocks:
                    doomed.append(operation_id)
                    count += 1
        return count


__all__ = [
    "ENGINE_ROUNDS_PER_TICK",
    "MAX_OPERATIONS_PER_BLOCK",
    "CommitIndex",
    "CommitManager",
    "CommitManagerFatal",
    "CommitResult",
    "NotChainNode",
    "PendingBlock",
    "PendingBlockStatus",
    "PendingBlocks",
    "commit_turn_node_id",
]
