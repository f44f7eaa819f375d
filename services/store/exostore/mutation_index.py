"""A mutation index (SPEC 3.3-3.4): one tantivy document per indexed mutation.

The store runs two: the pending index in RAM (`path=None`, documents without block offsets) and the chain
index on disk. Both share one `IndexSchema` (and so one `QueryCompiler`).

* `apply(ops)` adds / removes documents, commits once and reloads, so results are visible on return;
* `search(query, count, offset)` runs `query`'s predicate, ordered by `query.ordering` (or the predicate's
  default), ties broken by operation id (higher first when descending), and returns `MutationResults`:
  raw BM25 scores (`SortKind.SCORE`) or fast field values (`UINT` / `INT`). Recency, pending-index and
  reference boosts are the searcher's (`recency_boost` is here for it). For a fast-field ordering,
  ``uint64`` page bounds in `query.paging` (`after_ordering_value` / `before_ordering_value`: (value, operation
  id), a signed field's value as ``value + 2**63``, as the searcher's ordering values) restrict the search
  to the documents strictly between them, ties by operation id included (`_bounded_query`): the searcher's
  pages start at their bound instead of reading every match ranked before it;
* `fetch_entity_mutations(entity_id)`: every document of an entity, ascending operation id, de-duplicated,
  LRU-cached (invalidated by writes touching the entity).

Tantivy breaks ties by segment and document address, not by operation id. So that paging by offset is
exact: for a fast-field ordering, when the page boundary cuts a run of equal values, the run is re-fetched
ordered by operation id (`_resolve_boundary_ties`); for a score ordering, more hits are fetched until the run
of scores equal to the boundary's is complete (up to `TIE_EXPANSION_CAP` hits: a constant-score query over
many documents costs O(matches) under a score ordering). The rows such a fetch sorted (all of them when
the query's matches were all fetched, else those scoring above the last hit) are kept for the next pages
of the same compiled query while the searcher stays the same (`SCORE_ROWS_CACHE_SIZE` queries): fuzzy
matches all score 1.0, so a rare word's page boundary usually cuts a run of thousands of them. An ascending
score ordering fetches and sorts every match once, kept the same way for its next pages. Only the
first page of a search counts its matches (`with_total`): counting disables tantivy's block skipping.

Costs kept off the query path (same results): a page of the same compiled query on the same searcher is
kept (`RESULTS_CACHE_SIZE`); a page builds each mutation's metadata when it is first read (`_Page`: the
searcher walks a few hits of most pages, and the disk index loads a stored document per uncached hit);
the RAM (pending) index keeps every entity's mutations and every document's metadata as it indexes them,
so aggregating an entity or reading a hit there needs no search; documents built for the pending index
are reused by the chain index (`DocumentCache`); the words of `all_text` go to the schema's
`Vocabulary`, which lets match queries skip fuzzy automata that could not match anything but their own
token (`query.match_query`).
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import tantivy

from exocommon.errors import FailedPrecondition
from exocore.store import query_pb2
from exostore.query import CompiledQuery, QueryCompiler, terms_query
from exostore.registry import TraitRegistry, type_name_from_url
from exostore.schema import (
    F_ALL_REFS,
    F_ALL_TEXT,
    F_BLOCK_OFFSET,
    F_CREATION_DATE,
    F_DOCUMENT_TYPE,
    F_ENTITY_ID,
    F_HAS_REFERENCE,
    F_MODIFICATION_DATE,
    F_OPERATION_ID,
    F_TRAIT_ID,
    F_TRAIT_TYPE,
    IndexSchema,
    ValueKind,
    reference_text,
    text_analyzer,
    text_words,
)
from exostore.types import (
    DeleteOperationsOperation,
    DocumentType,
    EntityTombstoneMeta,
    EntityTombstoneOperation,
    IndexOperation,
    MutationMetadata,
    MutationResults,
    MutationType,
    PendingDeletionMeta,
    PendingDeletionOperation,
    PutTraitOperation,
    SortKind,
    SortValue,
    TraitPutMeta,
    TraitTombstoneMeta,
    TraitTombstoneOperation,
)

log = logging.getLogger(__name__)

NS_PER_DAY = 86_400 * 1_000_000_000
RECENCY_OFFSET_DAYS = 15
RECENCY_DECAY = 0.2
RECENCY_SCALE_DAYS = 365
ENTITY_MUTATIONS_LIMIT = 10_000
ENTITY_MUTATIONS_FIRST = 64
REFRESH_INTERVAL = 1.0  # seconds between searcher reloads picking up background merges
MERGE_WINDOW = 60.0  # seconds after a write during which background merges may still finish
RESULTS_CACHE_SIZE = 256  # searches whose page is kept while the index does not change
TIE_LOOKAHEAD = 64  # extra hits a first score-ordered search fetches (see `_search_by_score`)
TIE_EXPANSION_CAP = 50_000  # score ties beyond this many hits keep tantivy's (document address) order
SCORE_ROWS_CACHE_SIZE = 32  # score-ordered queries whose sorted rows are kept for their next pages
HITS_REMEMBERED = 4096  # disk index: hits read lately, by entity (see `MutationIndex._without_search`)
LISTING_MIN_DOCUMENTS = 1_000  # the smallest batch whose words come from the term dictionary (`_listing_words`)
# Pending documents kept for the chain index (~2 KB each for a note): a deferred chain-indexing round (5 s)
# at 10,000 mutations/s takes ~50,000; a missing one is built again on the indexing thread.
DOCUMENT_CACHE_SIZE = 50_000


_INT_BIAS = 1 << 63  # a signed field's page bound is `value + _INT_BIAS` (the searcher's ordering values)
_U64_MAX = (1 << 64) - 1


def _page_bounds(query: query_pb2.EntityQuery) -> tuple[tuple[int, int] | None, tuple[int, int] | None] | None:
    """The ``uint64`` (value, operation id) page bounds of `query` (after, before), None without any."""
    if not query.HasField("paging"):
        return None
    paging = query.paging
    bounds: list[tuple[int, int] | None] = []
    for name in ("after_ordering_value", "before_ordering_value"):
        bound = getattr(paging, name) if paging.HasField(name) else None  # type: ignore[arg-type]
        ok = bound is not None and bound.WhichOneof("value") == "uint64"
        bounds.append((bound.uint64, bound.operation_id) if ok else None)  # type: ignore[union-attr]
    if bounds[0] is None and bounds[1] is None:
        return None
    return bounds[0], bounds[1]


def recency_boost(now_ns: int, date_ns: int) -> float:
    """SPEC 3.6: ``exp(ln(0.2)/365 × max(0, |days(now) − days(date)| − 15))``, days = whole days since the
    epoch: 1.0 within 15 days, ≈0.214 at 365 days, ≈0.043 at 730 days."""
    distance = max(0, abs(now_ns // NS_PER_DAY - date_ns // NS_PER_DAY) - RECENCY_OFFSET_DAYS)
    return math.exp(math.log(RECENCY_DECAY) / RECENCY_SCALE_DAYS * distance)


def _ts_ns(ts: object) -> int:
    return max(0, ts.seconds * 1_000_000_000 + ts.nanos)  # type: ignore[attr-defined]


_SCORE_OF = operator.itemgetter(0)
_OPERATION_ID_OF = operator.itemgetter(1)
_DOCUMENT_OPERATIONS = (PutTraitOperation, TraitTombstoneOperation, EntityTombstoneOperation, PendingDeletionOperation)
_Meta = tuple[str, MutationType, int | None]  # entity id, mutation type, block offset


def _meta_from_document(doc: tantivy.Document) -> _Meta:
    """The metadata of a document about to be indexed (as `_meta_from_doc` reads it back)."""
    get = doc.get_first

    def first(name: str, default: object) -> object:
        value = get(name)
        return default if value is None else value

    return _meta_with(first)


def _meta_of(op: IndexOperation, doc: tantivy.Document) -> _Meta:
    """`_meta_from_document(doc)` for `op`'s document, mostly from `op` (reading the fields back through
    the document cost ~7 µs of the indexing thread per trait put)."""
    if not isinstance(op, PutTraitOperation):
        return _meta_from_document(doc)
    trait = op.trait
    created = _ts_ns(trait.creation_date) if trait.HasField("creation_date") else 0
    modified = _ts_ns(trait.modification_date) if trait.HasField("modification_date") else 0
    type_name = type_name_from_url(trait.message.type_url) if trait.HasField("message") else ""
    meta = TraitPutMeta(
        trait_id=trait.id,
        trait_type=sys.intern(type_name),
        creation_date=created or None,
        modification_date=modified or None,
        has_reference=bool(doc.get_first(F_HAS_REFERENCE)),
    )
    return op.entity_id, meta, op.block_offset


def _meta_from_doc(doc: dict[str, list[object]]) -> _Meta:
    def first(name: str, default: object) -> object:
        values = doc.get(name)
        return values[0] if values else default

    return _meta_with(first)


def _meta_with(first: Callable[[str, object], object]) -> _Meta:
    entity_id = str(first(F_ENTITY_ID, ""))
    block_offset = first(F_BLOCK_OFFSET, None)
    doc_type = int(first(F_DOCUMENT_TYPE, DocumentType.TRAIT_PUT))  # type: ignore[call-overload]
    mtype: MutationType
    if doc_type == DocumentType.TRAIT_PUT:
        created = int(first(F_CREATION_DATE, 0))  # type: ignore[call-overload]
        modified = int(first(F_MODIFICATION_DATE, 0))  # type: ignore[call-overload]
        mtype = TraitPutMeta(
            trait_id=str(first(F_TRAIT_ID, "")),
            trait_type=sys.intern(str(first(F_TRAIT_TYPE, ""))),
            creation_date=created or None,
            modification_date=modified or None,
            has_reference=bool(first(F_HAS_REFERENCE, 0)),
        )
    elif doc_type == DocumentType.TRAIT_TOMBSTONE:
        mtype = TraitTombstoneMeta(str(first(F_TRAIT_ID, "")))
    elif doc_type == DocumentType.ENTITY_TOMBSTONE:
        mtype = EntityTombstoneMeta()
    else:
        mtype = PendingDeletionMeta()
    return entity_id, mtype, None if block_offset is None else int(block_offset)  # type: ignore[call-overload]


_SHAREABLE = (PutTraitOperation, TraitTombstoneOperation, EntityTombstoneOperation)


class _Page(Sequence[MutationMetadata]):
    """The mutations of a searched page, each built (and its stored document loaded, when its metadata is not
    cached) when first read: a searcher walks a page only as far as it ranks better than the other index's
    matches, usually a few of the chain index's hits, and loading a document costs more than finding it.
    Read-only; concurrent readers may both build an item (equal values)."""

    __slots__ = ("_index", "_searcher", "_rows", "_kind", "_items")

    def __init__(
        self,
        index: MutationIndex,
        searcher: tantivy.Searcher,
        rows: list[tuple[float | int, int, tantivy.DocAddress]],
        kind: SortKind,
    ) -> None:
        self._index = index
        self._searcher = searcher
        self._rows = rows
        self._kind = kind
        self._items: list[MutationMetadata | None] = [None] * len(rows)

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, position: int) -> MutationMetadata: ...

    @overload
    def __getitem__(self, position: slice) -> list[MutationMetadata]: ...

    def __getitem__(self, position: int | slice) -> MutationMetadata | list[MutationMetadata]:
        if isinstance(position, slice):
            return [self._item(i) for i in range(*position.indices(len(self._rows)))]
        if position < 0:
            position += len(self._rows)
        if not 0 <= position < len(self._rows):
            raise IndexError("page index out of range")
        return self._item(position)

    def __iter__(self) -> Iterator[MutationMetadata]:
        for i in range(len(self._rows)):
            yield self._item(i)

    def __eq__(self, other: object) -> bool:  # as the list it stands for
        if isinstance(other, _Page | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"_Page({list(self)!r})"

    def _item(self, i: int) -> MutationMetadata:
        item = self._items[i]
        if item is None:
            value, operation_id, addr = self._rows[i]
            meta = self._index._meta_cache.get(operation_id) or self._index._meta(self._searcher, operation_id, addr)
            sort_value = SortValue(self._kind, value, operation_id)
            item = MutationMetadata(operation_id, meta[2], meta[0], meta[1], sort_value)
            self._items[i] = item
            if self._index._entities is None:
                self._index._remember_hit(self._searcher, item)
        return item


class IndexSchemaMismatch(FailedPrecondition):
    """An on-disk index was created with another tantivy schema (another version of the store, another
    pool size): it cannot be opened, only rebuilt."""


class DocumentCache:
    """Documents built for the pending index, without block offset, by operation id, for the chain index to
    take when the operation's block is deep enough: a document depends only on its operation and the trait
    registry (apart from the block offset), so the trait message is unpacked and mapped once instead of once
    per index. A document built under another registry version is not reused (a schema registered since
    may map more fields).

    Bounded (`capacity`, oldest dropped first): a missing document is simply built again. Used by the
    indexing thread only."""

    def __init__(self, capacity: int = DOCUMENT_CACHE_SIZE) -> None:
        # ordered: dropping the oldest of a plain dict scans the holes its earlier removals left (O(capacity))
        self._docs: OrderedDict[int, tuple[int, tantivy.Document]] = OrderedDict()
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, operation_id: int, version: int) -> tantivy.Document | None:
        entry = self._docs.get(operation_id)
        return entry[1] if entry is not None and entry[0] == version else None

    def put(self, operation_id: int, version: int, doc: tantivy.Document) -> None:
        docs = self._docs
        docs[operation_id] = (version, doc)
        while len(docs) > self._capacity:
            docs.popitem(last=False)

    def take(self, operation_id: int, version: int) -> tantivy.Document | None:
        """Removes and returns the document (the caller may add fields to it)."""
        entry = self._docs.pop(operation_id, None)
        return entry[1] if entry is not None and entry[0] == version else None


class MutationIndex:
    """One mutation index (pending: `path=None`, in RAM; chain: on disk at `path`)."""

    def __init__(
        self,
        schema: IndexSchema | TraitRegistry,
        path: Path | str | None = None,
        *,
        heap_size: int = 30_000_000,
        num_threads: int = 2,
        entity_cache_size: int = 5000,
        metadata_cache_size: int = 100_000,
    ) -> None:
        self.schema = schema if isinstance(schema, IndexSchema) else IndexSchema(schema)
        self.registry = self.schema.registry
        self.compiler = compiler_for(self.schema)
        self.path = Path(path) if path is not None else None
        if self.path is None:
            self._index = tantivy.Index(self.schema.tantivy_schema)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                self._index = tantivy.Index(self.schema.tantivy_schema, path=str(self.path), reuse=True)
            except ValueError as exc:
                if "schema does not match" in str(exc):  # tantivy's words for it
                    raise IndexSchemaMismatch(
                        f"the mutation index at {self.path} was built with another tantivy schema"
                    ) from exc
                raise FailedPrecondition(f"cannot open the mutation index at {self.path}: {exc}") from exc
        # Manual: the searcher is reloaded here after each commit (and by `refresh`). With tantivy's default
        # policy a reload right after a commit could wait ~100 ms for its meta-file watcher (with one writer
        # thread on every commit): every watch notification and `wait_indexed` waited for it.
        self._index.config_reader(reload_policy="Manual")
        self.schema.register_analyzers(self._index)
        self._vocabulary = self.schema.vocabulary
        self._analyzer = text_analyzer()  # the indexing thread's own (queries use the schema's)
        self._writer: tantivy.IndexWriter | None = self._index.writer(heap_size, num_threads)
        self._write_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._generation = 0
        self._entity_cache: OrderedDict[str, list[MutationMetadata]] = OrderedDict()
        # id(compiled query) -> (searcher, compiled query, sorted rows, complete, total): the rows fetched by
        # a score-ordered search, valid while that searcher is the current one (see `_search_by_score`)
        self._score_rows: OrderedDict[int, tuple] = OrderedDict()  # type: ignore[type-arg]
        # (id(compiled query), offset, count, with_total, page bounds) -> (searcher, compiled query, mutations,
        # total)
        self._results: OrderedDict[tuple, tuple] = OrderedDict()  # type: ignore[type-arg]
        self._entity_cache_size = entity_cache_size
        self._meta_cache: dict[int, _Meta] = {}
        self._meta_cache_size = metadata_cache_size
        self._hits: dict[str, tuple[tantivy.Searcher, MutationMetadata]] = {}  # see `_without_search`
        self._highest_block: tuple[int, int | None] | None = None  # (generation, value)
        # RAM index only, as committed: the entity id of each operation having one document here, and the
        # operations having several (absent from both: none), so that removing operations (moved to the
        # chain index) needs no search and no stored-document load.
        self._single: dict[int, str] | None = {} if self.path is None else None
        self._several: set[int] = set()
        # RAM index only, as committed: every entity's mutations (one per operation id, ascending), kept
        # up to date by `apply`, so that aggregating an entity needs no search.
        self._entities: dict[str, list[MutationMetadata]] | None = {} if self.path is None else None
        self._index.reload()
        self._searcher = self._index.searcher()
        self._last_reload = self._last_write = time.monotonic()  # opening may leave merges to finish
        if self.path is not None and self._searcher.num_docs:  # words indexed by earlier runs
            self._add_words_of(self._searcher)

    def refresh(self) -> None:
        """Reload the searcher so that segments merged in the background are used (fewer segments, faster
        queries; same documents). `search` does it by itself at most every `REFRESH_INTERVAL` seconds, while
        merges may still run (`MERGE_WINDOW` after the last write): a reload is not free."""
        with self._cache_lock:
            self._index.reload()
            self._searcher = self._index.searcher()
            self._last_reload = time.monotonic()
            self._score_rows.clear()
            self._results.clear()

    # --- writing --------------------------------------------------------------------------------------

    def apply(
        self,
        ops: Sequence[IndexOperation],
        documents: DocumentCache | None = None,
        built: Sequence[tantivy.Document | None] | None = None,
    ) -> int:
        """Apply index operations in order (one commit), then make them visible to searches.

        `documents`: documents of operations without block offset are kept there, and operations with one
        take theirs from there (see `DocumentCache`). `built`: the documents of `ops` already built by
        `build_documents` (then `documents` is not used). Returns the number of documents added plus the
        number removed by `DeleteOperationsOperation`s."""
        if not ops:
            return 0
        if built is not None and len(built) != len(ops):
            raise ValueError("built documents do not match the operations")
        # A large batch's words reach the vocabulary from the committed index's term dictionary instead of
        # each document's text (see `_listing_words`).
        listing = built is None and self._listing_words(len(ops))
        with self._write_lock:
            writer = self._writer
            if writer is None:
                raise FailedPrecondition("mutation index is closed")
            single, several = self._single, self._several  # committed state (RAM index only)
            touched: set[str] = set()
            removed_ops: set[int] = set()
            added_ops: dict[int, str] = {}
            batch_docs: dict[int, tuple[str, int]] = {}  # entity id, documents added since its last removal
            adds: list[tuple[int, str, _Meta]] = []  # RAM index: documents added and not removed since
            changed = 0
            try:
                for position, op in enumerate(ops):
                    if isinstance(op, DeleteOperationsOperation):
                        ids = list(dict.fromkeys(op.operation_ids))
                        if not ids:
                            continue
                        lookup: list[int] = []
                        for operation_id in ids:
                            if operation_id in added_ops:  # added earlier in this batch
                                touched.add(added_ops.pop(operation_id))
                                changed += 1
                            if single is None or operation_id in several:
                                lookup.append(operation_id)
                            elif operation_id in single:  # no search, no stored-document load
                                touched.add(single[operation_id])
                                changed += 1
                            batch_docs.pop(operation_id, None)
                        if lookup:
                            for _operation_id, meta in self._docs_for_operations(lookup):
                                touched.add(meta[0])
                                changed += 1
                        # (delete_documents_by_term silently misses u64 fields given a Python int)
                        writer.delete_documents_by_query(
                            tantivy.Query.term_set_query(self.schema.tantivy_schema, F_OPERATION_ID, ids)
                        )
                        removed_ops.update(ids)
                        if adds:
                            gone = set(ids)
                            adds = [add for add in adds if add[0] not in gone]
                        continue
                    prebuilt = built[position] if built is not None else None
                    doc = prebuilt if prebuilt is not None else self._document_for(op, documents, not listing)
                    writer.add_document(doc)
                    operation_id, entity_id = op.operation_id, op.entity_id
                    if single is not None:
                        adds.append((operation_id, entity_id, _meta_of(op, doc)))
                    added_ops[operation_id] = entity_id
                    batch_docs[operation_id] = (entity_id, batch_docs.get(operation_id, ("", 0))[1] + 1)
                    touched.add(entity_id)
                    changed += 1
                writer.commit()
            except BaseException:
                writer.rollback()  # nothing of a failed batch stays pending in the writer
                raise
            if single is not None:
                for operation_id in removed_ops:  # every document committed before the removal is gone
                    single.pop(operation_id, None)
                    several.discard(operation_id)
                for operation_id, (entity_id, count) in batch_docs.items():
                    if operation_id in single or operation_id in several:
                        single.pop(operation_id, None)
                        several.add(operation_id)
                    elif count == 1:
                        single[operation_id] = entity_id
                    else:
                        several.add(operation_id)
            self._index.reload()
            searcher = self._index.searcher()
            if listing:  # before any search uses this searcher (a fuzzy term expands to the words known then)
                self._add_words_of(searcher)
            with self._cache_lock:
                self._searcher = searcher
                self._last_reload = self._last_write = time.monotonic()
                self._generation += 1
                self._score_rows.clear()
                self._results.clear()
                for entity_id in touched:
                    self._entity_cache.pop(entity_id, None)
                for operation_id in removed_ops:
                    self._meta_cache.pop(operation_id, None)
                if self._entities is not None:
                    self._update_entities(touched, removed_ops, adds)
            return changed

    def _update_entities(self, touched: set[str], removed_ops: set[int], adds: list[tuple[int, str, _Meta]]) -> None:
        """RAM index: `_entities` and the metadata cache after a commit (under `_cache_lock`)."""
        entities = self._entities
        assert entities is not None
        if removed_ops:
            for entity_id in touched:
                mutations = entities.get(entity_id)
                if mutations is not None:
                    kept = [m for m in mutations if m.operation_id not in removed_ops]
                    if kept:
                        entities[entity_id] = kept
                    else:
                        del entities[entity_id]
        for operation_id, _entity_id, meta in adds:
            self._remember_meta(operation_id, meta)
            mutations = entities.setdefault(meta[0], [])
            if any(m.operation_id == operation_id for m in mutations):
                continue  # indexed twice: one per operation id
            sort_value = SortValue(SortKind.UINT, operation_id, operation_id)
            mutations.append(MutationMetadata(operation_id, meta[2], meta[0], meta[1], sort_value))
            if len(mutations) > 1 and mutations[-2].operation_id > operation_id:
                mutations.sort(key=lambda m: m.operation_id)

    def _docs_for_operations(self, operation_ids: list[int]) -> list[tuple[int, _Meta]]:
        searcher = self._searcher
        query = terms_query(self.schema, F_OPERATION_ID, operation_ids)
        hits = searcher.search(query, max(1, 2 * len(operation_ids)), count=False, order_by_field=F_OPERATION_ID).hits
        return [(int(value), self._meta(searcher, int(value), addr)) for value, addr in hits]

    def build_documents(
        self, ops: Sequence[IndexOperation], documents: DocumentCache | None = None
    ) -> list[tantivy.Document | None]:
        """The documents `apply(ops, built=...)` adds (None for a removal), built (or taken from `documents`)
        on the calling thread: the chain index commits a round on another thread, and building touches the
        shared document cache and vocabulary, which only the indexing thread writes."""
        return [
            None if isinstance(op, DeleteOperationsOperation) else self._document_for(op, documents) for op in ops
        ]

    def _listing_words(self, documents: int) -> bool:
        """Whether a batch of `documents` adds its words to the vocabulary by listing the index's term
        dictionary once committed, rather than by splitting each document's text (~6 µs a note, most of it
        looking up its ~60 words): a listing costs ~3 µs a word of the vocabulary (16 ms for 5,000, whatever
        the documents), so it pays for batches of at least as many documents as the vocabulary has words
        (a burst of writes: ~10,000 a batch)."""
        vocabulary = self._vocabulary
        return not vocabulary.saturated and documents >= max(len(vocabulary), LISTING_MIN_DOCUMENTS)

    def _add_words_of(self, searcher: tantivy.Searcher) -> None:
        """Every word of the index (as `searcher` sees it) into the vocabulary."""
        self._vocabulary.add_tokens([term for term, _ in searcher.terms_with_prefix(F_ALL_TEXT, "")])

    def _document_for(
        self, op: IndexOperation, documents: DocumentCache | None, words: bool = True
    ) -> tantivy.Document:
        """`op`'s document, shared through `documents` between the pending and the chain index. `words`: add
        its words to the vocabulary (else the caller does, see `_listing_words`)."""
        if documents is None or not isinstance(op, _SHAREABLE):
            return self._document(op, words)
        block_offset, version = op.block_offset, self.registry.version
        if block_offset is None:
            doc = documents.get(op.operation_id, version)
            if doc is None:
                doc = self._document(op, words)
                documents.put(op.operation_id, version, doc)
            return doc  # the writer copies it: the cached one stays without block offset
        doc = documents.take(op.operation_id, version)
        if doc is None:
            return self._document(op, words)
        doc.add_unsigned(F_BLOCK_OFFSET, block_offset)
        return doc

    def _document(self, op: IndexOperation, words: bool = True) -> tantivy.Document:
        if not isinstance(op, _DOCUMENT_OPERATIONS):
            raise TypeError(f"not an index operation: {op!r}")
        doc = tantivy.Document()
        doc.add_text(F_ENTITY_ID, op.entity_id)
        doc.add_unsigned(F_OPERATION_ID, op.operation_id)
        block_offset = getattr(op, "block_offset", None)
        if block_offset is not None:
            doc.add_unsigned(F_BLOCK_OFFSET, block_offset)
        if isinstance(op, PutTraitOperation):
            self._put_fields(doc, op, words)
            return doc
        doc.add_unsigned(F_CREATION_DATE, 0)
        doc.add_unsigned(F_MODIFICATION_DATE, 0)
        doc.add_unsigned(F_HAS_REFERENCE, 0)
        if isinstance(op, TraitTombstoneOperation):
            doc.add_unsigned(F_DOCUMENT_TYPE, DocumentType.TRAIT_TOMBSTONE)
            doc.add_text(F_TRAIT_ID, op.trait_id)
        elif isinstance(op, EntityTombstoneOperation):
            doc.add_unsigned(F_DOCUMENT_TYPE, DocumentType.ENTITY_TOMBSTONE)
        else:
            doc.add_unsigned(F_DOCUMENT_TYPE, DocumentType.PENDING_DELETION)
        return doc

    def _put_fields(self, doc: tantivy.Document, op: PutTraitOperation, words: bool = True) -> None:
        trait = op.trait
        doc.add_unsigned(F_DOCUMENT_TYPE, DocumentType.TRAIT_PUT)
        doc.add_text(F_TRAIT_ID, trait.id)
        doc.add_unsigned(F_CREATION_DATE, _ts_ns(trait.creation_date) if trait.HasField("creation_date") else 0)
        doc.add_unsigned(
            F_MODIFICATION_DATE, _ts_ns(trait.modification_date) if trait.HasField("modification_date") else 0
        )
        has_reference = 0
        type_name = type_name_from_url(trait.message.type_url) if trait.HasField("message") else ""
        if type_name:
            doc.add_text(F_TRAIT_TYPE, type_name)
            mapping = self.schema.mapping(type_name)
            message = self.registry.unpack_trait(trait.message) if mapping is not None and mapping.fields else None
            if message is not None and mapping is not None:
                add_text, text_kind, string_kind = doc.add_text, ValueKind.TEXT, ValueKind.STRING
                texts: list[str] = []
                for mapped in mapping.fields.values():
                    values = mapped.extract(message)
                    if not values:
                        continue
                    kind = mapped.value_kind
                    for value in values:
                        if kind is text_kind:
                            add_text(mapped.name, value)  # type: ignore[arg-type]
                            add_text(F_ALL_TEXT, value)  # type: ignore[arg-type]
                            texts.append(value)  # type: ignore[arg-type]
                        elif kind is string_kind:
                            add_text(mapped.name, value)  # type: ignore[arg-type]
                        elif kind is ValueKind.REFERENCE:
                            text = reference_text(*value)  # type: ignore[misc]
                            add_text(mapped.name, text)
                            add_text(F_ALL_REFS, text)
                            has_reference = 1
                        elif mapped.signed:
                            doc.add_integer(mapped.name, value)  # type: ignore[arg-type]
                        else:
                            doc.add_unsigned(mapped.name, value)  # type: ignore[arg-type]
                if texts and words:  # one analysis for all of them: the analyzer splits on spaces anyway
                    self._vocabulary.add_tokens(text_words(self._analyzer, " ".join(texts)))
        doc.add_unsigned(F_HAS_REFERENCE, has_reference)

    def close(self) -> None:
        """Wait for background merges and release the writer (the index stays searchable)."""
        with self._write_lock:
            if self._writer is not None:
                self._writer.wait_merging_threads()
                self._writer = None

    # --- reading --------------------------------------------------------------------------------------

    def compile(self, query: query_pb2.EntityQuery) -> CompiledQuery:
        return self.compiler.compile(query)

    def search(
        self,
        query: query_pb2.EntityQuery,
        count: int,
        offset: int = 0,
        compiled: CompiledQuery | None = None,
        *,
        with_total: bool = True,
    ) -> MutationResults:
        """Matching documents `offset .. offset+count` in the query's ordering (see the module doc).

        `with_total=False`: `total` may be left uncomputed (-1): counting every match keeps tantivy from
        skipping the blocks that cannot reach the top of a score ordering, so callers reading further
        pages of a query they already counted pass it."""
        now = time.monotonic()
        if now - self._last_reload > REFRESH_INTERVAL and now - self._last_write < MERGE_WINDOW:
            self.refresh()
        # the searcher before compiling: every word it can match is then in the vocabulary (see `Vocabulary`)
        searcher = self._searcher
        compiled = compiled or self.compiler.compile(query)
        count, offset = max(0, count), max(0, offset)
        field = compiled.sort_field
        bounds = _page_bounds(query) if field is not None else None
        # The same page of the same compiled query on the same searcher (same documents and statistics,
        # hence the same scores): watches re-running, lists polled, repeated searches.
        key = (id(compiled), offset, count, with_total, bounds)
        with self._cache_lock:
            cached = self._results.get(key)
            if cached is not None and cached[0] is searcher and cached[1] is compiled:
                self._results.move_to_end(key)
                return MutationResults(cached[2], cached[3])
        window = offset + count
        if field is None:
            rows, total = self._search_by_score(searcher, compiled, offset, window, with_total)
        else:
            tquery = compiled.query if bounds is None else self._bounded_query(compiled, field, bounds)
            rows, total = self._search_by_field(searcher, compiled, field, offset, window, with_total, tquery)
        mutations = _Page(self, searcher, rows, compiled.sort_kind)
        with self._cache_lock:
            if searcher is self._searcher:
                self._results[key] = (searcher, compiled, mutations, total)
                while len(self._results) > RESULTS_CACHE_SIZE:
                    self._results.popitem(last=False)
        return MutationResults(mutations, total)

    def _search_by_score(
        self, searcher: tantivy.Searcher, compiled: CompiledQuery, offset: int, window: int, with_total: bool = True
    ) -> tuple[list[tuple[float, int, tantivy.DocAddress]], int]:
        """Rows `offset..window` (score, operation id, address) ordered by score then operation id."""
        query = compiled.query
        cached = self._cached_score_rows(searcher, compiled, window)
        if cached is not None:
            rows, total = cached
            if with_total and total < 0:
                total = searcher.search(query, 1, count=True).count
            return rows[offset:window], total
        if compiled.ascending:  # worst first: every match is needed (kept for the next pages)
            total = searcher.search(query, 1, count=True).count
            hits = searcher.search(query, max(1, total), count=False).hits
            if not hits:
                return [], total
            addrs = [addr for _, addr in hits]
            op_ids = searcher.fast_field_values(F_OPERATION_ID, addrs)
            keys = [(score, op, i) for i, ((score, _), op) in enumerate(zip(hits, op_ids, strict=True))]
            keys.sort()
            rows = [(hits[i][0], op_ids[i], addrs[i]) for _, _, i in keys]
            self._cache_score_rows(searcher, compiled, rows, True, total)
            return rows[offset:window], total
        # tantivy breaks score ties by document address: fetch more until the run of scores equal to the
        # page boundary's is complete, so that ties are ordered by operation id (exact paging by offset).
        # Without a count, tantivy's top-k skips blocks whose best score cannot make the page.
        # One more than needed tells whether the boundary's run goes on; a few more than that usually hold the
        # whole run (equal BM25 scores are common: same term frequency and length) for little more than the
        # top-k itself, where a second search would cost as much as the first.
        limit = window + 1 + min(3 * window, TIE_LOOKAHEAD)
        total = -1
        while True:
            counting = with_total and total < 0
            result = searcher.search(query, limit, count=counting)
            hits = result.hits
            if counting:
                total = result.count
            complete = len(hits) < limit or (total >= 0 and len(hits) >= total)
            if window == 0 or complete:
                break
            if limit >= TIE_EXPANSION_CAP or hits[-1][0] != hits[window - 1][0]:
                break
            limit = max(limit * 4, window + 64)  # most runs are short: grow by steps
            limit = min(limit, total, TIE_EXPANSION_CAP) if total >= 0 else min(limit, TIE_EXPANSION_CAP)
        if not hits:
            return [], total
        # Hits come by score: only those up to the end of the page boundary's run of equal scores need their
        # operation id and ordering; every document scoring that much or more is among them.
        fetched = len(hits)
        end = fetched
        if not complete and 0 < window < fetched:
            boundary = hits[window - 1][0]
            end = window
            while end < fetched and hits[end][0] == boundary:
                end += 1
            if end < fetched:
                hits = hits[:end]
        addrs = [addr for _, addr in hits]
        op_ids = searcher.fast_field_values(F_OPERATION_ID, addrs)
        rows = list(zip([score for score, _ in hits], op_ids, addrs, strict=True))
        rows.sort(key=_OPERATION_ID_OF, reverse=True)  # stable sorts: by score, then by operation id
        rows.sort(key=_SCORE_OF, reverse=True)
        if complete:
            self._cache_score_rows(searcher, compiled, rows, True, total)
        elif end < fetched:
            # the boundary's run was fetched whole: every row is exact, keep them for the next pages of this
            # query (paging through a long run of equal scores costs one fetch)
            self._cache_score_rows(searcher, compiled, rows, False, total)
        elif fetched > window + 1 and limit < TIE_EXPANSION_CAP:
            last = hits[-1][0]  # the last run may go on: every row scoring above it is exact
            exact = sum(1 for row in rows if row[0] > last)
            self._cache_score_rows(searcher, compiled, rows[:exact], False, total)
        return rows[offset:window], total

    def _cached_score_rows(
        self, searcher: tantivy.Searcher, compiled: CompiledQuery, window: int
    ) -> tuple[list[tuple[float, int, tantivy.DocAddress]], int] | None:
        with self._cache_lock:
            entry = self._score_rows.get(id(compiled))
        if entry is None or entry[0] is not searcher or entry[1] is not compiled:
            return None
        _, _, rows, complete, total = entry
        if not complete and window > len(rows):
            return None
        return rows, total

    def _cache_score_rows(
        self,
        searcher: tantivy.Searcher,
        compiled: CompiledQuery,
        rows: list[tuple[float, int, tantivy.DocAddress]],
        complete: bool,
        total: int,
    ) -> None:
        if not complete and not rows:
            return
        with self._cache_lock:
            cache = self._score_rows
            cache[id(compiled)] = (searcher, compiled, rows, complete, total)
            cache.move_to_end(id(compiled))
            while len(cache) > SCORE_ROWS_CACHE_SIZE:
                cache.popitem(last=False)

    def _search_by_field(
        self,
        searcher: tantivy.Searcher,
        compiled: CompiledQuery,
        field: str,
        offset: int,
        window: int,
        with_total: bool = True,
        query: tantivy.Query | None = None,
    ) -> tuple[list[tuple[int, int, tantivy.DocAddress]], int]:
        """Rows `offset..window` (field value, operation id, address) ordered by value then operation id, of
        `query` (default: the compiled one)."""
        query = compiled.query if query is None else query
        order = tantivy.Order.Asc if compiled.ascending else tantivy.Order.Desc
        result = searcher.search(query, max(1, window), count=with_total, order_by_field=field, order=order)
        total = result.count if with_total else -1
        hits = result.hits
        if not hits or offset >= len(hits):
            return [], total
        if field == F_OPERATION_ID:
            return [(v, v, addr) for v, addr in hits[offset:window]], total
        op_ids = searcher.fast_field_values(F_OPERATION_ID, [addr for _, addr in hits])
        raw = list(zip((v for v, _ in hits), op_ids, (addr for _, addr in hits), strict=True))
        if len(hits) >= window and (total < 0 or total > len(hits)):
            raw = self._resolve_boundary_ties(searcher, query, field, order, raw)
        # documents without the field come last in both directions, as tantivy orders them
        if compiled.ascending:
            keys = [(v is None, v or 0, op, i) for i, (v, op, _) in enumerate(raw)]
        else:
            keys = [(v is None, -(v or 0), -op, i) for i, (v, op, _) in enumerate(raw)]
        keys.sort()
        rows = []
        for key in keys[offset:window]:
            value, op, addr = raw[key[3]]
            rows.append((0 if value is None else value, op, addr))
        return rows, total

    def _resolve_boundary_ties(
        self,
        searcher: tantivy.Searcher,
        query: tantivy.Query,
        field: str,
        order: tantivy.Order,
        rows: list[tuple[int | None, int, tantivy.DocAddress]],
    ) -> list[tuple[int | None, int, tantivy.DocAddress]]:
        """Replace the rows holding the boundary (last) value by the best of *all* the matches holding it,
        by operation id, so that a page boundary cutting a run of equal values is exact."""
        boundary = rows[-1][0]
        kept = [r for r in rows if r[0] != boundary]
        needed = len(rows) - len(kept)
        if boundary is None:
            same = tantivy.Query.exists_query(field)
            clauses = [(tantivy.Occur.Must, query), (tantivy.Occur.MustNot, same)]
        else:
            same = tantivy.Query.term_query(self.schema.tantivy_schema, field, int(boundary))
            clauses = [(tantivy.Occur.Must, query), (tantivy.Occur.Must, same)]
        ties = searcher.search(
            tantivy.Query.boolean_query(clauses), needed, count=False, order_by_field=F_OPERATION_ID, order=order
        ).hits
        return kept + [(boundary, int(op), addr) for op, addr in ties]

    def _bounded_query(
        self, compiled: CompiledQuery, field: str, bounds: tuple[tuple[int, int] | None, tuple[int, int] | None]
    ) -> tantivy.Query:
        """`compiled.query` restricted to the documents whose (field value, operation id) is strictly after
        `bounds[0]` and strictly before `bounds[1]` (either may be None). A document without the field
        sorts as value 0 (as `_search_by_field` returns it): it is kept whenever 0 may be within."""
        signed = compiled.sort_kind is SortKind.INT
        clauses = [(tantivy.Occur.Must, compiled.query)]
        for bound, greater in ((bounds[0], True), (bounds[1], False)):
            if bound is not None:
                value, operation_id = bound
                if signed:
                    value -= _INT_BIAS
                clauses.append((tantivy.Occur.Must, self._beyond(field, signed, value, operation_id, greater)))
        return tantivy.Query.boolean_query(clauses)

    def _beyond(self, field: str, signed: bool, value: int, operation_id: int, greater: bool) -> tantivy.Query:
        """Documents whose (field value, operation id) is greater (else less) than (value, operation_id)."""
        tschema = self.schema.tantivy_schema
        low_dom, high_dom = (-_INT_BIAS, _INT_BIAS - 1) if signed else (0, _U64_MAX)
        field_type = tantivy.FieldType.Integer if signed else tantivy.FieldType.Unsigned

        def span(name: str, kind: tantivy.FieldType, low: int, high: int) -> tantivy.Query | None:
            if low > high:
                return None
            return tantivy.Query.range_query(tschema, name, kind, low, high)

        if field == F_OPERATION_ID:  # the value is the operation id
            if greater:
                query = span(field, field_type, value if value > operation_id else value + 1, high_dom)
            else:
                query = span(field, field_type, low_dom, value if value < operation_id else value - 1)
            return query or tantivy.Query.empty_query()
        options: list[tantivy.Query] = []
        strictly = (
            span(field, field_type, value + 1, high_dom) if greater else span(field, field_type, low_dom, value - 1)
        )
        if strictly is not None:
            options.append(strictly)
        unsigned = tantivy.FieldType.Unsigned
        ties = (
            span(F_OPERATION_ID, unsigned, operation_id + 1, _U64_MAX)
            if greater
            else span(F_OPERATION_ID, unsigned, 0, operation_id - 1)
        )
        if ties is not None:
            options.append(
                tantivy.Query.boolean_query(
                    [
                        (tantivy.Occur.Must, tantivy.Query.term_query(tschema, field, value)),
                        (tantivy.Occur.Must, ties),
                    ]
                )
            )
        if field not in (F_CREATION_DATE, F_MODIFICATION_DATE) and (value <= 0 if greater else value >= 0):
            # documents without the field: value 0 (a superset: the searcher checks the bound exactly)
            options.append(
                tantivy.Query.boolean_query(
                    [
                        (tantivy.Occur.Must, tantivy.Query.all_query()),
                        (tantivy.Occur.MustNot, tantivy.Query.exists_query(field)),
                    ]
                )
            )
        if not options:
            return tantivy.Query.empty_query()
        return tantivy.Query.boolean_query([(tantivy.Occur.Should, option) for option in options])

    def _meta(self, searcher: tantivy.Searcher, operation_id: int, addr: tantivy.DocAddress) -> _Meta:
        meta = self._meta_cache.get(operation_id)
        if meta is None:
            meta = _meta_from_doc(searcher.doc(addr).to_dict())
            self._remember_meta(operation_id, meta)
        return meta

    def _remember_meta(self, operation_id: int, meta: _Meta) -> None:
        cache = self._meta_cache
        if len(cache) >= self._meta_cache_size:  # drop the oldest tenth
            try:
                for key in list(itertools.islice(cache, max(1, self._meta_cache_size // 10))):
                    cache.pop(key, None)
            except RuntimeError:  # pragma: no cover - resized by another thread
                pass
        cache.setdefault(operation_id, meta)

    def fetch_entity_mutations(self, entity_id: str) -> list[MutationMetadata]:
        """Every document of `entity_id`, ascending operation id, one per operation id (cached)."""
        if self._entities is not None:
            with self._cache_lock:
                return list(self._entities.get(entity_id, ()))
        with self._cache_lock:
            cached = self._entity_cache.get(entity_id)
            if cached is not None:
                self._entity_cache.move_to_end(entity_id)
                return list(cached)
            generation = self._generation
            searcher = self._searcher
        mutations = self._without_search(entity_id, searcher)
        if mutations is None:
            query = tantivy.Query.term_query(self.schema.tantivy_schema, F_ENTITY_ID, entity_id)
            # Most entities have a few documents: a small top-k first (tantivy sizes its buffers by the limit).
            hits = searcher.search(
                query, ENTITY_MUTATIONS_FIRST, count=False, order_by_field=F_OPERATION_ID, order=tantivy.Order.Asc
            ).hits
            if len(hits) >= ENTITY_MUTATIONS_FIRST:
                hits = searcher.search(
                    query, ENTITY_MUTATIONS_LIMIT, count=False, order_by_field=F_OPERATION_ID, order=tantivy.Order.Asc
                ).hits
            mutations = []
            last = -1
            for value, addr in hits:
                operation_id = int(value)
                if operation_id == last:
                    continue
                last = operation_id
                entity, mtype, block_offset = self._meta(searcher, operation_id, addr)
                sort_value = SortValue(SortKind.UINT, operation_id, operation_id)
                mutations.append(MutationMetadata(operation_id, block_offset, entity, mtype, sort_value))
        with self._cache_lock:
            if generation == self._generation:
                self._entity_cache[entity_id] = mutations
                if len(self._entity_cache) > self._entity_cache_size:
                    self._entity_cache.popitem(last=False)
        return list(mutations)

    def _without_search(self, entity_id: str, searcher: tantivy.Searcher) -> list[MutationMetadata] | None:
        """The entity's documents when a term lookup tells them (~1 us, a search costs ~10 times more), else
        None. The lookup counts the documents holding the entity id (deleted ones too): none, or one, which
        is a hit read from a page of this very searcher (`_Page`), as most entities a search aggregates:
        new ones found only in the pending index, and entities written once."""
        count = searcher.doc_freq(F_ENTITY_ID, entity_id)
        if count == 0:
            return []
        if count == 1:
            hit = self._hits.get(entity_id)
            if hit is not None and hit[0] is searcher:
                m = hit[1]
                sort_value = SortValue(SortKind.UINT, m.operation_id, m.operation_id)
                return [MutationMetadata(m.operation_id, m.block_offset, entity_id, m.mutation_type, sort_value)]
        return None

    def _remember_hit(self, searcher: tantivy.Searcher, hit: MutationMetadata) -> None:
        """Disk index: `hit` is a document of `searcher` (see `_without_search`)."""
        hits = self._hits
        if len(hits) >= HITS_REMEMBERED:
            hits.clear()
        hits[hit.entity_id] = (searcher, hit)

    def fetch_entities_mutations(self, entity_ids: Sequence[str]) -> dict[str, list[MutationMetadata]]:
        """`fetch_entity_mutations` of each entity: cached ones from the cache, the others with one search
        (unless one of them has many documents: then one search each, as `fetch_entity_mutations`)."""
        found: dict[str, list[MutationMetadata]] = {}
        missing: list[str] = []
        if self._entities is not None:
            with self._cache_lock:
                return {e: list(self._entities.get(e, ())) for e in entity_ids}
        with self._cache_lock:
            for entity_id in dict.fromkeys(entity_ids):
                cached = self._entity_cache.get(entity_id)
                if cached is None:
                    missing.append(entity_id)
                else:
                    self._entity_cache.move_to_end(entity_id)
                    found[entity_id] = list(cached)
            generation = self._generation
            searcher = self._searcher
        searched = []
        for entity_id in missing:
            known = self._without_search(entity_id, searcher)
            if known is None:
                searched.append(entity_id)
            else:
                found[entity_id] = known
        missing = searched
        if len(missing) < 2:
            for entity_id in missing:
                found[entity_id] = self.fetch_entity_mutations(entity_id)
            return found
        limit = ENTITY_MUTATIONS_FIRST * len(missing)
        hits = searcher.search(
            terms_query(self.schema, F_ENTITY_ID, missing),
            limit,
            count=False,
            order_by_field=F_OPERATION_ID,
            order=tantivy.Order.Asc,
        ).hits
        if len(hits) >= limit:
            for entity_id in missing:
                found[entity_id] = self.fetch_entity_mutations(entity_id)
            return found
        grouped: dict[str, list[MutationMetadata]] = {entity_id: [] for entity_id in missing}
        for value, addr in hits:
            operation_id = int(value)
            entity, mtype, block_offset = self._meta(searcher, operation_id, addr)
            mutations = grouped.get(entity)
            if mutations is None or (mutations and mutations[-1].operation_id == operation_id):
                continue  # one per operation id, as `fetch_entity_mutations`
            sort_value = SortValue(SortKind.UINT, operation_id, operation_id)
            mutations.append(MutationMetadata(operation_id, block_offset, entity, mtype, sort_value))
        with self._cache_lock:
            if generation == self._generation:
                for entity_id, mutations in grouped.items():
                    self._entity_cache[entity_id] = mutations
                while len(self._entity_cache) > self._entity_cache_size:
                    self._entity_cache.popitem(last=False)
        for entity_id, mutations in grouped.items():
            found[entity_id] = list(mutations)
        return found

    def operation_ids_for_entity(self, entity_id: str) -> list[int]:
        return [m.operation_id for m in self.fetch_entity_mutations(entity_id)]

    def highest_indexed_block(self) -> int | None:
        """Highest `block_offset` of any document (None if no document has one, e.g. the pending index)."""
        with self._cache_lock:
            generation, searcher, cached = self._generation, self._searcher, self._highest_block
        if cached is not None and cached[0] == generation:
            return cached[1]
        hits = searcher.search(
            tantivy.Query.exists_query(F_BLOCK_OFFSET), 1, count=False, order_by_field=F_BLOCK_OFFSET
        ).hits
        value = int(hits[0][0]) if hits and hits[0][0] is not None else None
        with self._cache_lock:
            self._highest_block = (generation, value)
        return value

    def count(self) -> int:
        """Number of documents in the index."""
        return int(self._searcher.num_docs)

    def entity_ids(self, operation_ids: Iterable[int]) -> dict[int, str]:
        """operation id -> entity id of the documents holding them (missing ids are absent)."""
        ids = list(dict.fromkeys(operation_ids))
        if not ids:
            return {}
        return {op: meta[0] for op, meta in self._docs_for_operations(ids)}


_COMPILERS_LOCK = threading.Lock()


def compiler_for(schema: IndexSchema) -> QueryCompiler:
    """The `QueryCompiler` shared by every index of `schema` (kept on the schema)."""
    with _COMPILERS_LOCK:
        compiler = schema.query_compiler
        if not isinstance(compiler, QueryCompiler):
            compiler = QueryCompiler(schema)
            schema.query_compiler = compiler
        return compiler
