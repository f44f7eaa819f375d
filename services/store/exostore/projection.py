"""Query projections (SPEC 3.6 "Projections"): which traits a query returns, and which of their fields.

A projection matches a trait type if its `package` list is empty, or if any entry `p` either ends with
``$`` and equals ``type + "$"`` (exact type), or is a prefix of the type. For each trait, the **first**
matching projection of the query applies: ``skip`` drops the trait; otherwise, if ``field_ids`` or
``field_group_ids`` is non-empty, every field of the trait message that is neither listed nor in a listed
group (``(exocore.field_group)`` option, extension 1376) is cleared and the trait is marked
``TRAIT_DETAILS_PARTIAL``.

Field projection needs the trait's message schema: an unknown type is refused with `InvalidArgument`
naming it (ARCHITECTURE "Clarifications"; the original logged and returned the trait whole).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import DecodeError

from exocommon.errors import Internal, InvalidArgument
from exocore.store import entity_pb2, options_pb2, query_pb2

TYPE_URL_PREFIX = "type.googleapis.com/"


def for_trait_name(
    trait_name: str,
    *,
    skip: bool = False,
    field_ids: Iterable[int] = (),
    field_group_ids: Iterable[int] = (),
) -> query_pb2.Projection:
    """Projection matching exactly one trait type (``package = [trait_name + "$"]``)."""
    return query_pb2.Projection(
        package=[f"{trait_name}$"], skip=skip, field_ids=list(field_ids), field_group_ids=list(field_group_ids)
    )


def for_package_prefix(
    prefix: str,
    *,
    skip: bool = False,
    field_ids: Iterable[int] = (),
    field_group_ids: Iterable[int] = (),
) -> query_pb2.Projection:
    """Projection matching every trait type starting with `prefix`."""
    return query_pb2.Projection(
        package=[prefix], skip=skip, field_ids=list(field_ids), field_group_ids=list(field_group_ids)
    )


def for_all(
    *,
    skip: bool = False,
    field_ids: Iterable[int] = (),
    field_group_ids: Iterable[int] = (),
) -> query_pb2.Projection:
    """Projection matching every trait."""
    return query_pb2.Projection(skip=skip, field_ids=list(field_ids), field_group_ids=list(field_group_ids))


def projection_matches(trait_type: str | None, projection: query_pb2.Projection) -> bool:
    """Whether `projection` applies to a trait of type `trait_type` (None: type unknown, e.g. no put)."""
    if not projection.package:
        return True
    if trait_type is None:
        return False
    for package in projection.package:
        if package.endswith("$") and package[:-1] == trait_type:
            return True
        if trait_type.startswith(package):
            return True
    return False


def find_projection(trait_type: str | None, projections: Sequence[query_pb2.Projection]) -> query_pb2.Projection | None:
    """The first projection of the query matching `trait_type`, if any."""
    for projection in projections:
        if projection_matches(trait_type, projection):
            return projection
    return None


def trait_type_of(trait: entity_pb2.Trait) -> str:
    """Full message name of a trait's payload (its `Any` type URL without the prefix)."""
    type_url = trait.message.type_url
    return type_url.rsplit("/", 1)[-1] if "/" in type_url else type_url


def field_groups(field: FieldDescriptor) -> tuple[int, ...]:
    """Values of the `(exocore.field_group)` option on a field."""
    return tuple(field.GetOptions().Extensions[options_pb2.field_group])


def _message_descriptor(trait_type: str, pool: DescriptorPool) -> Descriptor:
    try:
        return pool.FindMessageTypeByName(trait_type)
    except KeyError:
        raise InvalidArgument(f"cannot project fields of trait type '{trait_type}': unknown message type") from None


def project_trait_fields(
    trait: entity_pb2.Trait,
    projection: query_pb2.Projection,
    pool: DescriptorPool | None = None,
) -> bool:
    """Apply the field part of `projection` to `trait` in place; True if fields were removed.

    Nothing happens when the projection lists no fields and no groups, or when the trait has no payload.
    Otherwise every field of the message type that is neither in `field_ids` nor in one of
    `field_group_ids` is cleared and `details` becomes PARTIAL (as soon as the schema has such a field,
    set or not, as the original). The `Any` keeps its type URL.
    """
    if not projection.field_ids and not projection.field_group_ids:
        return False
    if not trait.HasField("message"):
        return False
    pool = pool if pool is not None else _descriptor_pool.Default()
    trait_type = trait_type_of(trait)
    descriptor = _message_descriptor(trait_type, pool)

    keep_ids = set(projection.field_ids)
    keep_groups = set(projection.field_group_ids)
    to_clear = [
        f.name
        for f in descriptor.fields
        if f.number not in keep_ids and not any(g in keep_groups for g in field_groups(f))
    ]
    if not to_clear:
        return False

    message = message_factory.GetMessageClass(descriptor)()
    try:
        message.ParseFromString(trait.message.value)
    except DecodeError as err:
        raise Internal(f"trait '{trait.id}' payload is not a valid {trait_type}: {err}") from err
    for name in to_clear:
        message.ClearField(name)
    trait.message.value = message.SerializeToString(deterministic=True)
    trait.details = entity_pb2.TRAIT_DETAILS_PARTIAL
    return True


def apply_projection(
    trait: entity_pb2.Trait,
    projections: Sequence[query_pb2.Projection],
    pool: DescriptorPool | None = None,
) -> entity_pb2.Trait | None:
    """The trait as the query's projections want it: None if skipped, else `trait` (fields projected in
    place). The projection is chosen by the payload's type."""
    projection = find_projection(trait_type_of(trait) if trait.HasField("message") else None, projections)
    if projection is None:
        return trait
    if projection.skip:
        return None
    project_trait_fields(trait, projection, pool)
    return trait


__all__ = [
    "TYPE_URL_PREFIX",
    "apply_projection",
    "field_groups",
    "find_projection",
    "for_all",
    "for_package_prefix",
    "for_trait_name",
    "project_trait_fields",
    "projection_matches",
    "trait_type_of",
]
