"""What the replication core needs from storage. Two implementations honour it: in memory (the
simulator, which keeps it across simulated crashes) and LevelDB (the service)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from exochain.model import BlockHeaderView, BlockView, SignedOp
from exocommon.errors import FailedPrecondition


class InvalidNextBlock(FailedPrecondition):
    """A block written at another offset than the chain's next offset."""

    def __init__(self, offset: int, expected_offset: int) -> None:
        super().__init__(f"block at offset {offset} does not follow the chain (next offset is {expected_offset})")
        self.offset = offset
        self.expected_offset = expected_offset


@dataclass(frozen=True, slots=True)
class CommitStatus:
    """Where a pending operation was committed locally (not replicated)."""

    block_offset: int
    block_height: int


@dataclass(frozen=True, slots=True)
class PendingEntry:
    op: SignedOp
    committed: CommitStatus | None = None


class ChainStore(Protocol):
    """The committed blocks, in offset order."""

    def last_block(self) -> BlockView | None: ...

    def get_block(self, offset: int) -> BlockView | None: ...

    def get_header(self, offset: int) -> BlockHeaderView | None:
        """Cheaper than get_block when only the header is needed."""
        ...

    def blocks_from(self, offset: int) -> Iterator[BlockView]:
        """Blocks with offset >= `offset`, in order."""
        ...

    def headers_from(self, offset: int) -> Iterator[BlockHeaderView]: ...

    def encoded_blocks_from(self, offset: int) -> Iterator[tuple[int, bytes]]:
        """(offset, serialised `Block`) of the blocks with offset >= `offset`, in order, without
        decoding them (what chain sync sends)."""
        ...

    def block_offset_of_operation(self, operation_id: int) -> int | None:
        """Offset of the block holding this entry, or proposed by this proposal id."""
        ...

    def next_offset(self) -> int:
        """Offset the next block must have (0 for an empty chain)."""
        ...

    def block_count(self) -> int: ...

    def write_block(self, block: BlockView) -> int:
        """Appends durably; raises InvalidNextBlock unless block.offset == next_offset().
        Returns the new next offset."""
        ...

    def truncate_from(self, offset: int) -> list[BlockView]:
        """Removes the block at `offset` and every later one (fork recovery); returns them, oldest first."""
        ...


class PendingStore(Protocol):
    """Operations not yet committed deep enough to be cleaned up; durable in the service."""

    def put(self, ops: Iterable[SignedOp]) -> list[bool]:
        """Inserts or replaces atomically and durably; per op, whether it was already there."""
        ...

    def get(self, operation_id: int) -> PendingEntry | None: ...

    def group(self, group_id: int) -> list[PendingEntry]:
        """Operations of a group (a proposal with its signatures and refusals), by id."""
        ...

    def range(self, after: int | None = None, up_to: int | None = None) -> Iterator[PendingEntry]:
        """Operations with after < id <= up_to (None = unbounded), in id order."""
        ...

    def count(self) -> int: ...

    def version(self) -> int:
        """Number of changes applied so far (each put, commit status change or delete of an operation)."""
        ...

    def changes_since(self, version: int) -> tuple[list[int], list[int]] | None:
        """The ids of the operations changed after `version` and (a parallel list) their group ids,
        oldest first (an id may repeat; `get` gives its current state); None when the store no longer
        knows (rescan it)."""
        ...

    def set_committed(self, operation_ids: Iterable[int], status: CommitStatus | None) -> None:
        """Local commit status of operations (None: back to uncommitted, after a truncation)."""
        ...

    def delete(self, operation_ids: Iterable[int]) -> None:
        """Deletes these operations; an id that is a group id with members deletes the whole group."""
        ...


class MetaStore(Protocol):
    """Small durable values of the node: sync state, last issued operation id."""

    def get_int(self, key: str) -> int | None: ...

    def set_int(self, key: str, value: int) -> None: ...
