"""Pending store synchronization (SPEC 2.7): the pending stores of the chain nodes converge by range hashing.

Theory of operation
-------------------
A `PendingSyncRequest` describes ranges of operation ids of the sender's pending store. For each range it
always carries the hash and count of *all* the sender's operations in it (after the height filter), and
optionally some of them as headers (id, group, hash) or in full. The receiver applies the full operations,
compares the range with its own store and, for every range that differs, answers with what lets the two
sides converge; a conversation ends when a request finds every range equal (nothing is sent back).

Inputs and outputs (sans-IO: no clock, no sockets; storage is read and written synchronously):

* `tick(now_ns)`: to each other chain node whose `RequestTracker` allows it, a whole-store request with
  hashes and counts only (anti-entropy), of the operations older than half the check interval (newer
  ones are being pushed: see `push_horizon`).
* `handle_new_operations(ops, now_ns)`: after the engine stored new local operations, one request per
  other chain node for `[first new id, last new id]` holding the new operations in full and the rest of
  that range hashed, so a peer that only lacked them answers nothing (low-latency push).
* `handle_request(from_node_id, request, now_ns)`: the reply (if anything differs) and the operations that
  were new in the pending store (the engine turns them into events).

Rules kept from the original, and why:

* Ranges hold up to `max_operations_per_range + 1` operations; the next range starts excluded at the last
  operation of the previous one, so the bounds chain without gaps. A whole-store request starts
  unbounded, so operations outside the sender's span are compared too; it ends at the push horizon
  rather than unbounded in this port (see `push_horizon`).
* Per differing range: remote count 0 -> send ours in full; remote sent a hash only -> send our headers;
  else diff its headers with our operations: ours it lacks go in full, the rest as headers, and what only
  it has is left out, which makes it send those in full.
* Height filter: an operation counts only if uncommitted, or committed at height >= `from_height`, where
  `from_height` is the request's `from_block_height` if non-zero, else our last cleanup height +
  `operations_depth_after_cleanup`, else no filter (this port takes the higher of the two: see
  `from_block_height`). Replies carry the height used. This keeps nodes from re-sending operations that
  others already cleaned up.

Where this port differs, and why:

* Received operations are stored only if they parse, their node is a cell member and their signature
  verifies; the others are dropped and logged. All accepted operations of one request are stored by a
  single durable `PendingStore.put` before any reply is returned.
* An operation we already hold is not rewritten (keeps its local commit status; a different operation
  under the same id is a conflict that is logged, ours is kept). An operation that is absent from our
  pending store but committed in our chain at or below our last cleanup height is not stored: it was
  cleaned up, and storing it again would revive it.
* A reply holds the ranges that differ only; equal ranges are left out rather than echoed as hashes
  (the receiver compares the ranges a request has, so leaving one out settles it the same way), so the
  rounds after the first of a conversation cost what differs, not the whole store.
* Every request from a peer counts as a response in its tracker (SPEC 11, quirk 17: the original never
  recorded responses, so its periodic full check backed off to 30s for good).
* A push covers `[first new id, last new id]`, not `[first new id, inf)`: under load the original's
  range held every operation newer than the push (thousands), which each push re-described and each
  receiver re-hashed and compared, so its cost grew with the pending store. A push whose only news is
  its own operations (the usual case: a batch's ids are consecutive) is answered by nothing; one whose
  range also holds operations the peer lacks starts the usual conversation. Operations after the range
  that a peer missed (a lost push) are found by the periodic whole-store check instead of the next push.
* Messages stay far below the gRPC message limit whatever the store holds: a push carries at most
  `PUSH_BYTES_MAX` bytes of operations (a bigger batch is split into several pushes) and a reply at most
  `REPLY_FULL_BYTES_MAX` bytes of full operations; the others it would send in full go as headers, so
  the peer asks for them again and the next round sends them (a peer that missed many operations gets
  them over a few rounds instead of in one message that could never be delivered).
* Conversations always end. Stores cannot always become equal: the same id may hold two versions (clock
  collisions, SPEC 11.16), and commit states differ between nodes, so one may filter out an operation the
  other still counts. The original then failed (`InvalidSyncState`) or could ping-pong forever. Here:
  - an id the remote lists that we hold, filtered out or in another version, is not asked for again;
  - a diff that finds no difference in ids settles the range for this conversation: we leave it out of
    the reply, as an equal range. Only when the remote sent full operations but fewer than its count (a
    push, whose other operations we may lack) do we answer with our headers instead;
  - a reply identical to one already sent to that peer since it last brought us something new (within a
    request interval) is not sent again: such a conversation is stuck, and repeats what the peer has.
  The next periodic check tries again, so nothing is lost but the time to converge after a real change.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field

from exochain import wire
from exochain.core.common import (
    META_CLEANUP_HEIGHT,
    ChainCell,
    LocalChainNode,
    Outgoing,
    PendingSyncConfig,
    RequestTracker,
)
from exochain.model import InvalidOperation, SignatureChecker, SignedOp
from exochain.storage.base import ChainStore, MetaStore, PendingEntry, PendingStore
from exocommon import canonical
from exocore.chain.v1 import chain_pb2

log = logging.getLogger(__name__)

# Distinct replies sent to one peer while it brings us nothing new, before its conversation is ended
# anyway (a hard bound; stuck conversations normally end at their first repeated reply, see `_may_reply`).
REPLIES_WITHOUT_PROGRESS_MAX = 64

# Operations pushed in one request: at most this many bytes of them (one at least), so that a push
# stays far below the gRPC message limit (16 MiB); a bigger batch is pushed in several requests.
PUSH_BYTES_MAX = 4 * 1024 * 1024
# Operations sent in full in one reply: at most this many bytes (one at least); the others of the
# reply go as headers, which makes the peer ask for them again (each round sends the next ones).
REPLY_FULL_BYTES_MAX = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SyncBound:
    """One end of a sync range, as on the wire: (0, False) is unbounded, else the id is included or not."""

    operation_id: int = 0
    included: bool = False

    @property
    def is_unbounded(self) -> bool:
        return self.operation_id == 0 and not self.included

    @classmethod
    def lower_of(cls, sync_range: chain_pb2.PendingSyncRange) -> SyncBound:
        return cls(sync_range.from_operation, sync_range.from_included)

    @classmethod
    def upper_of(cls, sync_range: chain_pb2.PendingSyncRange) -> SyncBound:
        return cls(sync_range.to_operation, sync_range.to_included)


UNBOUNDED = SyncBound()


class OperationDetails(enum.Enum):
    """How much of an operation a range carries (it is always in the range's hash and count)."""

    HASH = "hash"
    HEADER = "header"
    FULL = "full"


def store_range_arguments(lower: SyncBound, upper: SyncBound) -> tuple[int | None, int | None] | None:
    """The `(after, up_to)` arguments of `PendingStore.range` for these bounds; None if nothing fits."""
    after: int | None = None
    if not lower.is_unbounded:
        after = lower.operation_id - 1 if lower.included else lower.operation_id
        if after < 1:
            after = None  # operation ids start at 1
    up_to: int | None = None
    if not upper.is_unbounded:
        up_to = upper.operation_id if upper.included else upper.operation_id - 1
        if up_to < 1:
            return None
    if after is not None and up_to is not None and up_to <= after:
        return None
    return after, up_to


def passes_height_filter(entry: PendingEntry, from_height: int | None) -> bool:
    """Uncommitted operations always count; committed ones only from `from_height` up (SPEC 2.7)."""
    return from_height is None or entry.committed is None or entry.committed.block_height >= from_height


# Field tags of PendingSyncRequest, PendingSyncRange and OperationHeader (see `wire`).
_RANGES = wire.tag(1, wire.WIRE_LENGTH_DELIMITED)
_FROM_BLOCK_HEIGHT = wire.tag(2, wire.WIRE_VARINT)
_FROM_OPERATION = wire.tag(1, wire.WIRE_VARINT)
_FROM_INCLUDED = wire.tag(2, wire.WIRE_VARINT)
_TO_OPERATION = wire.tag(3, wire.WIRE_VARINT)
_TO_INCLUDED = wire.tag(4, wire.WIRE_VARINT)
_OPERATIONS_HASH = wire.tag(5, wire.WIRE_LENGTH_DELIMITED)
_OPERATIONS_COUNT = wire.tag(6, wire.WIRE_VARINT)
_OPERATIONS = wire.tag(7, wire.WIRE_LENGTH_DELIMITED)
_OPERATIONS_HEADERS = wire.tag(8, wire.WIRE_LENGTH_DELIMITED)


def _header_bytes(op: SignedOp) -> bytes:
    """A serialised `OperationHeader` (what `SignedOp.header()` builds; a flat message of varints is
    serialised faster by protobuf than by hand)."""
    operation = op.operation
    return _OperationHeader(
        group_id=operation.group_id, operation_id=operation.operation_id, operation_hash=op.hash
    ).SerializeToString()


_OperationHeader = chain_pb2.OperationHeader


@dataclass(slots=True)
class _RangeDraft:
    lower: SyncBound
    # The upper bound when set explicitly; else the range ends at its last operation (`upper`).
    explicit_upper: SyncBound | None = None
    count: int = 0
    last_id: int = 0
    hashes: list[bytes] = field(default_factory=list)
    # Set for a range copied as hash + count only (its operations are not pushed one by one).
    fixed_hash: bytes | None = None
    full: list[SignedOp] = field(default_factory=list)
    headers: list[SignedOp] = field(default_factory=list)

    @property
    def upper(self) -> SyncBound:
        if self.explicit_upper is not None:
            return self.explicit_upper
        return SyncBound(self.last_id, True) if self.count else UNBOUNDED

    def digest_key(self) -> tuple[object, ...]:
        operations_hash = self.fixed_hash if self.fixed_hash is not None else tuple(self.hashes)
        full = tuple(op.hash for op in self.full)
        headers = tuple(op.hash for op in self.headers)
        return (self.lower, self.upper, self.count, operations_hash, full, headers)

    def encode(self) -> bytes:
        """The serialised `PendingSyncRange` (what `to_proto` builds, written from the operations' own
        serialisations: a push holds hundreds of them)."""
        operations_hash = self.fixed_hash if self.fixed_hash is not None else canonical.operations_hash(self.hashes)
        upper = self.upper
        return b"".join(
            (
                wire.varint_field(_FROM_OPERATION, self.lower.operation_id),
                wire.varint_field(_FROM_INCLUDED, int(self.lower.included)),
                wire.varint_field(_TO_OPERATION, upper.operation_id),
                wire.varint_field(_TO_INCLUDED, int(upper.included)),
                wire.length_delimited(_OPERATIONS_HASH, operations_hash),
                wire.varint_field(_OPERATIONS_COUNT, self.count),
                wire.repeated(_OPERATIONS, [op.encode() for op in self.full]),
                wire.repeated(_OPERATIONS_HEADERS, [_header_bytes(op) for op in self.headers]),
            )
        )

    def to_proto(self) -> chain_pb2.PendingSyncRange:
        operations_hash = self.fixed_hash if self.fixed_hash is not None else canonical.operations_hash(self.hashes)
        return chain_pb2.PendingSyncRange(
            from_operation=self.lower.operation_id,
            from_included=self.lower.included,
            to_operation=self.upper.operation_id,
            to_included=self.upper.included,
            operations_hash=operations_hash,
            operations_count=self.count,
            operations=[op.to_proto() for op in self.full],
            operations_headers=[op.header() for op in self.headers],
        )


class SyncRangesBuilder:
    """Builds the ranges of a request from operations pushed in id order, starting a new range once the
    current one holds more than `max_operations_per_range` operations."""

    def __init__(self, max_operations_per_range: int, full_bytes_max: int | None = None) -> None:
        """`full_bytes_max`: once the operations added in full reach this many bytes, the next ones
        are added as headers instead (None: no limit)."""
        if max_operations_per_range < 1:
            raise ValueError("max_operations_per_range must be at least 1")
        self._max_operations_per_range = max_operations_per_range
        self._ranges: list[_RangeDraft] = []
        self._full_bytes_max = full_bytes_max
        self._full_bytes = 0

    def __len__(self) -> int:
        return len(self._ranges)

    def push_new_range(self, lower: SyncBound) -> None:
        """Starts a range at `lower`; it ends at its last operation unless `set_last_range_upper` says."""
        self._ranges.append(_RangeDraft(lower))

    def push_hashed_range(self, lower: SyncBound, upper: SyncBound, operations_hash: bytes, count: int) -> None:
        """A range described by hash and count only (e.g. an unchanged range echoed back)."""
        self._ranges.append(_RangeDraft(lower, upper, count, fixed_hash=operations_hash))

    def push_operation(self, op: SignedOp, details: OperationDetails) -> None:
        if not self._ranges:
            self.push_new_range(UNBOUNDED)
        last = self._ranges[-1]
        if last.fixed_hash is not None:
            raise ValueError("cannot push operations into a hash-only range; start a new range first")
        if last.count > self._max_operations_per_range:
            if last.explicit_upper is not None and not last.explicit_upper.included:
                raise ValueError("a full range must end at its last operation")
            last = _RangeDraft(SyncBound(last.upper.operation_id, False))
            self._ranges.append(last)
        operation_id = op.operation.operation_id
        if last.hashes and operation_id <= last.last_id:
            raise ValueError(f"operations must be pushed in increasing id order (got {operation_id})")
        last.explicit_upper = None  # ends at this operation
        last.last_id = operation_id
        last.count += 1
        last.hashes.append(op.hash)
        if details is OperationDetails.FULL and self._full_bytes_max is not None:
            size = op.encoded_size_max
            if self._full_bytes and self._full_bytes + size > self._full_bytes_max:
                details = OperationDetails.HEADER
            else:
                self._full_bytes += size
        if details is OperationDetails.FULL:
            last.full.append(op)
        elif details is OperationDetails.HEADER:
            last.headers.append(op)

    def set_last_range_upper(self, upper: SyncBound) -> None:
        if self._ranges:
            self._ranges[-1].explicit_upper = upper

    def build(self) -> list[chain_pb2.PendingSyncRange]:
        return [draft.to_proto() for draft in self._ranges]

    def request(self, from_block_height: int) -> chain_pb2.PendingSyncRequest:
        """The request holding these ranges (encoded from bytes, see `_RangeDraft.encode`)."""
        body = wire.repeated(_RANGES, [draft.encode() for draft in self._ranges])
        body += wire.varint_field(_FROM_BLOCK_HEIGHT, from_block_height)
        return chain_pb2.PendingSyncRequest.FromString(body)

    def digest(self) -> int:
        """Identifies the content of the ranges (in this process only), cheaper than serialising them."""
        return hash(tuple(draft.digest_key() for draft in self._ranges))


def plan_differing_range(
    remote: chain_pb2.PendingSyncRange,
    local_ops: Sequence[SignedOp],
    received_ids: Container[int],
    held_ids: Container[int],
) -> list[OperationDetails] | None:
    """For a range whose hash or count differs from the remote's, the details to send for each of our
    operations in it (SPEC 2.7 step 3); None when more messages cannot make this range converge.

    `local_ops`: ours in the range after the height filter; `received_ids`: operations the remote just
    sent in full; `held_ids`: every id our pending store holds, filtered out or not."""
    if remote.operations_count == 0:
        return [OperationDetails.FULL] * len(local_ops)
    if not remote.operations_headers and not remote.operations:
        return [OperationDetails.HEADER] * len(local_ops)
    remote_ids = {header.operation_id for header in remote.operations_headers}
    local_ids: set[int] = set()
    details: list[OperationDetails] = []
    differs = False
    for op in local_ops:
        local_ids.add(op.operation_id)
        if op.operation_id in remote_ids or op.operation_id in received_ids:
            details.append(OperationDetails.HEADER)
        else:
            details.append(OperationDetails.FULL)  # the remote lacks it
            differs = True
    # What only the remote has is left out of our headers: that makes it send those in full. Unless we
    # hold it already (another version, or filtered out by height): receiving it again would not help.
    if differs or any(i not in local_ids and i not in held_ids for i in remote_ids):
        return details
    if not remote.operations_headers and remote.operations_count > len(remote.operations):
        # A push: the remote holds operations here it did not show; our headers tell it which we lack.
        return [OperationDetails.HEADER] * len(local_ops)
    return None


@dataclass(frozen=True, slots=True)
class PendingSyncStatistics:
    requests_sent: int
    requests_received: int
    requests_dropped: int
    operations_stored: int
    operations_dropped: int
    replies_suppressed: int


class PendingSynchronizer:
    """The pending store synchronizer of one chain node (see the module docstring)."""

    def __init__(
        self,
        config: PendingSyncConfig,
        local: LocalChainNode,
        cell: ChainCell,
        pending: PendingStore,
        chain: ChainStore,
        meta: MetaStore,
        checker: SignatureChecker,
    ) -> None:
        if config.max_operations_per_range < 1 or config.operations_depth_after_cleanup < 0:
            raise ValueError(f"invalid pending sync config: {config}")
        if not cell.is_chain_node(local.node_id):
            raise ValueError(f"node {local.node_id} is not a chain node of cell {cell.cell_id}")
        self._config = config
        self._local = local
        self._cell = cell
        self._pending = pending
        self._chain = chain
        self._meta = meta
        self._checker = checker
        self._trackers: dict[str, RequestTracker] = {}
        # Per peer: the replies sent since it last brought us something new (see `_may_reply`).
        self._recent_replies: dict[str, _RecentReplies] = {}
        self._replies_suppressed = 0
        self._requests_sent = 0
        self._requests_received = 0
        self._requests_dropped = 0
        self._operations_stored = 0
        self._operations_dropped = 0

    # --- inputs -------------------------------------------------------------------------------

    def tick(self, now_ns: int) -> list[Outgoing]:
        """A whole-store request (hashes and counts only) to each chain peer its tracker lets us ask."""
        message: chain_pb2.PeerMessage | None = None
        outgoing: list[Outgoing] = []
        for peer_id in self._peer_ids():
            tracker = self._tracker(peer_id)
            if not tracker.can_send(now_ns):
                continue
            tracker.sent(now_ns)
            if message is None:
                # Same content for every peer: built once and shared (messages are never mutated after).
                message = _peer_message(self._whole_store_request(now_ns))
            outgoing.append(Outgoing(peer_id, message))
        self._requests_sent += len(outgoing)
        return outgoing

    def handle_new_operations(self, ops: Sequence[SignedOp], now_ns: int, urgent: bool = False) -> list[Outgoing]:
        """Pushes new local operations, already stored, to every chain peer: per chunk of at most
        `PUSH_BYTES_MAX` bytes of them, one request for the range [first, last] of the chunk.
        `urgent`: see `Outgoing` (the engine marks the commit manager's operations so)."""
        if not ops:
            return []
        foreign = [op for op in ops if op.node_id != self._local.node_id]
        if foreign:
            raise ValueError(f"only local operations are pushed, got {foreign[0]!r}")
        peer_ids = self._peer_ids()
        if not peer_ids:
            return []
        from_height = self.from_block_height()
        outgoing: list[Outgoing] = []
        for chunk in _chunks_by_size(sorted(ops, key=lambda op: op.operation_id), PUSH_BYTES_MAX):
            message = _peer_message(self._push_request(chunk, from_height))
            last_id = chunk[-1].operation_id
            outgoing.extend(Outgoing(peer_id, message, urgent, last_id) for peer_id in peer_ids)
        self._requests_sent += len(outgoing)
        return outgoing

    def _push_request(self, ops: Sequence[SignedOp], from_height: int | None) -> chain_pb2.PendingSyncRequest:
        """One request for [first, last] of `ops` (sorted): theirs in full, the rest of ours in it hashed."""
        new_ids = {op.operation_id for op in ops}
        first, last = SyncBound(ops[0].operation_id, True), SyncBound(ops[-1].operation_id, True)
        builder = SyncRangesBuilder(self._config.max_operations_per_range)
        builder.push_new_range(first)
        pushed = 0
        for entry in self._entries(first, last, from_height):
            is_new = entry.op.operation_id in new_ids
            pushed += is_new
            builder.push_operation(entry.op, OperationDetails.FULL if is_new else OperationDetails.HASH)
        if pushed != len(new_ids):
            # Persist before send: a peer must never learn of an operation we could lose.
            raise ValueError("new operations must be in the pending store before they are pushed")
        builder.set_last_range_upper(last)
        return builder.request(from_height or 0)

    def handle_request(
        self, from_node_id: str, request: chain_pb2.PendingSyncRequest, now_ns: int
    ) -> tuple[list[Outgoing], list[SignedOp]]:
        """Applies a peer's request; returns the reply (none if every range is equal) and the operations
        that were new in the pending store, stored durably before this returns."""
        if from_node_id == self._local.node_id or not self._cell.is_chain_node(from_node_id):
            log.warning("pending sync request from %s, not a chain peer: dropped", from_node_id)
            self._requests_dropped += 1
            return [], []
        self._requests_received += 1
        # Any request from the peer shows it is alive and syncing with us (fixes SPEC 11 quirk 17).
        self._tracker(from_node_id).responded(now_ns)
        problem = _invalid_ranges_reason(request)
        if problem is not None:
            log.warning("invalid pending sync request from %s: %s; dropped", from_node_id, problem)
            self._requests_dropped += 1
            return [], []
        from_height = self.from_block_height(request.from_block_height)
        received_ids, new_ops = self._store_received(from_node_id, request)
        builder = SyncRangesBuilder(self._config.max_operations_per_range, REPLY_FULL_BYTES_MAX)
        changed = False
        for sync_range in request.ranges:
            changed |= self._answer_range(sync_range, received_ids, from_height, builder)
        if not changed or not self._may_reply(from_node_id, builder.digest(), bool(new_ops), now_ns):
            return [], new_ops
        reply = builder.request(from_height or 0)
        self._requests_sent += 1
        return [Outgoing(from_node_id, _peer_message(reply))], new_ops

    # --- queries ------------------------------------------------------------------------------

    def from_block_height(self, request_height: int = 0) -> int | None:
        """The height filter: the higher of the request's (if non-zero) and ours (last cleanup height +
        depth, if a cleanup happened); None if neither.

        The original took the request's as is. But a node cannot hand over operations it already
        cleaned up: when its cleanup is ahead of the requester's (nodes clean up as their own chains
        grow, so it often is, by a block or two), the requester's lower height made every range with
        recently committed operations differ, and the conversation sent them in full, only for them
        to be dropped as cleaned up, again at each periodic check (megabytes under load). With the
        higher height, the reply (which carries it) makes both sides compare the same operations."""
        own: int | None = None
        cleanup_height = self._meta.get_int(META_CLEANUP_HEIGHT)
        if cleanup_height is not None:
            own = cleanup_height + self._config.operations_depth_after_cleanup
        if request_height and (own is None or request_height > own):
            return request_height
        return own

    def push_horizon(self, now_ns: int) -> int:
        """The newest operation id the periodic whole-store check covers: ids (timestamps) older than
        half the check interval. Newer operations are still being pushed (under load, thousands are
        queued or in flight at any time); comparing them made every check send them again, in full,
        in megabyte replies. A push that was lost is found by a later check."""
        return max(1, now_ns - self._config.request_min_interval_ns // 2)

    def statistics(self) -> PendingSyncStatistics:
        return PendingSyncStatistics(
            requests_sent=self._requests_sent,
            requests_received=self._requests_received,
            requests_dropped=self._requests_dropped,
            operations_stored=self._operations_stored,
            operations_dropped=self._operations_dropped,
            replies_suppressed=self._replies_suppressed,
        )

    # --- internals ----------------------------------------------------------------------------

    def _peer_ids(self) -> list[str]:
        return [node_id for node_id in self._cell.chain_node_ids if node_id != self._local.node_id]

    def _tracker(self, peer_id: str) -> RequestTracker:
        tracker = self._trackers.get(peer_id)
        if tracker is None:
            tracker = RequestTracker(self._config.request_min_interval_ns, self._config.request_max_interval_ns)
            self._trackers[peer_id] = tracker
        return tracker

    def _entries(self, lower: SyncBound, upper: SyncBound, from_height: int | None) -> Iterator[PendingEntry]:
        arguments = store_range_arguments(lower, upper)
        if arguments is None:
            return
        for entry in self._pending.range(*arguments):
            if passes_height_filter(entry, from_height):
                yield entry

    def _operations(self, lower: SyncBound, upper: SyncBound, from_height: int | None) -> list[SignedOp]:
        """Ours in the range after the height filter (`_entries` without the generator, for the hot path)."""
        arguments = store_range_arguments(lower, upper)
        if arguments is None:
            return []
        entries = self._pending.range(*arguments)
        if from_height is None:
            return [entry.op for entry in entries]
        return [entry.op for entry in entries if entry.committed is None or entry.committed.block_height >= from_height]

    def _may_reply(self, peer_id: str, reply_digest: int, made_progress: bool, now_ns: int) -> bool:
        """Whether to send this reply to `peer_id`: not if we already sent the same one since the peer last
        brought us something new (within a request interval). A conversation that stores nothing new on
        either side is stuck on what neither can fix (operations one side filters out, refuses, or holds
        in another version) and its messages repeat: it ends at the first repeat, and the next periodic
        check starts afresh. The repeated reply is redundant anyway: the peer already has its content."""
        recent = self._recent_replies.get(peer_id)
        if made_progress or recent is None or now_ns - recent.since_ns >= self._config.request_min_interval_ns:
            recent = _RecentReplies(now_ns)
            self._recent_replies[peer_id] = recent
        if reply_digest in recent.digests or len(recent.digests) >= REPLIES_WITHOUT_PROGRESS_MAX:
            log.info("pending sync with %s makes no progress: conversation ended", peer_id)
            self._replies_suppressed += 1
            return False
        recent.digests.add(reply_digest)
        return True

    def _whole_store_request(self, now_ns: int) -> chain_pb2.PendingSyncRequest:
        """Hashes and counts of the store up to the push horizon (`push_horizon`), in ranges of
        `max_operations_per_range + 1` operations (what `SyncRangesBuilder` makes of hash-only
        operations, computed directly: the store may hold tens of thousands of operations), the first
        starting unbounded and the last ending at the horizon."""
        from_height = self.from_block_height()
        horizon = SyncBound(self.push_horizon(now_ns), True)
        ops = self._operations(UNBOUNDED, horizon, from_height)
        per_range = self._config.max_operations_per_range + 1
        builder = SyncRangesBuilder(self._config.max_operations_per_range)
        lower = UNBOUNDED
        for start in range(0, max(len(ops), 1), per_range):
            chunk = ops[start : start + per_range]
            last = start + per_range >= len(ops)
            upper = horizon if last else SyncBound(chunk[-1].operation_id, True)
            builder.push_hashed_range(lower, upper, canonical.operations_hash([op.hash for op in chunk]), len(chunk))
            if not last:
                lower = SyncBound(chunk[-1].operation_id, False)
        return builder.request(from_height or 0)

    def _answer_range(
        self,
        remote: chain_pb2.PendingSyncRange,
        received_ids: set[int],
        from_height: int | None,
        builder: SyncRangesBuilder,
    ) -> bool:
        """Adds our answer for one range to `builder`; True if the range differs (a reply is needed).
        A range that is equal (or settled) is left out of the reply: the original echoed it as a hash,
        which made every round of a conversation re-hash the whole store on both sides."""
        lower, upper = SyncBound.lower_of(remote), SyncBound.upper_of(remote)
        local_ops = self._operations(lower, upper, from_height)
        if len(local_ops) == remote.operations_count and (
            canonical.operations_hash([op.hash for op in local_ops]) == remote.operations_hash
        ):
            return False
        details = plan_differing_range(remote, local_ops, received_ids, _HeldIds(self._pending))
        if details is None:
            log.info(
                "pending sync range %s..%s differs without differing ids (conflicting or filtered operations)",
                lower,
                upper,
            )
            # Settled for this conversation: left out of the reply (as if we had echoed the remote's own
            # hash and count). Our own hash would make it answer with headers again, and two such ranges
            # could keep a conversation going forever.
            return False
        builder.push_new_range(lower)
        for op, op_details in zip(local_ops, details, strict=True):
            builder.push_operation(op, op_details)
        builder.set_last_range_upper(upper)
        return True

    def _store_received(
        self, from_node_id: str, request: chain_pb2.PendingSyncRequest
    ) -> tuple[set[int], list[SignedOp]]:
        """Checks the full operations of a request and stores the acceptable new ones in one durable batch.
        Returns the ids of the valid operations received and the operations that were new."""
        parsed: list[SignedOp] = []
        for sync_range in request.ranges:
            for signed in sync_range.operations:
                op = self._parse(from_node_id, signed)
                if op is not None:
                    parsed.append(op)
        valid: dict[int, SignedOp] = {}
        for op, verified in zip(parsed, self._checker.verify_many(parsed), strict=True):
            if verified:
                valid.setdefault(op.operation_id, op)
            else:
                self._drop(from_node_id, f"operation {op.operation_id} of {op.node_id} has an invalid signature")
        cleanup_height = self._meta.get_int(META_CLEANUP_HEIGHT)
        to_store: list[SignedOp] = []
        for op in valid.values():
            existing = self._pending.get(op.operation_id)
            if existing is not None:
                if existing.op.hash != op.hash:
                    log.warning("operation %d from %s conflicts with ours: kept ours", op.operation_id, from_node_id)
                continue  # rewriting it could reset its local commit status
            if cleanup_height is not None and self._was_cleaned_up(op, cleanup_height):
                continue
            to_store.append(op)
        if not to_store:
            return set(valid), []
        existed = self._pending.put(to_store)
        new_ops = [op for op, was_there in zip(to_store, existed, strict=True) if not was_there]
        self._operations_stored += len(new_ops)
        return set(valid), new_ops

    def _parse(self, from_node_id: str, signed: chain_pb2.SignedOperation) -> SignedOp | None:
        """The operation if it parses and its author is a cell member (its signature is checked next)."""
        try:
            op = SignedOp.from_proto(signed, signed.SerializeToString())
        except InvalidOperation as exc:
            self._drop(from_node_id, str(exc))
            return None
        if self._cell.member_key(op.node_id) is None:
            self._drop(from_node_id, f"operation {op.operation_id} is from {op.node_id}, not a cell member")
            return None
        return op

    def _drop(self, from_node_id: str, reason: str) -> None:
        log.warning("pending sync: dropped an operation sent by %s: %s", from_node_id, reason)
        self._operations_dropped += 1

    def _was_cleaned_up(self, op: SignedOp, cleanup_height: int) -> bool:
        """In our chain at or below the last cleanup height: it was deleted from the pending store on
        purpose. Its group id finds the block for entries, proposals and their signatures/refusals."""
        offset = self._chain.block_offset_of_operation(op.group_id)
        if offset is None:
            return False
        header = self._chain.get_header(offset)
        return header is not None and header.height <= cleanup_height


@dataclass(slots=True)
class _RecentReplies:
    since_ns: int
    digests: set[int] = field(default_factory=set)


class _HeldIds:
    """`id in held` asks the pending store, only for the few ids a diff needs."""

    def __init__(self, pending: PendingStore) -> None:
        self._pending = pending

    def __contains__(self, operation_id: object) -> bool:
        return isinstance(operation_id, int) and self._pending.get(operation_id) is not None


def _chunks_by_size(ops: Sequence[SignedOp], bytes_max: int) -> Iterator[Sequence[SignedOp]]:
    """`ops` in consecutive chunks of at most `bytes_max` bytes each (one operation at least)."""
    start = size = 0
    for index, op in enumerate(ops):
        op_size = op.encoded_size_max
        if index > start and size + op_size > bytes_max:
            yield ops[start:index]
            start, size = index, 0
        size += op_size
    yield ops[start:]


def _peer_message(request: chain_pb2.PendingSyncRequest) -> chain_pb2.PeerMessage:
    return chain_pb2.PeerMessage(pending_sync=request)


def _invalid_ranges_reason(request: chain_pb2.PendingSyncRequest) -> str | None:
    for index, sync_range in enumerate(request.ranges):
        if sync_range.to_operation != 0 and sync_range.to_operation < sync_range.from_operation:
            return f"range {index} ends at {sync_range.to_operation} before it starts at {sync_range.from_operation}"
    return None


__all__ = [
    "PUSH_BYTES_MAX",
    "REPLIES_WITHOUT_PROGRESS_MAX",
    "REPLY_FULL_BYTES_MAX",
    "UNBOUNDED",
    "OperationDetails",
    "PendingSyncStatistics",
    "PendingSynchronizer",
    "SyncBound",
    "SyncRangesBuilder",
    "passes_height_filter",
    "plan_differing_range",
    "store_range_arguments",
]
