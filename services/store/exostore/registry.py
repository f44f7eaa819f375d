"""The trait type registry (SPEC 1.4 "cell schema registry", 3.4): which protobuf message types the store knows.

A `TraitRegistry` owns its own `DescriptorPool`, seeded with the built-in types (google well-known types,
`exocore.store`, `exocore.test`) and extended at runtime with `FileDescriptorSet`s: application schemas
(apphost) and the files listed under the cell config's `schemas:` key, so a user can index their own trait
types without writing an app.

* `message_descriptor(full_name)` / `message_class(full_name)`: built-in types resolve to the generated
  classes (`test_pb2.TestMessage` is returned as is), others to classes made from the registry's pool.
* `find_by_short_name(name)`: case-insensitive lookup through the `(exocore.short_name)` message option
  (extension 1377); `resolve_type_name` also accepts full names (exact, then case-insensitive).
* `unpack_trait(any)`: the trait message of an `Any` (`type.googleapis.com/<full name>`), None when its type
  is unknown or its bytes do not parse.
* `version` grows whenever new files are added, so caches (index mappings, compiled queries) can notice new
  types. Types never change once registered (a pool cannot redefine a name), only new ones appear.

Thread safety: additions take a lock; lookups read plain dicts (safe under the GIL).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.descriptor import Descriptor, FileDescriptor
from google.protobuf.message import DecodeError, Message

from exocommon.errors import InvalidArgument
from exocore.store import entity_pb2, mutation_pb2, options_pb2, query_pb2
from exocore.test import test_pb2

log = logging.getLogger(__name__)

TYPE_URL_PREFIX = "type.googleapis.com/"


def type_name_from_url(type_url: str) -> str:
    """Full message name of an `Any.type_url` (the part after the last ``/``; the whole string if none)."""
    return type_url.rsplit("/", 1)[-1]


def type_url_for(full_name: str) -> str:
    return TYPE_URL_PREFIX + full_name


def _builtin_files() -> list[FileDescriptor]:
    from google.protobuf import (
        any_pb2,
        descriptor_pb2,
        duration_pb2,
        empty_pb2,
        field_mask_pb2,
        struct_pb2,
        timestamp_pb2,
        wrappers_pb2,
    )

    modules = [
        descriptor_pb2,
        any_pb2,
        timestamp_pb2,
        duration_pb2,
        empty_pb2,
        struct_pb2,
        wrappers_pb2,
        field_mask_pb2,
        options_pb2,
        entity_pb2,
        mutation_pb2,
        query_pb2,
        test_pb2,
    ]
    return [m.DESCRIPTOR for m in modules]


def _comparable(proto: descriptor_pb2.FileDescriptorProto) -> bytes:
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(proto)
    copy.ClearField("source_code_info")
    return copy.SerializeToString(deterministic=True)


def _iter_messages(descriptors: Iterable[Descriptor]) -> Iterable[Descriptor]:
    for desc in descriptors:
        yield desc
        yield from _iter_messages(desc.nested_types)


class TraitRegistry:
    """Protobuf message types known to the store (built-ins + registered FileDescriptorSets)."""

    def __init__(self, *, builtins: bool = True) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        self._lock = threading.Lock()
        self._files: dict[str, bytes] = {}  # file name -> comparable serialized FileDescriptorProto
        self._builtin_files: set[str] = set()
        self._messages: dict[str, Descriptor] = {}
        self._lower_names: dict[str, str] = {}  # lowercased full name -> full name
        self._short_names: dict[str, str] = {}  # lowercased short name -> full name
        self._classes: dict[str, type[Message]] = {}
        self._version = 0
        if builtins:
            with self._lock:
                for file in _builtin_files():
                    self._add_generated_file(file)
                self._version += 1

    # --- registration ---------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Grows each time new message types are registered."""
        return self._version

    @property
    def pool(self) -> descriptor_pool.DescriptorPool:
        return self._pool

    def add_generated_file(self, file: FileDescriptor) -> None:
        """Register a generated module's `DESCRIPTOR` (and its dependencies)."""
        with self._lock:
            if self._add_generated_file(file):
                self._version += 1

    def add_file_descriptor_set(self, source: bytes | str | os.PathLike[str]) -> list[str]:
        """Register every file of a serialized `FileDescriptorSet` (bytes, or the path of a file holding one,
        e.g. `protoc --descriptor_set_out --include_imports`). Files already registered with the same content
        (ignoring source info) and built-in files are skipped. Returns the full names of the new message types.

        Raises `InvalidArgument` for unparsable data, a missing dependency, or a file / message name that is
        already registered with a different definition. Files added before the error stay registered."""
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
        else:
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"cannot read schema file {source}: {exc}") from exc
        fds = descriptor_pb2.FileDescriptorSet()
        try:
            fds.ParseFromString(data)
        except DecodeError as exc:
            raise InvalidArgument(f"invalid FileDescriptorSet: {exc}") from exc
        return self.add_file_descriptor_protos(fds.file)

    def add_file_descriptor_protos(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> list[str]:
        """Register `FileDescriptorProto`s in dependency order (see `add_file_descriptor_set`)."""
        pending = {f.name: f for f in files}
        added: list[str] = []
        with self._lock:
            try:
                for name in sorted(pending):
                    self._add_proto(name, pending, added, ())
            finally:
                if added:
                    self._version += 1
        return added

    def _add_proto(
        self,
        name: str,
        pending: dict[str, descriptor_pb2.FileDescriptorProto],
        added: list[str],
        stack: tuple[str, ...],
    ) -> None:
        proto = pending.get(name)
        if name in self._files:
            if proto is not None and name not in self._builtin_files and _comparable(proto) != self._files[name]:
                raise InvalidArgument(f"schema file {name!r} is already registered with a different definition")
            return
        if proto is None:
            raise InvalidArgument(f"schema file {stack[-1] if stack else '?'!r} depends on {name!r}, which is missing")
        if name in stack:
            raise InvalidArgument(f"schema file {name!r} has a dependency cycle")
        for dep in proto.dependency:
            self._add_proto(dep, pending, added, (*stack, name))
        try:
            self._pool.Add(proto)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"cannot register schema file {name!r}: {exc}") from exc
        self._files[name] = _comparable(proto)
        file = self._pool.FindFileByName(name)
        added.extend(self._index_file(file))

    def _add_generated_file(self, file: FileDescriptor) -> bool:
        if file.name in self._files:
            return False
        for dep in file.dependencies:
            self._add_generated_file(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        self._pool.Add(proto)
        self._files[file.name] = _comparable(proto)
        self._builtin_files.add(file.name)
        self._index_file(self._pool.FindFileByName(file.name))
        return True

    def _index_file(self, file: FileDescriptor) -> list[str]:
        names = []
        for desc in _iter_messages(file.message_types_by_name.values()):
            self._messages[desc.full_name] = desc
            self._lower_names.setdefault(desc.full_name.lower(), desc.full_name)
            for short in self._short_names_of(desc):
                self._short_names.setdefault(short.lower(), desc.full_name)
            names.append(desc.full_name)
        return names

    @staticmethod
    def _short_names_of(desc: Descriptor) -> list[str]:
        try:
            return list(desc.GetOptions().Extensions[options_pb2.short_name])
        except (KeyError, AttributeError):  # pragma: no cover - options of an unusual pool
            return []

    # --- lookups ----------------------------------------------------------------------------------------

    def message_names(self) -> list[str]:
        """Every registered message full name, sorted."""
        return sorted(self._messages)

    def is_builtin(self, full_name: str) -> bool:
        desc = self._messages.get(full_name)
        return desc is not None and desc.file.name in self._builtin_files

    def message_descriptor(self, full_name: str) -> Descriptor | None:
        return self._messages.get(full_name)

    def message_class(self, full_name: str) -> type[Message] | None:
        cls = self._classes.get(full_name)
        if cls is not None:
            return cls
        desc = self._messages.get(full_name)
        if desc is None:
            return None
        if desc.file.name in self._builtin_files:
            try:
                cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))
            except KeyError:  # pragma: no cover - built-ins are always in the default pool
                cls = message_factory.GetMessageClass(desc)
        else:
            cls = message_factory.GetMessageClass(desc)
        self._classes[full_name] = cls
        return cls

    def find_by_short_name(self, name: str) -> Descriptor | None:
        """The message declaring `name` in its `(exocore.short_name)` option, case-insensitively."""
        full = self._short_names.get(name.lower())
        return self._messages.get(full) if full is not None else None

    def resolve_type_name(self, name: str) -> str | None:
        """Full name for `name`: an exact full name, a short name, or a full name in another case."""
        if name in self._messages:
            return name
        lower = name.lower()
        full = self._short_names.get(lower)
        if full is not None:
            return full
        return self._lower_names.get(lower)

    def unpack_trait(self, message: AnyProto) -> Message | None:
        """The message inside an `Any`, or None if its type is unknown or its bytes are invalid."""
        cls = self.message_class(type_name_from_url(message.type_url))
        if cls is None:
            return None
        msg = cls()
        try:
            msg.ParseFromString(message.value)
        except DecodeError:
            log.warning("trait of type %s does not parse", message.type_url)
            return None
        return msg
