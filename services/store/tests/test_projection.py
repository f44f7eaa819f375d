"""SPEC 3.6 projections: matching, first-match selection, skip, field / field-group projection."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2

from exocommon.errors import InvalidArgument
from exocore.store import entity_pb2, query_pb2
from exocore.test import test_pb2
from exostore.projection import (
    apply_projection,
    field_groups,
    find_projection,
    for_all,
    for_package_prefix,
    for_trait_name,
    project_trait_fields,
    projection_matches,
    trait_type_of,
)

TYPE1 = "exocore.test.TestMessage"
TYPE2 = "exocore.test.TestMessage2"

FULL = test_pb2.TestMessage(string1="string1", string2="string2", grouped1="grouped1", grouped2="grouped2")


def _trait(message) -> entity_pb2.Trait:
    packed = any_pb2.Any()
    packed.Pack(message)
    return entity_pb2.Trait(id="trt1", message=packed)


def project(fields: list[int], groups: list[int]) -> tuple[test_pb2.TestMessage, int]:
    trait = _trait(FULL)
    project_trait_fields(trait, query_pb2.Projection(field_ids=fields, field_group_ids=groups))
    msg = test_pb2.TestMessage()
    assert trait.message.Unpack(msg)
    return msg, trait.details


def test_matches_prefix_exact_and_all():
    prefix = for_package_prefix("some.message")
    assert projection_matches("some.message.Type", prefix)
    assert not projection_matches(None, prefix)
    assert not projection_matches("other.message.Type2", prefix)

    everything = for_all()
    assert projection_matches("some.message.Type", everything)
    assert projection_matches(None, everything)
    assert projection_matches("other.message.Type2", everything)

    exact = for_trait_name("some.message.Type")
    assert list(exact.package) == ["some.message.Type$"]
    assert projection_matches("some.message.Type", exact)
    assert not projection_matches("some.message.Type2", exact)


def test_first_matching_projection_applies():
    projections = [for_package_prefix("exocore.test", field_ids=[1])]
    assert find_projection(TYPE1, projections) is projections[0]
    assert find_projection(TYPE2, projections) is projections[0]

    projections = [for_trait_name(TYPE1, field_ids=[1]), for_all(field_ids=[2])]
    assert list(find_projection(TYPE1, projections).field_ids) == [1]  # type: ignore[union-attr]
    assert list(find_projection(TYPE2, projections).field_ids) == [2]  # type: ignore[union-attr]
    assert find_projection("other.Type", [for_trait_name(TYPE1)]) is None


def test_field_projection():
    assert project([], []) == (FULL, entity_pb2.TRAIT_DETAILS_FULL)
    assert project([1], []) == (test_pb2.TestMessage(string1="string1"), entity_pb2.TRAIT_DETAILS_PARTIAL)
    assert project([1, 2], []) == (
        test_pb2.TestMessage(string1="string1", string2="string2"),
        entity_pb2.TRAIT_DETAILS_PARTIAL,
    )
    assert project([2], [1]) == (
        test_pb2.TestMessage(string2="string2", grouped1="grouped1", grouped2="grouped2"),
        entity_pb2.TRAIT_DETAILS_PARTIAL,
    )
    assert project([], [2]) == (test_pb2.TestMessage(grouped2="grouped2"), entity_pb2.TRAIT_DETAILS_PARTIAL)


def test_field_groups_option():
    fields = test_pb2.TestMessage.DESCRIPTOR.fields_by_name
    assert field_groups(fields["grouped1"]) == (1,)
    assert field_groups(fields["grouped2"]) == (1, 2)
    assert field_groups(fields["string1"]) == ()


def test_projection_keeps_type_url_and_other_trait_fields():
    trait = _trait(FULL)
    trait.last_operation_id = 7
    assert project_trait_fields(trait, for_all(field_ids=[1]))
    assert trait.message.type_url == f"type.googleapis.com/{TYPE1}"
    assert trait_type_of(trait) == TYPE1
    assert trait.id == "trt1" and trait.last_operation_id == 7


def test_apply_projection_skip_and_passthrough():
    assert apply_projection(_trait(FULL), [for_trait_name(TYPE1, skip=True)]) is None
    trait = _trait(test_pb2.TestMessage2(string1="a", string2="b"))
    # first match is the TestMessage2 one (keeps field 2), not the catch-all
    out = apply_projection(trait, [for_trait_name(TYPE1, skip=True), for_trait_name(TYPE2, field_ids=[2]), for_all()])
    assert out is trait
    msg = test_pb2.TestMessage2()
    trait.message.Unpack(msg)
    assert msg == test_pb2.TestMessage2(string2="b")
    assert trait.details == entity_pb2.TRAIT_DETAILS_PARTIAL
    # no matching projection: untouched
    trait = _trait(FULL)
    assert apply_projection(trait, [for_trait_name(TYPE2, skip=True)]) is trait
    assert trait.details == entity_pb2.TRAIT_DETAILS_FULL


def test_unknown_type_is_refused_for_field_projection_only():
    trait = entity_pb2.Trait(id="t", message=any_pb2.Any(type_url="type.googleapis.com/unknown.Type", value=b""))
    with pytest.raises(InvalidArgument, match=r"unknown\.Type"):
        project_trait_fields(trait, for_all(field_ids=[1]))
    assert not project_trait_fields(trait, for_all())  # nothing to project: schema not needed
    assert apply_projection(trait, [for_package_prefix("unknown", skip=True)]) is None
