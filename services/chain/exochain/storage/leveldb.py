"""Durable chain, pending and meta stores in one LevelDB database (one folder, one writer process).

Keys (integers are 8-byte big-endian, so key order is numeric order):

* ``b`` offset            -> encoded `Block` (header bytes, operations, signatures)
* ``h`` offset            -> the block's header bytes (header scans never decode operations)
* ``o`` operation id      -> offset of the block holding this entry, or proposed by this proposal id
* ``x`` ``chain``         -> last block offset, block count (written with every block change)
* ``p`` operation id      -> encoded `SignedOperation` of a pending operation
* ``c`` operation id      -> its local commit status: block offset, block height (absent: uncommitted)
* ``m`` key (utf-8)       -> decimal integer (`MetaStore`)

Every mutation is one write batch, synced to disk unless `sync_writes=False`: atomic, and durable
when the call returns (a SIGKILL right after loses nothing). With `sync_writes=False` (the service)
a write is in the OS when the call returns, which a killed process cannot lose, and `sync()` makes
every write so far durable on disk: the service calls it in a worker thread and answers appends and
sends messages only after it (group commit: one disk sync for all the writes of that moment).

The pending store is small (operations are cleaned up a few blocks after being committed) and read
a lot by pending sync, so it is mirrored in memory (loaded on open) and read from there, which also
gives its group index (rebuilt from the operations' group ids, so none is stored); the chain keeps
its last block and a few recent blocks decoded in memory.

Thread safety: mutations are serialized by one lock; reads may run concurrently with them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import plyvel
from plyvel._plyvel import WriteBatch

from exochain.model import BlockHeaderView, BlockView, InvalidBlock, InvalidOperation, SignedOp
from exochain.storage.base import CommitStatus, InvalidNextBlock, PendingEntry
from exochain.storage.memory import PendingIndex, block_indexed_operation_ids
from exocommon.errors import FailedPrecondition, Internal

log = logging.getLogger(__name__)

_BLOCK = b"b"
_HEADER = b"h"
_OP_INDEX = b"o"
_PENDING = b"p"
_COMMIT = b"c"
_META = b"m"
_CHAIN_STATE = b"xchain"

# LevelDB's memtable: writes are flushed to a table file once it holds this many bytes (two may be
# in memory at once, one being flushed).
WRITE_BUFFER_BYTES = 32 * 1024 * 1024

# inotify(7) events that change which files a folder holds.
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200

_U64 = struct.Struct(">Q")
_U64_PAIR = struct.Struct(">QQ")
_RECENT_BLOCKS = 64


class StorageInUse(FailedPrecondition):
    """The storage folder is held by another LevelDB opener (another process, or this one)."""


class StorageCorrupted(Internal):
    """Stored bytes that do not decode."""


def _key(prefix: bytes, value: int) -> bytes:
    return prefix + _U64.pack(value)


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class LevelDbStorage:
    """The chain service's storage: `.chain`, `.pending` and `.meta` over one LevelDB folder."""

    def __init__(self, path: Path | str, sync_writes: bool = True) -> None:
        self.path = Path(path)
        self.sync_writes = sync_writes
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot create chain storage folder {self.path}: {exc}") from exc
        try:
            self._db = plyvel.DB(
                str(self.path),
                create_if_missing=True,
                write_buffer_size=WRITE_BUFFER_BYTES,
                bloom_filter_bits=10,
                # What is stored is mostly hashes, signatures and entries sealed by the store: it does
                # not compress, and Snappy made compactions (a background thread) a quarter of a busy
                # node's CPU. Without it, and with a larger write buffer than LevelDB's default (fewer,
                # larger flushes, fewer compactions), about a third of that.
                compression=None,
            )
        except plyvel.IOError as exc:
            message = _error_text(exc)
            if "already held by process" in message:
                raise StorageInUse(f"chain storage at {self.path} is already open in this process") from exc
            if "IO error: lock " in message:
                raise StorageInUse(f"chain storage at {self.path} is in use by another process") from exc
            raise FailedPrecondition(f"cannot open chain storage at {self.path}: {message}") from exc
        except plyvel.Error as exc:
            raise StorageCorrupted(f"cannot open chain storage at {self.path}: {_error_text(exc)}") from exc
        self._lock = threading.RLock()
        # Durability bookkeeping of `sync()` (writes made / covered by a sync; first log to sync).
        self._writes = 0
        self._synced_writes = 0
        self._log_synced_from = 0
        self._sync_lock = threading.Lock()
        # The newest log, kept open, and a watch on the folder (see `sync`): None until a sync scans.
        self._log_fd: int | None = None
        self._folder_watch = _FolderWatch.open(self.path) if not sync_writes else None
        try:
            self.chain = LevelDbChainStore(self)
            self.pending = LevelDbPendingStore(self)
            self.meta = LevelDbMetaStore(self)
        except BaseException:
            self._db.close()
            raise
        log.info(
            "opened chain storage at %s: %d block(s), next offset %d, %d pending operation(s)",
            self.path,
            self.chain.block_count(),
            self.chain.next_offset(),
            self.pending.count(),
        )

    @property
    def closed(self) -> bool:
        return bool(self._db.closed)

    def close(self) -> None:
        with self._lock:
            if not self._db.closed:
                self._db.close()
        with self._sync_lock:
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
            if self._folder_watch is not None:
                self._folder_watch.close()
                self._folder_watch = None

    def __enter__(self) -> LevelDbStorage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _batch(self) -> WriteBatch:
        # transaction=False with an explicit write(): nothing reaches the DB unless _write() is called.
        return self._db.write_batch(sync=self.sync_writes)

    def _write(self, batch: WriteBatch) -> None:
        batch.write()
        self._writes += 1

    # -- durability ---------------------------------------------------------------------------

    def has_unsynced_writes(self) -> bool:
        """Whether a write returned since the last `sync()` without being durable yet."""
        return not self.sync_writes and self._writes != self._synced_writes

    def sync(self) -> None:
        """Makes every write that returned before this call durable (a no-op with `sync_writes`).

        For group commit: the writes themselves only reach the OS (which is enough to survive the
        process being killed), and one `sync()` then covers all of them, from any thread, without
        entering LevelDB's write path. A LevelDB write with sync=true would queue behind (and hold up)
        the writers: this syncs LevelDB's write-ahead log files instead (each write is in the newest
        log when it returns; an older log, still unsynced after a memtable switch, is synced too until
        LevelDB has compacted it into a table file, which it syncs itself, and deleted it).

        The newest log stays open, and while an inotify watch says no file came or went in the folder
        since the last scan it is the only one to sync: one fdatasync, no listing, no open (a
        tenth to a fifth of an idle node's append)."""
        if self.sync_writes:
            return
        target = self._writes
        if target == self._synced_writes:
            return
        with self._sync_lock:
            watch = self._folder_watch
            # Drained before the listing, so that a file created after it shows at the next sync.
            if self._log_fd is not None and watch is not None and not watch.changed():
                os.fdatasync(self._log_fd)
            else:
                self._scan_and_sync()
            self._synced_writes = max(self._synced_writes, target)

    def _scan_and_sync(self) -> None:
        """Syncs every log not synced since it was last written, found by listing the folder; keeps
        the newest open for the next syncs."""
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        # os.listdir, not Path.glob: this runs for every group of appends without a watch.
        names = os.listdir(self.path)
        numbers = sorted(int(name[:-4]) for name in names if name.endswith(".log") and name[:-4].isdigit())
        fresh = [n for n in numbers if n >= self._log_synced_from]
        if not fresh:
            # Not the layout expected: let LevelDB sync its log (slower, but always right).
            self._db.write_batch(sync=True).write()
            return
        if fresh[-1] != self._log_synced_from:
            _fsync_path(self.path)  # a new log file: its directory entry must be durable too
        for number in fresh[:-1]:
            _fsync_path(self.path / f"{number:06d}.log", missing_ok=True, data_only=True)
        try:
            fd = os.open(self.path / f"{fresh[-1]:06d}.log", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Gone since the listing: LevelDB switched logs meanwhile (and compacted this one).
            self._db.write_batch(sync=True).write()
            return
        os.fdatasync(fd)
        self._log_fd = fd
        self._log_synced_from = fresh[-1]


class _FolderWatch:
    """An inotify watch on a folder: whether a file came or went since the last call (Linux only)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def open(cls, path: Path) -> _FolderWatch | None:
        """None where inotify is not available (every sync then lists the folder)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add_watch = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return None
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return None
        mask = _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO
        if add_watch(fd, os.fsencode(path), mask) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def changed(self) -> bool:
        """True if any event (or a queue overflow, which is one too) came since the last call."""
        changed = False
        while True:
            try:
                if not os.read(self._fd, 65536):
                    return changed
            except BlockingIOError:
                return changed
            changed = True

    def close(self) -> None:
        os.close(self._fd)


def _fsync_path(path: Path, missing_ok: bool = False, data_only: bool = False) -> None:
    """fsync (or fdatasync, as LevelDB does for its logs: the data and the size, not the times)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if missing_ok:
            return  # a log LevelDB compacted and deleted meanwhile: its content is in a synced table
        raise
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def _error_text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


class LevelDbChainStore:
    """`ChainStore` over the shared database; see the module docstring for the keys."""

    def __init__(self, storage: LevelDbStorage) -> None:
        self._storage = storage
        self._db = storage._db
        self._lock = storage._lock
        # Recently written or read blocks (subscribers read each new block right after it is written).
        self._recent: OrderedDict[int, BlockView] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._last: BlockView | None = None
        self._count = 0
        self._load()

    def _load(self) -> None:
        last_offset = self._last_offset_on_disk()
        state = self._db.get(_CHAIN_STATE)
        if last_offset is None:
            if state is not None:
                log.warning("chain storage at %s: chain state without blocks; ignoring it", self._storage.path)
            return
        if state is not None and _U64_PAIR.unpack(state)[0] == last_offset:
            self._count = _U64_PAIR.unpack(state)[1]
        else:
            # Cannot happen with atomic batches; recount rather than trust a stale count.
            log.warning("chain storage at %s: chain state out of date; recounting blocks", self._storage.path)
            self._count = sum(1 for _ in self._db.iterator(prefix=_BLOCK, include_value=False))
        self._last = self._read_block(last_offset)

    def _last_offset_on_disk(self, before: int | None = None) -> int | None:
        stop = _key(_BLOCK, before) if before is not None else _prefix_end(_BLOCK)
        with self._db.iterator(start=_BLOCK, stop=stop, reverse=True, include_value=False) as it:
            for key in it:
                return _U64.unpack_from(key, 1)[0]
        return None

    def _read_block(self, offset: int) -> BlockView | None:
        block = self._recent.get(offset)
        if block is not None:
            return block
        data = self._db.get(_key(_BLOCK, offset))
        if data is None:
            return None
        block = _decode_block(data, offset)
        self._remember(block)
        return block

    def _remember(self, block: BlockView) -> None:
        with self._recent_lock:
            recent = self._recent
            recent[block.offset] = block
            if len(recent) > _RECENT_BLOCKS:
                recent.popitem(last=False)

    # -- reads --------------------------------------------------------------------------------

    def last_block(self) -> BlockView | None:
        return self._last

    def get_block(self, offset: int) -> BlockView | None:
        last = self._last
        if last is not None and last.offset == offset:
            return last
        return self._read_block(offset)

    def get_header(self, offset: int) -> BlockHeaderView | None:
        block = self._recent.get(offset)
        if block is not None:
            return block.head
        data = self._db.get(_key(_HEADER, offset))
        return _decode_header(data, offset) if data is not None else None

    def blocks_from(self, offset: int) -> Iterator[BlockView]:
        recent = self._recent
        with self._db.iterator(start=_key(_BLOCK, offset), stop=_prefix_end(_BLOCK)) as it:
            for key, data in it:
                block_offset = _U64.unpack_from(key, 1)[0]
                block = recent.get(block_offset)
                yield block if block is not None else _decode_block(data, block_offset)

    def encoded_blocks_from(self, offset: int) -> Iterator[tuple[int, bytes]]:
        with self._db.iterator(start=_key(_BLOCK, offset), stop=_prefix_end(_BLOCK)) as it:
            for key, data in it:
                yield _U64.unpack_from(key, 1)[0], data

    def headers_from(self, offset: int) -> Iterator[BlockHeaderView]:
        with self._db.iterator(start=_key(_HEADER, offset), stop=_prefix_end(_HEADER)) as it:
            for key, data in it:
                yield _decode_header(data, _U64.unpack_from(key, 1)[0])

    def block_offset_of_operation(self, operation_id: int) -> int | None:
        data = self._db.get(_key(_OP_INDEX, operation_id))
        return _U64.unpack(data)[0] if data is not None else None

    def next_offset(self) -> int:
        last = self._last
        return last.next_offset if last is not None else 0

    def block_count(self) -> int:
        return self._count

    # -- writes -------------------------------------------------------------------------------

    def write_block(self, block: BlockView) -> int:
        with self._lock:
            expected = self.next_offset()
            if block.offset != expected:
                raise InvalidNextBlock(block.offset, expected)
            offset_bytes = _U64.pack(block.offset)
            batch = self._storage._batch()
            batch.put(_BLOCK + offset_bytes, block.encode())
            batch.put(_HEADER + offset_bytes, block.head.header_bytes)
            for operation_id in block_indexed_operation_ids(block):
                batch.put(_key(_OP_INDEX, operation_id), offset_bytes)
            batch.put(_CHAIN_STATE, _U64_PAIR.pack(block.offset, self._count + 1))
            self._storage._write(batch)
            self._last = block
            self._count += 1
            self._remember(block)
            return block.next_offset

    def truncate_from(self, offset: int) -> list[BlockView]:
        with self._lock:
            removed: list[BlockView] = []
            batch = self._storage._batch()
            with self._db.iterator(start=_key(_BLOCK, offset), stop=_prefix_end(_BLOCK)) as it:
                for key, data in it:
                    block_offset = _U64.unpack_from(key, 1)[0]
                    block = self._recent.get(block_offset) or _decode_block(data, block_offset)
                    removed.append(block)
                    batch.delete(key)
                    batch.delete(_key(_HEADER, block_offset))
                    for operation_id in block_indexed_operation_ids(block):
                        batch.delete(_key(_OP_INDEX, operation_id))
            if not removed:
                return []
            new_last_offset = self._last_offset_on_disk(before=removed[0].offset)
            count = self._count - len(removed)
            if new_last_offset is None:
                batch.delete(_CHAIN_STATE)
            else:
                batch.put(_CHAIN_STATE, _U64_PAIR.pack(new_last_offset, count))
            self._storage._write(batch)
            with self._recent_lock:
                for block in removed:
                    self._recent.pop(block.offset, None)
            self._count = count
            self._last = self._read_block(new_last_offset) if new_last_offset is not None else None
            log.info("chain storage: removed %d block(s) from offset %d", len(removed), removed[0].offset)
            return removed


def _decode_block(data: bytes, offset: int) -> BlockView:
    try:
        return BlockView.decode(data)
    except (InvalidBlock, InvalidOperation) as exc:
        raise StorageCorrupted(f"stored block at offset {offset} does not decode: {exc}") from exc


def _decode_header(data: bytes, offset: int) -> BlockHeaderView:
    try:
        return BlockHeaderView.parse(data)
    except InvalidBlock as exc:
        raise StorageCorrupted(f"stored block header at offset {offset} does not decode: {exc}") from exc


def _same_signed_op(a: SignedOp, b: SignedOp) -> bool:
    return (
        a.hash == b.hash
        and a.signature == b.signature
        and a.batch_index == b.batch_index
        and a.batch_size == b.batch_size
        and a.batch_proof == b.batch_proof
    )


class LevelDbPendingStore:
    """`PendingStore` written durably to the database and mirrored in memory for reads."""

    def __init__(self, storage: LevelDbStorage) -> None:
        self._storage = storage
        self._db = storage._db
        self._lock = storage._lock
        self._index = PendingIndex()
        self._load()

    def _load(self) -> None:
        statuses: dict[int, CommitStatus] = {}
        for key, data in self._db.iterator(prefix=_COMMIT):
            statuses[_U64.unpack_from(key, 1)[0]] = CommitStatus(*_U64_PAIR.unpack(data))
        entries: dict[int, PendingEntry] = {}
        for key, data in self._db.iterator(prefix=_PENDING):
            operation_id = _U64.unpack_from(key, 1)[0]
            try:
                op = SignedOp.decode(data)
            except InvalidOperation as exc:
                raise StorageCorrupted(f"stored pending operation {operation_id} does not decode: {exc}") from exc
            entries[operation_id] = PendingEntry(op, statuses.get(operation_id))
        self._index.apply_put(entries)

    # -- reads (from the mirror) --------------------------------------------------------------

    def get(self, operation_id: int) -> PendingEntry | None:
        return self._index.get(operation_id)

    def group(self, group_id: int) -> list[PendingEntry]:
        return self._index.group(group_id)

    def range(self, after: int | None = None, up_to: int | None = None) -> Iterator[PendingEntry]:
        return self._index.range(after, up_to)

    def count(self) -> int:
        return self._index.count()

    def version(self) -> int:
        return self._index.version()

    def changes_since(self, version: int) -> tuple[list[int], list[int]] | None:
        return self._index.changes_since(version)

    # -- writes -------------------------------------------------------------------------------

    def put(self, ops: Iterable[SignedOp]) -> list[bool]:
        with self._lock:
            plan = self._index.plan_put(ops)
            if not plan.entries:
                return plan.existed
            batch = self._storage._batch()
            index = self._index
            writes = 0
            for operation_id, entry in plan.entries.items():
                id_bytes = _U64.pack(operation_id)
                previous = index.get(operation_id)
                if previous is not None and _same_signed_op(previous.op, entry.op):
                    continue  # the stored bytes (and commit status) would not change
                batch.put(_PENDING + id_bytes, entry.op.encode())
                writes += 1
                if previous is not None and previous.committed is not None and entry.committed is None:
                    batch.delete(_COMMIT + id_bytes)
            if writes:
                self._storage._write(batch)
            index.apply_put(plan.entries)
            return plan.existed

    def set_committed(self, operation_ids: Iterable[int], status: CommitStatus | None) -> None:
        with self._lock:
            changed = self._index.plan_set_committed(operation_ids, status)
            if not changed:
                return
            batch = self._storage._batch()
            if status is None:
                for operation_id in changed:
                    batch.delete(_key(_COMMIT, operation_id))
            else:
                value = _U64_PAIR.pack(status.block_offset, status.block_height)
                for operation_id in changed:
                    batch.put(_key(_COMMIT, operation_id), value)
            self._storage._write(batch)
            self._index.apply_put(changed)

    def delete(self, operation_ids: Iterable[int]) -> None:
        with self._lock:
            doomed = self._index.plan_delete(operation_ids)
            if not doomed:
                return
            batch = self._storage._batch()
            for entry in doomed:
                operation_id = entry.op.operation_id
                id_bytes = _U64.pack(operation_id)
                batch.delete(_PENDING + id_bytes)
                if entry.committed is not None:
                    batch.delete(_COMMIT + id_bytes)
            self._storage._write(batch)
            self._index.apply_delete(doomed)


class LevelDbMetaStore:
    """`MetaStore` over the shared database (``m`` + key -> decimal integer)."""

    def __init__(self, storage: LevelDbStorage) -> None:
        self._storage = storage
        self._db = storage._db
        self._lock = storage._lock

    def get_int(self, key: str) -> int | None:
        data = self._db.get(_META + key.encode())
        return int(data) if data is not None else None

    def set_int(self, key: str, value: int) -> None:
        with self._lock:
            batch = self._storage._batch()
            batch.put(_META + key.encode(), str(int(value)).encode())
            self._storage._write(batch)


__all__ = [
    "LevelDbChainStore",
    "LevelDbMetaStore",
    "LevelDbPendingStore",
    "LevelDbStorage",
    "StorageCorrupted",
    "StorageInUse",
]
