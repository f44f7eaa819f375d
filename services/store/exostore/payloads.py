"""The store's local LevelDB: decrypted mutation payloads by operation id, and the indexing progress.

Queries load trait payloads from here, never from the chain (ARCHITECTURE "data path of a query").
Everything in it is derived from the chain: a wiped folder is rebuilt by replaying the chain.

Keys (integers 8-byte big-endian, so key order is numeric order):

* ``p`` operation id -> the serialized `EntityMutation` of that chain entry (decrypted);
* ``mprogress``      -> the progress record (JSON, see `Progress`);
* ``mbarrier``       -> written with ``sync=True`` to flush every earlier unsynced write to disk.

Durability: payloads of pending operations are written without fsync (the pending index lives in RAM
and is rebuilt on restart anyway); before the chain index commits documents that refer to payloads,
`sync()` flushes them, and the progress that says those blocks are indexed is written (synced) after
the chain index commit. A crash anywhere in between replays those blocks, and re-indexing a block is
idempotent (see `entity_index`).

Thread safety: plyvel's DB is safe to use from several threads.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import plyvel
from google.protobuf.message import DecodeError

from exocommon.errors import FailedPrecondition, Internal
from exocore.store import mutation_pb2

log = logging.getLogger(__name__)

_PAYLOAD = b"p"
_PROGRESS = b"mprogress"
_BARRIER = b"mbarrier"
_U64 = struct.Struct(">Q")


class PayloadStoreInUse(FailedPrecondition):
    """Another process (or another opener in this one) holds the LevelDB folder."""


@dataclass(frozen=True, slots=True)
class BlockRef:
    """A block the store has seen: where it is, and its hash (to notice that the chain changed)."""

    offset: int
    height: int
    hash: str  # hex of the block header's multihash


@dataclass(frozen=True, slots=True)
class Progress:
    """What the store has indexed, so that a restart resumes instead of starting over.

    * `index_id`: identifies the on-disk chain index these records describe (a chain index folder
      with another id, or none, means the records are stale: full re-index);
    * `chain_indexed`: the last block whose operations are in the chain index (None: none yet);
    * `last_block` / `last_pending_operation_id`: the newest block and pending operation received
      (diagnostics; the pending index is in RAM and is rebuilt from `chain_indexed` on restart).
    """

    index_id: str = ""
    chain_indexed: BlockRef | None = None
    last_block: BlockRef | None = None
    last_pending_operation_id: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Progress:
        raw = json.loads(data)

        def ref(value: dict[str, object] | None) -> BlockRef | None:
            if value is None:
                return None
            return BlockRef(int(value["offset"]), int(value["height"]), str(value["hash"]))  # type: ignore[call-overload]

        return cls(
            index_id=str(raw.get("index_id", "")),
            chain_indexed=ref(raw.get("chain_indexed")),
            last_block=ref(raw.get("last_block")),
            last_pending_operation_id=int(raw.get("last_pending_operation_id", 0)),
        )


def _key(operation_id: int) -> bytes:
    return _PAYLOAD + _U64.pack(operation_id)


def _error_text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


class PayloadStore:
    """Decrypted mutations by operation id, plus the `Progress` record (see module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot create payload storage folder {self.path}: {exc}") from exc
        try:
            self._db = plyvel.DB(
                str(self.path),
                create_if_missing=True,
                bloom_filter_bits=10,
                # Snappy compressing every payload in compactions (a background thread) was ~9% of the
                # store's CPU under a burst of writes (bench-store, 100,000 notes: ~1.2 s) for ~30% less
                # disk (49 -> 69 MB). Tables written compressed before stay readable.
                compression=None,
            )
        except plyvel.IOError as exc:  # (an OSError too)
            message = _error_text(exc)
            if "already held by process" in message or "IO error: lock " in message:
                raise PayloadStoreInUse(f"store payloads at {self.path} are in use by another process") from exc
            raise FailedPrecondition(f"cannot open store payloads at {self.path}: {message}") from exc
        except plyvel.Error as exc:
            raise Internal(f"cannot open store payloads at {self.path}: {_error_text(exc)}") from exc

    # -- payloads -------------------------------------------------------------------------------

    def get(self, operation_id: int) -> bytes | None:
        return self._db.get(_key(operation_id))

    def get_mutation(self, operation_id: int) -> mutation_pb2.EntityMutation | None:
        """The stored mutation of an operation; None if absent (or, logged, if it does not parse)."""
        data = self.get(operation_id)
        if data is None:
            return None
        try:
            return mutation_pb2.EntityMutation.FromString(data)
        except DecodeError:
            log.error("stored payload of operation %d does not parse; ignoring it", operation_id)
            return None

    def contains(self, operation_id: int) -> bool:
        return self._db.get(_key(operation_id)) is not None

    def put_many(self, items: Iterable[tuple[int, bytes]], sync: bool = False) -> None:
        with self._db.write_batch(sync=sync) as batch:
            for operation_id, data in items:
                batch.put(_key(operation_id), data)

    def delete_many(self, operation_ids: Iterable[int], sync: bool = False) -> None:
        with self._db.write_batch(sync=sync) as batch:
            for operation_id in operation_ids:
                batch.delete(_key(operation_id))

    def operation_ids(self) -> list[int]:
        """Every stored operation id, ascending (tests and tools)."""
        return [
            _U64.unpack(key[1:])[0] for key in self._db.iterator(prefix=_PAYLOAD, include_value=False)
        ]

    def sync(self) -> None:
        """Makes every earlier write durable (one synced write flushes the log)."""
        self._db.put(_BARRIER, b"", sync=True)

    # -- progress -------------------------------------------------------------------------------

    def progress(self) -> Progress:
        data = self._db.get(_PROGRESS)
        if data is None:
            return Progress()
        try:
            return Progress.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("stored indexing progress is unreadable (%s); starting over", exc)
            return Progress()

    def save_progress(self, progress: Progress, sync: bool = True) -> None:
        self._db.put(_PROGRESS, progress.to_json(), sync=sync)

    # -- lifecycle ------------------------------------------------------------------------------

    def clear(self) -> None:
        """Removes every payload and the progress (a full re-index follows)."""
        with self._db.write_batch(sync=True) as batch:
            for key in self._db.iterator(include_value=False):
                batch.delete(key)

    @property
    def closed(self) -> bool:
        return bool(self._db.closed)

    def close(self) -> None:
        if not self._db.closed:
            self._db.close()


__all__ = ["BlockRef", "PayloadStore", "PayloadStoreInUse", "Progress"]
