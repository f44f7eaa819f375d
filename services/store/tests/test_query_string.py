"""Query string mini-language (SPEC 3.6): lexer, every rule, the SPEC examples, orderings and errors."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from exocommon.errors import InvalidArgument
from exocore.store import entity_pb2, query_pb2
from exocore.test import test_pb2
from exostore.mutation_index import MutationIndex
from exostore.query_string import Occur, Part, PartKind, parse_query_string
from exostore.registry import TraitRegistry
from exostore.schema import IndexSchema
from exostore.types import PutTraitOperation

Q = query_pb2
TM = "exocore.test.TestMessage"
SCHEMA = IndexSchema(TraitRegistry())
DAY = 86_400 * 1_000_000_000


def put(op: int, entity: str, msg: Message, created: int | None = None) -> PutTraitOperation:
    packed = any_pb2.Any()
    packed.Pack(msg)
    trait = entity_pb2.Trait(id="t1", message=packed)
    if created is not None:
        trait.creation_date.FromNanoseconds(created)
    return PutTraitOperation(op, None, entity, trait)


def qs(text: str, ordering: query_pb2.Ordering | None = None) -> query_pb2.EntityQuery:
    query = Q.EntityQuery(query_string=Q.QueryStringPredicate(query=text))
    if ordering is not None:
        query.ordering.CopyFrom(ordering)
    return query


def trait_qs(text: str, trait: str = TM) -> query_pb2.EntityQuery:
    pred = Q.TraitPredicate(trait_name=trait, query=Q.TraitQuery(query_string=Q.QueryStringPredicate(query=text)))
    return Q.EntityQuery(trait=pred)


def found(index: MutationIndex, query: query_pb2.EntityQuery) -> list[str]:
    return [m.entity_id for m in index.search(query, 100, 0).mutations]


@pytest.fixture(scope="module")
def index():
    """The SPEC's two traits, "Foo Bar One" (created first) and "Foo Bar Two"."""
    idx = MutationIndex(SCHEMA, None, heap_size=15_000_000, num_threads=1)
    idx.apply(
        [
            put(1, "entity1", test_pb2.TestMessage(string1="Foo Bar One", string3="Key One", uint1=3), created=DAY),
            put(2, "entity2", test_pb2.TestMessage(string1="Foo Bar Two", string3="key two", uint1=8), created=2 * DAY),
        ]
    )
    return idx


# --- lexer ------------------------------------------------------------------------------------------------


def test_lexer_parts():
    parts = parse_query_string('  +Foo -bar baz Field:Value f:(a b) "a Phrase" g:"x y" sort:created -sort:updated ')
    assert parts == [
        Part(Occur.MUST, PartKind.WORD, None, "Foo"),
        Part(Occur.MUST_NOT, PartKind.WORD, None, "bar"),
        Part(Occur.SHOULD, PartKind.WORD, None, "baz"),
        Part(Occur.SHOULD, PartKind.WORD, "field", "Value"),
        Part(Occur.SHOULD, PartKind.GROUP, "f", "a b"),
        Part(Occur.SHOULD, PartKind.PHRASE, None, "a Phrase"),
        Part(Occur.SHOULD, PartKind.PHRASE, "g", "x y"),
        Part(Occur.SHOULD, PartKind.WORD, "sort", "created"),
        Part(Occur.MUST_NOT, PartKind.WORD, "sort", "updated"),
    ]
    assert parse_query_string("") == []
    assert parse_query_string(" - + x: ") == []
    assert parse_query_string('"unterminated phrase') == [
        Part(Occur.SHOULD, PartKind.PHRASE, None, "unterminated phrase")
    ]
    assert parse_query_string("a:b:c") == [Part(Occur.SHOULD, PartKind.WORD, "a", "b:c")]
    assert parse_query_string('""') == [Part(Occur.SHOULD, PartKind.PHRASE, None, "")]


# --- SPEC examples --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo", ["entity1", "entity2"]),
        ("-foo", []),
        ("foo -two", ["entity1"]),
        ("foo +one", ["entity1"]),
        ("type:test", ["entity1", "entity2"]),
        ("", ["entity1", "entity2"]),
        ("-two", ["entity1"]),
        ("FOO", ["entity1", "entity2"]),
        ('"bar one"', ["entity1"]),
        ('"bar two" foo', ["entity2"]),
        ('"one bar"', []),
        ("nothing", []),
        ("onx", []),  # 3 bytes: exact only
        ("bars", ["entity1", "entity2"]),  # fuzzy distance 1
        ("type:TEST two", ["entity2"]),
        ("type:exocore.test.testmessage", ["entity1", "entity2"]),
        ("type:test -type:test", []),
        ("-type:exocore.test.TestMessage2", ["entity1", "entity2"]),
        ("type:exocore.test.TestMessage2", []),
        ("string1:two", ["entity2"]),  # no trait context: the value is searched in all_text
    ],
)
def test_examples(index, text, expected):
    assert sorted(found(index, qs(text))) == expected


def test_trait_query_string_uses_trait_fields(index):
    assert found(index, trait_qs("string1:two")) == ["entity2"]
    assert sorted(found(index, trait_qs("string1:(bar one)"))) == ["entity1", "entity2"]
    assert found(index, trait_qs('string1:"bar one"')) == ["entity1"]
    assert found(index, trait_qs("string3:key")) == []  # exact string field
    assert found(index, trait_qs('string3:"Key One"')) == ["entity1"]
    assert found(index, trait_qs("string3:(key two)")) == ["entity2"]
    assert found(index, trait_qs("uint1:8")) == ["entity2"]
    assert sorted(found(index, trait_qs("uint1:>=3"))) == ["entity1", "entity2"]
    assert found(index, trait_qs("uint1:>3")) == ["entity2"]
    assert found(index, trait_qs("uint1:<8")) == ["entity1"]
    assert found(index, trait_qs("foo -string1:one")) == ["entity2"]
    assert sorted(found(index, trait_qs(""))) == ["entity1", "entity2"]
    # type: in the query string sets the trait context too
    assert found(index, qs("type:test string1:two")) == ["entity2"]
    assert found(index, qs("string1:two type:test")) == ["entity2"]


def test_errors(index):
    with pytest.raises(InvalidArgument, match=r"'nope'.*TestMessage"):
        index.search(trait_qs("nope:x"), 10)
    with pytest.raises(InvalidArgument, match="nope"):
        index.search(qs("type:test nope:x"), 10)
    with pytest.raises(InvalidArgument, match=r"app\.Unknown"):
        index.search(qs("type:app.Unknown field:x"), 10)
    with pytest.raises(InvalidArgument, match="phrase"):
        index.search(qs('foo ""'), 10)
    with pytest.raises(InvalidArgument, match="one trait type"):
        index.search(qs("type:test type:exocore.test.TestMessage2"), 10)
    with pytest.raises(InvalidArgument, match="one trait type"):
        index.search(trait_qs("type:exocore.test.TestMessage2"), 10)
    with pytest.raises(InvalidArgument, match="uint1"):
        index.search(trait_qs("uint1:abc"), 10)
    with pytest.raises(InvalidArgument, match="sort"):
        index.search(qs("foo sort:nope"), 10)
    # unknown types without field parts are fine (traits of unknown types are still findable by type)
    assert found(index, qs("type:app.Unknown")) == []


# --- orderings -------------------------------------------------------------------------------------------


def test_sort_orderings(index):
    created = index.search(qs("foo sort:created"), 10)
    assert [m.entity_id for m in created.mutations] == ["entity2", "entity1"]
    assert [m.sort_value.value for m in created.mutations] == [2 * DAY, DAY]
    flipped = index.search(qs("foo -sort:created"), 10)
    assert [m.entity_id for m in flipped.mutations] == ["entity1", "entity2"]

    def ordering(text: str) -> query_pb2.Ordering:
        return index.compile(qs(text)).ordering

    assert ordering("foo").score and not ordering("foo").ascending
    assert ordering("foo sort:date").created_at
    assert ordering("sort:updated").updated_at and not ordering("sort:updated").ascending
    assert ordering("-sort:update").updated_at and ordering("-sort:update").ascending
    assert ordering("sort:score").score
    assert ordering("-sort:score").ascending
    # an explicit query ordering wins
    explicit = index.compile(qs("foo sort:created", Q.Ordering(operation_id=True, ascending=True))).ordering
    assert explicit.operation_id and explicit.ascending
    # sorted fields of the trait context
    by_field = index.compile(trait_qs("sort:uint3"))
    assert by_field.ordering.field == "uint3" and by_field.sort_field == "u64_fast_1"
    assert index.compile(trait_qs("")).ordering.score  # query string default: score


def test_no_positive_part_adds_all(index):
    assert sorted(found(index, qs("-nothing"))) == ["entity1", "entity2"]
    assert sorted(found(index, qs("sort:created"))) == ["entity1", "entity2"]
    assert found(index, qs("-foo -bar")) == []
