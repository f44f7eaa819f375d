"""Trait types known to a client: packing messages into `google.protobuf.Any` and back (SPEC.md 3.1, 4.7).

A trait's message travels as an `Any` whose `type_url` is ``type.googleapis.com/<full message name>``.
`TypeRegistry` maps full names to message classes:

* every generated module of the project (the `exocore` package: store, core, test messages...) and the
  protobuf well-known types are known from the start (`load_generated_modules`), so `unpack` works for them
  without registering anything;
* `register(cls)` adds an application's own message class (the web client's `registerMessage`);
* `pack(message)` -> `Any`; `unpack(any)` -> the message, or None when its type is unknown (traits of
  unknown types are legal: the store keeps them as opaque bytes); `unpack_as(any, cls)` insists.

The generated modules all live in protobuf's default descriptor pool, which is what `json_format` uses
to resolve `Any` in JSON (``{"@type": "type.googleapis.com/exocore.test.TestMessage", ...}``), so
importing them once (`load_generated_modules`) is what makes JSON bodies with traits work too.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import TypeVar

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import DecodeError, Message

from exocommon.errors import InvalidArgument

__all__ = [
    "TYPE_URL_PREFIX",
    "TypeRegistry",
    "default_registry",
    "load_generated_modules",
    "pack_any",
    "type_name_of_url",
    "unpack_any",
]

TYPE_URL_PREFIX = "type.googleapis.com/"

M = TypeVar("M", bound=Message)

_loaded = False
_load_lock = threading.Lock()


def load_generated_modules() -> None:
    """Imports every `*_pb2` module of the generated `exocore` package (once), so all of the project's
    message types are in protobuf's default pool (JSON `Any` resolution, reflection, `unpack`)."""
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        import exocore

        for module in pkgutil.walk_packages(exocore.__path__, prefix="exocore."):
            if module.name.endswith("_pb2"):
                importlib.import_module(module.name)
        # Well-known types a trait may use.
        from google.protobuf import (  # noqa: F401
            any_pb2,
            duration_pb2,
            empty_pb2,
            field_mask_pb2,
            struct_pb2,
            timestamp_pb2,
            wrappers_pb2,
        )

        _loaded = True


def type_name_of_url(type_url: str) -> str:
    """The full message name of an `Any.type_url` (what follows the last ``/``)."""
    return type_url.rsplit("/", 1)[-1]


class TypeRegistry:
    """Message classes by full name (see module docstring). Thread safe."""

    def __init__(self) -> None:
        load_generated_modules()
        self._classes: dict[str, type[Message]] = {}
        self._lock = threading.Lock()

    def register(self, *classes: type[Message]) -> None:
        """Makes `classes` the ones `unpack` returns for their full names."""
        with self._lock:
            for cls in classes:
                self._classes[cls.DESCRIPTOR.full_name] = cls

    def message_class(self, full_name: str) -> type[Message] | None:
        """The registered class, else the class of a type in the default pool, else None."""
        cls = self._classes.get(full_name)
        if cls is not None:
            return cls
        try:
            descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
        except KeyError:
            return None
        cls = message_factory.GetMessageClass(descriptor)
        with self._lock:
            self._classes.setdefault(full_name, cls)
        return cls

    def pack(self, message: Message) -> AnyProto:
        """`message` in an `Any` (``type.googleapis.com/<full name>``)."""
        if isinstance(message, AnyProto):
            return message
        packed = AnyProto()
        packed.Pack(message, type_url_prefix=TYPE_URL_PREFIX)
        return packed

    def unpack(self, packed: AnyProto) -> Message | None:
        """The message inside `packed`; None if its type is unknown. InvalidArgument if its bytes are not
        a valid message of that type."""
        cls = self.message_class(type_name_of_url(packed.type_url))
        if cls is None:
            return None
        message = cls()
        try:
            message.ParseFromString(packed.value)
        except DecodeError as exc:
            raise InvalidArgument(f"trait of type {packed.type_url} does not parse: {exc}") from exc
        return message

    def unpack_as(self, packed: AnyProto, cls: type[M]) -> M:
        """The message inside `packed`, which must be a `cls`; InvalidArgument otherwise."""
        full_name = cls.DESCRIPTOR.full_name
        if type_name_of_url(packed.type_url) != full_name:
            raise InvalidArgument(f"trait is a {type_name_of_url(packed.type_url)}, not a {full_name}")
        message = cls()
        try:
            message.ParseFromString(packed.value)
        except DecodeError as exc:
            raise InvalidArgument(f"trait of type {full_name} does not parse: {exc}") from exc
        return message


_default: TypeRegistry | None = None


def default_registry() -> TypeRegistry:
    """The process-wide registry used when none is given."""
    global _default
    if _default is None:
        _default = TypeRegistry()
    return _default


def pack_any(message: Message) -> AnyProto:
    return default_registry().pack(message)


def unpack_any(packed: AnyProto) -> Message | None:
    return default_registry().unpack(packed)
