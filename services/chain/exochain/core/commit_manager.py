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

A. **Analyse** the pending store once (`pending_blocks`): every proposal with its votes, a status
   (`PendingBlockStatus`) and, per entry, the proposals that hold it.
B. **Best next block**: among the `NEXT_POTENTIAL` proposals, the one I signed, else the one with
   the most valid signatures, else the oldest. If I have not voted on it yet, I sign it or refuse
   it (rules in `_vote`); if I have signed it and it has a quorum of valid chain-node signatures, I
   commit it. At most one block is committed per tick (a lagging node catches up one per tick).
C. **Otherwise propose**, when I am a chain node, it is my turn (`commit_turn_node_id`) and either
   enough entries wait or the last block is older than the commit interval.
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

Beyond the original (each marked in the code):
* a proposal a quorum already signed stays a potential next block after its timeout: the nodes that
  saw the quorum in time committed it, so the others must follow rather than stay a block behind
  (or forever behind if no further block comes);
* a vote counts only if its signer is the author of the `block_sign` operation carrying it;
* proposals a correct chain node cannot produce (other cell, header not naming its proposal,
  proposer without the chain role, unsorted operations, an operation id held here by another kind
  of operation) are refused instead of signed or waited on;
* proposals whose header does not parse are never voted on and are deleted once expired; refused or
  expired proposals left `operations_cleanup_after_block_depth` blocks behind are deleted even when
  their offset is not a block boundary (which would otherwise keep them forever).

Time: `now_ns` is wall time in ns; operation ids are consistent timestamps (ns with node and
counter in the sub-millisecond digits), so the age of a proposal is `now_ns` minus the millisecond
part of its id, and the last block's `proposed_operation_id` is its timestamp (0 for the genesis).

Cost per tick: one pass over the pending store, one header parse and one signature check per *new*
proposal or vote (headers, the entry -> proposals index and signature verdicts are cached across
ticks), chain index look-ups only for entries in no proposal and not known committed (to propose
them or find dangling ones) and for the entries of a block being voted on, and at most one `put`,
one `set_committed` and one `delete` call.
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
    ChainCell,
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
    # Entry operations of the pending store, by id (id order).
    entries: dict[int, PendingEntry]
    # Entry id -> group ids of the proposals holding it. Read only, and valid until the next analysis:
    # it is the manager's cache, kept up to date across ticks rather than rebuilt.
    operations_blocks: dict[int, list[int]]
    # Proposals whose header does not parse (never voted on; removed once expired).
    malformed: list[SignedOp] = field(default_factory=list)

    @property
    def entries_operations_count(self) -> int:
        return len(self.entries)

    def potential_next_blocks(self) -> list[PendingBlock]:
        """`NEXT_POTENTIAL` proposals, most likely first: the one I signed, then the one with the
        most valid signatures, then the oldest."""
        potential = [b for b in self.blocks.values() if b.status is PendingBlockStatus.NEXT_POTENTIAL]
        potential.sort(key=lambda b: (not b.has_my_signature, -len(b.signatures), b.group_id))
        return potential

    def best_next_block(self) -> PendingBlock | None:
        potential = self.potential_next_blocks()
        return potential[0] if potential else None

    def in_committed_proposal(self, operation_id: int) -> bool:
        """Whether a `PAST_COMMITTED` proposal holds this operation."""
        blocks = self.blocks
        return any(
            blocks[group_id].status is PendingBlockStatus.PAST_COMMITTED
            for group_id in self.operations_blocks.get(operation_id, ())
        )


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
    ) -> None:
        assert config.commit_maximum_interval_ns > 0, "commit interval must be positive"
        assert config.operations_cleanup_after_block_depth > 0, "cleanup depth must be positive"
        self.config = config
        self.local = local
        self.cell = cell
        self._pending = pending
        self._chain = chain
        self._meta = meta
        self._new_operation_id = new_operation_id
        # Caches kept across ticks, updated as proposals come and go (never the source of truth:
        # every tick re-reads the pending store and reconciles them).
        self._parsed: dict[int, _ParsedProposal] = {}
        # Entry id -> group ids of the (parsable) proposals holding it.
        self._operations_blocks: dict[int, list[int]] = {}

    # -- public -------------------------------------------------------------------------------

    def tick(self, now_ns: int) -> CommitResult:
        result = CommitResult()
        last = self._chain.last_block()
        if last is None:
            return result  # no genesis yet: chain sync must download it first
        blocks = self.pending_blocks(now_ns)
        best = blocks.best_next_block()
        try:
            if best is not None:
                self._on_next_block(best, blocks, result)
            elif self._should_propose(now_ns, blocks, last.head):
                self._propose(blocks, last.head, result)
        except _OutOfSync as exc:
            log.info("%s: out of sync: %s", self.local.node_id[-6:], exc)
            result.out_of_sync = True
            return result
        result.cleaned = self._cleanup(now_ns, blocks)
        return result

    def pending_blocks(self, now_ns: int) -> PendingBlocks:
        """Analyses the pending store (SPEC 2.8, A) in one pass over it."""
        entries: dict[int, PendingEntry] = {}
        proposals: list[SignedOp] = []
        votes: dict[int, list[SignedOp]] = {}
        # The hot loop of a tick (every pending operation): plain string kinds, no enum, no properties.
        for entry in self._pending.range():
            operation = entry.op.operation
            kind = operation.WhichOneof("kind")
            if kind == "entry":
                entries[operation.operation_id] = entry
            elif kind == "block_propose":
                proposals.append(entry.op)
            else:
                group = votes.get(operation.group_id)
                if group is None:
                    votes[operation.group_id] = [entry.op]
                else:
                    group.append(entry.op)

        analysed = PendingBlocks({}, entries, self._operations_blocks)
        next_offset = self._chain.next_offset()
        seen: set[int] = set()
        for proposal in proposals:
            group_id = proposal.operation_id
            seen.add(group_id)
            parsed = self._parse(proposal)
            if parsed.head is None:
                analysed.malformed.append(proposal)
                continue
            analysed.blocks[group_id] = self._analyse(
                proposal, parsed, tuple(votes.get(group_id, ())), now_ns, next_offset
            )
        for group_id in [g for g in self._parsed if g not in seen]:
            self._forget(group_id)
        return analysed

    def is_my_turn(self, now_ns: int) -> bool:
        """Whether the local node may propose now; raises NotChainNode if it has no chain role."""
        if not self.cell.is_chain_node(self.local.node_id):
            raise NotChainNode(f"node {self.local.node_id} is not a chain node of cell {self.cell.cell_id}")
        turn = commit_turn_node_id(self.cell.chain_node_ids, now_ns, self.config.commit_maximum_interval_ns)
        return turn == self.local.node_id

    # -- A: analysis --------------------------------------------------------------------------

    def _parse(self, proposal: SignedOp) -> _ParsedProposal:
        """The proposal's header, parsed once per proposal operation (and indexed by operation)."""
        group_id = proposal.operation_id
        cached = self._parsed.get(group_id)
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
        self._parsed[group_id] = parsed
        operations_blocks = self._operations_blocks
        for operation_id in parsed.operation_ids:
            holders = operations_blocks.get(operation_id)
            if holders is None:
                operations_blocks[operation_id] = [group_id]
            else:
                holders.append(group_id)
        return parsed

    def _forget(self, group_id: int) -> None:
        """Drops a proposal that left the pending store from the caches."""
        parsed = self._parsed.pop(group_id)
        operations_blocks = self._operations_blocks
        for operation_id in parsed.operation_ids:
            holders = operations_blocks.get(operation_id)
            if holders is not None and group_id in holders:
                holders.remove(group_id)
                if not holders:
                    del operations_blocks[operation_id]

    def _analyse(
        self,
        proposal: SignedOp,
        parsed: _ParsedProposal,
        votes: tuple[SignedOp, ...],
        now_ns: int,
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
        expired = now_ns - _time_ns(proposal.operation_id) >= self.config.block_proposal_timeout_ns
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
        if not block.has_my_signature and not block.has_my_refusal:
            vote = self._vote(block, blocks)
            if vote is _Vote.WAIT:
                return
            me = self.local.node_id
            if vote is _Vote.SIGN:
                signature = sign_block(block.head, me, self.local.keypair)
                operation = new_block_sign(self._new_operation_id(), me, block.group_id, signature.signature)
                self._store([operation], result)
                block.has_my_signature = True
                if self.cell.is_chain_node(me):
                    block.signatures[me] = signature
            else:
                self._store([new_block_refuse(self._new_operation_id(), me, block.group_id)], result)
                block.has_my_refusal = True
                return
        if block.has_my_signature and self.cell.has_quorum(len(block.signatures)):
            committed = self._commit(block, blocks)
            if committed is not None:
                result.committed_blocks.append(committed)

    def _vote(self, block: PendingBlock, blocks: PendingBlocks) -> _Vote:
        """Sign or refuse (SPEC 2.8, B.1); raises _OutOfSync when the previous block is not ours."""
        h = block.head.header
        where = f"proposal {block.group_id} from {block.proposer_node_id[-6:]} at offset {h.offset}"
        # Beyond the original: what a correct chain node cannot have proposed is refused outright.
        malformed = self._malformed_reason(block)
        if malformed is not None:
            log.info("refusing %s: %s", where, malformed)
            return _Vote.REFUSE
        for operation_id in block.operation_ids:
            if blocks.in_committed_proposal(operation_id) or self._in_chain(operation_id, blocks):
                log.info("refusing %s: operation %d is already committed", where, operation_id)
                return _Vote.REFUSE
        previous = self._chain.get_header(h.previous_offset)
        if previous is None or previous.hash != h.previous_hash:
            raise _OutOfSync(f"{where}: its previous block at offset {h.previous_offset} is not in the local chain")
        if h.offset != previous.next_offset or h.height != previous.height + 1:
            log.info("refusing %s: it does not follow its previous block", where)
            return _Vote.REFUSE
        local = [blocks.entries.get(operation_id) for operation_id in block.operation_ids]
        missing = [i for i, entry in zip(block.operation_ids, local, strict=True) if entry is None]
        if missing:
            if any(self._pending.get(operation_id) is not None for operation_id in missing):
                # Another kind of operation holds that id here (ids of two nodes collided): it will
                # never be this entry, so waiting would only stall the chain.
                log.warning("refusing %s: an operation id of the block is another operation here", where)
                return _Vote.REFUSE
            log.debug("%s: waiting for %d of its operations", where, len(missing))
            return _Vote.WAIT
        if not self._operations_match(block.head, [entry.op for entry in local if entry is not None]):
            log.info("refusing %s: its operations do not match the local ones", where)
            return _Vote.REFUSE
        return _Vote.SIGN

    def _malformed_reason(self, block: PendingBlock) -> str | None:
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

    def _in_chain(self, operation_id: int, blocks: PendingBlocks) -> bool:
        entry = blocks.entries.get(operation_id)
        if entry is not None and entry.committed is not None:
            return True
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
        local = [blocks.entries.get(operation_id) for operation_id in block.operation_ids]
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
            validate_block(view, previous, self.cell.chain_node_keys, self.cell.has_quorum)
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
        if now_ns - _time_ns(last.proposed_operation_id) >= self.config.commit_maximum_interval_ns:
            return True
        # Entries not committed locally and in no proposal: a cheap count of what waits.
        waiting = 0
        threshold = self.config.commit_maximum_pending_store_count
        for operation_id, entry in blocks.entries.items():
            if entry.committed is None and operation_id not in blocks.operations_blocks:
                waiting += 1
                if waiting >= threshold:
                    return True
        return False

    def _propose(self, blocks: PendingBlocks, last: BlockHeaderView, result: CommitResult) -> None:
        ops: list[SignedOp] = []
        for operation_id, entry in blocks.entries.items():  # id order
            if entry.committed is not None or blocks.in_committed_proposal(operation_id):
                continue
            if self._chain.block_offset_of_operation(operation_id) is not None:
                continue
            ops.append(entry.op)
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
                present = [i for i in block.operation_ids if i in blocks.entries]
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
        heights: dict[int, int | None] = {}
        for operation_id, entry in blocks.entries.items():
            if operation_id in blocks.operations_blocks:
                continue
            if entry.committed is not None:
                height: int | None = entry.committed.block_height
            else:
                offset = self._chain.block_offset_of_operation(operation_id)
                if offset is None:
                    continue
                if offset not in heights:
                    header = self._chain.get_header(offset)
                    heights[offset] = header.height if header is not None else None
                height = heights[offset]
            if height is not None and height <= deep_height:
                doomed.append(operation_id)
                count += 1
        return count


__all__ = [
    "MAX_OPERATIONS_PER_BLOCK",
    "CommitManager",
    "CommitManagerFatal",
    "CommitResult",
    "NotChainNode",
    "PendingBlock",
    "PendingBlockStatus",
    "PendingBlocks",
    "commit_turn_node_id",
]
