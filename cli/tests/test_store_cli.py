"""`exo store`: JSON in and out with the trait registry, and query building from the flags."""

from __future__ import annotations

import argparse
import base64
import json

import pytest
from google.protobuf import any_pb2

from exocli.commands.store import build_query, parse_json, to_json_dict
from exocommon.errors import InvalidArgument
from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exocore.test import test_pb2
from exostore.registry import TraitRegistry

REGISTRY = TraitRegistry()


def args(**values) -> argparse.Namespace:
    defaults = dict(
        json=None, query_string=None, trait=None, ids=None, match=None, all=False, count=None, include_deleted=False
    )
    defaults.update(values)
    return argparse.Namespace(**defaults)


def test_a_mutation_request_parses_with_any_traits():
    text = """{"mutations": [{"putTrait": {"trait": {"message": {
        "@type": "type.googleapis.com/exocore.test.TestMessage", "string1": "hi", "uint3": 4}}}}],
        "return_entities": true}"""
    request = parse_json(text, mutation_pb2.MutationRequest(), REGISTRY, "MutationRequest")
    assert request.return_entities
    message = request.mutations[0].put_trait.trait.message
    assert message.type_url == "type.googleapis.com/exocore.test.TestMessage"
    assert test_pb2.TestMessage.FromString(message.value) == test_pb2.TestMessage(string1="hi", uint3=4)


def test_bad_json_is_an_invalid_argument():
    with pytest.raises(InvalidArgument, match="invalid MutationRequest JSON"):
        parse_json('{"mutations": 3}', mutation_pb2.MutationRequest(), REGISTRY, "MutationRequest")
    with pytest.raises(InvalidArgument, match="invalid MutationRequest JSON"):
        parse_json(
            '{"mutations": [{"putTrait": {"trait": {"message": {"@type": "type.googleapis.com/nope.Nope"}}}}]}',
            mutation_pb2.MutationRequest(),
            REGISTRY,
            "MutationRequest",
        )


def test_results_print_known_traits_as_json_and_unknown_ones_as_bytes():
    known = any_pb2.Any()
    known.Pack(test_pb2.TestMessage(string1="hello"))
    unknown = any_pb2.Any(type_url="type.googleapis.com/my.Secret", value=b"\x0a\x02hi")
    results = query_pb2.EntityResults(
        entities=[
            query_pb2.EntityResult(
                entity=entity_pb2.Entity(
                    id="e1",
                    traits=[entity_pb2.Trait(id="t1", message=known), entity_pb2.Trait(id="t2", message=unknown)],
                ),
                source=query_pb2.PENDING,
            )
        ],
        hash=5,
    )
    data = to_json_dict(results, REGISTRY)
    traits = data["entities"][0]["entity"]["traits"]
    assert traits[0]["message"] == {"@type": "type.googleapis.com/exocore.test.TestMessage", "string1": "hello"}
    assert traits[1]["message"] == {
        "@type": "type.googleapis.com/my.Secret",
        "value": base64.b64encode(b"\x0a\x02hi").decode(),
    }
    assert data["entities"][0]["source"] == "PENDING" and data["hash"] == "5"
    assert results.entities[0].entity.traits[1].message == unknown, "the message printed is left as it was"


def test_queries_from_flags():
    assert build_query(args(query_string="fox -sort:created"), REGISTRY) == query_pb2.EntityQuery(
        query_string=query_pb2.QueryStringPredicate(query="fox -sort:created")
    )
    assert build_query(args(trait="test", count=3), REGISTRY) == query_pb2.EntityQuery(
        trait=query_pb2.TraitPredicate(trait_name="test"), paging=query_pb2.Paging(count=3)
    )
    assert list(build_query(args(ids="a, b,,c"), REGISTRY).ids.ids) == ["a", "b", "c"]
    assert build_query(args(all=True, include_deleted=True), REGISTRY).include_deleted
    assert build_query(args(json='{"match": {"query": "x"}, "programmatic": true}'), REGISTRY).programmatic
    with pytest.raises(InvalidArgument, match="say what to query"):
        build_query(args(), REGISTRY)


def _schema_with_a_map() -> bytes:
    """A FileDescriptorSet (as an app or cell.yaml `schemas:` brings) whose trait has a map field."""
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    file = fds.file.add(name="notes/tagged.proto", package="notes", syntax="proto3")
    note = file.message_type.add(name="Tagged")
    note.field.add(name="title", number=1, type=9, label=1)
    entry = note.nested_type.add(name="TagsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=3, label=1)
    note.field.add(name="tags", number=2, type=11, label=3, type_name=".notes.Tagged.TagsEntry")
    return fds.SerializeToString()


@pytest.mark.parametrize("type_name", ["exocore.test.TestMessage", "notes.Tagged"])
def test_map_fields_go_through_json_both_ways(tmp_path, type_name):
    # SPEC 11: the original's reflection did not support map fields; protobuf JSON here does, for
    # generated types and for types only known from a schema file (dynamic messages).
    registry = TraitRegistry()
    schema = tmp_path / "tagged.fds"
    schema.write_bytes(_schema_with_a_map())
    registry.add_file_descriptor_set(schema)
    field, values = ("map1", {"a": "1", "b": "two"}) if type_name.startswith("exocore") else ("tags", {"x": "7"})
    message_json = {"@type": f"type.googleapis.com/{type_name}", field: values}
    text = json.dumps({"mutations": [{"putTrait": {"trait": {"id": "t1", "message": message_json}}}]})
    request = parse_json(text, mutation_pb2.MutationRequest(), registry, "MutationRequest")
    trait = request.mutations[0].put_trait.trait
    message = registry.unpack_trait(trait.message)
    assert message is not None and {k: str(v) for k, v in getattr(message, field).items()} == values
    results = query_pb2.EntityResults(
        entities=[query_pb2.EntityResult(entity=entity_pb2.Entity(id="e1", traits=[trait]))]
    )
    printed = to_json_dict(results, registry)["entities"][0]["entity"]["traits"][0]["message"]
    assert printed == {"@type": f"type.googleapis.com/{type_name}", field: values}
