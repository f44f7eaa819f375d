"""Mutation index (SPEC 3.3-3.4, 3.6): real tantivy indices of exocore.test traits, every predicate, ordering,
fuzzy rule, field predicate and range, references, tombstones, deletions, paging and reopening from disk."""

from __future__ import annotations

import dataclasses
import math

import pytest
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

import exostore.mutation_index as mutation_index_module
from exocommon.errors import FailedPrecondition, InvalidArgument
from exocore.store import entity_pb2, query_pb2
from exocore.test import test_pb2
from exostore.mutation_index import DocumentCache, MutationIndex, recency_boost
from exostore.registry import TraitRegistry
from exostore.schema import IndexSchema
from exostore.types import (
    DeleteOperationsOperation,
    EntityTombstoneMeta,
    EntityTombstoneOperation,
    MutationResults,
    PendingDeletionMeta,
    PendingDeletionOperation,
    PutTraitOperation,
    SortKind,
    TraitPutMeta,
    TraitTombstoneMeta,
    TraitTombstoneOperation,
)

TM = "exocore.test.TestMessage"
TM2 = "exocore.test.TestMessage2"
REGISTRY = TraitRegistry()
SCHEMA = IndexSchema(REGISTRY)
Q = query_pb2
Op = Q.TraitFieldPredicate
DAY = 86_400 * 1_000_000_000


def new_index(path=None) -> MutationIndex:
    return MutationIndex(SCHEMA, path, heap_size=15_000_000, num_threads=1)


def put(op: int, entity: str, msg: Message, trait_id: str = "t1", created=None, modified=None, block=None):
    packed = any_pb2.Any()
    packed.Pack(msg)
    trait = entity_pb2.Trait(id=trait_id, message=packed)
    if created is not None:
        trait.creation_date.FromNanoseconds(created)
    if modified is not None:
        trait.modification_date.FromNanoseconds(modified)
    return PutTraitOperation(op, block, entity, trait)


def tm(**kw) -> test_pb2.TestMessage:
    return test_pb2.TestMessage(**kw)


def ts(ns: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(ns)
    return t


def entities(res: MutationResults) -> list[str]:
    return [m.entity_id for m in res.mutations]


def ops(res: MutationResults) -> list[int]:
    return [m.operation_id for m in res.mutations]


def search(index: MutationIndex, count: int = 100, offset: int = 0, ordering=None, **predicate) -> MutationResults:
    query = Q.EntityQuery(**predicate)
    if ordering is not None:
        query.ordering.CopyFrom(ordering)
    return index.search(query, count, offset)


def field(name: str, operator=Op.EQUAL, **value) -> Q.TraitPredicate:
    return Q.TraitPredicate(trait_name=TM, query=Q.TraitQuery(field=Op(field=name, operator=operator, **value)))


def trait_query(name: str = TM, **query) -> Q.TraitPredicate:
    return Q.TraitPredicate(trait_name=name, query=Q.TraitQuery(**query) if query else None)


@pytest.fixture
def foo_bar():
    index = new_index()
    index.apply([put(1, "e1", tm(string1="Foo Bar One")), put(2, "e2", tm(string1="Foo Bar Two"))])
    return index


# --- match and fuzzy ---------------------------------------------------------------------------------


def test_match_scores_descending(foo_bar):
    res = search(foo_bar, match=Q.MatchPredicate(query="foo"))
    assert res.total == 2 and sorted(entities(res)) == ["e1", "e2"]
    assert all(m.sort_value.kind is SortKind.SCORE and m.sort_value.value > 0 for m in res.mutations)
    assert ops(res) == [2, 1]  # equal scores: higher op id first
    res = search(foo_bar, match=Q.MatchPredicate(query="two"))
    assert entities(res) == ["e2"]
    compiled = foo_bar.compile(Q.EntityQuery(match=Q.MatchPredicate(query="x")))
    assert compiled.ordering.score and not compiled.ordering.ascending and compiled.sort_field is None
    # better match first
    foo_bar.apply([put(3, "e3", tm(string1="two two two"))])
    assert entities(search(foo_bar, match=Q.MatchPredicate(query="two")))[0] == "e3"


@pytest.mark.parametrize(
    ("query", "hit"),
    [("abc", True), ("abZ", False), ("abcdZ", True), ("abcZZ", False), ("abcdefZZ", True), ("abcdeZZZ", False)],
)
def test_fuzzy_rules(query, hit):
    index = new_index()
    index.apply([put(1, "e1", tm(string1="abc abcde abcdefgh"))])
    assert search(index, match=Q.MatchPredicate(query=query)).total == (1 if hit else 0)


def test_no_fuzzy_and_transpositions():
    index = new_index()
    index.apply([put(1, "e1", tm(string1="abc abcde abcdefgh"))])
    assert search(index, match=Q.MatchPredicate(query="abcdZ", no_fuzzy=True)).total == 0
    assert search(index, match=Q.MatchPredicate(query="abcde", no_fuzzy=True)).total == 1
    assert search(index, match=Q.MatchPredicate(query="abced")).total == 1  # transposition costs 1
    assert search(index, match=Q.MatchPredicate(query="")).total == 0


def test_exact_first_fuzzy_terms_give_the_automaton_results(tmp_path):
    """A fuzzy term runs as constant-score term queries of its token and the indexed words that close: same
    documents, same scores, same order as tantivy's automaton (forced here by a saturated vocabulary)."""
    fast_schema, slow_schema = IndexSchema(REGISTRY), IndexSchema(REGISTRY)
    slow_schema.vocabulary.saturated = True
    texts = [
        "alpha beta gamma",
        "alpha alpha delta",
        "alphx epsilon",  # a neighbour of alpha
        "epsilon zeta eta theta",
        "gamma gamma gamma",
        "theta iota kappa lambda",
        "lambdas kappa",  # a neighbour of lambda
        "beta",
    ]
    indices = []
    for schema in (fast_schema, slow_schema):
        index = MutationIndex(schema, None, heap_size=15_000_000, num_threads=1)
        index.apply([put(op, f"e{op}", tm(string1=text)) for op, text in enumerate(texts, start=1)])
        indices.append(index)
    assert not fast_schema.vocabulary.may_have_neighbor("gamma", 1)
    assert fast_schema.vocabulary.may_have_neighbor("alpha", 1)
    queries = [
        Q.EntityQuery(match=Q.MatchPredicate(query=text))
        for text in ("gamma", "alpha", "beta gamma", "alpha theta", "lambda kappa", "epsilon", "zeta eta", "nothing")
    ]
    queries += [
        Q.EntityQuery(query_string=Q.QueryStringPredicate(query=text))
        for text in ("+gamma beta -delta", "theta -kappa", "string1:gamma", "gamma eta", "+alpha lambda")
    ]
    assert "Fuzzy" not in repr(indices[0].compile(queries[0]).query)  # gamma: no automaton
    alpha = repr(indices[0].compile(queries[1]).query)  # alpha: alphx is one edit away, searched as a term
    assert '"alphx"' in alpha and "Fuzzy" not in alpha
    assert "Fuzzy" in repr(indices[1].compile(queries[0]).query)
    for query in queries:
        got, want = (index.search(query, 20) for index in indices)
        assert [(m.operation_id, m.sort_value.value) for m in got.mutations] == [
            (m.operation_id, m.sort_value.value) for m in want.mutations
        ], query
        assert got.total == want.total
    # a neighbour indexed later is seen by the next search (the compiled query depends on the vocabulary)
    assert ops(search(indices[0], match=Q.MatchPredicate(query="gamma"))) == [5, 1]
    indices[0].apply([put(20, "e20", tm(string1="gamme"))])
    assert ops(search(indices[0], match=Q.MatchPredicate(query="gamma")))[-1] == 20


def test_fuzzy_terms_as_vocabulary_words_match_what_the_automaton_matches():
    """Many words a few edits apart (insertions, deletions, substitutions, transpositions, a small alphabet):
    every fuzzy term searched as the vocabulary's words gives the documents and scores of tantivy's
    automaton (forced by a saturated vocabulary)."""
    import random

    rng = random.Random(11)
    words = sorted({"".join(rng.choices("abcd", k=rng.randint(3, 9))) for _ in range(400)})
    fast_schema, slow_schema = IndexSchema(REGISTRY), IndexSchema(REGISTRY)
    slow_schema.vocabulary.saturated = True
    indices = []
    for schema in (fast_schema, slow_schema):
        index = MutationIndex(schema, None, heap_size=15_000_000, num_threads=1)
        docs = [" ".join(words[i : i + 3]) for i in range(0, len(words), 3)]
        index.apply([put(op, f"e{op}", tm(string1=text)) for op, text in enumerate(docs, start=1)])
        indices.append(index)
    tokens = words[::3] + ["".join(rng.choices("abcd", k=rng.randint(4, 9))) for _ in range(150)]
    expanded = 0
    for token in tokens:
        for query in (token, f"{token} {rng.choice(words)}"):
            q = Q.EntityQuery(match=Q.MatchPredicate(query=query))
            expanded += "Fuzzy" not in repr(indices[0].compile(q).query)
            got, want = (index.search(q, 500) for index in indices)
            assert [(m.operation_id, m.sort_value.value) for m in got.mutations] == [
                (m.operation_id, m.sort_value.value) for m in want.mutations
            ], query
    assert expanded > len(tokens)  # most queries needed no automaton at all


def test_a_large_batch_lists_its_words_from_the_term_dictionary(monkeypatch):
    """A batch of at least as many documents as the vocabulary has words (and LISTING_MIN_DOCUMENTS) gives the
    vocabulary the words the index holds once committed; a smaller one, each document's words (then tokens
    the analyzer drops, 40 bytes or more, are in too: a superset)."""
    monkeypatch.setattr(mutation_index_module, "LISTING_MIN_DOCUMENTS", 4)
    schema = IndexSchema(REGISTRY)
    index = MutationIndex(schema, None, heap_size=15_000_000, num_threads=1)
    long_word, other_long_word = "x" * 45, "y" * 45
    texts = ["alpha beta", "gamme delta", f"epsilon {long_word}", "zeta", "eta theta"]
    index.apply([put(op, f"e{op}", tm(string1=text)) for op, text in enumerate(texts, start=1)])
    vocabulary = schema.vocabulary
    assert all(word in vocabulary for word in ("alpha", "gamme", "epsilon", "theta"))
    assert long_word not in vocabulary  # listed from the index, which does not hold it
    compiled = repr(index.compile(Q.EntityQuery(match=Q.MatchPredicate(query="gamma"))).query)
    assert '"gamme"' in compiled and "Fuzzy" not in compiled  # the listed neighbour, searched as a term
    assert ops(search(index, match=Q.MatchPredicate(query="gamma"))) == [2]
    index.apply([put(10, "e10", tm(string1=f"iota {other_long_word}"))])  # 1 < 9 words: split per document
    assert "iota" in vocabulary and other_long_word in vocabulary


def test_match_covers_nested_text_but_not_plain_strings():
    index = new_index()
    index.apply(
        [put(1, "e1", tm(struct1=test_pb2.TestStruct(string1="nested words"), string2="plain", string3="exact"))]
    )
    assert search(index, match=Q.MatchPredicate(query="nested")).total == 1
    assert search(index, match=Q.MatchPredicate(query="plain")).total == 0
    assert search(index, match=Q.MatchPredicate(query="exact")).total == 0


# --- trait, ids, operations, all ---------------------------------------------------------------------------


def test_trait_predicate_and_default_orderings(foo_bar):
    foo_bar.apply([put(3, "e3", test_pb2.TestMessage2(string1="Foo Three"))])
    res = search(foo_bar, trait=trait_query())
    assert ops(res) == [2, 1]  # operation id descending
    assert all(m.sort_value.kind is SortKind.UINT for m in res.mutations)
    assert ops(search(foo_bar, trait=trait_query(TM2))) == [3]
    assert ops(search(foo_bar, trait=trait_query("test"))) == [2, 1]  # short name
    res = search(foo_bar, trait=trait_query(match=Q.MatchPredicate(query="foo")))
    assert sorted(ops(res)) == [1, 2] and res.mutations[0].sort_value.kind is SortKind.SCORE
    assert ops(search(foo_bar, trait=trait_query(TM2, match=Q.MatchPredicate(query="foo")))) == [3]
    with pytest.raises(InvalidArgument, match="trait_name"):
        search(foo_bar, trait=Q.TraitPredicate())


def test_ids_operations_all_orderings():
    index = new_index()
    index.apply([put(op, f"e{op % 3}", tm(string1=f"n{op}"), trait_id=f"t{op}") for op in range(1, 10)])
    res = search(index, ids=Q.IdsPredicate(ids=["e1", "e2"]))
    assert ops(res) == [1, 2, 4, 5, 7, 8]  # ascending
    assert search(index, ids=Q.IdsPredicate()).total == 0
    assert ops(search(index, operations=Q.OperationsPredicate(operation_ids=[7, 3, 42]))) == [3, 7]
    assert search(index, operations=Q.OperationsPredicate()).total == 0
    assert ops(search(index, all=Q.AllPredicate())) == list(range(9, 0, -1))
    # explicit ordering wins over the default
    asc = Q.Ordering(operation_id=True, ascending=True)
    assert ops(search(index, all=Q.AllPredicate(), ordering=asc)) == list(range(1, 10))
    desc = Q.Ordering(operation_id=True)
    assert ops(search(index, ids=Q.IdsPredicate(ids=["e0"]), ordering=desc)) == [9, 6, 3]


def test_count_total_and_paging():
    index = new_index()
    for start in range(1, 26, 5):  # several commits -> several segments
        index.apply([put(op, f"e{op}", tm(string1="same words")) for op in range(start, start + 5)])
    assert index.count() == 25
    res = search(index, count=10, offset=10, all=Q.AllPredicate())
    assert ops(res) == list(range(15, 5, -1)) and res.total == 25
    assert ops(search(index, count=10, offset=20, all=Q.AllPredicate())) == [5, 4, 3, 2, 1]
    assert ops(search(index, count=10, offset=30, all=Q.AllPredicate())) == []
    assert search(index, count=0, all=Q.AllPredicate()).total == 25
    pages = [ops(search(index, count=7, offset=o, match=Q.MatchPredicate(query="same"))) for o in (0, 7, 14, 21)]
    assert sum(pages, []) == list(range(25, 0, -1))  # equal scores: op id descending, stable over pages


# --- dates orderings and tie breaking ---------------------------------------------------------------------


def test_created_updated_orderings_break_ties_by_operation_id():
    index = new_index()
    for start in range(1, 13, 4):
        index.apply([put(op, f"e{op}", tm(string1="x")) for op in range(start, start + 4)])  # no explicit dates
    created = Q.Ordering(created_at=True)
    full = ops(search(index, all=Q.AllPredicate(), ordering=created))
    assert full == list(range(12, 0, -1))
    pages = [ops(search(index, count=5, offset=o, all=Q.AllPredicate(), ordering=created)) for o in (0, 5, 10)]
    assert sum(pages, []) == full
    created_asc = Q.Ordering(created_at=True, ascending=True)
    pages = [ops(search(index, count=5, offset=o, all=Q.AllPredicate(), ordering=created_asc)) for o in (0, 5, 10)]
    assert sum(pages, []) == list(range(1, 13))

    index.apply(
        [
            put(20, "d1", tm(string1="x"), created=5 * DAY, modified=9 * DAY),
            put(21, "d2", tm(string1="x"), created=7 * DAY, modified=8 * DAY),
        ]
    )
    res = search(index, count=3, all=Q.AllPredicate(), ordering=created)
    assert ops(res) == [21, 20, 12]
    assert [m.sort_value.value for m in res.mutations] == [7 * DAY, 5 * DAY, 0]
    put_meta = res.mutations[0].mutation_type
    assert isinstance(put_meta, TraitPutMeta)
    assert (put_meta.creation_date, put_meta.modification_date) == (7 * DAY, 8 * DAY)
    assert ops(search(index, count=2, all=Q.AllPredicate(), ordering=Q.Ordering(updated_at=True))) == [20, 21]


# --- field predicates and ranges ---------------------------------------------------------------------------


@pytest.fixture
def numbers():
    index = new_index()
    index.apply(
        [
            put(1, "e1", tm(string1="Alpha beta", string3="Hello World", uint1=5, int1=-10, date1=ts(100 * DAY))),
            put(2, "e2", tm(string1="beta gamma", string3="hello world", uint1=10, int1=-1, date1=ts(200 * DAY))),
            put(3, "e3", tm(string1="gamma", string3="other", uint1=15, int1=7, date1=ts(300 * DAY))),
            put(4, "e4", test_pb2.TestMessage2(string1="Hello World")),
        ]
    )
    return index


def test_field_equality_on_string_and_text(numbers):
    assert entities(search(numbers, trait=field("string3", string="Hello World"))) == ["e1"]
    assert entities(search(numbers, trait=field("string3", string="hello world"))) == ["e2"]
    assert search(numbers, trait=field("string3", string="Hello")).total == 0
    # text fields match by token (single token) or phrase
    assert sorted(entities(search(numbers, trait=field("string1", string="Beta")))) == ["e1", "e2"]
    assert entities(search(numbers, trait=field("string1", string="beta gamma"))) == ["e2"]
    assert search(numbers, trait=field("string1", string="gamma beta")).total == 0
    # numbers given as strings on numeric fields
    assert entities(search(numbers, trait=field("uint1", string="10"))) == ["e2"]
    with pytest.raises(InvalidArgument, match="uint1"):
        search(numbers, trait=field("uint1", string="ten"))
    with pytest.raises(InvalidArgument, match="string3"):
        search(numbers, trait=field("string3", Op.GT, string="a"))
    with pytest.raises(InvalidArgument, match="string3"):
        search(numbers, trait=field("string3", int64=3))


@pytest.mark.parametrize(
    ("name", "operator", "value", "expected"),
    [
        ("uint1", Op.EQUAL, {"uint64": 10}, ["e2"]),
        ("uint1", Op.GT, {"uint64": 10}, ["e3"]),
        ("uint1", Op.GTE, {"uint64": 10}, ["e2", "e3"]),
        ("uint1", Op.LT, {"uint64": 10}, ["e1"]),
        ("uint1", Op.LTE, {"uint64": 10}, ["e1", "e2"]),
        ("uint1", Op.GT, {"int64": -3}, ["e1", "e2", "e3"]),
        ("uint1", Op.LT, {"int64": 0}, []),
        ("int1", Op.EQUAL, {"int64": -1}, ["e2"]),
        ("int1", Op.GT, {"int64": -1}, ["e3"]),
        ("int1", Op.GTE, {"int64": -1}, ["e2", "e3"]),
        ("int1", Op.LT, {"int64": -1}, ["e1"]),
        ("int1", Op.LTE, {"int64": -1}, ["e1", "e2"]),
        ("int1", Op.LT, {"uint64": 2**64 - 1}, ["e1", "e2", "e3"]),
        ("date1", Op.EQUAL, {"date": ts(200 * DAY)}, ["e2"]),
        ("date1", Op.GT, {"date": ts(200 * DAY)}, ["e3"]),
        ("date1", Op.GTE, {"date": ts(200 * DAY)}, ["e2", "e3"]),
        ("date1", Op.LT, {"date": ts(200 * DAY)}, ["e1"]),
        ("date1", Op.LTE, {"date": ts(200 * DAY)}, ["e1", "e2"]),
        ("date1", Op.LTE, {"date": ts(200 * DAY - 1)}, ["e1"]),
        ("date1", Op.GTE, {"uint64": 200 * DAY + 1}, ["e3"]),
    ],
)
def test_field_ranges(numbers, name, operator, value, expected):
    res = search(numbers, trait=field(name, operator, **value))
    assert sorted(entities(res)) == expected


def test_field_prefix_matches_nested_fields():
    index = new_index()
    index.apply([put(1, "e1", tm(struct1=test_pb2.TestStruct(string1="inner"))), put(2, "e2", tm(string1="inner"))])
    assert entities(search(index, trait=field("struct1", string="inner"))) == ["e1"]
    assert entities(search(index, trait=field("struct1.string1", string="inner"))) == ["e1"]


def test_unknown_field_and_unknown_type_errors(numbers):
    with pytest.raises(InvalidArgument, match=r"'nope'.*exocore\.test\.TestMessage"):
        search(numbers, trait=field("nope", string="x"))
    with pytest.raises(InvalidArgument, match="string2"):  # not indexed
        search(numbers, trait=field("string2", string="x"))
    unknown = Q.TraitPredicate(trait_name="app.Unknown", query=Q.TraitQuery(field=Op(field="a", string="x")))
    with pytest.raises(InvalidArgument, match=r"app\.Unknown"):
        search(numbers, trait=unknown)
    with pytest.raises(InvalidArgument, match="no value"):
        search(numbers, trait=field("uint1"))
    # field orderings
    with pytest.raises(InvalidArgument, match="not sorted"):
        search(numbers, trait=trait_query(), ordering=Q.Ordering(field="uint1"))
    with pytest.raises(InvalidArgument, match="nope"):
        search(numbers, trait=trait_query(), ordering=Q.Ordering(field="nope"))
    with pytest.raises(InvalidArgument, match="trait"):
        search(numbers, all=Q.AllPredicate(), ordering=Q.Ordering(field="uint3"))
    with pytest.raises(InvalidArgument, match=r"app\.Unknown"):
        search(numbers, trait=trait_query("app.Unknown"), ordering=Q.Ordering(field="uint3"))


def test_unknown_trait_type_is_indexed_with_fixed_fields():
    index = new_index()
    unknown = entity_pb2.Trait(id="tx", message=any_pb2.Any(type_url="type.googleapis.com/app.Unknown", value=b"1"))
    index.apply([PutTraitOperation(7, None, "ex", unknown), put(8, "e8", tm(string1="x"))])
    assert ops(search(index, trait=trait_query("app.Unknown"))) == [7]
    assert ops(search(index, ids=Q.IdsPredicate(ids=["ex"]))) == [7]
    assert ops(search(index, operations=Q.OperationsPredicate(operation_ids=[7]))) == [7]
    assert ops(search(index, all=Q.AllPredicate())) == [8, 7]
    meta = search(index, ids=Q.IdsPredicate(ids=["ex"])).mutations[0].mutation_type
    assert meta == TraitPutMeta("tx", "app.Unknown", None, None, False)


# --- sorting by sorted fields ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "values", "kind"),
    [
        ("uint3", [7, 0, 300, 42, 5], SortKind.UINT),
        ("int3", [-7, 0, 300, -42, 5], SortKind.INT),
        ("date3", [7 * DAY, 1, 300 * DAY, 42 * DAY, 5], SortKind.UINT),
    ],
)
def test_sort_by_field_both_directions(name, values, kind):
    index = new_index()
    for i, value in enumerate(values):  # one commit per doc: ties and order across segments
        msg = tm(**{name: ts(value) if name == "date3" else value})
        index.apply([put(i + 1, f"e{i + 1}", msg)])
    index.apply([put(10, "other", test_pb2.TestMessage2(string1="x"))])
    desc = search(index, trait=trait_query(), ordering=Q.Ordering(field=name))
    assert [m.sort_value.value for m in desc.mutations] == sorted(values, reverse=True)
    assert all(m.sort_value.kind is kind for m in desc.mutations)
    asc = search(index, trait=trait_query(), ordering=Q.Ordering(field=name, ascending=True))
    assert [m.sort_value.value for m in asc.mutations] == sorted(values)
    page = search(index, count=2, offset=1, trait=trait_query(), ordering=Q.Ordering(field=name, ascending=True))
    assert [m.sort_value.value for m in page.mutations] == sorted(values)[1:3]


def test_sort_by_field_ties_by_operation_id():
    index = new_index()
    for op in range(1, 9):
        index.apply([put(op, f"e{op}", tm(uint3=op % 2))])
    order = Q.Ordering(field="uint3")
    pages = [ops(search(index, count=3, offset=o, trait=trait_query(), ordering=order)) for o in (0, 3, 6)]
    assert sum(pages, []) == [7, 5, 3, 1, 8, 6, 4, 2]


# --- references ------------------------------------------------------------------------------------------------


@pytest.fixture
def refs():
    index = new_index()
    index.apply(
        [
            put(1, "e1", tm(ref1=entity_pb2.Reference(entity_id="et-a_b", trait_id="trt_x-y"))),
            put(2, "e2", tm(ref1=entity_pb2.Reference(entity_id="et-a_b", trait_id="other"))),
            put(3, "e3", tm(ref1=entity_pb2.Reference(entity_id="et a%b", trait_id="t 1"))),
            put(4, "e4", tm(ref2=entity_pb2.Reference(entity_id="et-a_b"), string1="et a b")),
            put(5, "e5", tm(string1="none")),
        ]
    )
    return index


def test_reference_predicate_ids_with_dashes_and_underscores(refs):
    res = search(refs, reference=Q.ReferencePredicate(entity_id="et-a_b"))
    assert ops(res) == [1, 2]  # ascending by default; ref2 is not indexed
    assert ops(search(refs, reference=Q.ReferencePredicate(entity_id="et-a_b", trait_id="trt_x-y"))) == [1]
    assert ops(search(refs, reference=Q.ReferencePredicate(entity_id="et-a_b", trait_id="trt"))) == []
    assert ops(search(refs, reference=Q.ReferencePredicate(entity_id="et"))) == []
    assert ops(search(refs, reference=Q.ReferencePredicate(entity_id="et a%b", trait_id="t 1"))) == [3]
    assert ops(search(refs, reference=Q.ReferencePredicate(entity_id="et"))) == []
    with pytest.raises(InvalidArgument):
        search(refs, reference=Q.ReferencePredicate())
    metas = {m.operation_id: m.mutation_type for m in search(refs, all=Q.AllPredicate()).mutations}
    assert [op for op, meta in sorted(metas.items()) if meta.has_reference] == [1, 2, 3]  # type: ignore[union-attr]


def test_trait_field_reference_predicate(refs):
    pred = Q.TraitFieldReferencePredicate(field="ref1", reference=Q.ReferencePredicate(entity_id="et-a_b"))
    assert ops(search(refs, trait=trait_query(reference=pred))) == [2, 1]
    pred = Q.TraitFieldReferencePredicate(reference=Q.ReferencePredicate(entity_id="et-a_b", trait_id="other"))
    assert ops(search(refs, trait=trait_query(reference=pred))) == [2]
    with pytest.raises(InvalidArgument, match="ref2"):
        bad = Q.TraitFieldReferencePredicate(field="ref2", reference=Q.ReferencePredicate(entity_id="x"))
        search(refs, trait=trait_query(reference=bad))
    with pytest.raises(InvalidArgument, match="string1"):
        bad = Q.TraitFieldReferencePredicate(field="string1", reference=Q.ReferencePredicate(entity_id="x"))
        search(refs, trait=trait_query(reference=bad))
    assert ops(search(refs, trait=field("ref1", string="et a%b"))) == [3]


# --- boolean -------------------------------------------------------------------------------------------------


def test_boolean_predicate(foo_bar):
    B = Q.BooleanPredicate
    foo_bar.apply([put(3, "e3", test_pb2.TestMessage2(string1="Foo Three"))])
    must = B(
        queries=[
            B.SubQuery(occur=B.MUST, trait=trait_query()),
            B.SubQuery(occur=B.MUST_NOT, ids=Q.IdsPredicate(ids=["e1"])),
        ]
    )
    res = search(foo_bar, boolean=must)
    assert ops(res) == [2]
    assert foo_bar.compile(Q.EntityQuery(boolean=must)).ordering.operation_id  # from the trait sub-predicate
    should = B(
        queries=[
            B.SubQuery(occur=B.SHOULD, ids=Q.IdsPredicate(ids=["e3"])),
            B.SubQuery(occur=B.SHOULD, match=Q.MatchPredicate(query="one")),
        ]
    )
    compiled = foo_bar.compile(Q.EntityQuery(boolean=should))
    assert compiled.ordering.operation_id and compiled.ordering.ascending  # ids first: op id ascending
    assert ops(search(foo_bar, boolean=should)) == [1, 3]
    only_not = B(queries=[B.SubQuery(occur=B.MUST_NOT, match=Q.MatchPredicate(query="two"))])
    assert sorted(ops(search(foo_bar, boolean=only_not))) == [1, 3]
    nested = B(queries=[B.SubQuery(occur=B.MUST, boolean=should), B.SubQuery(occur=B.MUST, all=Q.AllPredicate())])
    assert sorted(ops(search(foo_bar, boolean=nested))) == [1, 3]
    assert search(foo_bar, boolean=B()).total == 0
    two_traits = B(
        queries=[B.SubQuery(occur=B.SHOULD, trait=trait_query()), B.SubQuery(occur=B.SHOULD, trait=trait_query(TM2))]
    )
    with pytest.raises(InvalidArgument, match="one trait type"):
        search(foo_bar, boolean=two_traits)


def test_test_predicate_and_missing_predicate_fail(foo_bar):
    with pytest.raises(InvalidArgument):
        search(foo_bar, test=Q.TestPredicate(success=True))
    with pytest.raises(InvalidArgument):
        foo_bar.search(Q.EntityQuery(), 10)


def test_score_ascending(foo_bar):
    foo_bar.apply([put(3, "e3", tm(string1="two two two two"))])
    res = search(foo_bar, match=Q.MatchPredicate(query="two"), ordering=Q.Ordering(score=True, ascending=True))
    assert entities(res) == ["e2", "e3"]
    assert res.mutations[0].sort_value.value < res.mutations[1].sort_value.value


# --- tombstones, pending deletions, deletions ----------------------------------------------------------------


def test_tombstones_and_pending_deletions_are_documents():
    index = new_index()
    index.apply(
        [
            put(1, "e1", tm(string1="a"), block=3),
            TraitTombstoneOperation(2, 3, "e1", "t1"),
            EntityTombstoneOperation(3, 4, "e2"),
            PendingDeletionOperation(4, "e1"),
        ]
    )
    res = search(index, ids=Q.IdsPredicate(ids=["e1", "e2"]))
    assert ops(res) == [1, 2, 3, 4]
    types = [m.mutation_type for m in res.mutations]
    assert types[1:] == [TraitTombstoneMeta("t1"), EntityTombstoneMeta(), PendingDeletionMeta()]
    assert [m.block_offset for m in res.mutations] == [3, 3, 4, None]
    assert ops(search(index, operations=Q.OperationsPredicate(operation_ids=[2, 3]))) == [2, 3]
    assert ops(search(index, all=Q.AllPredicate())) == [4, 3, 2, 1]
    assert ops(search(index, trait=trait_query())) == [1]  # only puts have a trait type
    assert index.highest_indexed_block() == 4


def test_delete_operations_removes_documents():
    index = new_index()
    assert index.apply([put(op, "e1", tm(string1="a"), trait_id=f"t{op}") for op in (1, 2, 3)]) == 3
    assert index.operation_ids_for_entity("e1") == [1, 2, 3]
    assert index.apply([DeleteOperationsOperation((1, 3, 99))]) == 2
    assert index.count() == 1
    assert index.operation_ids_for_entity("e1") == [2]  # cache invalidated
    assert ops(search(index, all=Q.AllPredicate())) == [2]
    # a put and its deletion in the same batch
    assert index.apply([put(5, "e5", tm()), DeleteOperationsOperation((5,))]) == 2
    assert search(index, ids=Q.IdsPredicate(ids=["e5"])).total == 0
    assert index.apply([]) == 0


def test_delete_operations_counts_match_a_disk_index(tmp_path):
    """The RAM index counts removals from its own bookkeeping (no search): same counts, documents and entity
    caches as the on-disk index, which searches, including operations indexed twice or re-added."""
    indices = [new_index(), new_index(tmp_path / "disk")]
    batches = [
        [put(op, f"e{op % 2}", tm(string1="a"), trait_id=f"t{op}") for op in (1, 2, 3, 4)],
        [put(2, "e0", tm(string1="a"), trait_id="t2")],  # operation 2 now has two documents
        [DeleteOperationsOperation((1, 2, 99))],
        [put(5, "e1", tm()), DeleteOperationsOperation((5, 3)), put(5, "e1", tm())],  # 5 re-added after removal
        [DeleteOperationsOperation((5, 4)), DeleteOperationsOperation((4,))],
        [put(6, "e6", tm()), put(6, "e6", tm())],
        [DeleteOperationsOperation((6,))],
    ]
    for batch in batches:
        counts = [index.apply(batch) for index in indices]
        assert counts[0] == counts[1], batch
        assert [ops(search(index, all=Q.AllPredicate())) for index in indices][0] == ops(
            search(indices[1], all=Q.AllPredicate())
        )
        for entity in ("e0", "e1", "e6"):
            # the RAM index answers from its own map of entities, the disk index searches
            assert indices[0].fetch_entity_mutations(entity) == indices[1].fetch_entity_mutations(entity)
        wanted = ["e0", "e1", "e6", "nobody"]
        assert indices[0].fetch_entities_mutations(wanted) == indices[1].fetch_entities_mutations(wanted)
    assert indices[0].count() == indices[1].count() == 0
    # every kind of document, with and without block offsets, dates and references
    msg = tm(string1="x")
    msg.ref1.entity_id = "e9"
    batch = [
        put(10, "e1", msg, created=DAY, modified=2 * DAY),
        put(11, "e1", tm(), block=4),
        TraitTombstoneOperation(12, 5, "e1", "t1"),
        EntityTombstoneOperation(13, None, "e2"),
        PendingDeletionOperation(14, "e2"),
    ]
    for index in indices:
        index.apply(batch)
    for entity in ("e1", "e2"):
        assert indices[0].fetch_entity_mutations(entity) == indices[1].fetch_entity_mutations(entity)
    res = [search(index, all=Q.AllPredicate()).mutations for index in indices]
    assert res[0] == res[1]


def test_shared_document_indexes_the_same_fields(tmp_path):
    """A chain document taken from the pending index's `DocumentCache` holds exactly the fields of one built
    from the operation, block offset included; the pending index keeps its copy without it."""
    cache = DocumentCache()
    pending, chain, fresh = new_index(), new_index(tmp_path / "chain"), new_index(tmp_path / "fresh")
    msg = tm(string1="Foo Bar", string3="folder1", uint3=7, date3=ts(5 * DAY))
    msg.struct1.string1 = "nested words"
    msg.ref1.entity_id, msg.ref1.trait_id = "e9", "t9"
    operations = [
        put(1, "e1", msg, created=DAY, modified=2 * DAY),
        TraitTombstoneOperation(2, None, "e1", "t1"),
        EntityTombstoneOperation(3, None, "e2"),
    ]
    pending.apply([*operations, PendingDeletionOperation(4, "e3")], cache)
    assert len(cache) == 3  # a pending deletion marker never goes to the chain index
    in_block = [dataclasses.replace(op, block_offset=7) for op in operations]
    shared = [chain._document_for(op, cache) for op in in_block]
    assert len(cache) == 0
    for doc, op in zip(shared, in_block, strict=True):
        expected = fresh._document(op).to_dict()
        assert {k: sorted(map(str, v)) for k, v in doc.to_dict().items()} == {
            k: sorted(map(str, v)) for k, v in expected.items()
        }
    chain.apply(in_block, DocumentCache())
    fresh.apply(in_block)
    for query in (
        Q.EntityQuery(all=Q.AllPredicate()),
        Q.EntityQuery(match=Q.MatchPredicate(query="nested foo")),
        Q.EntityQuery(trait=field("string3", string="folder1")),
        Q.EntityQuery(
            trait=Q.TraitPredicate(
                trait_name=TM,
                query=Q.TraitQuery(
                    reference=Q.TraitFieldReferencePredicate(
                        field="ref1", reference=Q.ReferencePredicate(entity_id="e9")
                    )
                ),
            )
        ),
    ):
        got, want = chain.search(query, 10), fresh.search(query, 10)
        assert [(m.operation_id, m.block_offset, m.mutation_type) for m in got.mutations] == [
            (m.operation_id, m.block_offset, m.mutation_type) for m in want.mutations
        ]
    assert [m.block_offset for m in search(pending, all=Q.AllPredicate()).mutations] == [None] * 4


def test_document_cache_is_bounded_and_versioned():
    cache = DocumentCache(capacity=2)
    docs = [new_index()._document(put(op, "e", tm())) for op in (1, 2, 3)]
    for op, doc in zip((1, 2, 3), docs, strict=True):
        cache.put(op, 0, doc)
    assert len(cache) == 2 and cache.get(1, 0) is None  # the oldest went first
    assert cache.get(2, 1) is None  # built under another registry version
    assert cache.take(3, 0) is docs[2] and cache.take(3, 0) is None


def test_fetch_entity_mutations_sorted_dedup_and_invalidated():
    index = new_index()
    index.apply([put(5, "e1", tm(), trait_id="a"), put(2, "e1", tm(), trait_id="b"), put(3, "e2", tm())])
    index.apply([put(2, "e1", tm(), trait_id="b")])  # same operation indexed twice
    first = index.fetch_entity_mutations("e1")
    assert [m.operation_id for m in first] == [2, 5]
    assert [m.mutation_type.trait_id for m in first] == ["b", "a"]  # type: ignore[union-attr]
    assert index.fetch_entity_mutations("e1") == first  # cached
    index.apply([TraitTombstoneOperation(7, None, "e1", "a")])
    assert [m.operation_id for m in index.fetch_entity_mutations("e1")] == [2, 5, 7]
    assert index.fetch_entity_mutations("nope") == []


def test_highest_indexed_block():
    index = new_index()
    assert index.highest_indexed_block() is None
    index.apply([put(1, "e1", tm())])
    assert index.highest_indexed_block() is None
    index.apply([put(2, "e1", tm(), block=10), put(3, "e1", tm(), block=30), put(4, "e1", tm(), block=20)])
    assert index.highest_indexed_block() == 30
    index.apply([DeleteOperationsOperation((3,))])
    assert index.highest_indexed_block() == 20


# --- on disk ---------------------------------------------------------------------------------------------------


def test_on_disk_index_reopens_with_the_same_results(tmp_path):
    path = tmp_path / "chain"
    index = new_index(path)
    index.apply(
        [
            put(
                1,
                "e1",
                tm(string1="Foo Bar One", string3="k1", uint3=3, ref1=entity_pb2.Reference(entity_id="x-1")),
                block=0,
            ),
            put(2, "e2", tm(string1="Foo Bar Two", string3="k2", uint3=1), block=100),
        ]
    )
    queries = [
        Q.EntityQuery(match=Q.MatchPredicate(query="two")),
        Q.EntityQuery(trait=field("string3", string="k1")),
        Q.EntityQuery(trait=trait_query(), ordering=Q.Ordering(field="uint3")),
        Q.EntityQuery(reference=Q.ReferencePredicate(entity_id="x-1")),
    ]
    before = [ops(index.search(q, 10)) for q in queries]
    assert before == [[2], [1], [1, 2], [1]]
    index.close()
    del index

    # a new process: new registry, new schema, same mapping
    reopened = MutationIndex(IndexSchema(TraitRegistry()), path, heap_size=15_000_000, num_threads=1)
    assert reopened.count() == 2
    assert [ops(reopened.search(q, 10)) for q in queries] == before
    assert reopened.highest_indexed_block() == 100
    reopened.apply([put(3, "e3", tm(string3="k1"), block=200)])
    assert ops(reopened.search(queries[1], 10)) == [3, 1]


def test_recency_boost():
    now = 1000 * DAY
    assert recency_boost(now, now) == 1.0
    assert recency_boost(now, now - 15 * DAY) == 1.0
    assert recency_boost(now, now + 15 * DAY) == 1.0
    assert math.isclose(recency_boost(now, now - 365 * DAY), 0.2 ** (350 / 365), rel_tol=1e-9)
    assert math.isclose(recency_boost(now, now - 365 * DAY), 0.2137, abs_tol=1e-3)
    assert math.isclose(recency_boost(now, now - 730 * DAY), 0.0428, abs_tol=1e-3)


def test_on_disk_index_with_another_schema_is_refused(tmp_path):
    path = tmp_path / "chain"
    MutationIndex(IndexSchema(REGISTRY, pool_size=2), path, heap_size=15_000_000, num_threads=1).close()
    with pytest.raises(FailedPrecondition, match="chain"):
        new_index(path)


def test_failed_batch_is_rolled_back():
    index = new_index()
    index.apply([put(1, "e1", tm(string1="a"))])
    with pytest.raises(TypeError):
        index.apply([put(2, "e2", tm(string1="b")), "not an operation"])  # type: ignore[list-item]
    index.apply([put(3, "e3", tm(string1="c"))])
    assert ops(search(index, all=Q.AllPredicate())) == [3, 1]


def test_pages_through_a_long_run_of_equal_scores_and_without_total():
    index = new_index()
    index.apply([put(op, f"e{op}", tm(string1="same words")) for op in range(1, 2501)])
    match = Q.MatchPredicate(query="same")
    pages = []
    for offset in range(0, 2500, 300):
        res = search(index, count=300, offset=offset, match=match)
        pages.append(ops(res))
    assert sum(pages, []) == list(range(2500, 0, -1))  # ties by op id descending across every page
    again = index.search(Q.EntityQuery(match=match), 300, 600, with_total=False)
    assert ops(again) == list(range(1900, 1600, -1)) and again.total in (-1, 2500)
    assert index.search(Q.EntityQuery(match=match), 10, 0).total == 2500
    # a write invalidates what was kept of the run
    index.apply([put(3000, "e3000", tm(string1="same words"))])
    assert ops(search(index, count=3, offset=0, match=match)) == [3000, 2500, 2499]


def test_pages_cut_inside_runs_of_equal_scores_match_the_whole_ordering():
    """Runs of equal scores followed by lower scores: small pages (cut inside a run, only the run ordered by
    operation id) concatenate to the whole result ordered by score, then operation id."""
    index = new_index()
    texts = ["same", "same same", "same other words", "same same same filler"]
    index.apply([put(op, f"e{op}", tm(string1=texts[op % 4])) for op in range(1, 241)])
    match = Q.MatchPredicate(query="same")
    whole = search(index, count=1000, match=match).mutations
    assert len(whole) == 240
    keys = [(-m.sort_value.value, -m.operation_id) for m in whole]
    assert keys == sorted(keys)
    for size in (7, 60, 61):
        pages = [search(index, count=size, offset=offset, match=match) for offset in range(0, 240, size)]
        assert sum((ops(page) for page in pages), []) == ops(search(index, count=1000, match=match))
        assert [m.sort_value.value for page in pages for m in page.mutations] == [m.sort_value.value for m in whole]


def test_repeated_searches_reuse_the_page_until_the_index_changes():
    index = new_index()
    index.apply([put(op, f"e{op}", tm(string1="same words", date3=ts(op * DAY))) for op in range(1, 30)])
    sorted_by_date = Q.EntityQuery(trait=trait_query(), ordering=Q.Ordering(field="date3"))
    first = index.search(sorted_by_date, 5, 0)
    assert not hasattr(first.mutations, "clear")  # read-only: the same page is handed to every caller
    assert [m.operation_id for m in first.mutations[1:3]] == [28, 27] and first.mutations[-1].operation_id == 25
    again = index.search(sorted_by_date, 5, 0)
    assert again.mutations is first.mutations
    assert ops(again) == [29, 28, 27, 26, 25] and again.total == 29
    assert ops(index.search(sorted_by_date, 5, 5)) == [24, 23, 22, 21, 20]
    index.refresh()  # another searcher (merged segments): searched again, same page
    assert ops(index.search(sorted_by_date, 5, 0)) == [29, 28, 27, 26, 25]
    index.apply([put(40, "e40", tm(string1="same words", date3=ts(40 * DAY)))])
    assert ops(index.search(sorted_by_date, 5, 0)) == [40, 29, 28, 27, 26]
    index.apply([DeleteOperationsOperation((40, 29))])
    assert ops(index.search(sorted_by_date, 5, 0)) == [28, 27, 26, 25, 24]


def test_a_page_loads_the_metadata_of_the_hits_read_only(tmp_path):
    """The disk index loads a hit's stored document when the hit is first read (a searcher reads a few hits of
    most pages); the page reads as the list of its mutations."""
    index = new_index(tmp_path / "chain")
    index.apply([put(op, f"e{op}", tm(string1="same words"), block=1) for op in range(1, 21)])
    index._meta_cache.clear()
    page = index.search(Q.EntityQuery(all=Q.AllPredicate()), 10, 0).mutations
    assert len(page) == 10 and not index._meta_cache
    assert page[0].operation_id == 20 and page[0].entity_id == "e20" and page[0].block_offset == 1
    assert list(index._meta_cache) == [20]
    assert page[-1].operation_id == 11 and [m.operation_id for m in page[2:4]] == [18, 17]
    with pytest.raises(IndexError):
        page[10]
    assert page == [index.fetch_entity_mutations(f"e{op}")[0] for op in range(20, 10, -1)]
    assert len(index._meta_cache) == 10


class _CountingSearcher:
    """A tantivy searcher counting its searches."""

    def __init__(self, searcher) -> None:
        self.searcher, self.searches = searcher, 0

    def search(self, *args, **kwargs):
        self.searches += 1
        return self.searcher.search(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.searcher, name)


def test_entities_of_one_document_read_as_a_hit_need_no_search(tmp_path):
    """The disk index answers an entity whose only document is a hit read from a page of the current searcher
    with that hit (its document frequency says there is no other), and searches otherwise."""
    index, other = new_index(tmp_path / "chain"), new_index(tmp_path / "other")
    batch = [put(1, "e1", tm(string1="word"), block=1), put(2, "e2", tm(string1="word"), block=1)]
    batch += [put(3, "e2", tm(string1="other"), trait_id="t2", block=1), put(4, "e3", tm(string1="word"), block=1)]
    for target in (index, other):
        target.apply(batch)
    index._last_write = float("-inf")  # no periodic reload (of merged segments) replacing the counting searcher
    counting = index._searcher = _CountingSearcher(index._searcher)
    page = index.search(Q.EntityQuery(match=Q.MatchPredicate(query="word")), 10, 0).mutations
    assert {page[0].entity_id, page[1].entity_id} <= {"e1", "e2", "e3"}  # two of three hits read
    read = [m.entity_id for m in page[:2]]
    searches = counting.searches
    for entity in read:
        assert index.fetch_entity_mutations(entity) == other.fetch_entity_mutations(entity)
    assert counting.searches == searches + ("e2" in read)  # e2 has two documents: searched
    unread = ({"e1", "e3"} - set(read)).pop()
    assert index.fetch_entity_mutations(unread) == other.fetch_entity_mutations(unread)  # not a hit read: searched
    assert counting.searches == searches + ("e2" in read) + 1
    list(page)
    index._entity_cache.clear()
    searches = counting.searches
    assert index.fetch_entities_mutations(["e1", "e3", "nobody"]) == other.fetch_entities_mutations(
        ["e1", "e3", "nobody"]
    )
    assert counting.searches == searches
    index.apply([put(5, "e4", tm(), block=2)])  # another searcher: the hits read belong to the previous one
    index._last_write = float("-inf")
    counting = index._searcher = _CountingSearcher(index._searcher)
    assert index.fetch_entity_mutations("e1") == other.fetch_entity_mutations("e1")
    assert counting.searches == 1


def test_fetch_entities_mutations_is_fetch_entity_mutations_of_each():
    index, other = new_index(), new_index()
    batch = [put(op, f"e{op % 5}", tm(), trait_id=f"t{op}") for op in range(1, 40)]
    batch += [put(100 + op, "busy", tm(), trait_id=f"b{op}") for op in range(1, 80)]  # more than a first fetch
    batch += [put(7, "e2", tm(), trait_id="t7"), EntityTombstoneOperation(200, None, "e1")]  # 7 indexed twice
    for target in (index, other):
        target.apply(batch)
    wanted = ["e0", "e1", "e2", "missing", "e0"]
    assert index.fetch_entities_mutations(wanted) == {e: other.fetch_entity_mutations(e) for e in wanted}
    assert [m.operation_id for m in index.fetch_entity_mutations("e2")] == [2, 7, 12, 17, 22, 27, 32, 37]
    assert index.fetch_entities_mutations(["busy", "e3"]) == {
        "busy": other.fetch_entity_mutations("busy"),
        "e3": other.fetch_entity_mutations("e3"),
    }
    index.apply([DeleteOperationsOperation((2,))])  # the cache filled by the batch is invalidated
    assert [m.operation_id for m in index.fetch_entities_mutations(["e2", "e3"])["e2"]][:2] == [7, 12]


def test_on_disk_fetches_of_entities_without_documents(tmp_path):
    """The on-disk index answers entities it holds no document of without a search (a term lookup): the same
    answers, also once the entity is written, and once its documents are deleted (still counted by the
    term's document frequency until merged away)."""
    index = new_index(tmp_path / "chain")
    index.apply([put(1, "e1", tm(), block=1), put(2, "e2", tm(), block=1)])
    assert index.fetch_entity_mutations("new") == []
    assert {
        e: [m.operation_id for m in ms] for e, ms in index.fetch_entities_mutations(["e1", "new", "e2"]).items()
    } == {
        "e1": [1],
        "new": [],
        "e2": [2],
    }
    index.apply([put(3, "new", tm(), block=2)])  # the empty answer cached above is invalidated
    assert [m.operation_id for m in index.fetch_entity_mutations("new")] == [3]
    index.apply([DeleteOperationsOperation((3, 1))])
    assert index.fetch_entity_mutations("new") == []
    assert index.fetch_entities_mutations(["new", "e1", "e2", "other"]) == {
        "new": [],
        "e1": [],
        "e2": index.fetch_entity_mutations("e2"),
        "other": [],
    }


def test_fetch_entity_mutations_of_an_entity_with_many_documents():
    index = new_index()
    index.apply([put(op, "busy", tm(), trait_id=f"t{op}") for op in range(1, 201)])
    assert [m.operation_id for m in index.fetch_entity_mutations("busy")] == list(range(1, 201))


# --- page bounds pushed down by the searcher (SPEC 11 item 7) -------------------------------------------------


def _sorted_docs(index: MutationIndex) -> MutationIndex:
    ops_ = []
    for op in range(1, 61):
        msg = tm(
            string1=f"word {'rare' if op % 3 == 0 else ''}", date3=ts((op % 7) * DAY), uint3=op % 5, int3=op % 9 - 4
        )
        if op % 11 == 0:
            msg = tm(string1="word")  # no sorted field values (0)
        ops_.append(put(op, f"e{op % 20}", msg, trait_id=f"t{op % 3}", created=(op % 4) * DAY if op % 6 else None))
    index.apply(ops_)
    return index


def _ordering_value(m, signed: bool) -> Q.OrderingValue:
    value = m.sort_value.value + (1 << 63 if signed else 0)
    return Q.OrderingValue(uint64=value, operation_id=m.operation_id)


@pytest.mark.parametrize("ascending", [False, True])
@pytest.mark.parametrize(
    "ordering",
    [
        dict(operation_id=True),
        dict(created_at=True),
        dict(updated_at=True),
        dict(field="date3"),
        dict(field="uint3"),
        dict(field="int3"),
    ],
)
def test_page_bounds_restrict_a_fast_field_search_exactly(ordering, ascending):
    index = _sorted_docs(new_index())
    predicate = dict(trait=trait_query()) if "field" in ordering else dict(all=Q.AllPredicate())
    order = Q.Ordering(ascending=ascending, **ordering)
    signed = ordering.get("field") == "int3"
    whole = search(index, count=1000, ordering=order, **predicate).mutations
    assert len(whole) == 60
    for i in (0, 7, 8, 30, 59):  # bounds inside runs of equal values (ties by operation id) and at the ends
        for j in (i + 1, i + 13, 60):
            query = Q.EntityQuery(ordering=order, **predicate)
            start, end = (query.paging.after_ordering_value, query.paging.before_ordering_value)
            if not ascending:
                start, end = end, start
            start.CopyFrom(_ordering_value(whole[i], signed))
            if j < 60:
                end.CopyFrom(_ordering_value(whole[j], signed))
            got = index.search(query, 100, 0)
            assert ops(got) == [m.operation_id for m in whole[i + 1 : j]], (i, j)
            assert ops(index.search(query, 3, 2, with_total=False)) == [
                m.operation_id for m in whole[i + 3 : min(j, i + 6)]
            ]
    # pages with bounds are kept apart from unbounded ones
    assert ops(search(index, count=5, ordering=order, **predicate)) == [m.operation_id for m in whole[:5]]


class _Traits:
    """Payloads of the operations put in the test indices (the searcher's `TraitFetcher`)."""

    def __init__(self) -> None:
        self.by_op: dict[int, tuple[str, entity_pb2.Trait]] = {}

    def put(self, *args, **kwargs) -> PutTraitOperation:
        operation = put(*args, **kwargs)
        self.by_op[operation.operation_id] = (operation.entity_id, operation.trait)
        return operation

    def fetch(self, operation_id: int, block_offset: int | None):
        return self.by_op.get(operation_id)


def test_searcher_pages_through_real_indices_past_the_iteration_cap():
    """Through tantivy: with a cap of 4 mutations per index and pages of 5, following next_page gives every
    entity once, in the order of one uncapped page, for score, operation id, date and field orderings."""
    from exostore.searcher import EntitySearcher

    chain, pending, traits = new_index(), new_index(), _Traits()
    chain_ops, pending_ops = [], []
    for t in range(3):
        for i in range(30):
            op = 1000 * t + 7 * ((i * 13) % 30) + 1
            msg = tm(
                string1="word " + "word " * ((i + t) % 4) + f"filler{i % 3}",
                date3=ts(((i + t) % 6) * DAY),
                uint3=(i * 7 + t) % 9,
                int3=(i * 5 + t) % 7 - 3,
            )
            operation = traits.put(op, f"e{i:02}", msg, trait_id=f"t{t}", created=((i + t) % 5) * DAY)
            if (i + t) % 5 == 0:
                pending_ops.append(operation)
            else:
                chain_ops.append(dataclasses.replace(operation, block_offset=op))
    chain_ops.append(EntityTombstoneOperation(5000, 5000, "e01"))
    chain.apply(chain_ops)
    pending.apply(pending_ops)

    def searcher(**kwargs) -> EntitySearcher:
        return EntitySearcher(
            chain, pending, traits.fetch, ordering_resolver=lambda q: chain.compile(q).ordering, **kwargs
        )

    queries = [
        Q.EntityQuery(match=Q.MatchPredicate(query="word")),
        Q.EntityQuery(match=Q.MatchPredicate(query="word"), ordering=Q.Ordering(score=True, no_recency_boost=True)),
        Q.EntityQuery(all=Q.AllPredicate()),
        Q.EntityQuery(all=Q.AllPredicate(), ordering=Q.Ordering(operation_id=True, ascending=True)),
        Q.EntityQuery(all=Q.AllPredicate(), ordering=Q.Ordering(created_at=True, ascending=True)),
        Q.EntityQuery(trait=trait_query(), ordering=Q.Ordering(field="date3")),
        Q.EntityQuery(trait=trait_query(), ordering=Q.Ordering(field="int3", ascending=True)),
        Q.EntityQuery(query_string=Q.QueryStringPredicate(query="word sort:created")),
        Q.EntityQuery(query_string=Q.QueryStringPredicate(query="type:test word -sort:uint3")),
    ]
    capped = searcher(page_size=2, max_pages=2)
    for query in queries:
        whole = Q.EntityQuery()
        whole.CopyFrom(query)
        whole.paging.count = 1000
        reference = searcher(max_pages=None).search(whole)
        expected = [r.entity.id for r in reference.entities]
        assert len(expected) == 29 and reference.estimated_count == 29, query  # e01 deleted
        query.paging.count = 5
        seen: list[str] = []
        for _ in range(100):
            res = capped.search(query)
            seen += [r.entity.id for r in res.entities]
            if not res.HasField("next_page"):
                break
            query.paging.CopyFrom(res.next_page)
        assert seen == expected, query


def test_ascending_score_pages_are_sorted_once():
    index = new_index()
    index.apply([put(op, f"e{op}", tm(string1="same " + "other " * (op % 5))) for op in range(1, 101)])
    match = Q.MatchPredicate(query="same")
    order = Q.Ordering(score=True, ascending=True)
    whole = search(index, count=1000, ordering=order, match=match).mutations
    keys = [(m.sort_value.value, m.operation_id) for m in whole]
    assert len(whole) == 100 and keys == sorted(keys)
    pages = [ops(search(index, count=7, offset=offset, ordering=order, match=match)) for offset in range(0, 100, 7)]
    assert sum(pages, []) == [m.operation_id for m in whole]
    assert index._score_rows  # the sorted rows were kept for the next pages


def test_repeated_fields_index_every_element(tagged_registry: TraitRegistry):
    """SPEC 11 item 7: the original skipped repeated fields. Each element is an index value: a field
    predicate matches when any element does; a repeated field flagged sorted is indexed, not sorted."""
    registry = tagged_registry
    schema = IndexSchema(registry)
    mapping = schema.mapping("rep.Tagged")
    assert mapping is not None and mapping.describe() == {
        "tags": ("string", "string_0", False),
        "sizes": ("u64", "u64_0", False),  # not sorted: no single value to sort by
        "links": ("references", "references_0", False),
    }
    tagged = registry.message_class("rep.Tagged")
    assert tagged is not None
    index = MutationIndex(schema, None, heap_size=15_000_000, num_threads=1)
    first = tagged(tags=["red", "blue"], sizes=[3, 30])
    first.links.add(entity_id="et-x", trait_id="t1")
    second = tagged(tags=["green"], sizes=[7])
    index.apply([put(1, "e1", first), put(2, "e2", second), put(3, "e3", tagged())])

    def rep(name: str, operator=Op.EQUAL, **value) -> Q.TraitPredicate:
        predicate = Op(field=name, operator=operator, **value)
        return Q.TraitPredicate(trait_name="rep.Tagged", query=Q.TraitQuery(field=predicate))

    assert entities(search(index, trait=rep("tags", string="blue"))) == ["e1"]
    assert entities(search(index, trait=rep("tags", string="red"))) == ["e1"]
    assert entities(search(index, trait=rep("tags", string="green"))) == ["e2"]
    assert entities(search(index, trait=rep("tags", string="yellow"))) == []
    assert sorted(entities(search(index, trait=rep("sizes", Op.GT, uint64=5)))) == ["e1", "e2"]  # 30 > 5, 7 > 5
    assert entities(search(index, trait=rep("sizes", Op.LT, uint64=5))) == ["e1"]  # 3 < 5
    assert entities(search(index, reference=Q.ReferencePredicate(entity_id="et-x"))) == ["e1"]


def test_metadata_of_an_operation_is_the_one_read_back_from_its_document():
    index = new_index()
    with_ref = tm(string1="x")
    with_ref.ref1.entity_id, with_ref.ref1.trait_id = "e9", "t9"
    no_message = put(5, "e5", tm())
    no_message.trait.ClearField("message")
    for op in (
        put(1, "e1", tm(string1="plain")),
        put(2, "e2", with_ref, trait_id="t2", created=DAY, modified=2 * DAY),
        put(3, "e3", tm(), block=4),
        no_message,
        TraitTombstoneOperation(6, None, "e6", "t6"),
        EntityTombstoneOperation(7, None, "e7"),
        PendingDeletionOperation(8, "e8"),
    ):
        doc = index._document(op)
        assert mutation_index_module._meta_of(op, doc) == mutation_index_module._meta_from_document(doc), op
