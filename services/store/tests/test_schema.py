"""Trait registry and index schema mapping (SPEC 3.4): deterministic slots, kinds, options, registration."""

from __future__ import annotations

import random

import pytest
from google.protobuf import any_pb2, descriptor_pb2, timestamp_pb2
from google.protobuf.descriptor import FileDescriptor

import exostore.schema as schema_module
from exocommon.errors import InvalidArgument
from exocore.store import entity_pb2, options_pb2
from exocore.test import test_pb2
from exostore.registry import TraitRegistry, type_name_from_url
from exostore.schema import (
    FieldKind,
    IndexSchema,
    ValueKind,
    Vocabulary,
    build_mapping,
    damerau_levenshtein_distance,
    osa_distance,
    ref_escape,
    reference_text,
    text_analyzer,
    text_words,
)

TEST_MESSAGE = "exocore.test.TestMessage"

EXPECTED_TEST_MESSAGE = {
    # walked in field-number order: string1(1), struct1(3).string1, date1(8), uint1(10), string3(12), ref1(13),
    # int1(15), date3(17), uint3(18), int3(19)
    "string1": ("text", "text_0", False),
    "struct1.string1": ("text", "text_1", False),
    "date1": ("u64", "u64_0", False),
    "uint1": ("u64", "u64_1", False),
    "string3": ("string", "string_0", False),
    "ref1": ("references", "references_0", False),
    "int1": ("i64", "i64_0", False),
    "date3": ("u64_fast", "u64_fast_0", True),
    "uint3": ("u64_fast", "u64_fast_1", True),
    "int3": ("i64_fast", "i64_fast_0", True),
}


def _file_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _with_deps(file: FileDescriptor) -> list[descriptor_pb2.FileDescriptorProto]:
    out: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def walk(f: FileDescriptor) -> None:
        if f.name in seen:
            return
        seen.add(f.name)
        for dep in f.dependencies:
            walk(dep)
        out.append(_file_proto(f))

    walk(file)
    return out


def _fds(files: list[descriptor_pb2.FileDescriptorProto]) -> bytes:
    return descriptor_pb2.FileDescriptorSet(file=files).SerializeToString()


def _field(
    name: str,
    number: int,
    ftype: int,
    *,
    text: bool = False,
    indexed: bool = False,
    sorted_: bool = False,
    type_name: str = "",
    repeated: bool = False,
) -> descriptor_pb2.FieldDescriptorProto:
    fd = descriptor_pb2.FieldDescriptorProto(name=name, number=number, type=ftype)  # type: ignore[arg-type]
    fd.label = fd.LABEL_REPEATED if repeated else fd.LABEL_OPTIONAL
    if type_name:
        fd.type_name = type_name
    if text:
        fd.options.Extensions[options_pb2.text] = True
    if indexed:
        fd.options.Extensions[options_pb2.indexed] = True
    if sorted_:
        fd.options.Extensions[options_pb2.sorted] = True
    return fd


F = descriptor_pb2.FieldDescriptorProto


def _app_file(name: str = "app/note.proto", package: str = "app") -> descriptor_pb2.FileDescriptorProto:
    """An app schema whose fields are declared out of field-number order."""
    file = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
    file.dependency.extend(
        ["exocore/store/options.proto", "exocore/store/entity.proto", "google/protobuf/timestamp.proto"]
    )
    note = file.message_type.add(name="Note")
    note.options.Extensions[options_pb2.short_name].append("note")
    note.field.extend(
        [
            _field("title", 10, F.TYPE_STRING, text=True),
            _field("body", 2, F.TYPE_STRING, text=True),
            _field("count", 5, F.TYPE_UINT64, indexed=True, sorted_=True),
            _field("due", 7, F.TYPE_MESSAGE, indexed=True, type_name=".google.protobuf.Timestamp"),
            _field("tags", 3, F.TYPE_STRING, indexed=True, repeated=True),
            _field("author", 4, F.TYPE_MESSAGE, indexed=True, type_name=f".{package}.Person"),
            _field("link", 9, F.TYPE_MESSAGE, indexed=True, type_name=".exocore.store.Reference"),
            _field("score", 11, F.TYPE_SINT64, indexed=True),
            _field("done", 12, F.TYPE_BOOL, indexed=True),
            _field("ratio", 13, F.TYPE_DOUBLE, indexed=True),
        ]
    )
    person = file.message_type.add(name="Person")
    person.field.extend(
        [
            _field("name", 2, F.TYPE_STRING, text=True),
            _field("email", 1, F.TYPE_STRING, indexed=True),
            _field("nick", 3, F.TYPE_STRING),
        ]
    )
    return file


# --- mapping ------------------------------------------------------------------------------------------


def test_test_message_mapping_is_field_number_ordered():
    schema = IndexSchema(TraitRegistry())
    mapping = schema.mapping(TEST_MESSAGE)
    assert mapping is not None
    assert mapping.describe() == EXPECTED_TEST_MESSAGE
    # not flagged / unsupported: string2, date2, uint2, int2, ref2, grouped*, oneof*, map1
    for name in ("string2", "date2", "uint2", "int2", "ref2", "grouped1", "map1", "oneof_string1"):
        assert name not in mapping.fields
    assert mapping.fields["struct1.string1"].attrs == ("struct1", "string1")
    assert mapping.fields["date3"].value_kind is ValueKind.TIMESTAMP
    assert mapping.fields["int3"].kind is FieldKind.I64_FAST
    assert [f.path for f in mapping.text_fields] == ["string1", "struct1.string1"]
    assert [f.path for f in mapping.reference_fields] == ["ref1"]
    assert [f.name for f in mapping.resolve("struct1")] == ["text_1"]
    assert mapping.resolve("nope") == []


def test_same_mapping_whatever_the_registration_order():
    app = _app_file()
    other = _app_file("other/thing.proto", "other")
    deps = _with_deps(test_pb2.DESCRIPTOR)

    first = TraitRegistry(builtins=False)
    first.add_file_descriptor_set(_fds([*deps, app, other]))
    second = TraitRegistry(builtins=False)
    with pytest.raises(InvalidArgument, match="missing"):
        second.add_file_descriptor_set(_fds([other]))  # missing dependencies are refused ...
    assert second.message_descriptor("other.Note") is None
    second.add_file_descriptor_set(_fds([other, app, *reversed(deps)]))  # ... any order is fine with them
    third = TraitRegistry()  # built-ins first, then the apps one by one in reverse
    third.add_file_descriptor_set(_fds([other]))
    third.add_file_descriptor_set(_fds([app]))

    names = ["app.Note", "other.Note", TEST_MESSAGE, "exocore.test.TestMessage2"]
    mappings = [[IndexSchema(r).mapping(n).describe() for n in names] for r in (first, second, third)]  # type: ignore[union-attr]
    assert mappings[0] == mappings[1] == mappings[2]
    assert mappings[0][2] == EXPECTED_TEST_MESSAGE
    assert mappings[0][0] == {
        "body": ("text", "text_0", False),
        "tags": ("string", "string_0", False),  # repeated: one value per element
        "author.email": ("string", "string_1", False),
        "author.name": ("text", "text_1", False),
        "count": ("u64_fast", "u64_fast_0", True),
        "due": ("u64", "u64_0", False),
        "link": ("references", "references_0", False),
        "title": ("text", "text_2", False),
        "score": ("i64", "i64_0", False),
        "done": ("u64", "u64_1", False),
    }


def test_pool_exhaustion_skips_fields():
    registry = TraitRegistry()
    desc = registry.message_descriptor(TEST_MESSAGE)
    assert desc is not None
    mapping = build_mapping(desc, pool_size=1)
    assert mapping.fields["string1"].name == "text_0"
    assert "struct1.string1" not in mapping.fields
    assert mapping.fields["date3"].name == "u64_fast_0"  # field 17 before uint3 (18)
    assert "uint3" not in mapping.fields
    assert [p for p, f in mapping.fields.items() if f.kind is FieldKind.U64_FAST] == ["date3"]


def test_mapping_values_extraction():
    schema = IndexSchema(TraitRegistry())
    mapping = schema.mapping(TEST_MESSAGE)
    assert mapping is not None
    msg = test_pb2.TestMessage(
        string1="Hello",
        struct1=test_pb2.TestStruct(string1="nested"),
        date1=timestamp_pb2.Timestamp(seconds=2, nanos=5),
        int1=-4,
        ref1=entity_pb2.Reference(entity_id="et-1", trait_id="t_1"),
    )
    values = {m.path: v for m, v in mapping.values(msg)}
    assert values == {
        "string1": "Hello",
        "struct1.string1": "nested",
        "date1": 2_000_000_005,
        "uint1": 0,  # scalars without presence are indexed even when 0
        "ref1": ("et-1", "t_1"),
        "int1": -4,
        "date3": 0,  # sorted timestamps always get a value
        "uint3": 0,
        "int3": 0,
    }


def test_unknown_type_has_no_mapping_until_registered():
    registry = TraitRegistry()
    schema = IndexSchema(registry)
    assert schema.mapping("app.Note") is None
    registry.add_file_descriptor_set(_fds([_app_file()]))
    mapping = schema.mapping("app.Note")
    assert mapping is not None and "title" in mapping.fields


# --- registry -------------------------------------------------------------------------------------------


def test_registry_builtins_and_lookups():
    registry = TraitRegistry()
    assert registry.message_class(TEST_MESSAGE) is test_pb2.TestMessage
    assert registry.message_class("google.protobuf.Timestamp") is timestamp_pb2.Timestamp
    assert registry.message_descriptor("exocore.store.Entity") is not None
    assert registry.message_descriptor("nope.Nope") is None
    assert registry.message_class("nope.Nope") is None
    desc = registry.find_by_short_name("TEST")
    assert desc is not None and desc.full_name == TEST_MESSAGE
    assert registry.find_by_short_name("unknown") is None
    assert registry.resolve_type_name("test") == TEST_MESSAGE
    assert registry.resolve_type_name("exocore.test.testmessage") == TEST_MESSAGE
    assert registry.resolve_type_name(TEST_MESSAGE) == TEST_MESSAGE
    assert registry.resolve_type_name("app.Nope") is None
    assert type_name_from_url("type.googleapis.com/a.B") == "a.B"


def test_unpack_trait():
    registry = TraitRegistry()
    packed = any_pb2.Any()
    packed.Pack(test_pb2.TestMessage(string1="x"))
    msg = registry.unpack_trait(packed)
    assert isinstance(msg, test_pb2.TestMessage) and msg.string1 == "x"
    assert registry.unpack_trait(any_pb2.Any(type_url="type.googleapis.com/app.Nope", value=b"")) is None
    bad = any_pb2.Any(type_url=packed.type_url, value=b"\xff\xff\xff")
    assert registry.unpack_trait(bad) is None


def test_add_file_descriptor_set_from_path_and_errors(tmp_path):
    registry = TraitRegistry()
    version = registry.version
    path = tmp_path / "note.fds"
    path.write_bytes(_fds([_app_file()]))
    added = registry.add_file_descriptor_set(path)
    assert added == ["app.Note", "app.Person"]
    assert registry.version > version
    assert registry.find_by_short_name("NOTE").full_name == "app.Note"  # type: ignore[union-attr]
    cls = registry.message_class("app.Note")
    assert cls is not None
    packed = any_pb2.Any(type_url="type.googleapis.com/app.Note", value=cls(title="hi").SerializeToString())
    assert registry.unpack_trait(packed).title == "hi"  # type: ignore[union-attr]

    # the same file again: nothing new, no version bump
    version = registry.version
    assert registry.add_file_descriptor_set(str(path)) == []
    assert registry.version == version
    # built-in files in a set are skipped
    assert registry.add_file_descriptor_set(_fds(_with_deps(test_pb2.DESCRIPTOR))) == []

    changed = _app_file()
    changed.message_type[0].field[0].name = "heading"
    with pytest.raises(InvalidArgument, match="app/note.proto"):
        registry.add_file_descriptor_set(_fds([changed]))
    orphan = descriptor_pb2.FileDescriptorProto(name="x/y.proto", package="x", dependency=["x/missing.proto"])
    with pytest.raises(InvalidArgument, match="missing"):
        registry.add_file_descriptor_set(_fds([orphan]))
    with pytest.raises(InvalidArgument):
        registry.add_file_descriptor_set(b"\xff\xff garbage")
    with pytest.raises(InvalidArgument):
        registry.add_file_descriptor_set(tmp_path / "absent.fds")


def test_reference_tokens_escape_deterministically():
    assert ref_escape("et-a_b") == "et-a_b"
    assert ref_escape("a b%c") == "a%20b%25c"
    assert reference_text("et 1", "t%1") == "entityet%201 traitt%251"


def _osa(a: str, b: str) -> int:
    """Levenshtein distance with adjacent transpositions costing 1 (optimal string alignment)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def test_text_words_are_the_analyzer_tokens():
    analyzer = text_analyzer()
    rng = random.Random(7)
    alphabet = "abcXYZ09 ,.!?'-_@\t\n" + "é" * 2 + "Ω"
    long_word = "x" * 45
    for text in [f"Hello, World! it's 2 O'Clock_now {long_word} end", "Crème BRÛLÉE, 30 Ωmega"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50))) for _ in range(3000)
    ]:
        words, tokens = text_words(analyzer, text), analyzer.analyze(text)
        # the same tokens; on the ASCII path, words of >= 40 bytes too (the index drops them)
        assert [w for w in words if len(w.encode()) < 40] == tokens, text
    assert text_words(analyzer, f"a {long_word}") == ["a", long_word]
    assert text_words(analyzer, "Crème BRÛLÉE") == ["crème", "brûlée"]


def test_vocabulary_neighbors():
    vocabulary = Vocabulary()
    vocabulary.add_tokens(["abcde", "abcdefgh", "hello"])
    version = vocabulary.version
    assert len(vocabulary) == 3 and version == 3
    assert not vocabulary.may_have_neighbor("abcde", 1)  # only itself
    assert not vocabulary.may_have_neighbor("abcdefgh", 2)
    assert vocabulary.may_have_neighbor("abcdz", 1)  # substitution
    assert vocabulary.may_have_neighbor("bacde", 1)  # transposition
    assert vocabulary.may_have_neighbor("abcd", 1) and vocabulary.may_have_neighbor("abcdex", 1)
    assert not vocabulary.may_have_neighbor("abczz", 1)
    assert vocabulary.may_have_neighbor("abcdefzz", 2) and not vocabulary.may_have_neighbor("abcdezzz", 2)
    assert vocabulary.may_have_neighbor("abcdf", 1)  # abcde: one substitution
    vocabulary.add_tokens(["hello", "abcde"])  # nothing new
    assert vocabulary.version == version
    vocabulary.add_tokens(["abcdf"])
    assert vocabulary.may_have_neighbor("abcde", 1) and vocabulary.version == version + 1


def test_vocabulary_never_misses_a_neighbor():
    """Exhaustive on a small alphabet: every word within the distance (OSA, the stricter one) is found."""
    import itertools
    import random

    rng = random.Random(5)
    words = sorted({"".join(rng.choices("abc", k=rng.randint(3, 7))) for _ in range(60)})
    vocabulary = Vocabulary()
    vocabulary.add_tokens(words)
    for length in (4, 5, 6):
        for token in map("".join, itertools.product("abc", repeat=length)):
            for distance in (1, 2):
                near = any(w != token and _osa(token, w) <= distance for w in words)
                if near:
                    assert vocabulary.may_have_neighbor(token, distance), (token, distance)


def test_vocabulary_saturates():
    vocabulary = Vocabulary(max_variants=50)
    vocabulary.add_tokens(["abcdefgh", "ijklmnop"])
    assert vocabulary.saturated
    assert vocabulary.may_have_neighbor("zzzzzzzz", 2)


def test_vocabulary_lists_neighbors_and_distances():
    vocabulary = Vocabulary()
    vocabulary.add_tokens(["hello", "hallo", "help", "yellow", "abcdefgh", "abcdfegh", "bacdefgh"])
    assert vocabulary.neighbors("hello", 1) == ["hallo"]
    assert vocabulary.neighbors("hello", 2) == ["hallo", "help", "yellow"]
    assert vocabulary.neighbors("abcdefgh", 1) == ["abcdfegh", "bacdefgh"]  # transpositions
    assert vocabulary.neighbors("zzzzzzzz", 2) == []
    assert osa_distance("ca", "abc", 5) == 3 and damerau_levenshtein_distance("ca", "abc") == 2
    assert osa_distance("kitten", "sitting", 1) == 2  # stops past the limit
    vocabulary.add_tokens(["abc"])
    assert vocabulary.neighbors("ca", 2) is None  # the two distances disagree: the automaton decides


def test_specialised_extractors_give_the_generic_values():
    """Each mapped field's `extract` (specialised once) gives what the generic walk gives, set or not,
    nested, repeated, and with presence (a proto2 file: its optional scalars have presence)."""
    app = _app_file()
    app2 = _app_file("app2/note.proto", "app2")
    app2.syntax = "proto2"
    deep = app2.message_type.add(name="Deep")
    deep.field.extend([_field("word", 1, F.TYPE_STRING, text=True), _field("x", 2, F.TYPE_SINT64, indexed=True)])
    app2.message_type[1].field.append(_field("deep", 4, F.TYPE_MESSAGE, indexed=True, type_name=".app2.Deep"))
    registry = TraitRegistry()
    registry.add_file_descriptor_set(_fds([app, app2]))
    schema = IndexSchema(registry)
    rng = random.Random(3)
    checked = set()
    for type_name in ("app.Note", "app2.Note", TEST_MESSAGE):
        mapping = schema.mapping(type_name)
        assert mapping is not None
        cls = registry.message_class(type_name)
        for _ in range(200):
            message = cls()
            for path, mapped in mapping.fields.items():
                if rng.random() < 0.5:
                    continue
                parent = message
                for step in mapped.descriptors[:-1]:
                    parent = getattr(parent, step.name)
                leaf = mapped.descriptors[-1]
                if mapped.repeated:
                    getattr(parent, leaf.name).extend(rng.choice([[], ["a"], ["b", ""]]))
                elif mapped.value_kind is ValueKind.TIMESTAMP:
                    getattr(parent, leaf.name).seconds = rng.choice([0, 5])
                elif mapped.value_kind is ValueKind.REFERENCE:
                    getattr(parent, leaf.name).entity_id = rng.choice(["", "e1"])
                elif mapped.value_kind in (ValueKind.TEXT, ValueKind.STRING):
                    setattr(parent, leaf.name, rng.choice(["", "word"]))
                elif mapped.value_kind is ValueKind.BOOL:
                    setattr(parent, leaf.name, rng.choice([False, True]))
                else:
                    setattr(parent, leaf.name, rng.choice([0, 3]))
                checked.add((type_name, path, mapped.has_presence, len(mapped.descriptors)))
            for mapped in mapping.fields.values():
                assert mapped.extract(message) == schema_module._field_values(message, mapped), mapped.path
    assert any(presence for _, _, presence, _ in checked), "proto2 fields with presence were covered"
    assert any(depth >= 3 for _, _, _, depth in checked), "a field two messages down was covered"
