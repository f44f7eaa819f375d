"""SPEC 3.7 search algorithm over two in-memory fake mutation indices."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from google.protobuf import any_pb2

from exocommon.clock import NS_PER_SEC, timestamp_to_proto
from exocommon.errors import InvalidArgument
from exocommon.hashing import crc64_of_u64s
from exocore.store import entity_pb2, query_pb2
from exocore.test import test_pb2
from exostore.aggregator import EntityAggregator
from exostore.projection import for_all, for_trait_name
from exostore.searcher import (
    EntitySearcher,
    MutationSource,
    compare_ordering_values,
    effective_ordering,
    is_within_page_bound,
    recency_boost,
    to_f32,
    top_negatively_rescored,
)
from exostore.types import (
    EntityTombstoneMeta,
    MutationMetadata,
    MutationResults,
    SortKind,
    SortValue,
    TraitPutMeta,
    TraitTombstoneMeta,
)

NOW = 1_700_000_000 * NS_PER_SEC
DAY = 86_400 * NS_PER_SEC
TYPE1 = "exocore.test.TestMessage"
TYPE2 = "exocore.test.TestMessage2"


def op(i: int) -> int:
    """A consistent-timestamp-like operation id, `i` ms after NOW."""
    return NOW + i * 1_000_000


# --- fakes ------------------------------------------------------------------------------------------------


@dataclass
class Doc:
    meta: MutationMetadata
    text: str = ""
    score: float = 0.0


class FakeIndex:
    """A list of documents with simple predicate matching; `search` obeys MutationSource's contract, page
    bounds included (unless `honours_bounds` is false: then it reads from the top, as the contract allows)."""

    def __init__(self, pending: bool, honours_bounds: bool = True) -> None:
        self.pending = pending
        self.honours_bounds = honours_bounds
        self.docs: list[Doc] = []
        self.search_calls = 0
        self.bounded_calls = 0

    def _matches(self, query, doc: Doc) -> bool:
        kind = query.WhichOneof("predicate")
        m = doc.meta
        if kind == "boolean":
            occurs = [(sub.occur, self._matches(sub, doc)) for sub in query.boolean.queries]
            must = query_pb2.BooleanPredicate.MUST
            return all(ok for occur, ok in occurs if occur == must) and any(ok for _, ok in occurs)
        if kind == "all":
            return True
        if kind == "ids":
            return m.entity_id in query.ids.ids
        if kind == "operations":
            return m.operation_id in query.operations.operation_ids
        if kind == "match":
            return bool(query.match.query) and query.match.query in doc.text
        if kind == "trait":
            return isinstance(m.mutation_type, TraitPutMeta) and m.mutation_type.trait_type == query.trait.trait_name
        raise InvalidArgument(f"fake index does not support {kind}")

    def _sort_value(self, ordering: query_pb2.Ordering, doc: Doc) -> SortValue:
        m = doc.meta
        which = ordering.WhichOneof("value")
        if which == "score":
            return SortValue(SortKind.SCORE, doc.score, m.operation_id)
        if which == "operation_id":
            return SortValue(SortKind.UINT, m.operation_id, m.operation_id)
        put = m.mutation_type if isinstance(m.mutation_type, TraitPutMeta) else None
        if which == "created_at":
            return SortValue(SortKind.UINT, (put.creation_date or 0) if put else 0, m.operation_id)
        if which == "updated_at":
            return SortValue(SortKind.UINT, (put.modification_date or 0) if put else 0, m.operation_id)
        raise AssertionError(f"ordering not resolved by the searcher: {ordering}")

    def search(
        self, query: query_pb2.EntityQuery, count: int, offset: int, *, with_total: bool = True
    ) -> MutationResults:
        self.search_calls += 1
        ordering = query.ordering
        matched = [d for d in self.docs if self._matches(query, d)]
        values = [(self._sort_value(ordering, d), d) for d in matched]
        if query.HasField("paging"):
            paging = query.paging
            assert paging.count == 0 and paging.offset == 0, "count and offset are the arguments"
            assert ordering.WhichOneof("value") != "score", "score pages cannot start at their bound"
            self.bounded_calls += 1
            if self.honours_bounds:
                values = [(sv, d) for sv, d in values if is_within_page_bound(uint(sv.value, sv.operation_id), paging)]
                matched = [d for _, d in values]
        values.sort(key=lambda v: (v[0].value, v[0].operation_id), reverse=not ordering.ascending)
        page = values[offset : offset + count]
        mutations = [
            MutationMetadata(d.meta.operation_id, d.meta.block_offset, d.meta.entity_id, d.meta.mutation_type, sv)
            for sv, d in page
        ]
        return MutationResults(mutations, len(matched))

    def fetch_entity_mutations(self, entity_id: str) -> list[MutationMetadata]:
        return [d.meta for d in self.docs if d.meta.entity_id == entity_id]


@dataclass
class Store:
    chain: FakeIndex = field(default_factory=lambda: FakeIndex(pending=False))
    pending: FakeIndex = field(default_factory=lambda: FakeIndex(pending=True))
    payloads: dict[int, tuple[str, entity_pb2.Trait]] = field(default_factory=dict)
    fetches: int = 0
    flagged: list[EntityAggregator] = field(default_factory=list)
    block: int = 1

    def _index(self, pending: bool) -> FakeIndex:
        return self.pending if pending else self.chain

    def _offset(self, pending: bool) -> int | None:
        if pending:
            return None
        self.block += 1
        return self.block

    def put(
        self,
        entity: str,
        trait: str,
        op_id: int,
        *,
        pending: bool = False,
        text: str = "",
        score: float = 1.0,
        created: int | None = None,
        modified: int | None = None,
        has_reference: bool = False,
        message=None,
    ) -> None:
        message = message if message is not None else test_pb2.TestMessage(string1=f"{entity}/{trait}@{op_id}")
        meta = MutationMetadata(
            op_id,
            self._offset(pending),
            entity,
            TraitPutMeta(trait, message.DESCRIPTOR.full_name, created, modified, has_reference),
            SortValue(SortKind.UINT, op_id, op_id),
        )
        self._index(pending).docs.append(Doc(meta, text, score))
        packed = any_pb2.Any()
        packed.Pack(message)
        payload = entity_pb2.Trait(id=trait, message=packed)
        if created is not None:
            payload.creation_date.CopyFrom(timestamp_to_proto(created))
        self.payloads[op_id] = (entity, payload)

    def delete_trait(self, entity: str, trait: str, op_id: int, *, pending: bool = False) -> None:
        meta = MutationMetadata(
            op_id, self._offset(pending), entity, TraitTombstoneMeta(trait), SortValue(SortKind.UINT, op_id, op_id)
        )
        self._index(pending).docs.append(Doc(meta))

    def delete_entity(self, entity: str, op_id: int, *, pending: bool = False) -> None:
        meta = MutationMetadata(
            op_id, self._offset(pending), entity, EntityTombstoneMeta(), SortValue(SortKind.UINT, op_id, op_id)
        )
        self._index(pending).docs.append(Doc(meta))

    def fetch_trait(self, operation_id: int, block_offset: int | None) -> tuple[str, entity_pb2.Trait] | None:
        self.fetches += 1
        return self.payloads.get(operation_id)

    def searcher(self, **kwargs) -> EntitySearcher:
        chain: MutationSource = self.chain
        pending: MutationSource = self.pending
        kwargs.setdefault("now_ns", lambda: NOW)
        return EntitySearcher(chain, pending, self.fetch_trait, gc_flagger=self.flagged.append, **kwargs)


def all_query(count: int = 0, ascending: bool | None = None, **kwargs) -> query_pb2.EntityQuery:
    query = query_pb2.EntityQuery(all=query_pb2.AllPredicate(), paging=query_pb2.Paging(count=count), **kwargs)
    if ascending is not None:
        query.ordering.operation_id = True
        query.ordering.ascending = ascending
    return query


def match_query(text: str, **ordering) -> query_pb2.EntityQuery:
    return query_pb2.EntityQuery(
        match=query_pb2.MatchPredicate(query=text), ordering=query_pb2.Ordering(score=True, **ordering)
    )


def ids(results: query_pb2.EntityResults) -> list[str]:
    return [r.entity.id for r in results.entities]


def uint(v: int, op_id: int) -> query_pb2.OrderingValue:
    return query_pb2.OrderingValue(uint64=v, operation_id=op_id)


# --- building blocks ---------------------------------------------------------------------------------------


def test_top_negatively_rescored_spec_example():
    penalized = {18: 11, 12: 4}
    stream = [20, 18, 15, 12, 10, 8, 5, 3, 2]
    # keys: smaller is better -> negate scores
    result = top_negatively_rescored(stream, 7, lambda s: (-s, -penalized.get(s, s)))
    assert result == [20, 15, 18, 10, 8, 5, 12]
    assert top_negatively_rescored([2, 1], 4, lambda s: (-s, -s)) == [2, 1]
    assert top_negatively_rescored([10, 8, 6, 5, 4, 2, 1], 4, lambda s: (-s, -s)) == [10, 8, 6, 5]
    assert top_negatively_rescored([3], 0, lambda s: (-s, -s)) == []


def test_top_negatively_rescored_stops_consuming_early():
    consumed = []

    def stream():
        for s in [10, 9, 8, 7, 6, 5, 4]:
            consumed.append(s)
            yield s

    assert top_negatively_rescored(stream(), 2, lambda s: (-s, -s)) == [10, 9]
    assert consumed == [10, 9, 8]


def test_recency_boost_values():
    assert recency_boost(NOW, NOW) == 1.0
    assert recency_boost(NOW, NOW - 15 * DAY) == 1.0
    assert recency_boost(NOW, NOW + 15 * DAY) == 1.0
    assert recency_boost(NOW, NOW - 16 * DAY) < 1.0
    assert recency_boost(NOW, NOW - 365 * DAY) == pytest.approx(0.2136757, abs=1e-6)
    assert recency_boost(NOW, NOW - 730 * DAY) == pytest.approx(0.042735178, abs=1e-7)
    assert recency_boost(NOW, NOW + 365 * DAY) == recency_boost(NOW, NOW - 365 * DAY)


def test_ordering_value_comparisons():
    mn = query_pb2.OrderingValue(min=True)
    mx = query_pb2.OrderingValue(max=True)
    f1 = query_pb2.OrderingValue(float=1.0, operation_id=5)
    f2 = query_pb2.OrderingValue(float=2.0, operation_id=1)
    f1b = query_pb2.OrderingValue(float=1.0, operation_id=6)
    u1 = uint(1, 1)
    d1 = query_pb2.OrderingValue(date=timestamp_to_proto(NOW), operation_id=1)
    d2 = query_pb2.OrderingValue(date=timestamp_to_proto(NOW + 1), operation_id=1)
    assert compare_ordering_values(mn, f1) == -1
    assert compare_ordering_values(f1, mn) == 1
    assert compare_ordering_values(mx, u1) == 1
    assert compare_ordering_values(d1, mx) == -1
    assert compare_ordering_values(f1, f2) == -1
    assert compare_ordering_values(f1, f1b) == -1  # tie on value: operation id
    assert compare_ordering_values(f1, f1) == 0
    assert compare_ordering_values(d1, d2) == -1
    assert compare_ordering_values(f1, u1) is None  # different kinds
    assert compare_ordering_values(u1, d1) is None
    page = query_pb2.Paging(after_ordering_value=uint(10, 10), before_ordering_value=uint(20, 20))
    assert is_within_page_bound(uint(15, 15), page)
    assert is_within_page_bound(uint(10, 11), page)
    assert not is_within_page_bound(uint(10, 10), page)  # strictly
    assert not is_within_page_bound(uint(20, 20), page)
    assert not is_within_page_bound(f1, page)  # incomparable is out


def test_effective_ordering():
    def resolve(**kwargs) -> query_pb2.Ordering:
        return effective_ordering(query_pb2.EntityQuery(**kwargs))

    o = resolve(match=query_pb2.MatchPredicate(query="a"))
    assert o.WhichOneof("value") == "score" and not o.ascending
    o = resolve(trait=query_pb2.TraitPredicate(trait_name=TYPE1))
    assert o.WhichOneof("value") == "operation_id" and not o.ascending
    for pred in (
        dict(ids=query_pb2.IdsPredicate(ids=["a"])),
        dict(reference=query_pb2.ReferencePredicate(entity_id="a")),
        dict(operations=query_pb2.OperationsPredicate(operation_ids=[1])),
    ):
        o = resolve(**pred)
        assert o.WhichOneof("value") == "operation_id" and o.ascending
    o = resolve(all=query_pb2.AllPredicate(), ordering=query_pb2.Ordering(ascending=True))
    assert o.WhichOneof("value") == "operation_id" and not o.ascending  # direction forced
    o = resolve(all=query_pb2.AllPredicate(), ordering=query_pb2.Ordering(updated_at=True, ascending=True))
    assert o.WhichOneof("value") == "updated_at" and o.ascending  # explicit ordering kept
    sub = query_pb2.BooleanPredicate.SubQuery
    o = resolve(
        boolean=query_pb2.BooleanPredicate(
            queries=[sub(ids=query_pb2.IdsPredicate(ids=["a"])), sub(match=query_pb2.MatchPredicate(query="x"))]
        )
    )
    assert o.WhichOneof("value") == "operation_id" and o.ascending
    o = resolve(query_string=query_pb2.QueryStringPredicate(query="hello"))
    assert o.WhichOneof("value") == "score"
    o = resolve(query_string=query_pb2.QueryStringPredicate(query="hello sort:created"))
    assert o.WhichOneof("value") == "created_at" and not o.ascending
    o = resolve(query_string=query_pb2.QueryStringPredicate(query="hello -sort:updated"))
    assert o.WhichOneof("value") == "updated_at" and o.ascending
    o = resolve(
        query_string=query_pb2.QueryStringPredicate(query="-sort:date"), ordering=query_pb2.Ordering(score=True)
    )
    assert o.WhichOneof("value") == "created_at" and o.ascending  # sort: wins over an explicit ordering
    again = effective_ordering(
        query_pb2.EntityQuery(query_string=query_pb2.QueryStringPredicate(query="-sort:date"), ordering=o)
    )
    assert again == o  # idempotent


# --- search -----------------------------------------------------------------------------------------------


def test_basic_search_results_fields():
    s = Store()
    s.put("e1", "t1", op(1), created=NOW - DAY)
    s.put("e1", "t1", op(2))
    s.put("e2", "t1", op(3), pending=True)
    res = s.searcher().search(all_query())
    assert ids(res) == ["e2", "e1"]
    e2, e1 = res.entities
    assert e2.source == query_pb2.PENDING
    assert e1.source == query_pb2.CHAIN
    assert e1.ordering_value == uint(op(2), op(2))
    assert e1.entity.creation_date == timestamp_to_proto(NOW - DAY)
    assert e1.entity.modification_date == timestamp_to_proto(op(2))
    assert not e1.entity.HasField("deletion_date")
    assert e1.entity.last_operation_id == op(2)
    [trait] = e1.entity.traits
    assert trait.id == "t1"
    assert trait.creation_date == timestamp_to_proto(NOW - DAY)  # aggregated, not the payload's own
    assert trait.modification_date == timestamp_to_proto(op(2))
    assert trait.last_operation_id == op(2)
    msg = test_pb2.TestMessage()
    trait.message.Unpack(msg)
    assert msg.string1 == f"e1/t1@{op(2)}"
    assert e1.hash == crc64_of_u64s([op(1), op(2)])
    assert res.hash == crc64_of_u64s([e2.hash, e1.hash])
    assert res.estimated_count == 2  # entities, not mutations (3)
    assert res.current_page.count == 10
    assert not res.HasField("next_page")  # partial page
    assert not res.skipped_hash


def test_query_without_predicate_is_invalid():
    with pytest.raises(InvalidArgument):
        Store().searcher().search(query_pb2.EntityQuery())


def test_dedup_happens_before_paging_bounds():
    s = Store()
    s.put("A", "t1", op(1))  # old mutation of A, still active (other trait)
    s.put("D", "t1", op(20))
    s.put("C", "t1", op(30))
    s.put("B", "t1", op(40))
    s.put("A", "t2", op(50))  # A's best mutation
    searcher = s.searcher()
    page1 = searcher.search(all_query(count=2))
    assert ids(page1) == ["A", "B"]
    page2 = searcher.search(query_pb2.EntityQuery(all=query_pb2.AllPredicate(), paging=page1.next_page))
    assert ids(page2) == ["C", "D"]
    page3 = searcher.search(query_pb2.EntityQuery(all=query_pb2.AllPredicate(), paging=page2.next_page))
    assert ids(page3) == []  # A does not come back through its older mutation
    assert not page3.HasField("next_page")


@pytest.mark.parametrize("ascending", [False, True])
def test_paging_35_entities_in_4_pages(ascending):
    s = Store()
    for i in range(35):
        # two traits per entity, interleaved ops, some in the pending index
        s.put(f"e{i:02}", "t1", op(i), pending=i % 4 == 0)
        s.put(f"e{i:02}", "t2", op(100 + i), pending=i % 3 == 0)
    searcher = s.searcher()
    query = all_query(count=10, ascending=ascending)
    pages = []
    counts = []
    while True:
        res = searcher.search(query)
        pages.append(ids(res))
        assert res.current_page.count == 10
        counts.append(res.estimated_count)
        if not res.HasField("next_page"):
            break
        query.paging.CopyFrom(res.next_page)
        assert len(pages) < 10
    assert [len(p) for p in pages] == [10, 10, 10, 5]
    # entities, not mutations: estimated from the mutations each page examined (each entity's two
    # mutations are far apart in this ordering: the first page sees one per entity)
    assert all(35 <= count <= 70 for count in counts), counts
    assert counts[-1] < 70
    seen = [e for p in pages for e in p]
    assert sorted(seen) == [f"e{i:02}" for i in range(35)]  # all, exactly once
    # order: by the entity's best mutation (t2 ops when descending, t1 ops when ascending)
    expected = [f"e{i:02}" for i in range(35)]
    assert seen == (expected if ascending else expected[::-1])
    if ascending:
        assert pages and query.paging.HasField("after_ordering_value")
    else:
        assert query.paging.HasField("before_ordering_value")


def test_next_page_present_on_full_page_and_last_page_may_be_empty():
    s = Store()
    for i in range(4):
        s.put(f"e{i}", "t1", op(i))
    searcher = s.searcher()
    res = searcher.search(all_query(count=2))
    assert res.HasField("next_page")
    assert res.next_page.before_ordering_value == uint(op(2), op(2))
    res = searcher.search(query_pb2.EntityQuery(all=query_pb2.AllPredicate(), paging=res.next_page))
    assert ids(res) == ["e1", "e0"] and res.HasField("next_page")
    res = searcher.search(query_pb2.EntityQuery(all=query_pb2.AllPredicate(), paging=res.next_page))
    assert ids(res) == [] and not res.HasField("next_page")


def test_include_deleted():
    s = Store()
    s.put("alive", "t1", op(1))
    s.put("gone", "t1", op(2))
    s.put("gone", "t2", op(3))
    s.delete_trait("gone", "t1", op(4))
    s.delete_entity("gone", op(5))
    s.put("half", "t1", op(6))
    s.put("half", "t2", op(7))
    s.delete_trait("half", "t2", op(8))
    searcher = s.searcher()

    res = searcher.search(all_query())
    assert ids(res) == ["half", "alive"]
    assert [t.id for t in res.entities[0].entity.traits] == ["t1"]  # deleted trait hidden

    res = searcher.search(all_query(include_deleted=True))
    assert ids(res) == ["half", "gone", "alive"]
    half, gone, _ = res.entities
    assert [t.id for t in half.entity.traits] == ["t1", "t2"]
    assert half.entity.traits[1].deletion_date == timestamp_to_proto(op(8))
    assert not half.entity.HasField("deletion_date")
    assert gone.entity.deletion_date == timestamp_to_proto(op(5))
    assert [t.id for t in gone.entity.traits] == ["t1", "t2"]
    assert all(t.deletion_date == timestamp_to_proto(op(5)) for t in gone.entity.traits)
    # the deleted trait's payload is its last put version
    msg = test_pb2.TestMessage()
    gone.entity.traits[1].message.Unpack(msg)
    assert msg.string1 == f"gone/t2@{op(3)}"


def test_stale_match_is_skipped_without_marking_the_entity_seen():
    s = Store()
    s.put("e1", "t1", op(1))
    s.put("e1", "t1", op(5))  # overrides op 1
    searcher = s.searcher()
    # ascending: the stale op 1 comes first, then the active op 5 surfaces the entity
    res = searcher.search(all_query(ascending=True))
    assert ids(res) == ["e1"]
    assert res.entities[0].ordering_value == uint(op(5), op(5))
    # only the stale op matches: nothing, unless include_deleted
    ops_query = query_pb2.EntityQuery(operations=query_pb2.OperationsPredicate(operation_ids=[op(1)]))
    assert ids(searcher.search(ops_query)) == []
    ops_query.include_deleted = True
    assert ids(searcher.search(ops_query)) == ["e1"]


def test_skipped_hash_returns_no_entities_and_fetches_nothing():
    s = Store()
    s.put("e1", "t1", op(1))
    s.put("e2", "t1", op(2))
    searcher = s.searcher()
    first = searcher.search(all_query())
    assert first.hash != 0 and len(first.entities) == 2
    fetches = s.fetches
    again = searcher.search(all_query(result_hash=first.hash))
    assert again.skipped_hash
    assert len(again.entities) == 0
    assert again.hash == first.hash
    assert again.estimated_count == first.estimated_count
    assert s.fetches == fetches
    # something changed: not skipped any more
    s.put("e1", "t2", op(3), pending=True)
    changed = searcher.search(all_query(result_hash=first.hash))
    assert not changed.skipped_hash and len(changed.entities) == 2
    # an empty page is never "skipped" against the default result_hash 0
    empty = searcher.search(query_pb2.EntityQuery(ids=query_pb2.IdsPredicate(ids=["nope"])))
    assert empty.hash == 0 and not empty.skipped_hash


def test_results_hash_changes_when_any_entity_mutation_changes():
    s = Store()
    s.put("e1", "t1", op(1))
    s.put("e2", "t1", op(2))
    s.put("e2", "t2", op(3))
    searcher = s.searcher()
    query = query_pb2.EntityQuery(ids=query_pb2.IdsPredicate(ids=["e1", "e2"]))
    base = searcher.search(query)
    assert base.hash == crc64_of_u64s([r.hash for r in base.entities])
    hashes = {base.hash}
    # a mutation that does not match the query but belongs to a returned entity
    s.put("e1", "t9", op(4), pending=True)
    hashes.add(searcher.search(query).hash)
    # a removed mutation (e.g. by GC) changes it too
    s.chain.docs = [d for d in s.chain.docs if d.meta.operation_id != op(2)]
    hashes.add(searcher.search(query).hash)
    s.delete_trait("e2", "t2", op(5))
    hashes.add(searcher.search(query).hash)
    assert len(hashes) == 4


def test_reference_penalty_changes_order():
    s = Store()
    s.put("noref", "t1", op(1), text="hello", score=10.0)
    s.put("ref", "t1", op(2), text="hello", score=5.0, has_reference=True)
    searcher = s.searcher()
    res = searcher.search(match_query("hello", no_recency_boost=True))
    assert ids(res) == ["ref", "noref"]
    assert res.entities[1].ordering_value.float == pytest.approx(3.0)
    assert res.entities[0].ordering_value.float == pytest.approx(5.0)
    res = searcher.search(match_query("hello", no_recency_boost=True, no_reference_boost=True))
    assert ids(res) == ["noref", "ref"]
    assert res.entities[0].ordering_value.float == pytest.approx(10.0)
    # ascending: the penalty divides
    res = searcher.search(match_query("hello", no_recency_boost=True, ascending=True))
    assert ids(res) == ["ref", "noref"]
    assert res.entities[1].ordering_value.float == pytest.approx(10.0 / 0.3, rel=1e-6)


def test_reference_penalty_uses_rescored_top_n_across_pages():
    s = Store()
    # raw scores 20, 18 (no ref -> 5.4), 15, 12 (no ref -> 3.6), 10, 8, 5
    for i, (score, ref) in enumerate([(20, True), (18, False), (15, True), (12, False), (10, True), (8, True)]):
        s.put(f"e{score}", "t1", op(i), text="x", score=score, has_reference=ref)
    searcher = s.searcher()
    q = match_query("x", no_recency_boost=True)
    q.paging.count = 4
    res = searcher.search(q)
    assert ids(res) == ["e20", "e15", "e10", "e8"]
    q.paging.CopyFrom(res.next_page)
    res = searcher.search(q)
    assert ids(res) == ["e18", "e12"]
    assert not res.HasField("next_page")


def test_recency_boost_in_search():
    s = Store()
    s.put("old", "t1", op(1), text="x", score=1.0, modified=NOW - 365 * DAY, has_reference=True)
    s.put("new", "t1", op(2), text="x", score=0.5, has_reference=True)
    searcher = s.searcher()
    res = searcher.search(match_query("x"))
    assert ids(res) == ["new", "old"]
    assert res.entities[0].ordering_value.float == pytest.approx(0.5)
    assert res.entities[1].ordering_value.float == pytest.approx(0.2136757, abs=1e-6)
    res = searcher.search(match_query("x", no_recency_boost=True))
    assert ids(res) == ["old", "new"]


def test_pending_index_boost():
    s = Store()
    s.put("chain", "t1", op(2), text="x", score=1.0, has_reference=True)
    s.put("pending", "t1", op(1), text="x", score=1.0, has_reference=True, pending=True)
    searcher = s.searcher()
    res = searcher.search(match_query("x"))
    assert ids(res) == ["pending", "chain"]
    assert res.entities[0].ordering_value.float == pytest.approx(5.0)
    assert res.entities[0].source == query_pb2.PENDING
    # without recency boost, no index boost either: tie broken by operation id
    res = searcher.search(match_query("x", no_recency_boost=True))
    assert ids(res) == ["chain", "pending"]
    assert searcher.search(match_query("x")).estimated_count == 2


def test_score_values_round_trip_as_paging_bounds():
    s = Store()
    for i in range(6):
        s.put(f"e{i}", "t1", op(i), text="x", score=1.0 / (i + 3), modified=NOW - (20 + i) * DAY)
    searcher = s.searcher()
    q = match_query("x")
    q.paging.count = 2
    seen: list[str] = []
    for _ in range(5):
        res = searcher.search(q)
        seen += ids(res)
        if not res.HasField("next_page"):
            break
        # the bound went through the wire type (f32)
        bound = query_pb2.Paging.FromString(res.next_page.SerializeToString())
        q.paging.CopyFrom(bound)
    assert sorted(seen) == [f"e{i}" for i in range(6)]
    assert len(seen) == 6
    assert to_f32(0.1) != 0.1 and to_f32(to_f32(0.1)) == to_f32(0.1)


def test_gc_flags():
    s = Store()
    s.put("healthy", "t1", op(1))
    s.put("deleted", "t1", op(2))
    s.delete_entity("deleted", op(3))
    s.put("stale", "t1", op(4))
    s.put("stale", "t1", op(5))
    for i in range(12):
        s.put("churn", "t1", op(10 + i))
    searcher = s.searcher()
    res = searcher.search(query_pb2.EntityQuery(operations=query_pb2.OperationsPredicate(operation_ids=[op(4)])))
    assert ids(res) == []
    assert [a.entity_id for a in s.flagged] == ["stale"]
    s.flagged.clear()
    res = searcher.search(all_query())
    assert ids(res) == ["churn", "stale", "healthy"]
    flagged = sorted(a.entity_id for a in s.flagged)
    # deleted (matched through its put and tombstone), churn (returned, should_collect); stale's old op 4
    # is never examined since op 5 made the entity seen first
    assert flagged == ["churn", "deleted"]
    assert len(s.flagged) == 2  # each entity flagged once per search


def test_iteration_cap_is_configurable():
    s = Store()
    for i in range(10):
        s.put(f"e{i}", "t1", op(i))
    capped = s.searcher(page_size=2, max_pages=2).search(all_query(count=100))
    assert ids(capped) == ["e9", "e8", "e7", "e6"]
    assert capped.estimated_count == 10
    uncapped = s.searcher(page_size=2, max_pages=None).search(all_query(count=100))
    assert len(uncapped.entities) == 10
    s.chain.search_calls = 0
    s.searcher(page_size=3).search(all_query(count=1))
    assert s.chain.search_calls == 1  # lazy: one page was enough


def test_projections_and_trait_order():
    s = Store()
    s.put("e1", "t2", op(1), message=test_pb2.TestMessage2(string1="a", string2="b"))
    s.put("e1", "t1", op(2), message=test_pb2.TestMessage(string1="s1", string2="s2", grouped2="g2"))
    s.put("e1", "t3", op(3), message=test_pb2.TestMessage(string1="x"))
    searcher = s.searcher()
    res = searcher.search(all_query())
    assert [t.id for t in res.entities[0].entity.traits] == ["t1", "t2", "t3"]

    q = all_query(projections=[for_trait_name(TYPE2, skip=True), for_all(field_group_ids=[2])])
    [entity] = searcher.search(q).entities
    assert [t.id for t in entity.entity.traits] == ["t1", "t3"]
    msg = test_pb2.TestMessage()
    entity.entity.traits[0].message.Unpack(msg)
    assert msg == test_pb2.TestMessage(grouped2="g2")
    assert entity.entity.traits[0].details == entity_pb2.TRAIT_DETAILS_PARTIAL
    assert entity.entity.traits[0].last_operation_id == op(2)


def test_payload_of_another_entity_is_dropped():
    s = Store()
    s.put("e1", "t1", op(1))
    s.put("e1", "t2", op(2))
    s.payloads[op(2)] = ("other", s.payloads[op(2)][1])
    del s.payloads[op(1)]
    res = s.searcher().search(all_query())
    assert ids(res) == ["e1"]
    assert list(res.entities[0].entity.traits) == []


def test_operation_in_both_indices_counts_once_and_comes_from_chain():
    s = Store()
    s.put("e1", "t1", op(1))
    s.pending.docs.append(
        Doc(MutationMetadata(op(1), None, "e1", s.chain.docs[0].meta.mutation_type, SortValue(SortKind.UINT, 0, 0)))
    )
    res = s.searcher().search(all_query())
    assert ids(res) == ["e1"]
    assert res.entities[0].source == query_pb2.CHAIN
    assert res.entities[0].hash == crc64_of_u64s([op(1)])
    assert res.estimated_count == 1


# --- lazy reading of the indices ------------------------------------------------------------------------------


def _scored(i: int, score: float, modified: int | None) -> MutationMetadata:
    return MutationMetadata(
        op(i), None, f"e{i}", TraitPutMeta("t1", TYPE1, None, modified, False), SortValue(SortKind.SCORE, score, op(i))
    )


@pytest.mark.parametrize("f32_scores", [True, False])
@pytest.mark.parametrize("recency", [True, False])
def test_boosted_score_stream_is_the_sorted_stream_read_lazily(recency, f32_scores):
    import random

    rng = random.Random(3)
    # raw scores in the order an index yields them (score desc, then op id desc), with runs of equal
    # scores, and modification dates from today to 3 years ago (recency boosts from 1.0 to ~0.01)
    raw = [(round(rng.uniform(0.5, 6.0), 1), i) for i in range(600)]
    if f32_scores:  # tantivy's scores are 32-bit floats
        raw = [(to_f32(score), i) for score, i in raw]
    raw.sort(key=lambda x: (-x[0], -op(x[1])))
    docs = [_scored(i, score, NOW - rng.randrange(0, 3 * 365) * DAY) for score, i in raw]
    searcher = Store().searcher()
    reads = 0

    def source():
        nonlocal reads
        for doc in docs:
            reads += 1
            yield doc

    stream = searcher._score_matches(source(), query_pb2.PENDING, False, recency, 5.0, NOW)
    got = [m.mutation.operation_id for m in stream]
    expected = [
        m.mutation.operation_id
        for m in sorted(
            (searcher._score_matches(iter([d]), query_pb2.PENDING, False, recency, 5.0, NOW).__next__() for d in docs),
            key=lambda m: (-m.value, -m.mutation.operation_id),
        )
    ]
    assert got == expected

    # with every boost equal, a match is final as soon as it is read, even inside a run of equal scores
    # (the index yields a run by decreasing operation id)
    flat = sorted(
        (_scored(i, float(100 - i // 3), None) for i in range(300)),
        key=lambda m: (-m.sort_value.value, -m.operation_id),
    )
    reads = 0
    docs = flat
    lazy = searcher._score_matches(source(), query_pb2.CHAIN, False, recency, 1.0, NOW)
    first = [next(lazy).mutation.operation_id for _ in range(5)]
    assert first == [op(2), op(1), op(0), op(5), op(4)] and reads == 5

    # equal raw scores with boosts below 1: a match equal to the bound waits for the run to go on
    tied = [_scored(i, 2.0, NOW - 400 * DAY if i == 9 else None) for i in range(9, -1, -1)]
    expected = [
        m.mutation.operation_id
        for m in sorted(
            (searcher._score_matches(iter([d]), query_pb2.PENDING, False, recency, 5.0, NOW).__next__() for d in tied),
            key=lambda m: (-m.value, -m.mutation.operation_id),
        )
    ]
    got = [
        m.mutation.operation_id
        for m in searcher._score_matches(iter(tied), query_pb2.PENDING, False, recency, 5.0, NOW)
    ]
    assert got == expected


def test_score_queries_read_small_pages_first():
    s = Store()
    for i in range(3000):
        s.put(f"e{i}", "t1", op(i), text="word", score=1.0 + (i % 1000), has_reference=True)
    searcher = s.searcher()
    res = searcher.search(match_query("word"))
    assert len(res.entities) == 10 and res.estimated_count == 3000
    assert s.chain.search_calls == 1, "the first page was enough"
    # the same results as reading the whole capped stream in pages of 1000
    eager = s.searcher(page_size=5000, max_pages=1).search(match_query("word", no_recency_boost=True))
    lazy = searcher.search(match_query("word", no_recency_boost=True))
    assert ids(lazy) == ids(eager)


class BatchingFakeIndex(FakeIndex):
    """A fake index that also fetches several entities' mutations at once (as `MutationIndex`)."""

    def __init__(self, pending: bool) -> None:
        super().__init__(pending)
        self.single_fetches = 0
        self.batch_fetches = 0
        self.batched: list[list[str]] = []

    def fetch_entity_mutations(self, entity_id: str) -> list[MutationMetadata]:
        self.single_fetches += 1
        return super().fetch_entity_mutations(entity_id)

    def fetch_entities_mutations(self, entity_ids: list[str]) -> dict[str, list[MutationMetadata]]:
        self.batch_fetches += 1
        self.batched.append(list(entity_ids))
        return {e: FakeIndex.fetch_entity_mutations(self, e) for e in entity_ids}


def test_batched_entity_fetches_give_the_same_results():
    stores = [Store(), Store(chain=BatchingFakeIndex(False), pending=BatchingFakeIndex(True))]
    for store in stores:
        for i in range(40):
            store.put(f"e{i % 25}", f"t{i % 3}", op(i), pending=i % 4 == 0, text="word", score=float(i % 7))
        store.delete_trait("e3", "t0", op(50))
        store.delete_entity("e4", op(51), pending=True)
    queries = [
        all_query(count=5),
        all_query(count=7, ascending=True),
        match_query("word"),
        match_query("word", ascending=True),
        all_query(count=5, include_deleted=True),
        all_query(count=20),  # more than the pending index holds: the chain index's entities are batched too
    ]
    for query in queries:
        plain, batched = (store.searcher().search(query) for store in stores)
        assert plain == batched
        page = query_pb2.EntityQuery()
        page.CopyFrom(query)
        page.paging.CopyFrom(plain.next_page)
        assert stores[0].searcher().search(page) == stores[1].searcher().search(page)
    batching = stores[1]
    assert batching.chain.batch_fetches and batching.pending.batch_fetches
    # entities of the first pages were fetched in batches, not one by one: from the pending index all of them,
    # from the chain index those of its own page when the pending index did not fill its first page
    assert batching.pending.single_fetches < batching.chain.single_fetches
    assert batching.chain.batch_fetches < batching.pending.batch_fetches


def test_the_chain_index_prefetches_what_the_pending_page_lacks():
    """The chain page's entities are batched only as far as the pending page lacks entities (the others are
    looked up one by one if aggregated): all of them when the pending index matched nothing, none when its
    page is full. Same results either way."""
    for in_pending, batched in ((0, 12), (4, 8), (10, None)):
        stores = [Store(), Store(chain=BatchingFakeIndex(False), pending=BatchingFakeIndex(True))]
        for store in stores:
            for i in range(30):
                store.put(f"c{i}", "t1", op(i), text="word", score=float(40 - i))
            for i in range(in_pending):
                store.put(f"p{i}", "t1", op(100 + i), pending=True, text="word", score=1.0)
        plain, batching = (store.searcher().search(match_query("word")) for store in stores)
        assert plain == batching
        chain = stores[1].chain
        assert chain.batched == ([] if batched is None else [[f"c{i}" for i in range(batched)]])


# --- paging with the iteration cap (SPEC 11 item 7) ---------------------------------------------------------


def _bound(paging: query_pb2.Paging, ascending: bool) -> query_pb2.OrderingValue:
    return paging.after_ordering_value if ascending else paging.before_ordering_value


def page_through(searcher: EntitySearcher, query: query_pb2.EntityQuery, max_pages: int = 200):
    """Every page of `query` by following next_page: (pages of entity ids, estimated counts). Checks that
    each page's bound strictly advances."""
    query = query_pb2.EntityQuery.FromString(query.SerializeToString())
    ascending = effective_ordering(query).ascending
    pages: list[list[str]] = []
    counts: list[int] = []
    previous = None
    while True:
        res = searcher.search(query)
        pages.append(ids(res))
        counts.append(res.estimated_count)
        if not res.HasField("next_page"):
            return pages, counts
        bound = _bound(res.next_page, ascending)
        if previous is not None:
            assert compare_ordering_values(bound, previous) == (1 if ascending else -1), "the bound must advance"
        previous = bound
        query.paging.CopyFrom(res.next_page)
        assert len(pages) < max_pages, "paging does not end"


def _many_entities(traits: int, honours_bounds: bool = True, entities: int = 30) -> Store:
    """`entities` entities of `traits` traits, the puts of an entity spread over the whole operation order (the
    best and worst ranked mutations of an entity fall on different pages), some in the pending index, some
    overridden (stale matches), a deleted trait and a deleted entity; scores and dates with ties."""
    s = Store(
        chain=FakeIndex(pending=False, honours_bounds=honours_bounds),
        pending=FakeIndex(pending=True, honours_bounds=honours_bounds),
    )
    n = 0
    for t in range(traits):
        for i in range(entities):
            n += 1
            s.put(
                f"e{i:02}",
                f"t{t}",
                op(1000 * t + 7 * ((i * 13) % entities)),
                pending=(i + t) % 5 == 0,
                text="word",
                score=float(1 + (i * 7 + t * 11) % 9),
                created=NOW - ((i + t) % 6) * DAY,
                modified=NOW - ((i * 3 + t) % 40) * DAY,
                has_reference=(i + t) % 4 != 0,
            )
    s.put("e03", "t0", op(5000), text="other", score=1.0)  # overrides e03's first trait: a stale match
    s.delete_trait("e04", "t0", op(5001))
    s.delete_entity("e05", op(5002), pending=True)
    return s


ORDERINGS = {
    "operation_id desc": dict(all=query_pb2.AllPredicate()),
    "operation_id asc": dict(
        all=query_pb2.AllPredicate(), ordering=query_pb2.Ordering(operation_id=True, ascending=True)
    ),
    "created_at desc": dict(all=query_pb2.AllPredicate(), ordering=query_pb2.Ordering(created_at=True)),
    "updated_at asc": dict(
        trait=query_pb2.TraitPredicate(trait_name=TYPE1), ordering=query_pb2.Ordering(updated_at=True, ascending=True)
    ),
    "score": dict(match=query_pb2.MatchPredicate(query="word"), ordering=query_pb2.Ordering(score=True)),
    "score without recency": dict(
        match=query_pb2.MatchPredicate(query="word"), ordering=query_pb2.Ordering(score=True, no_recency_boost=True)
    ),
    "score asc": dict(
        match=query_pb2.MatchPredicate(query="word"),
        ordering=query_pb2.Ordering(score=True, ascending=True, no_recency_boost=True),
    ),
    "score asc with recency": dict(
        match=query_pb2.MatchPredicate(query="word"), ordering=query_pb2.Ordering(score=True, ascending=True)
    ),
}


@pytest.mark.parametrize("honours_bounds", [True, False], ids=["pushed", "from the top"])
@pytest.mark.parametrize("traits", [1, 3])
@pytest.mark.parametrize("ordering", list(ORDERINGS))
def test_capped_paging_reaches_every_entity_exactly_once(ordering, traits, honours_bounds):
    """With a cap of 4 mutations per index and pages of 5, following next_page gives every entity once, in
    the order of one uncapped page (the original lost everything past the cap and stopped on short pages)."""
    s = _many_entities(traits, honours_bounds)
    query = query_pb2.EntityQuery(**ORDERINGS[ordering])
    whole = query_pb2.EntityQuery.FromString(query.SerializeToString())
    whole.paging.count = 1000
    reference = s.searcher(max_pages=None).search(whole)
    expected = ids(reference)
    assert len(expected) >= 27 and not reference.HasField("next_page")
    assert reference.estimated_count == len(expected)  # read to the end: exact
    for include_deleted in (False, True):
        query.include_deleted = whole.include_deleted = include_deleted
        expected = ids(s.searcher(max_pages=None).search(whole))
        query.paging.count = 5
        pages, counts = page_through(s.searcher(page_size=2, max_pages=2), query)
        assert [e for page in pages for e in page] == expected
        assert all(counts)


@pytest.mark.parametrize("ordering", ["operation_id desc", "score"])
def test_a_page_cut_short_by_the_cap_has_a_next_page(ordering):
    s = Store()
    for i in range(10):
        for t in range(3):  # each entity's mutations together: the cap (4) reads at most 2 entities per index
            s.put(f"e{i}", f"t{t}", op(10 * i + t), text="word", score=float(i + 1), has_reference=True)
    query = query_pb2.EntityQuery(**ORDERINGS[ordering])
    query.paging.count = 5
    searcher = s.searcher(page_size=2, max_pages=2)
    first = searcher.search(query)
    assert 0 < len(first.entities) < 5
    assert first.HasField("next_page")
    pages, _ = page_through(searcher, query)
    assert [e for page in pages for e in page] == [f"e{i}" for i in range(9, -1, -1)]


def test_deep_pages_start_at_their_bound():
    """Past the cap: pages of a non-score ordering read the indices from their bound, not from the top."""
    s = Store()
    for i in range(300):
        s.put(f"e{i:03}", "t1", op(i), pending=i % 2 == 0)
    searcher = s.searcher(page_size=10, max_pages=1)
    query = all_query(count=20)
    pages, counts = page_through(searcher, query)
    assert [e for page in pages for e in page] == [f"e{i:03}" for i in range(299, -1, -1)]
    assert all(len(page) <= 20 for page in pages)
    assert counts[0] == 300 and counts[-1] == 300  # one mutation per entity: exact estimates
    assert s.chain.bounded_calls > 0 and s.pending.bounded_calls > 0
    # a deep page asks each index for its bounded matches (one page) and their count, nothing more
    query.paging.before_ordering_value.CopyFrom(uint(op(100), op(100)))
    s.chain.search_calls = s.pending.search_calls = 0
    res = searcher.search(query)
    assert ids(res)[:2] == ["e099", "e098"]
    assert s.chain.search_calls <= 3 and s.pending.search_calls <= 3


def test_pushed_bound_keeps_each_entity_on_the_page_of_its_best_match():
    s = Store()
    s.put("A", "t1", op(1), message=test_pb2.TestMessage2(string1="a"))  # A's only TYPE2 put
    s.put("B", "t1", op(2))
    s.put("C", "t1", op(3))
    s.put("A", "t2", op(4))  # A's best mutation of the `all` query, not of the TYPE2 query
    s.put("D", "t1", op(5))
    s.put("D", "t1", op(6))  # overrides op 5
    s.put("E", "t1", op(7))
    s.put("E", "t2", op(8))
    s.delete_trait("E", "t2", op(9))  # active: E's best match with include_deleted, and of `all`
    searcher = s.searcher()

    def pages_of(query):
        return page_through(searcher, query)[0]

    assert pages_of(all_query(count=2)) == [["E", "D"], ["A", "C"], ["B"]]
    assert pages_of(all_query(count=1, ascending=True)) == [["A"], ["B"], ["C"], ["D"], ["E"], []]
    type2 = query_pb2.EntityQuery(trait=query_pb2.TraitPredicate(trait_name=TYPE2), paging=query_pb2.Paging(count=1))
    assert pages_of(type2) == [["A"], []]
    s.delete_entity("C", op(10))
    assert pages_of(all_query(count=1, include_deleted=True)) == [["C"], ["E"], ["D"], ["A"], ["B"], []]
    assert pages_of(all_query(count=1, ascending=True)) == [["A"], ["B"], ["D"], ["E"], []]


def test_top_negatively_rescored_flushes_only_up_to_where_the_stream_was_cut():
    penalized = {18: 11, 12: 4}
    keys = lambda s: (-s, -penalized.get(s, s))  # noqa: E731
    assert top_negatively_rescored([20, 18, 15, 12], 7, keys) == [20, 15, 18, 12]
    assert top_negatively_rescored([20, 18, 15, 12], 7, keys, lambda: -12) == [20, 15]
    assert top_negatively_rescored([20, 18, 15, 12], 7, keys, lambda: None) == [20, 15, 18, 12]


# --- estimated_count (SPEC 11 item 7) ----------------------------------------------------------------------


def test_estimated_count_is_exact_when_every_match_was_examined():
    s = Store()
    for i in range(6):
        for t in range(3):
            s.put(f"e{i}", f"t{t}", op(10 * i + t), pending=i == 1)
    s.delete_entity("e2", op(100))
    s.delete_trait("e3", "t0", op(101))
    searcher = s.searcher()
    res = searcher.search(all_query(count=100))
    assert len(res.entities) == 5 and res.estimated_count == 5  # 20 mutations; e2 deleted
    res = searcher.search(all_query(count=100, include_deleted=True))
    assert len(res.entities) == 6 and res.estimated_count == 6


def test_estimated_count_extrapolates_entities_per_mutation():
    s = Store()
    for i in range(30):
        for t in range(3):  # an entity's 3 mutations follow each other in the ordering
            s.put(f"e{i:02}", f"t{t}", op(10 * i + t))
    searcher = s.searcher()
    res = searcher.search(all_query(count=2))
    # 7 mutations examined (e29's three, e28's three, e27's first, which ends the page): 3 entities
    assert ids(res) == ["e29", "e28"]
    assert res.estimated_count == round(90 * 3 / 7)
    # never fewer than the entities seen
    s2 = Store()
    for i in range(3):
        s2.put(f"e{i}", "t1", op(i))
    s2.chain.docs.append(Doc(s2.chain.docs[0].meta))  # an index counting fewer documents than it yields
    res = s2.searcher().search(all_query(count=2))
    assert res.estimated_count >= 2
