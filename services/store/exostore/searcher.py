"""Entity-level search (SPEC 3.7) over the two mutation indices.

`EntitySearcher.search(query)` runs the query on the chain and the pending index (any pair of objects
satisfying `MutationSource`), merges both streams of matching mutations by ordering value (chain first on
ties), walks them keeping one result per entity (its best-ranked active mutation), pages by ordering value,
selects the top `count` with the "negatively re-scored top-N" algorithm, hashes the page and loads the
trait payloads through a `TraitFetcher` callback.

Ordering values:

* the ordering is resolved once by `effective_ordering` (predicate defaults, `sort:` in query strings)
  and sent to both sources explicitly, so the sources never guess it;
* ``score``: the sources return **raw** relevance scores. Unless ``no_recency_boost``, this module
  multiplies each by ``recency(d)`` (d = the put's explicit modification date, else the operation time)
  and by `pending_index_boost` (5.0) for pending-index matches, then re-sorts each source's stream. Unless
  ``no_reference_boost``, the score of an entity without any reference is × 0.3 (÷ 0.3 when ascending).
  Scores are rounded to 32-bit floats (the wire type), so a value sent back as a paging bound compares
  exactly;
* ``operation_id`` / ``created_at`` / ``updated_at`` / ``field``: the source's u64 value as ``uint64``;
  a signed (`SortKind.INT`) value is mapped order-preservingly to ``value + 2**63`` (the original could
  not sort by signed fields at all);
* ties are broken by operation id; `compare_ordering_values` implements the proto comparison
  (``min`` < anything < ``max``, different kinds incomparable).

Differences from the original, on purpose:

* `next_page` is absent when the page is empty **or partial** (fewer than `count` results): a partial
  page is the last one (SPEC 11 item 7 calls the original's behaviour a bug) -- unless the iteration cap
  cut it short (below);
* when the results hash equals a non-zero `result_hash`, `skipped_hash` is set and **no entities** are
  returned (the original returned entity shells; the proto says empty). 0 means "no hash" (proto3
  default), so an empty page is never reported as skipped;
* traits are ordered by trait id (the original's order was a hash map's, SPEC 11 item 9);
* the iteration cap per index (`max_pages` × `page_size`, default 5 × 1000 as the original) is a
  constructor parameter; ``max_pages=None`` removes it. It never loses results (the original's pages
  past the first 5,000 mutations of an index were unreachable, SPEC 11 item 7): it counts only the
  matches past the page's start bound (`after_ordering_value` ascending, `before_ordering_value`
  descending), and when it stops an index's stream before the page is full, the page gets a `next_page`
  bounded by the last match examined (all that ranks up to it was examined; see `_capped`), so paging
  goes on from there and every page's bound strictly advances;
* pages of a non-score ordering start at their bound: the searcher pushes the bound into the index search
  (`query.paging` of `MutationSource.search`), so a deep page reads what lies past its bound only. An
  entity ranks by its best matching mutation, which may lie before the bound (an earlier page returned
  it): such an entity is recognised by its other active mutations ranked before the bound that match the
  query (`_ranked_before_bound`: rarely more than a search per index, only for entities having such
  mutations). Score orderings cannot start at their bound (the index ranks raw scores, the page boosted
  ones): each page reads both indices from the top. **Remaining cost**: a deep score page reads every
  mutation ranked before its bound (their metadata only: their entities are aggregated only if they show
  up again past the bound, see `candidates` in `search`); likewise an ascending score ordering with
  recency boost reads every match (a boost has no lower bound); and a ``field`` ordering of a query string
  is not pushed down (no sub-query can restrict a query string to some operations);
* within the cap, each index is read lazily: a first page of ``max(12, 1.5 × count)`` mutations, then
  pages growing 4 times up to `page_size`, and score streams are re-ranked by their boosts lazily too
  (`_score_matches`): a page of 10 usually reads a few dozen mutations per index (same results: paging by
  offset is exact); the mutations of the entities best ranked on the first pages are fetched in one batch
  per index (`_Prefetch`, when the sources have `fetch_entities_mutations`) before aggregating them;
* `estimated_count` counts entities (the original counted mutations, SPEC 11 item 7): exact when both
  indices were read to the end from the top (the distinct entities that matched, deleted ones only with
  `include_deleted`); otherwise the matching mutations of both indices × the distinct entities per
  mutation examined, at least the entities seen;
* entities flagged for GC are reported to the `gc_flagger` callback once per search; an entity whose
  aggregation says `should_collect` is flagged when it is returned, even if the page was skipped by hash.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.protobuf.descriptor_pool import DescriptorPool

from exocommon.clock import timestamp_to_proto
from exocommon.errors import InvalidArgument
from exocore.store import entity_pb2, query_pb2
from exostore.aggregator import EntityAggregator, TraitAggregator, crc64_of_u64s
from exostore.projection import find_projection, project_trait_fields
from exostore.types import MutationMetadata, MutationResults, SortKind, TraitPutMeta

log = logging.getLogger(__name__)

DEFAULT_PAGE_COUNT = 10
ITERATOR_PAGE_SIZE = 1000
ITERATOR_MAX_PAGES = 5
FIRST_PAGE_MIN = 12  # mutations asked from each index first (at least 1.5 times the entity page)
PAGE_GROWTH = 4  # each further page is this many times larger, up to ITERATOR_PAGE_SIZE
PREFETCH_EXTRA = 2  # entities prefetched per index beyond the page's count (the others are fetched one by one)
PENDING_INDEX_BOOST = 5.0
REFERENCE_PENALTY = 0.3
RECENCY_OFFSET_DAYS = 15.0
RECENCY_SCALE_DAYS = 365.0
RECENCY_DECAY = 0.2
NS_PER_DAY = 86_400 * 1_000_000_000
_INT_BIAS = 1 << 63
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = (1 << 64) - 1


# --- what the searcher needs from the rest of the store ----------------------------------------------------


class MutationSource(Protocol):
    """One mutation index (pending or chain), as the searcher uses it.

    `search` returns the documents matching `query`'s predicate, ordered by `query.ordering` (always set by
    the searcher: value and direction; ties by operation id, higher first when descending), skipping the
    first `offset` and returning at most `count`; `total` counts every matching document. `query.paging`
    has no count nor offset (they are the arguments); for a non-score ordering its `after_ordering_value`
    / `before_ordering_value`, when set (``uint64`` values, a signed field's as ``value + 2**63``), tell
    the source it may return only the documents whose (sort value, operation id) lies strictly between
    them (then `total` counts those): pages start at their bound. A source may ignore them (the searcher
    filters by bound anyway), at the cost of reading from the top. For a ``score`` ordering, `sort_value` is
    the raw relevance score (`SortKind.SCORE`) **without** recency or index boost (the searcher applies
    them); otherwise it is the u64 sort field (`SortKind.UINT`; operation id, explicit date in ns or 0, or
    the sorted field; `SortKind.INT` for signed fields). `sort_value.operation_id` is the document's
    operation id. Query errors are raised (e.g. `InvalidArgument`).

    `with_total=False` (further pages of a query already counted) lets the source skip counting:
    `total` is then unspecified.

    `fetch_entity_mutations` returns every document of that entity in this index (any order).
    """

    def search(
        self, query: query_pb2.EntityQuery, count: int, offset: int, *, with_total: bool = True
    ) -> MutationResults: ...

    def fetch_entity_mutations(self, entity_id: str) -> list[MutationMetadata]: ...


class _Prefetch:
    """Mutations of the entities a search is about to aggregate, fetched with one search per index (sources
    having `fetch_entities_mutations(ids) -> {id: mutations}`, as `fetch_entity_mutations` of each) rather
    than two searches per entity: from the pending index (RAM: lookups) for the entities of both first
    pages; from the chain index for those of its own first page, unless the pending index filled its first
    page: its matches (boosted 5 times) then usually make most of the entity page, and the few chain
    entities aggregated cost less one by one than a batch of all of them. An entity found only in the
    pending index is usually new: it is looked up alone in the chain index if aggregated. (Score pages past
    a bound prefetch nothing: their first pages rank before the bound, see `EntitySearcher.search`.)"""

    def __init__(self, pending: MutationSource, chain: MutationSource) -> None:
        self._pending = getattr(pending, "fetch_entities_mutations", None)
        self._chain = getattr(chain, "fetch_entities_mutations", None)
        self._found: tuple[dict[str, list[MutationMetadata]], dict[str, list[MutationMetadata]]] = ({}, {})

    def add(
        self, chain_page: Sequence[MutationMetadata], pending_page: Sequence[MutationMetadata], wanted: int
    ) -> None:
        """Prefetches the entities of the first `wanted + PREFETCH_EXTRA` mutations of the pending page, and
        of the chain page as many as the pending page lacks: none when it is full (a page builds its
        mutations as they are read, loading a stored document for each chain hit, and the pending matches,
        boosted 5 times, then usually make most of the entity page); the others are looked up one by one if
        aggregated (without a search for most: see `MutationIndex._without_search`)."""
        if self._pending is None or self._chain is None:
            return
        limit = wanted + PREFETCH_EXTRA
        in_pending = [m.entity_id for m in pending_page[:limit]]
        from_chain = 0 if len(pending_page) >= wanted else limit - len(in_pending)
        in_chain = list(dict.fromkeys(m.entity_id for m in chain_page[:from_chain]))
        everyone = list(dict.fromkeys([*in_chain, *in_pending]))
        if len(everyone) > 1:
            self._found[0].update(self._pending(everyone))
        if len(in_chain) > 1:
            self._found[1].update(self._chain(in_chain))

    def take(self, entity_id: str) -> tuple[list[MutationMetadata] | None, list[MutationMetadata] | None]:
        """(pending, chain) mutations of the entity when prefetched."""
        return self._found[0].pop(entity_id, None), self._found[1].pop(entity_id, None)


TraitFetcher = Callable[[int, int | None], tuple[str, entity_pb2.Trait] | None]
"""(operation_id, block_offset or None if pending) -> (entity id, trait) of that put, or None if missing."""

GcFlagger = Callable[[EntityAggregator], None]
"""Receives entities that may have something to garbage collect (deleted, stale match, `should_collect`)."""


# --- ordering values ----------------------------------------------------------------------------------------

_OV = tuple[str, float | int, int]  # (kind: "float"|"uint64"|"date"|"min"|"max"|"", value, operation_id)


def _ov_from_proto(value: query_pb2.OrderingValue) -> _OV:
    kind = value.WhichOneof("value") or ""
    if kind == "float":
        return ("float", value.float, value.operation_id)
    if kind == "uint64":
        return ("uint64", value.uint64, value.operation_id)
    if kind == "date":
        return ("date", value.date.seconds * 1_000_000_000 + value.date.nanos, value.operation_id)
    return (kind, 0, value.operation_id)


def _ov_to_proto(value: _OV) -> query_pb2.OrderingValue:
    kind, primary, op_id = value
    result = query_pb2.OrderingValue(operation_id=op_id)
    if kind == "float":
        result.float = float(primary)
    elif kind == "uint64":
        result.uint64 = int(primary)
    elif kind == "date":
        result.date.CopyFrom(timestamp_to_proto(int(primary)))
    elif kind == "min":
        result.min = True
    elif kind == "max":
        result.max = True
    return result


def _cmp(a: float | int, b: float | int) -> int | None:
    if a < b:
        return -1
    if a > b:
        return 1
    if a == b:
        return 0
    return None  # NaN


def _compare_ov(a: _OV, b: _OV) -> int | None:
    if a[0] == b[0] and a[1] == b[1]:
        return _cmp(a[2], b[2])
    if a[0] == "min":
        return -1
    if b[0] == "min":
        return 1
    if a[0] == "max":
        return 1
    if b[0] == "max":
        return -1
    if a[0] == b[0] and a[0] in ("float", "uint64", "date"):
        return _cmp(a[1], b[1])
    return None


def compare_ordering_values(a: query_pb2.OrderingValue, b: query_pb2.OrderingValue) -> int | None:
    """-1, 0 or 1 as `a` is less, equal or greater than `b`; None if incomparable (different kinds, NaN).

    `min` is less than anything and `max` greater; equal primary values compare by operation id.
    """
    return _compare_ov(_ov_from_proto(a), _ov_from_proto(b))


def is_after(value: query_pb2.OrderingValue, bound: query_pb2.OrderingValue) -> bool:
    return compare_ordering_values(value, bound) == 1


def is_before(value: query_pb2.OrderingValue, bound: query_pb2.OrderingValue) -> bool:
    return compare_ordering_values(value, bound) == -1


def _within(value: _OV, after: _OV | None, before: _OV | None) -> bool:
    if before is not None and _compare_ov(value, before) != -1:
        return False
    return after is None or _compare_ov(value, after) == 1


def _pre_bound_test(start: _OV | None, ascending: bool) -> Callable[[_OV], bool] | None:
    """Tells whether an ordering value ranks at or before `start`, the bound a page starts from (its
    `after_ordering_value` ascending, `before_ordering_value` descending); None when there is none.
    Incomparable values rank before (they are never within the page)."""
    if start is None:
        return None
    outside = 1 if ascending else -1

    def test(value: _OV) -> bool:
        return _compare_ov(value, start) != outside

    return test


def _put_date(attribute: str) -> Callable[[MutationMetadata], int]:
    def value(mutation: MutationMetadata) -> int:
        kind = mutation.mutation_type
        return (getattr(kind, attribute) or 0) if isinstance(kind, TraitPutMeta) else 0

    return value


# The sort value of a mutation, from its metadata, for the orderings where the metadata holds it (as the
# index's fast fields: an explicit date in ns, else 0; tombstones 0).
_KNOWN_SORT_VALUES: dict[str, Callable[[MutationMetadata], int]] = {
    "operation_id": lambda mutation: mutation.operation_id,
    "created_at": _put_date("creation_date"),
    "updated_at": _put_date("modification_date"),
}


def is_within_page_bound(value: query_pb2.OrderingValue, paging: query_pb2.Paging) -> bool:
    """Strictly after `after_ordering_value` and strictly before `before_ordering_value` (when set)."""
    after = _ov_from_proto(paging.after_ordering_value) if paging.HasField("after_ordering_value") else None
    before = _ov_from_proto(paging.before_ordering_value) if paging.HasField("before_ordering_value") else None
    return _within(_ov_from_proto(value), after, before)


_F32 = struct.Struct("<f")


def to_f32(value: float) -> float:
    """`value` rounded to the nearest 32-bit float (the wire type of scores)."""
    try:
        return float(_F32.unpack(_F32.pack(value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


def _f32_below(value: float) -> float:
    """The largest score below `value` (> 0): the next 32-bit float down when `value` is one (tantivy's
    scores are), else the next double down."""
    packed = struct.pack("<f", value)
    if struct.unpack("<f", packed)[0] != value:
        return math.nextafter(value, -math.inf)
    (bits,) = struct.unpack("<I", packed)
    return float(struct.unpack("<f", struct.pack("<I", bits - 1))[0])


def recency_boost(now_ns: int, date_ns: int) -> float:
    """``exp(ln(0.2)/365 × max(0, |days(now) − days(date)| − 15))``, days = whole days since the epoch.

    1.0 within 15 days, ≈0.2137 at 365 days, ≈0.04274 at 730 days.
    """
    now_days = now_ns // NS_PER_DAY
    date_days = date_ns // NS_PER_DAY
    distance = max(0.0, abs(now_days - date_days) - RECENCY_OFFSET_DAYS)
    return to_f32(math.exp(math.log(RECENCY_DECAY) / RECENCY_SCALE_DAYS * distance))


# --- effective ordering --------------------------------------------------------------------------------------


def _query_string_sort_parts(text: str) -> list[tuple[str, bool]]:
    """(sort value, negated) of each ``sort:`` part of a query string, scanned like the original parser."""
    parts: list[tuple[str, bool]] = []
    field, buf, negated, phrase, paren = "", "", False, False, False

    def push() -> None:
        if buf and field == "sort":
            parts.append((buf, negated))

    for ch in text.lower():
        if phrase:
            if ch == '"':
                push()
                field, buf, negated, phrase, paren = "", "", False, False, False
            else:
                buf += ch
        elif paren:
            if ch == ")":
                push()
                field, buf, negated, phrase, paren = "", "", False, False, False
            else:
                buf += ch
        elif ch.isspace():
            push()
            field, buf, negated, phrase, paren = "", "", False, False, False
        elif ch == "+":
            negated = False
        elif ch == "-":
            negated = True
        elif ch == ":":
            field, buf = buf, ""
        elif ch == '"':
            phrase = True
        elif ch == "(":
            paren = True
        else:
            buf += ch
    push()
    return parts


def _apply_query_string(text: str, ordering: query_pb2.Ordering) -> None:
    if ordering.WhichOneof("value") is None:
        ordering.score = True
    for value, negated in _query_string_sort_parts(text):
        if value.startswith("update"):
            ordering.updated_at = True
            ordering.ascending = False
        elif value == "date" or value.startswith("create"):
            ordering.created_at = True
            ordering.ascending = False
        elif value == "score":
            ordering.score = True
            ordering.ascending = False
        if negated:
            ordering.ascending = not ordering.ascending


def _apply_default(kind: str, predicate: object, ordering: query_pb2.Ordering) -> None:
    unset = ordering.WhichOneof("value") is None
    if kind == "match":
        if unset:
            ordering.score = True
    elif kind == "trait":
        if unset:
            ordering.operation_id = True
        assert isinstance(predicate, query_pb2.TraitPredicate)
        if predicate.HasField("query") and predicate.query.WhichOneof("predicate") == "query_string":
            _apply_query_string(predicate.query.query_string.query, ordering)
    elif kind in ("ids", "reference", "operations"):
        if unset:
            ordering.operation_id = True
            ordering.ascending = True
    elif kind == "all":
        if unset:
            ordering.operation_id = True
            ordering.ascending = False
    elif kind == "boolean":
        assert isinstance(predicate, query_pb2.BooleanPredicate)
        for sub in predicate.queries:
            sub_kind = sub.WhichOneof("predicate")
            if sub_kind is not None:
                _apply_default(sub_kind, getattr(sub, sub_kind), ordering)
    elif kind == "query_string":
        assert isinstance(predicate, query_pb2.QueryStringPredicate)
        _apply_query_string(predicate.query, ordering)


def effective_ordering(query: query_pb2.EntityQuery) -> query_pb2.Ordering:
    """The ordering a query runs with (SPEC 3.6): the query's own if it has a value, else the predicate's
    default (match / query string: score; trait, all: operation id descending; ids, reference, operations:
    operation id ascending; boolean: its first sub-predicate's; a trait query's own match does not change
    the trait's default, as the original). A query string's ``sort:`` parts always win, ``-sort:`` flipping
    the direction. Idempotent: resolving the result again gives the same ordering."""
    ordering = query_pb2.Ordering()
    ordering.CopyFrom(query.ordering)
    kind = query.WhichOneof("predicate")
    if kind is not None:
        _apply_default(kind, getattr(query, kind), ordering)
    if ordering.WhichOneof("value") is None:
        ordering.operation_id = True
    return ordering


# --- top-N with penalized scores -----------------------------------------------------------------------------


class _Comparable(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...

    def __le__(self, other: Any, /) -> bool: ...


T = TypeVar("T")
K = TypeVar("K", bound=_Comparable)


def top_negatively_rescored(
    items: Iterable[T],
    count: int,
    keys: Callable[[T], tuple[K, K]],
    flush_until: Callable[[], K | None] | None = None,
) -> list[T]:
    """The best `count` items by penalized key, from `items` sorted by original key (smaller key = better).

    `keys(item)` returns (original key, penalized key), the penalized key never better than the original.
    Items wait in a heap by penalized key and are released once the stream's original keys get worse than
    them, so the stream is consumed only as far as needed. Keys must be mutually comparable with ``<=``.
    `flush_until()`, called once `items` is exhausted, may return a key: the stream was cut there (items
    beyond it were not read), so only waiting items whose penalized key is at most that key are released.
    """
    top: list[T] = []
    if count <= 0:
        return top
    reserve: list[tuple[K, int, T]] = []
    seq = itertools.count()
    for item in items:
        original, penalized = keys(item)
        while reserve and reserve[0][0] <= original and len(top) < count:
            top.append(heapq.heappop(reserve)[2])
        if len(top) >= count:
            return top
        heapq.heappush(reserve, (penalized, next(seq), item))
    limit = flush_until() if flush_until is not None else None
    while reserve and len(top) < count and (limit is None or reserve[0][0] <= limit):
        top.append(heapq.heappop(reserve)[2])
    return top


# --- the search -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Match:
    mutation: MutationMetadata
    source: query_pb2.EntityResultSource.ValueType
    kind: str  # "float" | "uint64"
    value: float | int


@dataclass(slots=True)
class _Stop:
    """End of an index's stream cut by the iteration cap: every match ranked up to `ov` (rank `key`) was
    yielded before it, and any match left ranks after it."""

    key: tuple[float | int, float | int]
    ov: _OV


@dataclass(slots=True)
class _Walk:
    """What a search's walk over the merged stream saw (for `next_page` and `estimated_count`)."""

    stop: _Stop | None = None
    exhausted: bool = False
    examined: int = 0


@dataclass(slots=True)
class _Candidate:
    match: _Match
    aggregator: EntityAggregator
    original_key: tuple[float | int, int]
    penalized_key: tuple[float | int, int]
    ordering_value: _OV


class EntitySearcher:
    """Runs entity queries over a chain and a pending `MutationSource`; stateless between searches."""

    def __init__(
        self,
        chain_index: MutationSource,
        pending_index: MutationSource,
        fetch_trait: TraitFetcher,
        *,
        gc_flagger: GcFlagger | None = None,
        page_size: int = ITERATOR_PAGE_SIZE,
        max_pages: int | None = ITERATOR_MAX_PAGES,
        pending_index_boost: float = PENDING_INDEX_BOOST,
        now_ns: Callable[[], int] = time.time_ns,
        descriptor_pool: DescriptorPool | None = None,
        ordering_resolver: Callable[[query_pb2.EntityQuery], query_pb2.Ordering] | None = None,
    ) -> None:
        """`ordering_resolver` gives the ordering a query runs with; pass the mutation index's compiler
        (`lambda q: index.compile(q).ordering`) so the indices and the searcher can never disagree on it
        (default: `effective_ordering`). `max_pages` × `page_size` mutations at most are read per index
        and query (None: no cap);
        `now_ns` is the wall clock of the recency boost; `descriptor_pool` resolves trait types for field
        projections (default: the generated messages' pool)."""
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        if max_pages is not None and max_pages <= 0:
            raise ValueError("max_pages must be positive or None")
        self._chain = chain_index
        self._pending = pending_index
        self._fetch_trait = fetch_trait
        self._gc_flagger = gc_flagger
        self._page_size = page_size
        self._max_pages = max_pages
        self._pending_boost = pending_index_boost
        self._now_ns = now_ns
        self._pool = descriptor_pool
        self._resolve_ordering = ordering_resolver or effective_ordering

    # public ----------------------------------------------------------------------------------------------

    def search(self, query: query_pb2.EntityQuery) -> query_pb2.EntityResults:
        if query.WhichOneof("predicate") is None:
            raise InvalidArgument("query has no predicate")

        ordering = self._resolve_ordering(query)
        ascending = ordering.ascending
        order_kind = ordering.WhichOneof("value")
        is_score = order_kind == "score"
        recency = is_score and not ordering.no_recency_boost
        reference_boost = not ordering.no_reference_boost

        page = query_pb2.Paging()
        page.CopyFrom(query.paging)
        if page.count == 0:
            page.count = DEFAULT_PAGE_COUNT
        after = _ov_from_proto(page.after_ordering_value) if page.HasField("after_ordering_value") else None
        before = _ov_from_proto(page.before_ordering_value) if page.HasField("before_ordering_value") else None
        start = after if ascending else before  # the bound this page starts from
        pre_bound = _pre_bound_test(start, ascending)

        index_query = query_pb2.EntityQuery()
        index_query.CopyFrom(query)
        index_query.ClearField("paging")
        index_query.ordering.CopyFrom(ordering)
        count_query = index_query
        # Non-score orderings: the indices start at the page's bound (see the module doc).
        sort_value_of = _KNOWN_SORT_VALUES.get(order_kind or "")
        pushed = False
        if not is_score and (sort_value_of is not None or query.WhichOneof("predicate") != "query_string"):
            bounds = [(b, name) for b, name in ((after, "after"), (before, "before")) if b and b[0] == "uint64"]
            if bounds:
                pushed = True
                index_query = query_pb2.EntityQuery()
                index_query.CopyFrom(count_query)
                for bound, name in bounds:
                    getattr(index_query.paging, f"{name}_ordering_value").CopyFrom(_ov_to_proto(bound))

        now_ns = self._now_ns()
        wanted = page.count
        aggregators: dict[str, EntityAggregator | None] = {}
        origins: dict[str, tuple[list[MutationMetadata], list[MutationMetadata]]] = {}
        prefetch = _Prefetch(self._pending, self._chain)
        first_pages: list[Sequence[MutationMetadata]] = [(), ()]  # chain, pending

        # The best of each first page: the entity page usually comes from them. Not when the indices are read
        # from the top past a bound (score orderings): their first pages then rank mostly before the bound,
        # and such entities are not aggregated (see `deferred` below).
        prefetching = pre_bound is None or pushed

        def on_chain_page(mutations: Sequence[MutationMetadata], first: bool) -> None:
            if first and prefetching:
                first_pages[0] = mutations

        def on_pending_page(mutations: Sequence[MutationMetadata], first: bool) -> None:
            if first and prefetching:
                first_pages[1] = mutations

        chain_total, chain_stream = self._stream(
            self._chain,
            index_query,
            query_pb2.CHAIN,
            is_score,
            ascending,
            recency,
            1.0,
            now_ns,
            wanted,
            on_chain_page,
            pre_bound=pre_bound,
            with_total=not pushed,
        )
        pending_total, pending_stream = self._stream(
            self._pending,
            index_query,
            query_pb2.PENDING,
            is_score,
            ascending,
            recency,
            self._pending_boost,
            now_ns,
            wanted,
            on_pending_page,
            pre_bound=pre_bound,
            with_total=not pushed,
        )
        if pushed:  # the counts of every match, not only of those past the bound (cached by the indices)
            chain_total = self._chain.search(count_query, 0, 0).total
            pending_total = self._pending.search(count_query, 0, 0).total
        prefetch.add(first_pages[0], first_pages[1], wanted)

        def entries(stream: Iterator[_Match | _Stop], index: int) -> Iterator[tuple[Any, int, _Match | _Stop]]:
            for item in stream:
                if isinstance(item, _Stop):
                    yield item.key, index, item
                else:
                    yield self._rank_key(item.value, item.mutation.sort_value.operation_id, ascending), index, item

        merged = heapq.merge(entries(chain_stream, 0), entries(pending_stream, 1), key=lambda e: (e[0], e[1]))

        flagged: set[str] = set()

        def flag(agg: EntityAggregator) -> None:
            if self._gc_flagger is not None and agg.entity_id not in flagged:
                flagged.add(agg.entity_id)
                self._gc_flagger(agg)

        def surely_before_bound(match: _Match) -> bool:
            """Ranked before the page's start bound whatever the entity's reference penalty."""
            if pre_bound is None:
                return False
            op_id = match.mutation.sort_value.operation_id
            if not pre_bound((match.kind, match.value, op_id)):
                return False
            if match.kind == "float" and reference_boost:
                value = match.value
                penalized = to_f32(value / REFERENCE_PENALTY if ascending else value * REFERENCE_PENALTY)
                return pre_bound(("float", penalized, op_id))
            return True

        walk = _Walk()
        seen: set[str] = set()
        # entity -> its mutations ranked before the page's bound, not aggregated (yet): an entity is
        # aggregated only if it shows up past the bound (then it ranks before the bound if one of them is
        # active), so a deep page reading from the top does not aggregate every entity of the earlier pages
        deferred: dict[str, list[int]] = {}

        def candidates() -> Iterator[_Candidate]:
            for original_key, _, item in merged:
                if isinstance(item, _Stop):
                    walk.stop = item  # an index's stream was cut: nothing is known beyond
                    return
                match = item
                walk.examined += 1
                entity_id = match.mutation.entity_id
                if entity_id in seen:
                    continue  # dedup before the page bounds: an entity ranks by its best mutation only
                if surely_before_bound(match):
                    deferred.setdefault(entity_id, []).append(match.mutation.operation_id)
                    continue
                agg = self._aggregate(entity_id, aggregators, prefetch, origins)
                if agg is None:
                    continue
                earlier = deferred.pop(entity_id, None)
                if earlier is not None:
                    active = agg.active_operations
                    if agg.deleted or not all(op_id in active for op_id in earlier):
                        flag(agg)
                    if query.include_deleted or any(op_id in active for op_id in earlier):
                        seen.add(entity_id)  # ranked before the bound by an earlier mutation
                        continue
                if agg.deleted or match.mutation.operation_id not in agg.active_operations:
                    flag(agg)
                    if not query.include_deleted:
                        continue  # not marked as seen: a later active mutation may still surface it
                if pushed and self._ranked_before_bound(
                    index_query, match, agg, origins.get(entity_id), query.include_deleted, pre_bound, sort_value_of
                ):
                    seen.add(entity_id)  # its best match lies before the bound: returned by an earlier page
                    continue
                seen.add(entity_id)

                op_id = match.mutation.sort_value.operation_id
                value = match.value
                if match.kind == "float" and reference_boost and not agg.has_reference:
                    value = to_f32(value / REFERENCE_PENALTY if ascending else value * REFERENCE_PENALTY)
                ordering_value: _OV = (match.kind, value, op_id)
                if not _within(ordering_value, after, before):
                    continue
                yield _Candidate(match, agg, original_key, self._rank_key(value, op_id, ascending), ordering_value)
            walk.exhausted = True

        selected = top_negatively_rescored(
            candidates(),
            page.count,
            lambda c: (c.original_key, c.penalized_key),
            lambda: walk.stop.key if walk.stop is not None else None,
        )

        results_hash = crc64_of_u64s(c.aggregator.hash for c in selected)
        skipped = query.result_hash != 0 and results_hash == query.result_hash
        for candidate in selected:
            if candidate.aggregator.should_collect:
                flag(candidate.aggregator)

        bound: _OV | None = None
        if selected and len(selected) >= page.count:
            bound = selected[-1].ordering_value
        elif walk.stop is not None:
            # the cap cut the page short: the next page goes on from the last match examined (every
            # entity ranked up to it was returned by this page or an earlier one)
            bound = walk.stop.ov
        next_page: query_pb2.Paging | None = None
        if bound is not None:
            next_page = query_pb2.Paging()
            next_page.CopyFrom(page)
            if ascending:
                next_page.after_ordering_value.CopyFrom(_ov_to_proto(bound))
            else:
                next_page.before_ordering_value.CopyFrom(_ov_to_proto(bound))

        total = max(0, chain_total) + max(0, pending_total)
        entities = len(seen) + len(deferred)
        if walk.exhausted and not pushed:
            estimated = entities  # every match was examined (deferred entities were not aggregated: counted)
        elif walk.examined:
            estimated = max(entities, round(total * entities / walk.examined))
        else:
            estimated = total
        results = query_pb2.EntityResults(
            skipped_hash=skipped,
            estimated_count=min(estimated, _U32_MAX),
            current_page=page,
            hash=results_hash,
        )
        if next_page is not None:
            results.next_page.CopyFrom(next_page)
        if not skipped:
            for candidate in selected:
                self._fill_result(results.entities.add(), candidate, query)
        return results

    def fetch_entity(self, entity_id: str, include_deleted: bool = False) -> entity_pb2.Entity | None:
        """The aggregated entity with its traits (no query, no projection); None if it has no mutation."""
        agg = self._aggregate(entity_id, {})
        if agg is None:
            return None
        return self._entity(agg, (), include_deleted)

    # internals ------------------------------------------------------------------------------------------

    @staticmethod
    def _rank_key(value: float | int, operation_id: int, ascending: bool) -> tuple[float | int, int]:
        """Sort key, smaller = ranked first."""
        return (value, operation_id) if ascending else (-value, -operation_id)

    def _pages(
        self,
        source: MutationSource,
        query: query_pb2.EntityQuery,
        wanted: int,
        on_page: Callable[[Sequence[MutationMetadata], bool], None] | None = None,
        with_total: bool = True,
    ) -> tuple[int, Iterator[MutationMetadata]]:
        """The source's matching mutations in order, read lazily: a first page sized for `wanted` entities,
        then pages growing `PAGE_GROWTH` times up to `page_size` (the same mutations as reading pages of
        `page_size`: paging by offset is exact). The iteration cap is `_capped`'s. `with_total=False`: the
        total returned is unspecified (-1 or the source's count)."""
        size = min(self._page_size, max(FIRST_PAGE_MIN, wanted + wanted // 2))
        first = source.search(query, size, 0, with_total=with_total)
        total = first.total
        if on_page is not None:
            on_page(first.mutations, True)

        def iterate() -> Iterator[MutationMetadata]:
            page, offset, asked = first, 0, size
            while True:
                yield from page.mutations
                offset += len(page.mutations)
                if len(page.mutations) < asked or 0 <= total <= offset:
                    return
                asked = min(self._page_size, asked * PAGE_GROWTH)
                page = source.search(query, asked, offset, with_total=False)
                if on_page is not None:
                    on_page(page.mutations, False)

        return total, iterate()

    def _stream(
        self,
        source: MutationSource,
        query: query_pb2.EntityQuery,
        source_kind: query_pb2.EntityResultSource.ValueType,
        is_score: bool,
        ascending: bool,
        recency: bool,
        index_boost: float,
        now_ns: int,
        wanted: int,
        on_page: Callable[[Sequence[MutationMetadata], bool], None] | None = None,
        *,
        pre_bound: Callable[[_OV], bool] | None = None,
        with_total: bool = True,
    ) -> tuple[int, Iterator[_Match | _Stop]]:
        total, mutations = self._pages(source, query, wanted, on_page, with_total)
        matches: Iterator[_Match]
        if is_score:
            matches = self._score_matches(mutations, source_kind, ascending, recency, index_boost, now_ns)
        else:
            matches = (self._uint_match(m, source_kind) for m in mutations)
        return total, self._capped(matches, ascending, pre_bound)

    def _capped(
        self, matches: Iterator[_Match], ascending: bool, pre_bound: Callable[[_OV], bool] | None
    ) -> Iterator[_Match | _Stop]:
        """`matches` (final: in ranking order) up to the iteration cap, `max_pages × page_size` matches past
        the page's start bound (those ranked before it are read without counting: a deep page still reads
        them, but the cap cannot hide what lies past them); a `_Stop` at the last match yielded ends a
        stream cut while matches are left. Every match counted is past the bound, so the stop is too: a
        next page bounded by it starts further."""
        cap = None if self._max_pages is None else self._max_pages * self._page_size
        counted = 0
        last: _Match | None = None
        for match in matches:
            if cap is not None and counted >= cap and last is not None:
                op_id = last.mutation.sort_value.operation_id
                yield _Stop(self._rank_key(last.value, op_id, ascending), (last.kind, last.value, op_id))
                return
            if pre_bound is None or not pre_bound((match.kind, match.value, match.mutation.sort_value.operation_id)):
                counted += 1
            last = match
            yield match

    def _score_matches(
        self,
        mutations: Iterator[MutationMetadata],
        source_kind: query_pb2.EntityResultSource.ValueType,
        ascending: bool,
        recency: bool,
        index_boost: float,
        now_ns: int,
    ) -> Iterator[_Match]:
        """The boosted matches of one index in boosted order (ties by operation id).

        Boosts change the order, so the (capped) stream of the index is re-ranked. Descending, that is
        done lazily: the source yields raw scores in decreasing order, and a boosted value is at most
        ``raw × 1.0 × index_boost`` (recency <= 1; float rounding is monotonic), so a read match is final
        once its boosted value is above that bound for the last raw score read: the stream is consumed
        only as far as the page needs, and yields exactly what sorting the whole stream would. Ascending,
        without boosts (``recency`` false), the stream is read lazily too; with them, it is read whole (a
        recency boost has no lower bound)."""

        boosts: dict[int, float] = {}  # day -> recency boost (a function of the day: most matches share a few)

        def boosted(m: MutationMetadata) -> _Match:
            score = float(m.sort_value.value)
            if recency:
                date = m.operation_id
                if isinstance(m.mutation_type, TraitPutMeta) and m.mutation_type.modification_date:
                    date = m.mutation_type.modification_date
                boost = boosts.get(date // NS_PER_DAY)
                if boost is None:
                    boost = boosts[date // NS_PER_DAY] = recency_boost(now_ns, date)
                score = score * boost * index_boost
            return _Match(m, source_kind, "float", to_f32(score))

        def rank(match: _Match) -> tuple[float | int, int]:
            return self._rank_key(match.value, match.mutation.sort_value.operation_id, ascending)

        if ascending and recency:  # worst first: no bound on what is left, the whole stream is needed
            matches = [boosted(m) for m in mutations]
            matches.sort(key=rank)
            yield from matches
            return
        if ascending:  # no boost: the raw order, but for runs of equal values once rounded to 32 bits
            run: list[_Match] = []
            for m in mutations:
                match = boosted(m)
                if run and match.value != run[-1].value:
                    run.sort(key=rank)
                    yield from run
                    run = []
                run.append(match)
            run.sort(key=rank)
            yield from run
            return
        heap: list[tuple[tuple[float | int, int], int, _Match]] = []
        seq = itertools.count()
        max_boost = index_boost if recency else 1.0
        last_raw: float | None = None
        bound = below = 0.0
        for m in mutations:
            raw = float(m.sort_value.value)
            match = boosted(m)
            if not raw >= 0.0:  # negative or NaN: no bound, sort everything left
                rest = [match, *(boosted(x) for x in mutations)]
                rest.extend(entry[2] for entry in heap)
                rest.sort(key=rank)
                yield from rest
                return
            heapq.heappush(heap, (rank(match), next(seq), match))
            if raw != last_raw:
                last_raw = raw
                bound = to_f32(raw * max_boost)
                # what a lower raw score (the next 32-bit float down, at most) can reach once boosted
                below = to_f32(_f32_below(raw) * max_boost) if raw > 0.0 else -math.inf
            last_op = m.operation_id
            # Final: above anything unread; or equal to the best unread value when that can only come from
            # the same raw score (`below` < `bound`), whose unread matches have lower operation ids.
            while heap:
                (negated, negated_op), _, top = heap[0]
                value = -negated
                if value > bound or (value == bound and below < bound and -negated_op >= last_op):
                    yield heapq.heappop(heap)[2]
                else:
                    break
        while heap:
            yield heapq.heappop(heap)[2]

    @staticmethod
    def _uint_match(mutation: MutationMetadata, source_kind: query_pb2.EntityResultSource.ValueType) -> _Match:
        sort_value = mutation.sort_value
        if sort_value.kind is SortKind.SCORE:
            return _Match(mutation, source_kind, "float", to_f32(float(sort_value.value)))
        value = int(sort_value.value)
        if sort_value.kind is SortKind.INT:
            value += _INT_BIAS
        return _Match(mutation, source_kind, "uint64", value)

    def _aggregate(
        self,
        entity_id: str,
        cache: dict[str, EntityAggregator | None],
        prefetch: _Prefetch | None = None,
        origins: dict[str, tuple[list[MutationMetadata], list[MutationMetadata]]] | None = None,
    ) -> EntityAggregator | None:
        """The entity's aggregation (cached in `cache`); `origins` receives its (pending, chain) mutations."""
        if entity_id in cache:
            return cache[entity_id]
        pending, chain = prefetch.take(entity_id) if prefetch is not None else (None, None)
        if pending is None:
            pending = self._pending.fetch_entity_mutations(entity_id)
        if chain is None:
            chain = self._chain.fetch_entity_mutations(entity_id)
        if origins is not None:
            origins[entity_id] = (pending, chain)
        mutations = pending + chain
        agg = EntityAggregator.from_mutations(mutations) if mutations else None
        if agg is None:
            log.warning("entity %s matched a query but has no indexed mutation", entity_id)
        cache[entity_id] = agg
        return agg

    def _ranked_before_bound(
        self,
        index_query: query_pb2.EntityQuery,
        match: _Match,
        agg: EntityAggregator,
        origins: tuple[list[MutationMetadata], list[MutationMetadata]] | None,
        include_deleted: bool,
        pre_bound: Callable[[_OV], bool] | None,
        sort_value_of: Callable[[MutationMetadata], int] | None,
    ) -> bool:
        """Whether the entity of `match` (its first match past the page's start bound, in a stream starting
        at that bound) has a match ranked at or before the bound: it then ranks there (by its best
        match, active unless `include_deleted`) and belongs to an earlier page.

        Only the entity's other mutations can be such matches (active ones unless `include_deleted`);
        when the ordering's sort value is in their metadata (`sort_value_of`), only those ranked at or
        before the bound: usually none, and nothing is searched. Otherwise each index holding some is asked
        which of them match the query: the query AND those operations (one search), or for a query string
        (no boolean sub-query can hold one) the query bounded to each one's own rank (one search each)."""
        if pre_bound is None or origins is None:
            return False
        own = match.mutation.operation_id
        active = agg.active_operations
        for source, mutations in ((self._chain, origins[1]), (self._pending, origins[0])):
            ranks: dict[int, int | None] = {}
            for mutation in mutations:
                op_id = mutation.operation_id
                if op_id == own or op_id in ranks or not (include_deleted or op_id in active):
                    continue
                if sort_value_of is None:
                    ranks[op_id] = None
                else:
                    value = sort_value_of(mutation)
                    if pre_bound(("uint64", value, op_id)):
                        ranks[op_id] = value
            if not ranks:
                continue
            found: list[MutationMetadata] = []
            kind = index_query.WhichOneof("predicate")
            if kind != "query_string":
                sub = query_pb2.BooleanPredicate.SubQuery
                probe = query_pb2.EntityQuery(
                    boolean=query_pb2.BooleanPredicate(
                        queries=[
                            sub(occur=query_pb2.BooleanPredicate.MUST, **{kind: getattr(index_query, kind)}),
                            sub(
                                occur=query_pb2.BooleanPredicate.MUST,
                                operations=query_pb2.OperationsPredicate(operation_ids=list(ranks)),
                            ),
                        ]
                    ),
                    ordering=index_query.ordering,
                )
                found = list(source.search(probe, 2 * len(ranks), 0, with_total=False).mutations)
            else:
                for op_id, value in ranks.items():
                    assert value is not None  # query strings are pushed down only with known sort values
                    probe = query_pb2.EntityQuery()
                    probe.CopyFrom(index_query)
                    probe.ClearField("paging")
                    below, above = _just_around(value, op_id)
                    if below is not None:
                        probe.paging.after_ordering_value.CopyFrom(_ov_to_proto(below))
                    if above is not None:
                        probe.paging.before_ordering_value.CopyFrom(_ov_to_proto(above))
                    found.extend(source.search(probe, 2, 0, with_total=False).mutations)
            for mutation in found:
                if mutation.operation_id in ranks:
                    found_match = self._uint_match(mutation, query_pb2.CHAIN)
                    if pre_bound((found_match.kind, found_match.value, mutation.sort_value.operation_id)):
                        return True
        return False

    def _fill_result(self, result: query_pb2.EntityResult, candidate: _Candidate, query: query_pb2.EntityQuery) -> None:
        """Builds the result in place (each message assignment or append would copy the traits again)."""
        self._fill_entity(result.entity, candidate.aggregator, query.projections, query.include_deleted)
        result.source = candidate.match.source
        _set_ov(result.ordering_value, candidate.ordering_value)
        result.hash = candidate.aggregator.hash

    def _entity(
        self, agg: EntityAggregator, projections: Sequence[query_pb2.Projection], include_deleted: bool
    ) -> entity_pb2.Entity:
        entity = entity_pb2.Entity()
        self._fill_entity(entity, agg, projections, include_deleted)
        return entity

    def _fill_entity(
        self,
        entity: entity_pb2.Entity,
        agg: EntityAggregator,
        projections: Sequence[query_pb2.Projection],
        include_deleted: bool,
    ) -> None:
        entity.id = agg.entity_id
        entity.last_operation_id = agg.last_operation_id
        if agg.creation_date is not None:
            _set_ts(entity.creation_date, agg.creation_date)
        if agg.modification_date is not None:
            _set_ts(entity.modification_date, agg.modification_date)
        if agg.deletion_date is not None:
            _set_ts(entity.deletion_date, agg.deletion_date)
        for trait_id in sorted(agg.traits):
            self._add_trait(entity, agg, agg.traits[trait_id], projections, include_deleted)

    def _add_trait(
        self,
        entity: entity_pb2.Entity,
        agg: EntityAggregator,
        trait_agg: TraitAggregator,
        projections: Sequence[query_pb2.Projection],
        include_deleted: bool,
    ) -> None:
        last_put = trait_agg.last_put
        if last_put is None:
            return  # only tombstones: nothing to show
        projection = find_projection(trait_agg.trait_type, projections) if projections else None
        if projection is not None and projection.skip:
            return
        if trait_agg.deleted and not include_deleted:
            return

        fetched = self._fetch_trait(last_put.operation_id, last_put.block_offset)
        if fetched is None:
            log.error(
                "could not fetch operation %d (trait %s of entity %s)",
                last_put.operation_id,
                trait_agg.trait_id,
                agg.entity_id,
            )
            return
        entity_id, fetched_trait = fetched
        if entity_id != agg.entity_id:
            log.error(
                "operation %d belongs to entity %s, not to entity %s", last_put.operation_id, entity_id, agg.entity_id
            )
            return

        trait = entity.traits.add()
        trait.CopyFrom(fetched_trait)
        if projection is not None:
            project_trait_fields(trait, projection, self._pool)
        for name, date in (
            ("creation_date", trait_agg.creation_date),
            ("modification_date", trait_agg.modification_date),
            ("deletion_date", trait_agg.deletion_date),
        ):
            if date is None:
                trait.ClearField(name)
            else:
                _set_ts(getattr(trait, name), date)
        trait.last_operation_id = trait_agg.last_operation_id or 0


def _just_around(value: int, operation_id: int) -> tuple[_OV | None, _OV | None]:
    """Page bounds holding (value, operation id) only (None: no bound needed on that side)."""
    below: _OV | None = None
    if operation_id > 0:
        below = ("uint64", value, operation_id - 1)
    elif value > 0:
        below = ("uint64", value - 1, _U64_MAX)
    above: _OV | None = None
    if operation_id < _U64_MAX:
        above = ("uint64", value, operation_id + 1)
    elif value < _U64_MAX:
        above = ("uint64", value + 1, 0)
    return below, above


def _set_ts(target: Any, ns: int) -> None:
    """Sets a `Timestamp` field in place (as `timestamp_to_proto`)."""
    target.seconds, target.nanos = divmod(ns, 1_000_000_000)


def _set_ov(target: query_pb2.OrderingValue, value: _OV) -> None:
    """`_ov_to_proto` written into an existing message."""
    kind, primary, op_id = value
    target.operation_id = op_id
    if kind == "float":
        target.float = float(primary)
    elif kind == "uint64":
        target.uint64 = int(primary)
    elif kind == "date":
        _set_ts(target.date, int(primary))
    elif kind == "min":
        target.min = True
    elif kind == "max":
        target.max = True


__all__ = [
    "DEFAULT_PAGE_COUNT",
    "ITERATOR_MAX_PAGES",
    "ITERATOR_PAGE_SIZE",
    "PENDING_INDEX_BOOST",
    "REFERENCE_PENALTY",
    "EntitySearcher",
    "GcFlagger",
    "MutationSource",
    "TraitFetcher",
    "compare_ordering_values",
    "effective_ordering",
    "is_after",
    "is_before",
    "is_within_page_bound",
    "recency_boost",
    "to_f32",
    "top_negatively_rescored",
]
