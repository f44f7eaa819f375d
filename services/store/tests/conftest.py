"""Fixtures shared by the store's tests."""

from __future__ import annotations

import pytest

from exostore.registry import TraitRegistry


@pytest.fixture
def tagged_registry() -> TraitRegistry:
    """A registry with `rep.Tagged`: repeated `tags` (string), `sizes` (uint64, flagged sorted) and
    `links` (References), all indexed."""
    from google.protobuf import descriptor_pb2

    from exocore.store import options_pb2

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="rep/tagged.proto", package="rep", syntax="proto3")
    file.dependency.extend(["exocore/store/options.proto", "exocore/store/entity.proto"])
    message = file.message_type.add(name="Tagged")
    for name, number, ftype, type_name, flags in [
        ("tags", 1, F.TYPE_STRING, "", ("indexed",)),
        ("sizes", 2, F.TYPE_UINT64, "", ("indexed", "sorted")),
        ("links", 3, F.TYPE_MESSAGE, ".exocore.store.Reference", ("indexed",)),
    ]:
        fd = message.field.add(name=name, number=number, type=ftype, label=F.LABEL_REPEATED)  # type: ignore[arg-type]
        if type_name:
            fd.type_name = type_name
        for flag in flags:
            fd.options.Extensions[getattr(options_pb2, flag)] = True
    registry = TraitRegistry()
    registry.add_file_descriptor_protos([file])
    return registry
