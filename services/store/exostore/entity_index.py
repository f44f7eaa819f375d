"""The entity index (SPEC 3.3): the pending index in RAM, the chain index on disk, and the rules that
move the chain's operations into them, fed by the chain's `Subscribe` events.

Synchronous and single-writer: the tailer calls `start_replay`, `apply_events` and
`index_chain_blocks` from one thread (the store's indexing thread); searches (`search`,
`fetch_trait`) may run concurrently from other threads.

State
-----

* **Chain index** (`<store dir>/chain`, tantivy): operations of committed blocks at least
  `chain_index_min_depth` deep, with their block offset. `Progress.chain_indexed` (in the payload
  store) names the last block in it; the pair is tied by an index id written next to the folder
  (`chain.id`): a mismatch (either wiped, or a crash while resetting) means a full re-index.
* **Pending index** (RAM): every other operation the store has seen, pending or in a block newer
  than `chain_indexed`, always written without a block offset (SPEC 3.3).
* **Retained blocks**: the blocks newer than `chain_indexed` received so far (offset, height, hash,
  entry ids); the chain index takes them from here once deep enough.
* **Payloads** (`payloads.PayloadStore`): every decrypted mutation by operation id.

Lifecycle
---------

* `start_replay()` is called before every (re)subscription and returns the `SubscribeRequest`: from
  `chain_indexed` (or the genesis), every pending operation. It starts building a **new** pending
  index while the current one keeps answering queries; replayed blocks and pending operations go to
  the new one; `CaughtUp` swaps it in (SPEC "re-index pending", without a window where queries see a
  half-built index). This covers the first start, a restart (the pending index is rebuilt from the
  chain and the local payloads: nothing is decrypted twice), a `StreamDiscontinuity` and a chain
  service that restarted.
* Blocks: entries not yet in the pending index are added to it; the block is retained.
  A block at an offset already retained with another hash means the chain changed under us: the
  retained blocks from there on are forgotten (as a truncation).
* `ChainTruncated(from)`: retained blocks from `from` on are forgotten; their entries stay in the
  pending index (they are pending again, and the pending index has no block offsets, so nothing
  else changes). Entries of the chain index can only come from blocks at least `min_depth` deep, so
  a truncation reaching into them means a fork deeper than that: `FullReindexNeeded` is raised and
  the tailer calls `reset_chain_index()` then resubscribes from the genesis.
* `index_chain_blocks()` (SPEC "index new chain blocks"): with `H` the newest block's height and
  `h` the last chain-indexed block's, nothing happens while a block is indexed and
  `H - h < min_depth` or `H - h < leeway`; otherwise every retained block with `H - height >=
  min_depth` goes to the chain index (one commit) and its operations leave the pending index. It
  runs after every batch of events while replaying, and live unless deferred indexing is on; then
  the store's timer runs a round through `start_chain_indexing` (blocks chosen, documents built and
  payloads synced on the indexing thread, the chain-index commit on the committer thread, so that
  event batches keep the pending index going) and `finish_chain_indexing` (operations leave the
  pending index, progress saved). A batch holding anything but pending operations and newer blocks
  (a truncation, a block replacing a retained one, a replay's end) ends the round in flight first.
* `DeleteOperations` mutations: a pending-deletion marker in the pending index; in the chain index
  the listed operations' documents are removed (and their payloads dropped afterwards).

Crash safety: payloads are synced before a chain index commit, and the progress naming the newly
indexed blocks is synced after it. If the process dies between the commit and the progress write,
the chain index holds documents of blocks newer than `chain_indexed`; they are replayed, so
chain-indexing a block first removes any document of its operations (only for blocks up to the
highest block offset found in the index at open, so the normal path pays nothing).

Every batch returns an `IndexUpdate`: the operation ids that became searchable (mutation tracker),
the ids seen in blocks (`wait_committed`), and what changed (entity id and trait type per
operation), which the watched queries use to re-run only the watches a change can affect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from exochain.model import BlockHeaderView
from exocommon.config import EntityIndexSettings, atomic_write_text
from exocommon.errors import ExocoreError
from exocommon.sealed import SealedPayloadError, open_sealed
from exocore.chain.v1 import chain_pb2
from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exostore.aggregator import EntityAggregator
from exostore.mutation_index import DOCUMENT_CACHE_SIZE, DocumentCache, IndexSchemaMismatch, MutationIndex
from exostore.payloads import BlockRef, PayloadStore, Progress
from exostore.registry import TraitRegistry, type_name_from_url
from exostore.schema import IndexSchema
from exostore.searcher import PENDING_INDEX_BOOST, EntitySearcher
from exostore.types import DeleteOperationsOperation, IndexOperation, MutationMetadata, index_operations_for

if TYPE_CHECKING:
    import tantivy

log = logging.getLogger(__name__)

INDEX_ID_FILE = "chain.id"
# The trait mappings (per type fingerprints) the chain index was built with; see `_open_chain_index`.
MAPPINGS_FILE = "chain.mappings.json"
CHAIN_INDEX_DIR = "chain"
# A deferred chain-index round takes whole blocks up to about this many operations, and the next round
# follows at once: a round of a whole burst of writes (100,000 notes) held the indexing thread for seconds
# while it built the documents, and nothing new became searchable meanwhile.
CHAIN_ROUND_MAX_OPERATIONS = 20_000
# See `EntityIndex.remember_appended`. A burst's appends run ahead of the tail by tens of thousands of
# operations (with 20,000, 100,000 notes written without waiting were mostly decrypted and parsed again).
APPENDED_CACHE_SIZE = 60_000


class FullReindexNeeded(ExocoreError):
    """The chain index holds operations of blocks the chain no longer has: it must be rebuilt."""

    grpc_status = "INTERNAL"


# ---------------------------------------------------------------------------------------------
# Events (what the tailer feeds) and updates (what a batch did)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainEntry:
    operation_id: int
    data: bytes  # the sealed EntityMutation


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """A committed block: its entries, or (from `ChainLog.Subscribe`, see `events_from_proto`) its operations
    with the ids its header lists, parsed only where an index lacks them (`split`): most of a block's entries
    came as pending operations first, and parsing each one again cost the indexing thread 2.2 µs per mutation
    under a burst of writes (header and split: 0.4)."""

    ref: BlockRef
    entries: tuple[ChainEntry, ...] = ()
    operation_ids: tuple[int, ...] = ()  # the header's, in block order (with `operations`)
    operations: Sequence[chain_pb2.SignedOperation] = ()

    def split(self, known: Set[int], coming: Set[int] = frozenset()) -> tuple[tuple[int, ...], list[ChainEntry]]:
        """The operation ids of the block's entries (block order), and the entries of those neither in `known`
        nor in `coming` (operations of other kinds are left out). An id in either is taken from the header
        unparsed: it is an entry that was indexed, or that a pending event of the same batch brings."""
        if self.operations:
            ids = self.operation_ids
            found: list[int] = []
            new: list[ChainEntry] = []
            if len(ids) == len(self.operations):
                for operation_id, signed in zip(ids, self.operations, strict=True):
                    if operation_id in known or operation_id in coming:
                        found.append(operation_id)
                        continue
                    entry = _entry_of(signed)
                    if entry is None:
                        continue
                    if entry.operation_id != operation_id:
                        break  # header and operations disagree (a block the chain checked cannot): parse all
                    found.append(operation_id)
                    new.append(entry)
                else:
                    return tuple(found), new
            entries: Iterable[ChainEntry] = (e for e in map(_entry_of, self.operations) if e is not None)
        else:
            entries = self.entries
        found, new = [], []
        for entry in entries:
            found.append(entry.operation_id)
            if entry.operation_id not in known and entry.operation_id not in coming:
                new.append(entry)
        return tuple(found), new


@dataclass(frozen=True, slots=True)
class PendingEvent:
    entry: ChainEntry


@dataclass(frozen=True, slots=True)
class CaughtUpEvent:
    last_block_offset: int
    last_pending_operation_id: int


@dataclass(frozen=True, slots=True)
class TruncatedEvent:
    from_offset: int


IndexEvent = BlockEvent | PendingEvent | CaughtUpEvent | TruncatedEvent


def _entry_of(signed: chain_pb2.SignedOperation) -> ChainEntry | None:
    """The entry of a chain operation; None for other kinds. The chain node checked the operation (hash,
    signature, structure) before storing it: this only parses what the store needs (no hashing, no
    copies: a `SignedOp` costs several times more, per operation of every batch)."""
    try:
        operation = chain_pb2.Operation.FromString(signed.operation_bytes)
    except DecodeError as exc:
        log.warning("skipping an operation that does not parse: %s", exc)
        return None
    kind = operation.WhichOneof("kind")
    if kind != "entry":
        if kind is None or operation.operation_id == 0:
            log.warning("skipping an operation without kind or id (%d)", operation.operation_id)
        return None
    if operation.operation_id == 0 or not operation.node_id:
        log.warning("skipping an entry operation without id or node id")
        return None
    return ChainEntry(operation.operation_id, operation.entry.data)


def events_from_proto(events: Iterable[chain_pb2.ChainEvent]) -> list[IndexEvent]:
    """The index events of `ChainLog.Subscribe` events (discontinuities are the tailer's business)."""
    out: list[IndexEvent] = []
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "block":
            head = BlockHeaderView.parse(event.block.header_bytes)
            ref = BlockRef(head.offset, head.height, head.hash.hex())
            out.append(BlockEvent(ref, operation_ids=tuple(head.operation_ids), operations=event.block.operations))
        elif kind == "pending":
            entry = _entry_of(event.pending.operation)
            if entry is not None:
                out.append(PendingEvent(entry))
        elif kind == "pending_batch":
            for signed in event.pending_batch.operations:
                entry = _entry_of(signed)
                if entry is not None:
                    out.append(PendingEvent(entry))
        elif kind == "caught_up":
            out.append(CaughtUpEvent(event.caught_up.last_block_offset, event.caught_up.last_pending_operation_id))
        elif kind == "truncated":
            out.append(TruncatedEvent(event.truncated.from_offset))
    return out


@dataclass(frozen=True, slots=True)
class IndexChange:
    """One operation that entered or left an index: what watched queries route on."""

    operation_id: int
    entity_id: str
    trait_type: str | None  # the put trait's type; None for tombstones and deletions
    message: any_pb2.Any | None = field(default=None, compare=False, repr=False)  # the put trait's message


@dataclass(slots=True)
class IndexUpdate:
    indexed: list[int] = field(default_factory=list)  # searchable now (pending or chain index)
    committed: list[int] = field(default_factory=list)  # seen in a committed block
    changes: list[IndexChange] = field(default_factory=list)
    reset: bool = False  # the pending index was replaced: any watch may be affected
    caught_up: bool = False

    def merge(self, other: IndexUpdate) -> None:
        self.indexed.extend(other.indexed)
        self.committed.extend(other.committed)
        self.changes.extend(other.changes)
        self.reset = self.reset or other.reset
        self.caught_up = self.caught_up or other.caught_up

    @property
    def changed(self) -> bool:
        return self.reset or bool(self.changes)


def change_of(operation_id: int, mutation: mutation_pb2.EntityMutation) -> IndexChange:
    if mutation.WhichOneof("mutation") == "put_trait":
        message = mutation.put_trait.trait.message
        return IndexChange(operation_id, mutation.entity_id, type_name_from_url(message.type_url) or None, message)
    return IndexChange(operation_id, mutation.entity_id, None)


@dataclass(slots=True)
class _RetainedBlock:
    ref: BlockRef
    operation_ids: tuple[int, ...]


@dataclass(slots=True)
class _ChainRound:
    """One round of "index new chain blocks": what `_begin_chain_round` prepared on the indexing thread,
    committed to the chain index (`future`: on the chain committer thread), then ended by `_end_chain_round`."""

    blocks: list[_RetainedBlock]
    op_ids: list[int]
    indexed: list[int]  # operations with a mutation (the others did not decode)
    ops: list[IndexOperation]
    docs: list[tantivy.Document | None]
    changes: list[IndexChange]
    deleted_targets: list[int]
    future: Future[int] | None = None


def _touches(events: Sequence[IndexEvent], round_: _ChainRound) -> bool:
    """Whether `events` may change what the chain-indexing round in flight holds: anything but pending
    operations and blocks after its own (a truncation, a block replacing one of its own, a replay's end)."""
    last = round_.blocks[-1].ref.offset
    return any(
        not isinstance(e, PendingEvent) and not (isinstance(e, BlockEvent) and e.ref.offset > last) for e in events
    )


class _IndexRef:
    """What the searcher sees of an index: always the current one (indices get replaced)."""

    def __init__(self, get: Callable[[], MutationIndex]) -> None:
        self._get = get

    def search(self, query: query_pb2.EntityQuery, count: int, offset: int, *, with_total: bool = True) -> object:
        return self._get().search(query, count, offset, with_total=with_total)

    def fetch_entity_mutations(self, entity_id: str) -> list[MutationMetadata]:
        return self._get().fetch_entity_mutations(entity_id)

    def fetch_entities_mutations(self, entity_ids: Sequence[str]) -> dict[str, list[MutationMetadata]]:
        return self._get().fetch_entities_mutations(entity_ids)


# ---------------------------------------------------------------------------------------------
# The entity index
# ---------------------------------------------------------------------------------------------


class EntityIndex:
    """See the module docstring."""

    def __init__(
        self,
        store_dir: Path | str,
        registry: TraitRegistry,
        settings: EntityIndexSettings,
        payloads: PayloadStore,
        data_key: bytes,
        *,
        gc_flagger: Callable[[EntityAggregator], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        now_ns: Callable[[], int] = time.time_ns,
        pending_index_boost: float = PENDING_INDEX_BOOST,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.registry = registry
        self.settings = settings
        self.payloads = payloads
        self._key = data_key
        self._monotonic = monotonic
        self.schema = IndexSchema(registry)
        self._documents = DocumentCache()  # built for the pending index, reused by the chain index
        self._chain_path = self.store_dir / CHAIN_INDEX_DIR
        self._undecodable: set[int] = set()

        self.progress = payloads.progress()
        self._open_chain_index()
        self._dedup_upto = self._highest_chain_offset_beyond_progress()

        self.pending = self._new_pending_index()
        self._pending_ops: set[int] = set()
        # The pending index being built by a replay (None: writes go to `pending`).
        self._building: MutationIndex | None = None
        self._building_ops: set[int] = set()
        self._replay_update = IndexUpdate()
        self._retained: dict[int, _RetainedBlock] = {}
        self.caught_up = False
        self.replays = 0
        # Mutations decoded for the pending index, kept for the chain index (reading back and parsing each
        # payload again cost the indexing thread as much as building its document); bounded like `_documents`.
        self._parsed: OrderedDict[int, mutation_pb2.EntityMutation] = OrderedDict()
        # What this store appended itself (`remember_appended`, from the event loop): sealed entry ->
        # (payload, mutation). Its chain entries come back through the tail: no decryption, no parse.
        # Ordered: taking the oldest of a plain dict scans the holes the tail's removals left at its front
        # (measured: ~4 µs a mutation once a burst filled it).
        self._appended: OrderedDict[bytes, tuple[bytes, mutation_pb2.EntityMutation]] = OrderedDict()
        self._appended_lock = threading.Lock()
        # Deferred chain indexing commits on its own thread (`start_chain_indexing`): the round in flight, and
        # the update of a round ended by another call than `finish_chain_indexing` (reported by the next one).
        self._chain_round: _ChainRound | None = None
        self._committer: ThreadPoolExecutor | None = None
        self._carried = IndexUpdate()

        # Deferred chain indexing (SPEC 3.3): last non-programmatic query, last pending write applied, last
        # indexing attempt.
        self._last_user_query = float("-inf")
        self._last_write = float("-inf")
        self._last_deferred_attempt = monotonic()
        self._lock = threading.Lock()

        self.searcher = EntitySearcher(
            _IndexRef(lambda: self.chain),  # type: ignore[arg-type]
            _IndexRef(lambda: self.pending),  # type: ignore[arg-type]
            self.fetch_trait,
            gc_flagger=gc_flagger,
            pending_index_boost=pending_index_boost,
            now_ns=now_ns,
            descriptor_pool=registry.pool,
        )

    # -- opening and resetting ------------------------------------------------------------------

    def _new_pending_index(self) -> MutationIndex:
        s = self.settings.pending_index
        return MutationIndex(
            self.schema,
            None,
            heap_size=s.indexer_heap_size_bytes,
            num_threads=s.indexer_num_threads,
            entity_cache_size=s.entity_mutations_cache_size,
        )

    def _open_chain_index(self) -> None:
        """Opens the chain index, or starts it over (a full re-index from the chain) when it does not
        match the stored progress, or when a trait type it holds documents of is now mapped otherwise
        (`IndexSchema.type_fingerprints`)."""
        marker = self.store_dir / INDEX_ID_FILE
        on_disk = marker.read_text().strip() if marker.is_file() else ""
        current = self.schema.type_fingerprints()
        recorded = self._recorded_mappings()
        if not self.progress.index_id or on_disk != self.progress.index_id or not self._chain_path.is_dir():
            if self._chain_path.exists() or self.progress.chain_indexed is not None:
                log.warning(
                    "chain index at %s does not match the stored progress; rebuilding it from the chain",
                    self._chain_path,
                )
            self._wipe_chain_index_files()
            recorded = {}
        elif recorded is None:
            if self.progress.chain_indexed is not None:
                log.warning(
                    "the chain index at %s does not record the trait mappings it was built with; rebuilding it "
                    "from the chain",
                    self._chain_path,
                )
                self._wipe_chain_index_files()
            recorded = {}
        else:
            changed = sorted(name for name in recorded.keys() & current.keys() if recorded[name] != current[name])
            if changed:
                log.warning(
                    "the indexed fields of %s changed since the chain index at %s was built; rebuilding it from "
                    "the chain",
                    ", ".join(changed),
                    self._chain_path,
                )
                self._wipe_chain_index_files()
                recorded = {}
        # Types no longer registered keep their entry: if one comes back changed, its documents are stale.
        self._record_mappings({**recorded, **current})
        try:
            self.chain = self._new_chain_index()
        except IndexSchemaMismatch as exc:
            log.warning("%s; rebuilding it from the chain", exc)
            self._wipe_chain_index_files()
            self._record_mappings(current)
            self.chain = self._new_chain_index()

    def _new_chain_index(self) -> MutationIndex:
        s = self.settings.chain_index
        return MutationIndex(
            self.schema,
            self._chain_path,
            heap_size=s.indexer_heap_size_bytes,
            num_threads=s.indexer_num_threads,
            entity_cache_size=s.entity_mutations_cache_size,
        )

    def _wipe_chain_index_files(self) -> None:
        if self._chain_path.exists():
            shutil.rmtree(self._chain_path)
        index_id = uuid.uuid4().hex
        self.progress = Progress(index_id=index_id)
        # Progress first: a crash before the marker is written leaves a mismatch (wipe again).
        self.payloads.save_progress(self.progress)
        atomic_write_text(self.store_dir / INDEX_ID_FILE, index_id + "\n", secret=False)

    def _recorded_mappings(self) -> dict[str, str] | None:
        """The type fingerprints the chain index was built with (None: not recorded)."""
        path = self.store_dir / MAPPINGS_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else None

    def _record_mappings(self, fingerprints: dict[str, str]) -> None:
        text = json.dumps(fingerprints, sort_keys=True, indent=0)
        atomic_write_text(self.store_dir / MAPPINGS_FILE, text, secret=False)

    def _highest_chain_offset_beyond_progress(self) -> int | None:
        highest = self.chain.highest_indexed_block()
        indexed = self.progress.chain_indexed
        if highest is not None and (indexed is None or highest > indexed.offset):
            log.info("chain index has documents past its recorded progress (interrupted commit); re-indexing them")
            return highest
        return None

    def reset_chain_index(self) -> None:
        """Full re-index: empty chain index and progress (payloads are kept: they never change)."""
        with contextlib.suppress(Exception):  # its blocks are gone with the chain index
            self._settle_chain_round()
        self.chain.close()
        self._wipe_chain_index_files()
        self.chain = self._new_chain_index()
        self._dedup_upto = None
        self._retained.clear()

    def close(self) -> None:
        if self._chain_round is not None:
            try:
                self._settle_chain_round()
            except Exception:  # its blocks are indexed again after a restart
                log.exception("the chain-indexing round in flight failed")
        if self._committer is not None:
            self._committer.shutdown()
        self.chain.close()
        self.pending.close()
        if self._building is not None:
            self._building.close()

    # -- state ----------------------------------------------------------------------------------

    @property
    def chain_indexed(self) -> BlockRef | None:
        return self.progress.chain_indexed

    @property
    def replaying(self) -> bool:
        return self._building is not None

    @property
    def retained_offsets(self) -> list[int]:
        return list(self._retained)

    @property
    def last_block(self) -> BlockRef | None:
        if self._retained:
            return next(reversed(self._retained.values())).ref
        return self.progress.chain_indexed

    def pending_operation_ids(self) -> set[int]:
        """Operation ids in the pending index that answers queries."""
        return set(self._pending_ops)

    def _target(self) -> tuple[MutationIndex, set[int]]:
        if self._building is not None:
            return self._building, self._building_ops
        return self.pending, self._pending_ops

    # -- replay ---------------------------------------------------------------------------------

    def start_replay(self) -> chain_pb2.SubscribeRequest:
        """Begin building a new pending index; the subscription to open (see module docstring)."""
        self._settle_chain_round()  # its blocks are about to be forgotten
        if self._building is not None:
            self._building.close()
        self._building = self._new_pending_index()
        self._building_ops = set()
        self._replay_update = IndexUpdate()
        self._retained.clear()
        self.replays += 1
        indexed = self.progress.chain_indexed
        if indexed is None:
            return chain_pb2.SubscribeRequest(
                has_from_block_offset=False, from_pending_operation_id=0, pending_batches=True
            )
        return chain_pb2.SubscribeRequest(
            has_from_block_offset=True, from_block_offset=indexed.offset, from_pending_operation_id=0,
            pending_batches=True,
            # A chain that no longer holds this block answers with a truncation to 0 (a full reindex).
            from_block_hash=bytes.fromhex(indexed.hash),
        )

    def _finish_replay(self, event: CaughtUpEvent) -> IndexUpdate:
        assert self._building is not None
        old = self.pending
        self.pending, self._pending_ops = self._building, self._building_ops
        self._building, self._building_ops = None, set()
        old.close()
        update, self._replay_update = self._replay_update, IndexUpdate()
        update.indexed = sorted(set(update.indexed) | self._pending_ops)
        update.reset = True
        update.caught_up = True
        self.caught_up = True
        log.info(
            "caught up with the chain: last block at offset %d, %d operation(s) in the pending index, "
            "chain index up to %s",
            event.last_block_offset,
            len(self._pending_ops),
            "nothing" if self.chain_indexed is None else f"offset {self.chain_indexed.offset}",
        )
        return update

    # -- decoding -------------------------------------------------------------------------------

    def remember_appended(
        self, entries: Sequence[bytes], payloads: Sequence[bytes], mutations: Sequence[mutation_pb2.EntityMutation]
    ) -> None:
        """Mutations this store is about to append (validated; their sealed chain entries, payloads), so that
        indexing their entries when the tail brings them needs neither decryption nor parsing (~10 µs each).
        Keyed by the sealed entry (unique: a random nonce each), known before the Append answers, which
        the tail often beats. Any thread; the oldest are forgotten past `APPENDED_CACHE_SIZE` (say, an
        Append that failed, or while the tail is down)."""
        with self._appended_lock:  # the indexing thread takes from it meanwhile
            appended = self._appended
            for entry, payload, mutation in zip(entries, payloads, mutations, strict=True):
                appended[entry] = (payload, mutation)
            while len(appended) > APPENDED_CACHE_SIZE:
                appended.popitem(last=False)

    def _decode(self, entries: Sequence[ChainEntry]) -> dict[int, mutation_pb2.EntityMutation]:
        """Mutations of `entries` (undecodable ones are logged once and left out); new payloads saved."""
        found: dict[int, mutation_pb2.EntityMutation] = {}
        new: list[tuple[int, bytes]] = []
        own_entries: dict[bytes, tuple[bytes, mutation_pb2.EntityMutation]] = {}
        if self._appended:
            with self._appended_lock:
                appended = self._appended
                own_entries = {e.data: appended.pop(e.data) for e in entries if e.data in appended}
        for entry in entries:
            op_id = entry.operation_id
            if op_id in found or op_id in self._undecodable:
                continue
            own = own_entries.get(entry.data) if own_entries else None
            if own is not None:
                found[op_id] = own[1]
                new.append((op_id, own[0]))
                continue
            stored = self.payloads.get(op_id)
            data = stored
            if data is None:
                try:
                    data = open_sealed(self._key, entry.data)
                except SealedPayloadError as exc:
                    self._skip(op_id, f"does not decrypt with the cell data key ({exc})")
                    continue
            try:
                mutation = mutation_pb2.EntityMutation.FromString(data)
            except DecodeError as exc:
                self._skip(op_id, f"is not an EntityMutation ({exc})")
                continue
            if not mutation.entity_id or mutation.WhichOneof("mutation") is None:
                self._skip(op_id, "is an EntityMutation without entity id or mutation")
                continue
            found[op_id] = mutation
            if stored is None:
                new.append((op_id, data))
        if new:
            self.payloads.put_many(new)
        parsed = self._parsed
        parsed.update(found)
        while len(parsed) > DOCUMENT_CACHE_SIZE:
            parsed.popitem(last=False)
        return found

    def _skip(self, operation_id: int, why: str) -> None:
        if operation_id not in self._undecodable:
            self._undecodable.add(operation_id)
            log.warning("skipping chain entry %d: it %s", operation_id, why)

    # -- events ---------------------------------------------------------------------------------

    def apply_chain_events(self, events: Sequence[chain_pb2.ChainEvent]) -> IndexUpdate:
        return self.apply_events(events_from_proto(events))

    def apply_events(self, events: Sequence[IndexEvent]) -> IndexUpdate:
        """Applies a batch of events (in order) and returns what changed (see module docstring)."""
        round_ = self._chain_round
        if round_ is not None and (round_.future is None or round_.future.done() or _touches(events, round_)):
            self._settle_chain_round()
        update = IndexUpdate()
        batch: list[IndexEvent] = []
        saw_block = False
        for event in events:
            if isinstance(event, BlockEvent | PendingEvent):
                saw_block = saw_block or isinstance(event, BlockEvent)
                batch.append(event)
                continue
            update.merge(self._apply_entries(batch))
            batch = []
            if isinstance(event, TruncatedEvent):
                self._truncate(event.from_offset, "the chain was truncated")
            elif isinstance(event, CaughtUpEvent):
                if self._building is not None:
                    self._replay_update.merge(self.index_chain_blocks())
                    update.merge(self._finish_replay(event))
                for offset in [o for o in self._retained if o > event.last_block_offset]:
                    # Cannot happen after a replay (retained blocks come from it); be safe.
                    del self._retained[offset]
        update.merge(self._apply_entries(batch))
        if saw_block and (self._building is not None or self.settings.chain_index_deferred_interval_secs is None):
            update.merge(self.index_chain_blocks())
        self._save_progress(sync=False)
        if self._carried.indexed or self._carried.changed or self._carried.committed:
            update.merge(self._carried)
            self._carried = IndexUpdate()
        update.indexed = list(dict.fromkeys(update.indexed))
        if self._building is not None:
            # Nothing is visible before the swap: report it all then.
            self._replay_update.merge(update)
            return IndexUpdate(committed=update.committed)
        return update

    def _apply_entries(self, events: Sequence[IndexEvent]) -> IndexUpdate:
        update = IndexUpdate()
        if not events:
            return update
        target, target_ops = self._target()
        # Only what the target index lacks: most block entries came as pending operations first (reading
        # back and parsing their payloads again, one LevelDB read and one parse each, served nothing).
        entries: list[ChainEntry] = []
        blocks: dict[int, tuple[tuple[int, ...], list[ChainEntry]]] = {}  # by position: `BlockEvent.split`
        coming = {e.entry.operation_id for e in events if isinstance(e, PendingEvent)}
        for position, event in enumerate(events):
            if isinstance(event, BlockEvent):
                blocks[position] = event.split(target_ops, coming)
                entries.extend(blocks[position][1])
            elif isinstance(event, PendingEvent) and event.entry.operation_id not in target_ops:
                entries.append(event.entry)
        mutations = self._decode(entries)
        ops: list[IndexOperation] = []
        # A pending operation already in the chain index (a peer re-sending an old operation) stays out
        # of the pending index: it would count as pending there forever.
        candidates = [
            e.entry.operation_id
            for e in events
            if isinstance(e, PendingEvent) and e.entry.operation_id not in target_ops
        ]
        added: set[int] = set(self.chain.entity_ids(candidates)) if candidates else set()
        skipped = set(added)
        last_pending = self.progress.last_pending_operation_id

        def add(entry: ChainEntry) -> None:
            op_id = entry.operation_id
            if op_id in target_ops or op_id in added:
                return
            mutation = mutations.get(op_id)
            if mutation is None:
                return
            ops.extend(index_operations_for(op_id, None, mutation, pending=True))
            added.add(op_id)
            update.changes.append(change_of(op_id, mutation))

        for position, event in enumerate(events):
            if isinstance(event, BlockEvent):
                if not self._accept_block(event.ref):
                    continue
                block_ids, block_new = blocks[position]
                self._retained[event.ref.offset] = _RetainedBlock(event.ref, block_ids)
                update.committed.extend(block_ids)
                for entry in block_new:  # (the others are in the target index already)
                    add(entry)
            elif isinstance(event, PendingEvent):
                last_pending = max(last_pending, event.entry.operation_id)
                add(event.entry)
        if ops:
            target.apply(ops, self._documents)
            if target is self.pending:
                with self._lock:
                    self._last_write = self._monotonic()
        added -= skipped
        target_ops.update(added)
        update.indexed.extend(added)
        self.progress = replace(self.progress, last_block=self.last_block, last_pending_operation_id=last_pending)
        return update

    def _accept_block(self, ref: BlockRef) -> bool:
        """Whether a received block is new (forgetting retained blocks it replaces)."""
        indexed = self.progress.chain_indexed
        if indexed is not None and ref.offset <= indexed.offset:
            if ref.offset == indexed.offset and ref.hash != indexed.hash:
                raise FullReindexNeeded(
                    f"the chain's block at offset {ref.offset} is not the one the chain index was built from"
                )
            return False
        existing = self._retained.get(ref.offset)
        if existing is not None and existing.ref.hash == ref.hash:
            return False
        if existing is not None or any(offset > ref.offset for offset in self._retained):
            self._truncate(ref.offset, f"a different block arrived at offset {ref.offset}")
        return True

    def _truncate(self, from_offset: int, why: str) -> None:
        indexed = self.progress.chain_indexed
        if indexed is not None and from_offset <= indexed.offset:
            raise FullReindexNeeded(
                f"{why}: blocks from offset {from_offset} on are gone, but the chain index holds blocks up to "
                f"offset {indexed.offset} (a fork deeper than chain_index_min_depth)"
            )
        dropped = [offset for offset in self._retained if offset >= from_offset]
        for offset in dropped:
            del self._retained[offset]
        if dropped:
            log.info("%s: forgetting %d block(s) from offset %d; their entries are pending again", why,
                     len(dropped), from_offset)

    # -- chain indexing -------------------------------------------------------------------------

    def index_chain_blocks(self) -> IndexUpdate:
        """SPEC "index new chain blocks" (see module docstring), committed on the calling thread (a round
        in flight is ended first)."""
        self._settle_chain_round()
        update, self._carried = self._carried, IndexUpdate()
        round_ = self._begin_chain_round()
        if round_ is not None:
            if round_.ops:
                self.chain.apply(round_.ops, built=round_.docs)
            update.merge(self._end_chain_round(round_))
        return update

    def start_chain_indexing(self) -> Future[int] | None:
        """Deferred chain indexing: begins a round as `index_chain_blocks` (blocks, documents, payloads
        synced) and commits it to the chain index on the chain committer thread, while the indexing thread
        goes on with the pending index (a round of 5 s of writes took ~1 s, during which nothing became
        searchable). The caller waits for the future, then calls `finish_chain_indexing` on the indexing
        thread. None: nothing to index now. Events that could touch the round's blocks end it first."""
        if self._chain_round is not None:
            return self._chain_round.future
        round_ = self._begin_chain_round(CHAIN_ROUND_MAX_OPERATIONS)
        if round_ is None:
            return None
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="store-chain-commit")
        round_.future = self._committer.submit(self.chain.apply, round_.ops, None, round_.docs)
        self._chain_round = round_
        return round_.future

    def finish_chain_indexing(self) -> IndexUpdate:
        """Ends the round started by `start_chain_indexing` (waiting for its commit, raising its error): its
        operations leave the pending index and the progress names its blocks."""
        self._settle_chain_round()
        update, self._carried = self._carried, IndexUpdate()
        return update

    def _settle_chain_round(self) -> None:
        round_, self._chain_round = self._chain_round, None
        if round_ is None:
            return
        if round_.future is not None:
            round_.future.result()
        self._carried.merge(self._end_chain_round(round_))

    @property
    def chain_backlog(self) -> bool:
        """Whether blocks deep enough for the chain index are still waiting (a deferred round took at most
        `CHAIN_ROUND_MAX_OPERATIONS`). On the indexing thread (which changes the retained blocks)."""
        newest = self.last_block
        if newest is None or self._chain_round is not None:
            return False
        min_depth = self.settings.chain_index_min_depth
        return any(newest.height - b.ref.height >= min_depth for b in self._retained.values())

    def _begin_chain_round(self, max_operations: int | None = None) -> _ChainRound | None:
        with self._lock:
            self._last_deferred_attempt = self._monotonic()
        if not self._retained:
            return None
        newest = self.last_block
        assert newest is not None
        top = newest.height
        indexed = self.progress.chain_indexed
        min_depth = self.settings.chain_index_min_depth
        if indexed is not None:
            depth = top - indexed.height
            if depth < min_depth or depth < self.settings.chain_index_depth_leeway:
                return None
        blocks = [b for b in self._retained.values() if top - b.ref.height >= min_depth]
        if not blocks:
            return None
        if max_operations is not None:
            total = 0
            for count, block in enumerate(blocks):
                total += len(block.operation_ids)
                if total >= max_operations:
                    blocks = blocks[: count + 1]
                    break

        op_ids = [op for b in blocks for op in b.operation_ids]
        parsed = self._parsed
        mutations: dict[int, mutation_pb2.EntityMutation] = {}
        for op in op_ids:
            m = parsed.pop(op, None)
            if m is None:
                m = self.payloads.get_mutation(op)
            if m is not None:
                mutations[op] = m
        self.payloads.sync()
        chain_ops: list[IndexOperation] = []
        redo = [op for b in blocks if self._dedup_upto is not None and b.ref.offset <= self._dedup_upto
                for op in b.operation_ids]
        if redo:
            chain_ops.append(DeleteOperationsOperation(tuple(redo)))
        changes: list[IndexChange] = []
        deleted_targets: list[int] = []
        for block in blocks:
            for op in block.operation_ids:
                mutation = mutations.get(op)
                if mutation is None:
                    continue
                chain_ops.extend(index_operations_for(op, block.ref.offset, mutation, pending=False))
                changes.append(change_of(op, mutation))
                if mutation.WhichOneof("mutation") == "delete_operations":
                    deleted_targets.extend(mutation.delete_operations.operation_ids)
        docs = self.chain.build_documents(chain_ops, self._documents)
        return _ChainRound(blocks, op_ids, list(mutations), chain_ops, docs, changes, deleted_targets)

    def _end_chain_round(self, round_: _ChainRound) -> IndexUpdate:
        """After the round's chain-index commit: its operations leave the pending index(es), progress saved."""
        blocks, op_ids = round_.blocks, round_.op_ids
        for index, ops_set in ((self.pending, self._pending_ops), (self._building, self._building_ops)):
            if index is None:
                continue
            leaving = [op for op in op_ids if op in ops_set]
            if leaving:
                index.apply([DeleteOperationsOperation(tuple(leaving))])
                ops_set.difference_update(leaving)
        for block in blocks:
            if self._retained.get(block.ref.offset) is block:
                del self._retained[block.ref.offset]
        self.progress = replace(self.progress, chain_indexed=blocks[-1].ref, last_block=self.last_block)
        self.payloads.save_progress(self.progress, sync=True)
        if self._dedup_upto is not None and blocks[-1].ref.offset >= self._dedup_upto:
            self._dedup_upto = None
        if round_.deleted_targets:
            self.payloads.delete_many(round_.deleted_targets)
        log.info(
            "chain-indexed %d block(s) up to offset %d (%d operation(s))",
            len(blocks),
            blocks[-1].ref.offset,
            len(op_ids),
        )
        return IndexUpdate(indexed=list(round_.indexed), changes=list(round_.changes))

    def note_query(self, programmatic: bool) -> None:
        if not programmatic:
            with self._lock:
                self._last_user_query = self._monotonic()

    def deferred_indexing_due(self) -> bool:
        """Whether the deferred-indexing timer should index now (SPEC 3.3): not while a
        non-programmatic query came in the last `chain_index_deferred_query_secs`, unless the last
        attempt is older than `chain_index_deferred_max_secs`.

        Beyond the original: when `chain_index_deferred_write_secs` is set (2 s by default, see config.py),
        not while writes entered the pending index that recently either (a chain-index round during a burst
        of writes takes a quarter of the store's CPU from it). Once the pending index holds
        `chain_index_deferred_max_pending` operations (it lives in RAM), neither wait holds."""
        settings = self.settings
        if settings.chain_index_deferred_interval_secs is None or self._building is not None:
            return False
        now = self._monotonic()
        with self._lock:
            recent_query = now - self._last_user_query < settings.chain_index_deferred_query_secs
            writing = now - self._last_write < settings.chain_index_deferred_write_secs
            overdue = now - self._last_deferred_attempt >= settings.chain_index_deferred_max_secs
        crowded = 0 < settings.chain_index_deferred_max_pending <= len(self._pending_ops)
        return overdue or crowded or not (recent_query or writing)

    def _save_progress(self, sync: bool) -> None:
        self.payloads.save_progress(self.progress, sync=sync)

    # -- reading --------------------------------------------------------------------------------

    def fetch_trait(self, operation_id: int, block_offset: int | None) -> tuple[str, entity_pb2.Trait] | None:
        mutation = self.payloads.get_mutation(operation_id)
        if mutation is None or mutation.WhichOneof("mutation") != "put_trait":
            return None
        return mutation.entity_id, mutation.put_trait.trait

    def search(self, query: query_pb2.EntityQuery) -> query_pb2.EntityResults:
        return self.searcher.search(query)

    def entity_mutations(self, entity_id: str) -> list[MutationMetadata]:
        """Every indexed mutation of an entity, both indices (GC)."""
        return self.pending.fetch_entity_mutations(entity_id) + self.chain.fetch_entity_mutations(entity_id)


__all__ = [
    "BlockEvent",
    "CaughtUpEvent",
    "ChainEntry",
    "EntityIndex",
    "FullReindexNeeded",
    "IndexChange",
    "IndexEvent",
    "IndexUpdate",
    "PendingEvent",
    "TruncatedEvent",
    "change_of",
    "events_from_proto",
]
