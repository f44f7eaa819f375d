"""In-memory chain, pending and meta stores.

Used by the deterministic simulator, which keeps these objects across simulated crashes: they must
behave exactly as the durable LevelDB stores do. The pending store's state and rules live in
`PendingIndex`, which the LevelDB pending store also uses as its in-memory mirror, so both apply
the same rules by construction.

Iterators work on a snapshot of the blocks / ids (`range`: taken when called; `blocks_from`,
`headers_from`: when first advanced): mutating the store while iterating never raises, and pending
operations deleted meanwhile are left out.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from exochain.model import BlockHeaderView, BlockView, SignedOp
from exochain.storage.base import CommitStatus, InvalidNextBlock, PendingEntry

# Above this many deletions at once, the sorted id list is rebuilt instead of edited in place.
_BULK_DELETE = 32

# Changes the pending store's journal keeps at least (`PendingIndex.changes_since`); a consumer that
# falls further behind rescans the store instead.
JOURNAL_LEN_MIN = 1 << 16


def block_indexed_operation_ids(block: BlockView) -> list[int]:
    """Operation ids the chain's operation index maps to `block`: its entries and its proposal id."""
    ids = [op.operation_id for op in block.operations]
    if block.header.proposed_operation_id:
        ids.append(block.header.proposed_operation_id)
    return ids


class MemoryChainStore:
    """Blocks in a list ordered by offset, with an operation id -> block offset index."""

    def __init__(self) -> None:
        self._blocks: list[BlockView] = []
        self._offsets: list[int] = []
        self._operation_index: dict[int, int] = {}

    def last_block(self) -> BlockView | None:
        return self._blocks[-1] if self._blocks else None

    def get_block(self, offset: int) -> BlockView | None:
        i = bisect.bisect_left(self._offsets, offset)
        if i < len(self._offsets) and self._offsets[i] == offset:
            return self._blocks[i]
        return None

    def get_header(self, offset: int) -> BlockHeaderView | None:
        block = self.get_block(offset)
        return block.head if block is not None else None

    def blocks_from(self, offset: int) -> Iterator[BlockView]:
        yield from self._blocks[bisect.bisect_left(self._offsets, offset) :]

    def headers_from(self, offset: int) -> Iterator[BlockHeaderView]:
        for block in self._blocks[bisect.bisect_left(self._offsets, offset) :]:
            yield block.head

    def encoded_blocks_from(self, offset: int) -> Iterator[tuple[int, bytes]]:
        for block in self._blocks[bisect.bisect_left(self._offsets, offset) :]:
            yield block.offset, block.encode()

    def block_offset_of_operation(self, operation_id: int) -> int | None:
        return self._operation_index.get(operation_id)

    def next_offset(self) -> int:
        return self._blocks[-1].next_offset if self._blocks else 0

    def block_count(self) -> int:
        return len(self._blocks)

    def write_block(self, block: BlockView) -> int:
        expected = self.next_offset()
        if block.offset != expected:
            raise InvalidNextBlock(block.offset, expected)
        self._blocks.append(block)
        self._offsets.append(block.offset)
        offset = block.offset
        for operation_id in block_indexed_operation_ids(block):
            self._operation_index[operation_id] = offset
        return block.next_offset

    def truncate_from(self, offset: int) -> list[BlockView]:
        i = bisect.bisect_left(self._offsets, offset)
        removed = self._blocks[i:]
        del self._blocks[i:]
        del self._offsets[i:]
        for block in removed:
            for operation_id in block_indexed_operation_ids(block):
                self._operation_index.pop(operation_id, None)
        return removed


@dataclass(frozen=True, slots=True)
class PutPlan:
    """What a `put` changes: per op whether it existed, and the final entry of each id written."""

    existed: list[bool]
    entries: dict[int, PendingEntry]


class PendingIndex:
    """Pending operations by id (dict + sorted id list) with a group id -> op ids index.

    Reads, plus the two-step mutations shared with the durable store: `plan_*` computes what a
    mutation changes without changing anything, `apply_*` applies it (after the durable store has
    persisted it).

    Every applied change (insert, replace, commit status, delete) is also appended to a journal of
    `(operation id, group id)`, numbered by `version()`: a consumer that derives state from the store
    (the commit manager's index) reads `changes_since(its version)` instead of rescanning the store.
    The journal keeps at least the last `JOURNAL_LEN_MIN` changes; an older version gets None (rescan)."""

    def __init__(self) -> None:
        self._entries: dict[int, PendingEntry] = {}
        self._ids: list[int] = []
        # Group id -> ids of the *other* operations of the group (signatures and refusals of a proposal).
        # An operation that is its own group (an entry, a proposal) is not indexed here: entries are
        # almost every operation, and a set each would cost memory and time for nothing.
        self._groups: dict[int, set[int]] = {}
        # Two parallel lists of ints (operation ids, group ids) rather than tuples: ints are not tracked
        # by the garbage collector, and this journal grows by several entries per operation.
        self._journal_ids: list[int] = []
        self._journal_groups: list[int] = []
        # Version of the change before the journal's first (it holds versions start+1 ... start+len).
        self._journal_start = 0

    # -- reads --------------------------------------------------------------------------------

    def get(self, operation_id: int) -> PendingEntry | None:
        return self._entries.get(operation_id)

    def group(self, group_id: int) -> list[PendingEntry]:
        entries = self._entries
        head = entries.get(group_id)
        heads = [head] if head is not None and head.op.group_id == group_id else []
        members = self._groups.get(group_id)
        if not members:
            return heads
        found = (entries.get(i) for i in sorted(members))
        others = [entry for entry in found if entry is not None]
        return sorted(heads + others, key=lambda entry: entry.op.operation_id) if heads else others

    def range(self, after: int | None = None, up_to: int | None = None) -> Iterator[PendingEntry]:
        """Operations with after < id <= up_to (None = unbounded), in id order."""
        ids = self._ids
        lo = 0 if after is None else bisect.bisect_right(ids, after)
        hi = len(ids) if up_to is None else bisect.bisect_right(ids, up_to)
        return self._iterate(ids[lo:hi] if hi > lo else [])

    def _iterate(self, ids: list[int]) -> Iterator[PendingEntry]:
        entries = self._entries
        for operation_id in ids:
            entry = entries.get(operation_id)
            if entry is not None:
                yield entry

    def count(self) -> int:
        return len(self._entries)

    def version(self) -> int:
        """Number of changes applied since the store was created (or opened)."""
        return self._journal_start + len(self._journal_ids)

    def changes_since(self, version: int) -> tuple[list[int], list[int]] | None:
        """The operation ids and (in a parallel list) group ids of every change after `version`,
        oldest first (an id may repeat; its current state is `get(id)`); None if the journal no longer
        goes back that far."""
        index = version - self._journal_start
        if index < 0 or index > len(self._journal_ids):
            return None
        return self._journal_ids[index:], self._journal_groups[index:]

    def _record(self, operation_id: int, group_id: int) -> None:
        self._journal_ids.append(operation_id)
        self._journal_groups.append(group_id)
        if len(self._journal_ids) >= 2 * JOURNAL_LEN_MIN:
            del self._journal_ids[:JOURNAL_LEN_MIN]
            del self._journal_groups[:JOURNAL_LEN_MIN]
            self._journal_start += JOURNAL_LEN_MIN

    # -- planning -----------------------------------------------------------------------------

    def plan_put(self, ops: Iterable[SignedOp]) -> PutPlan:
        """Insert-or-replace, applied in order. Re-putting an identical operation (same hash) keeps
        its local commit status; a different operation under the same id starts uncommitted."""
        existed: list[bool] = []
        planned: dict[int, PendingEntry] = {}
        entries = self._entries
        for op in ops:
            operation_id = op.operation_id
            previous = planned.get(operation_id) or entries.get(operation_id)
            if previous is None:
                existed.append(False)
                planned[operation_id] = PendingEntry(op)
            else:
                existed.append(True)
                same = previous.op.hash == op.hash
                planned[operation_id] = PendingEntry(op, previous.committed if same else None)
        return PutPlan(existed, planned)

    def plan_delete(self, operation_ids: Iterable[int]) -> list[PendingEntry]:
        """The entries `delete(operation_ids)` removes: a group id with members means the whole group."""
        doomed: dict[int, PendingEntry] = {}
        entries = self._entries
        for operation_id in operation_ids:
            entry = entries.get(operation_id)
            members = self._groups.get(operation_id)
            # The whole group if the id has members (the group's own operation is one if present).
            if entry is not None and (not members or entry.op.group_id == operation_id):
                doomed[operation_id] = entry
            for member in members or ():
                entry = entries.get(member)
                if entry is not None:
                    doomed[member] = entry
        return list(doomed.values())

    def plan_set_committed(self, operation_ids: Iterable[int], status: CommitStatus | None) -> dict[int, PendingEntry]:
        """New entries for the present operations whose status changes."""
        changed: dict[int, PendingEntry] = {}
        entries = self._entries
        for operation_id in operation_ids:
            entry = entries.get(operation_id)
            if entry is not None and entry.committed != status:
                changed[operation_id] = PendingEntry(entry.op, status)
        return changed

    # -- applying -----------------------------------------------------------------------------

    def apply_put(self, entries: Mapping[int, PendingEntry]) -> None:
        """Inserts or replaces these entries (also what `set_committed` applies)."""
        current = self._entries
        ids = self._ids
        groups = self._groups
        for operation_id, entry in entries.items():
            previous = current.get(operation_id)
            group_id = entry.op.group_id
            if previous is None:
                if not ids or operation_id > ids[-1]:
                    ids.append(operation_id)
                else:
                    bisect.insort(ids, operation_id)
            elif previous.op.group_id != group_id:
                self._ungroup(previous.op.group_id, operation_id)
            if group_id != operation_id:
                members = groups.get(group_id)
                if members is None:
                    groups[group_id] = {operation_id}
                else:
                    members.add(operation_id)
            current[operation_id] = entry
            self._record(operation_id, group_id)
            if previous is not None and previous.op.group_id != group_id:
                self._record(operation_id, previous.op.group_id)

    def apply_delete(self, entries: Iterable[PendingEntry]) -> None:
        removed: set[int] = set()
        current = self._entries
        for entry in entries:
            operation_id = entry.op.operation_id
            previous = current.pop(operation_id, None)
            if previous is not None:
                removed.add(operation_id)
                self._ungroup(previous.op.group_id, operation_id)
                self._record(operation_id, previous.op.group_id)
        if not removed:
            return
        ids = self._ids
        if len(removed) > _BULK_DELETE:
            self._ids = [i for i in ids if i not in removed]
        else:
            for operation_id in removed:
                del ids[bisect.bisect_left(ids, operation_id)]

    def _ungroup(self, group_id: int, operation_id: int) -> None:
        members = self._groups.get(group_id)
        if members is not None:
            members.discard(operation_id)
            if not members:
                del self._groups[group_id]


class MemoryPendingStore(PendingIndex):
    """The pending store, in memory only."""

    def put(self, ops: Iterable[SignedOp]) -> list[bool]:
        plan = self.plan_put(ops)
        self.apply_put(plan.entries)
        return plan.existed

    def set_committed(self, operation_ids: Iterable[int], status: CommitStatus | None) -> None:
        self.apply_put(self.plan_set_committed(operation_ids, status))

    def delete(self, operation_ids: Iterable[int]) -> None:
        self.apply_delete(self.plan_delete(operation_ids))


class MemoryMetaStore:
    def __init__(self) -> None:
        self._values: dict[str, int] = {}

    def get_int(self, key: str) -> int | None:
        return self._values.get(key)

    def set_int(self, key: str, value: int) -> None:
        self._values[key] = int(value)


__all__ = [
    "JOURNAL_LEN_MIN",
    "MemoryChainStore",
    "MemoryMetaStore",
    "MemoryPendingStore",
    "PendingIndex",
    "PutPlan",
    "block_indexed_operation_ids",
]
