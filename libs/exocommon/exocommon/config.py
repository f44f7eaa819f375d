"""Node and cell configuration (SPEC 1.3-1.8): YAML files <-> protobuf messages, validation,
editing helpers, the node directory layout, the runtime model (`LocalNode`, `Cell`) and the
store/chain settings with the original's defaults.

YAML format (the original's serde serialization of `exocore/core/config.proto`):

* keys are the snake_case proto field names; enums are integers (enum names are also accepted);
* `oneof location` is flattened: its variant is a plain key (`inline:`);
* wrapper fields (`UInt64Value`...) are plain numbers; an explicit `0` is kept (it is "set");
* unknown keys are ignored at every level, with a warning naming the key and, when one is close,
  the field it may have meant (the original ignored them silently, and its example node.yaml misspelt
  two store settings, SPEC 11 item 13); `null` means "not set";
* on save, fields at their default (empty strings/lists, unset messages/wrappers) are omitted and
  fields are written in proto declaration order.

Decoding is done by a small descriptor-driven walker rather than `json_format.ParseDict`, so that
every error names the exact field path (``store.index.chain_index_min_depth``,
``nodes[1].roles[0]``) and so that wrong types are never silently dropped (ParseDict with
``ignore_unknown_fields`` drops an unknown enum *name* without an error).

Every error is a `ConfigError` (an `InvalidArgument`) whose message is
``<file>: <field path>: <what is wrong>``.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from exocommon.errors import InvalidArgument
from exocommon.ids import CellId, NodeId, PeerId
from exocommon.keys import Keypair, PublicKey
from exocore.core import config_pb2

log = logging.getLogger(__name__)

LocalNodeConfig = config_pb2.LocalNodeConfig
NodeAddresses = config_pb2.NodeAddresses
NodeCellConfig = config_pb2.NodeCellConfig
NodeStoreConfig = config_pb2.NodeStoreConfig
EntityIndexConfig = config_pb2.EntityIndexConfig
MutationIndexConfig = config_pb2.MutationIndexConfig
EntityGarbageCollectorConfig = config_pb2.EntityGarbageCollectorConfig
ChainConfig = config_pb2.ChainConfig
CellConfig = config_pb2.CellConfig
CellNodeConfig = config_pb2.CellNodeConfig
NodeConfig = config_pb2.NodeConfig
CellApplicationConfig = config_pb2.CellApplicationConfig

NODE_YAML = "node.yaml"
CELL_YAML = "cell.yaml"

M = TypeVar("M", bound=Message)


class Role(IntEnum):
    """`CellNodeConfig.Role` (SPEC 0.2); 0 (INVALID_ROLE) is never valid in a config."""

    CHAIN = config_pb2.CellNodeConfig.CHAIN_ROLE
    STORE = config_pb2.CellNodeConfig.STORE_ROLE
    APP_HOST = config_pb2.CellNodeConfig.APP_HOST_ROLE


_ROLE_VALUES = frozenset(int(r) for r in Role)
CHAIN_ROLE = Role.CHAIN
STORE_ROLE = Role.STORE
APP_HOST_ROLE = Role.APP_HOST


class ConfigError(InvalidArgument):
    """A node/cell config that cannot be read or is invalid.

    `source` is the file (or a label such as ``node.yaml``), `field` the dotted field path
    (``nodes[1].roles[0]``) or None, `detail` what is wrong.
    """

    def __init__(self, source: str | None, field: str | None, detail: str) -> None:
        self.source = source
        self.field = field
        self.detail = detail
        super().__init__(": ".join(p for p in (source, field, detail) if p))


# ---------------------------------------------------------------------------------------------
# YAML <-> protobuf
# ---------------------------------------------------------------------------------------------

_WRAPPERS = frozenset(
    f"google.protobuf.{n}"
    for n in (
        "DoubleValue",
        "FloatValue",
        "Int64Value",
        "UInt64Value",
        "Int32Value",
        "UInt32Value",
        "BoolValue",
        "StringValue",
        "BytesValue",
    )
)

_FD = FieldDescriptor
_INT_KINDS: dict[int, tuple[int, int, str]] = {
    _FD.TYPE_UINT32: (0, 2**32 - 1, "an unsigned integer"),
    _FD.TYPE_FIXED32: (0, 2**32 - 1, "an unsigned integer"),
    _FD.TYPE_UINT64: (0, 2**64 - 1, "an unsigned integer"),
    _FD.TYPE_FIXED64: (0, 2**64 - 1, "an unsigned integer"),
    _FD.TYPE_INT32: (-(2**31), 2**31 - 1, "an integer"),
    _FD.TYPE_SINT32: (-(2**31), 2**31 - 1, "an integer"),
    _FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1, "an integer"),
    _FD.TYPE_INT64: (-(2**63), 2**63 - 1, "an integer"),
    _FD.TYPE_SINT64: (-(2**63), 2**63 - 1, "an integer"),
    _FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1, "an integer"),
}
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_wrapper(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.full_name in _WRAPPERS


def _parse_scalar(value: Any, fd: FieldDescriptor, path: str, source: str) -> Any:
    t = fd.type
    if t == _FD.TYPE_STRING:
        if isinstance(value, str):
            return value
        # serde_yaml reads an unquoted scalar as a string when a string is expected
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(source, path, f"expected a string, got {_describe(value)}")
    if t in _INT_KINDS:
        lo, hi, what = _INT_KINDS[t]
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
            n = int(value.strip())
        else:
            raise ConfigError(source, path, f"expected {what}, got {_describe(value)}")
        if not lo <= n <= hi:
            raise ConfigError(source, path, f"{n} is out of range for {what} ({lo}..{hi})")
        return n
    if t == _FD.TYPE_BOOL:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, path, f"expected true or false, got {_describe(value)}")
    if t in (_FD.TYPE_FLOAT, _FD.TYPE_DOUBLE):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(source, path, f"expected a number, got {_describe(value)}")
    if t == _FD.TYPE_ENUM:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**31) <= value < 2**31:
                raise ConfigError(source, path, f"enum value {value} is out of range")
            return value  # open enum: unknown numbers are kept, validation decides
        if isinstance(value, str):
            ev = fd.enum_type.values_by_name.get(value.strip())
            if ev is not None:
                return ev.number
        names = ", ".join(f"{v.number}={v.name}" for v in fd.enum_type.values)
        raise ConfigError(source, path, f"expected an enum number ({names}), got {_describe(value)}")
    if t == _FD.TYPE_BYTES:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except ValueError:
                pass
        raise ConfigError(source, path, f"expected base64 bytes, got {_describe(value)}")
    raise ConfigError(source, path, f"unsupported field type {t}")  # pragma: no cover


def _warn_unknown_key(key: object, fields: Mapping[str, FieldDescriptor], path: str, source: str) -> None:
    """Unknown keys are ignored (forward compatibility), but said: a misspelt setting would
    otherwise silently keep its default."""
    where = _join(path, str(key))
    close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.75)
    # Among close names, the one sharing the longest prefix (settings differ by their last words).
    close.sort(key=lambda name: -len(os.path.commonprefix([name, str(key)])))
    hint = f" (did you mean {_join(path, close[0])}?)" if close else ""
    log.warning("%s: %s: unknown key, ignored%s", source, where, hint)


def _parse_message(data: Any, msg: Message, path: str, source: str) -> None:
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigError(source, path or None, f"expected a mapping, got {_describe(data)}")
    fields = msg.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        fd = fields.get(key) if isinstance(key, str) else None
        if fd is None:
            _warn_unknown_key(key, fields, path, source)
            continue
        if value is None:
            continue  # null means "not set"
        fpath = _join(path, key)
        if fd.is_repeated:
            if not isinstance(value, list):
                raise ConfigError(source, fpath, f"expected a list, got {_describe(value)}")
            container = getattr(msg, key)
            for i, item in enumerate(value):
                ipath = f"{fpath}[{i}]"
                if item is None:
                    raise ConfigError(source, ipath, "null is not allowed in a list")
                if _is_wrapper(fd):
                    inner = fd.message_type.fields_by_name["value"]
                    container.add().value = _parse_scalar(item, inner, ipath, source)
                elif fd.message_type is not None:
                    _parse_message(item, container.add(), ipath, source)
                else:
                    container.append(_parse_scalar(item, fd, ipath, source))
        elif _is_wrapper(fd):
            inner = fd.message_type.fields_by_name["value"]
            getattr(msg, key).value = _parse_scalar(value, inner, fpath, source)
        elif fd.message_type is not None:
            sub = getattr(msg, key)
            sub.SetInParent()  # `key: {}` is kept as "set" (matters for oneof variants)
            _parse_message(value, sub, fpath, source)
        else:
            setattr(msg, key, _parse_scalar(value, fd, fpath, source))


def _value_to_data(fd: FieldDescriptor, value: Any) -> Any:
    if _is_wrapper(fd):
        inner = value.value
        return base64.b64encode(inner).decode("ascii") if isinstance(inner, bytes) else inner
    if fd.message_type is not None:
        return message_to_data(value)
    if fd.type == _FD.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def message_to_data(msg: Message) -> dict[str, Any]:
    """A protobuf message as plain YAML-ready data (see module doc); defaults are omitted."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.is_repeated:
            if len(value):
                out[fd.name] = [_value_to_data(fd, v) for v in value]
        elif fd.has_presence:
            if msg.HasField(fd.name):
                out[fd.name] = _value_to_data(fd, value)
        elif value != fd.default_value:
            out[fd.name] = _value_to_data(fd, value)
    return out


def message_from_data(data: Any, msg_type: type[M], source: str = "<config>") -> M:
    """Build a `msg_type` from plain data (parsed YAML); no semantic validation."""
    msg = msg_type()
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(source, None, f"expected a mapping at the top level, got {_describe(data)}")
    _parse_message(data, msg, "", source)
    return msg


def message_from_yaml(text: str | bytes, msg_type: type[M], source: str = "<config>") -> M:
    """Parse YAML text into a `msg_type` (no semantic validation)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(source, None, f"invalid YAML: {e}") from None
    return message_from_data(data, msg_type, source)


def message_to_yaml(msg: Message) -> str:
    """Serialize a message as YAML (see module doc)."""
    return yaml.safe_dump(message_to_data(msg), sort_keys=False, allow_unicode=True, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

_HOST = re.compile(r"\[[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?\]|[A-Za-z0-9_.-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_GRPC_ADDRESS_FIELDS = ("chain", "store", "gateway", "apphost")


def is_grpc_address(addr: str) -> bool:
    """True iff `addr` is ``host:port`` (host a name, IPv4 or ``[IPv6]``; port 1..65535)."""
    host, sep, port = addr.rpartition(":")
    return bool(sep and _HOST.fullmatch(host) and _PORT.fullmatch(port) and 1 <= int(port) <= 65535)


def _require_public_key(text: str, path: str, source: str) -> PublicKey:
    if not text:
        raise ConfigError(source, path, "required field is missing")
    try:
        return PublicKey.decode_base58(text)
    except InvalidArgument as e:
        raise ConfigError(source, path, str(e)) from None


def _decode_keypair(text: str, path: str, source: str) -> Keypair:
    try:
        return Keypair.decode_base58(text)
    except InvalidArgument as e:
        raise ConfigError(source, path, str(e)) from None


def _check_keypair_matches(kp: Keypair, pk: PublicKey, path: str, source: str) -> None:
    if kp.public_key != pk:
        raise ConfigError(
            source,
            path,
            f"keypair does not match public_key (the keypair's public key is "
            f"{kp.public_key.encode_base58()}, public_key is {pk.encode_base58()})",
        )


def _check_id(id_text: str, pk: PublicKey, path: str, source: str) -> PeerId:
    derived = PeerId.from_public_key(pk)
    if id_text and id_text != str(derived):
        raise ConfigError(source, path, f"{id_text!r} is not the id of the public key (expected {derived})")
    return derived


def _validate_addresses(addrs: config_pb2.NodeAddresses, path: str, source: str) -> None:
    for name in _GRPC_ADDRESS_FIELDS:
        value = getattr(addrs, name)
        if value and not is_grpc_address(value):
            raise ConfigError(
                source,
                _join(path, name),
                f"expected a gRPC address 'host:port' with a port in 1..65535, got {value!r}",
            )


def _check_positive(msg: Message, name: str, path: str, source: str) -> None:
    if msg.HasField(name) and getattr(msg, name).value < 1:
        raise ConfigError(source, _join(path, name), f"must be at least 1, got {getattr(msg, name).value}")


def _validate_settings(cfg: config_pb2.LocalNodeConfig, source: str) -> None:
    if cfg.HasField("store"):
        _check_positive(cfg.store, "query_parallelism", "store", source)
        idx = cfg.store.index
        for name in ("pending_index", "chain_index"):
            sub = getattr(idx, name)
            for f in ("indexer_num_threads", "indexer_heap_size_bytes"):
                _check_positive(sub, f, f"store.index.{name}", source)
        for f in ("run_interval_secs", "queue_size"):
            _check_positive(idx.garbage_collector, f, "store.index.garbage_collector", source)
    if cfg.HasField("chain"):
        for f in (
            "segment_max_size",
            "segment_max_open_mmap",
            "commit_interval_ms",
            "block_proposal_timeout_ms",
            "cleanup_after_block_depth",
            "commit_max_pending_operations",
            "tick_interval_ms",
            "sync_interval_ms",
            "commit_min_interval_ms",
        ):
            _check_positive(cfg.chain, f, "chain", source)
    if cfg.HasField("apphost"):
        for fd in cfg.apphost.DESCRIPTOR.fields:
            if fd.message_type is not None:  # every wrapper field must be at least 1
                _check_positive(cfg.apphost, fd.name, "apphost", source)
        address = cfg.apphost.store_address
        if address and not is_grpc_address(address):
            raise ConfigError(source, "apphost.store_address", f"expected a gRPC address 'host:port', got {address!r}")


def _validate_role(role: int, path: str, source: str) -> None:
    if role == config_pb2.CellNodeConfig.INVALID_ROLE:
        raise ConfigError(source, path, "role 0 (INVALID_ROLE) is not allowed")
    if role not in _ROLE_VALUES:
        known = ", ".join(f"{r.value}={r.name}_ROLE" for r in Role)
        raise ConfigError(source, path, f"role {role} is not a known role ({known})")


def _validate_cell_node(entry: config_pb2.CellNodeConfig, path: str, source: str) -> PublicKey:
    if not entry.HasField("node"):
        raise ConfigError(source, _join(path, "node.public_key"), "required field is missing")
    pk = _require_public_key(entry.node.public_key, _join(path, "node.public_key"), source)
    _check_id(entry.node.id, pk, _join(path, "node.id"), source)
    if entry.node.HasField("addresses"):
        _validate_addresses(entry.node.addresses, _join(path, "node.addresses"), source)
    for j, role in enumerate(entry.roles):
        _validate_role(role, f"{_join(path, 'roles')}[{j}]", source)
    return pk


def _validate_cell(cfg: config_pb2.CellConfig, source: str, prefix: str) -> PeerId:
    pk = _require_public_key(cfg.public_key, _join(prefix, "public_key"), source)
    if cfg.keypair:
        kp = _decode_keypair(cfg.keypair, _join(prefix, "keypair"), source)
        _check_keypair_matches(kp, pk, _join(prefix, "keypair"), source)
    cell_id = _check_id(cfg.id, pk, _join(prefix, "id"), source)
    seen: dict[PublicKey, int] = {}
    app_host: int | None = None
    for i, entry in enumerate(cfg.nodes):
        path = _join(prefix, f"nodes[{i}]")
        npk = _validate_cell_node(entry, path, source)
        if npk in seen:
            raise ConfigError(source, _join(path, "node.public_key"), f"same node as nodes[{seen[npk]}] (listed twice)")
        seen[npk] = i
        if Role.APP_HOST in entry.roles:
            if app_host is not None:
                raise ConfigError(
                    source,
                    _join(path, "roles"),
                    f"only one node of a cell may have APP_HOST_ROLE (3); nodes[{app_host}] already has it",
                )
            app_host = i
    for i, app in enumerate(cfg.apps):
        if app.public_key:
            _require_public_key(app.public_key, _join(prefix, f"apps[{i}].public_key"), source)
    return cell_id


def validate_cell_config(cfg: config_pb2.CellConfig, source: str = CELL_YAML) -> CellId:
    """Check a cell config (see module doc of SPEC 1.7 rules); returns the cell id."""
    return _validate_cell(cfg, source, "")


def validate_cell_node_config(cfg: config_pb2.CellNodeConfig, source: str = "cell node") -> NodeId:
    """Check one `CellNodeConfig` (e.g. received when a node joins); returns its node id."""
    return PeerId.from_public_key(_validate_cell_node(cfg, "", source))


def validate_node_config(cfg: config_pb2.LocalNodeConfig, source: str = NODE_YAML) -> NodeId:
    """Check a node config; returns the node id."""
    if not cfg.keypair:
        raise ConfigError(source, "keypair", "required field is missing")
    kp = _decode_keypair(cfg.keypair, "keypair", source)
    pk = _require_public_key(cfg.public_key, "public_key", source)
    _check_keypair_matches(kp, pk, "keypair", source)
    node_id = _check_id(cfg.id, pk, "id", source)
    for name in ("addresses", "listen_addresses"):
        if cfg.HasField(name):
            _validate_addresses(getattr(cfg, name), name, source)
    seen: dict[str, int] = {}
    for i, entry in enumerate(cfg.cells):
        path = f"cells[{i}]"
        if entry.HasField("inline"):
            cell_id = str(_validate_cell(entry.inline, source, f"{path}.inline"))
            if entry.id and entry.id != cell_id:
                raise ConfigError(source, f"{path}.id", f"{entry.id!r} is not the inline cell's id {cell_id}")
        elif entry.id:
            try:
                cell_id = str(PeerId.from_str(entry.id))
            except InvalidArgument as e:
                raise ConfigError(source, f"{path}.id", str(e)) from None
        else:
            raise ConfigError(source, path, "needs an `id` (cells/<id>/cell.yaml) or an `inline` cell config")
        if cell_id in seen:
            raise ConfigError(source, path, f"cell {cell_id} is already listed as cells[{seen[cell_id]}]")
        seen[cell_id] = i
    _validate_settings(cfg, source)
    return node_id


# ---------------------------------------------------------------------------------------------
# Text and file I/O
# ---------------------------------------------------------------------------------------------


def node_config_from_yaml(text: str | bytes, source: str = NODE_YAML) -> config_pb2.LocalNodeConfig:
    cfg = message_from_yaml(text, config_pb2.LocalNodeConfig, source)
    validate_node_config(cfg, source)
    return cfg


def node_config_to_yaml(cfg: config_pb2.LocalNodeConfig) -> str:
    return message_to_yaml(cfg)


def cell_config_from_yaml(text: str | bytes, source: str = CELL_YAML) -> config_pb2.CellConfig:
    cfg = message_from_yaml(text, config_pb2.CellConfig, source)
    validate_cell_config(cfg, source)
    return cfg


def cell_config_to_yaml(cfg: config_pb2.CellConfig) -> str:
    return message_to_yaml(cfg)


def cell_node_config_from_yaml(text: str | bytes, source: str = "cell node") -> config_pb2.CellNodeConfig:
    """A joining node's `CellNodeConfig` (exchanged through discovery, SPEC 1.8)."""
    cfg = message_from_yaml(text, config_pb2.CellNodeConfig, source)
    validate_cell_node_config(cfg, source)
    return cfg


def cell_node_config_to_yaml(cfg: config_pb2.CellNodeConfig) -> str:
    return message_to_yaml(cfg)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, "file does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), None, f"cannot read: {e}") from None


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str, *, secret: bool) -> None:
    """Write `text` to `path` atomically (tmp file in the same folder + fsync + rename).

    `secret` files (holding a keypair) get mode 0600, others 0644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600 if secret else 0o644)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def load_node_config(path: str | os.PathLike[str]) -> config_pb2.LocalNodeConfig:
    path = Path(path)
    return node_config_from_yaml(_read_text(path), str(path))


def save_node_config(cfg: config_pb2.LocalNodeConfig, path: str | os.PathLike[str]) -> None:
    """Validate then write `cfg` (always mode 0600: a node config holds the node keypair)."""
    path = Path(path)
    validate_node_config(cfg, str(path))
    atomic_write_text(path, node_config_to_yaml(cfg), secret=True)


def load_cell_config(path: str | os.PathLike[str]) -> config_pb2.CellConfig:
    path = Path(path)
    return cell_config_from_yaml(_read_text(path), str(path))


def save_cell_config(cfg: config_pb2.CellConfig, path: str | os.PathLike[str]) -> None:
    """Validate then write `cfg` (mode 0600 if it holds the cell keypair, else 0644)."""
    path = Path(path)
    validate_cell_config(cfg, str(path))
    atomic_write_text(path, cell_config_to_yaml(cfg), secret=bool(cfg.keypair))


# ---------------------------------------------------------------------------------------------
# Generation and editing helpers (SPEC 1.3, 1.7)
# ---------------------------------------------------------------------------------------------


def generate_node_config(name: str | None = None) -> config_pb2.LocalNodeConfig:
    """A new node identity: `keypair`, `public_key`, `id` and `name` (generated if None)."""
    kp = Keypair.generate()
    return config_pb2.LocalNodeConfig(
        keypair=kp.encode_base58(),
        public_key=kp.public_key.encode_base58(),
        id=str(PeerId.from_public_key(kp.public_key)),
        name=kp.public_key.generate_name() if name is None else name,
    )


def generate_cell_config(name: str | None = None) -> config_pb2.CellConfig:
    """A new full cell (with keypair) without nodes."""
    kp = Keypair.generate()
    return config_pb2.CellConfig(
        keypair=kp.encode_base58(),
        public_key=kp.public_key.encode_base58(),
        id=str(PeerId.from_public_key(kp.public_key)),
        name=kp.public_key.generate_name() if name is None else name,
    )


def cell_entry_id(entry: config_pb2.NodeCellConfig) -> str:
    """The cell id of a node.yaml `cells[]` entry: its `id`, else the inline cell's id (or "")."""
    if entry.id:
        return entry.id
    if entry.HasField("inline"):
        if entry.inline.id:
            return entry.inline.id
        with contextlib.suppress(InvalidArgument):
            return str(PeerId.from_public_key(PublicKey.decode_base58(entry.inline.public_key)))
    return ""


def add_cell(node_cfg: config_pb2.LocalNodeConfig, cell_entry: config_pb2.NodeCellConfig) -> None:
    """Remove the entries for the same cell id, then append `cell_entry` (in place).

    Ids are compared as `cell_entry_id` (an inline entry without `id` uses its cell's id), so two
    id-less inline entries of different cells do not replace each other as in the original.
    """
    cell_id = cell_entry_id(cell_entry)
    kept = [c for c in node_cfg.cells if not cell_id or cell_entry_id(c) != cell_id]
    del node_cfg.cells[:]
    node_cfg.cells.extend(kept)
    node_cfg.cells.add().CopyFrom(cell_entry)


def add_node(cell_cfg: config_pb2.CellConfig, cell_node_cfg: config_pb2.CellNodeConfig) -> None:
    """Replace the entry with the same `node.public_key`, else append; no-op without a `node`."""
    if not cell_node_cfg.HasField("node"):
        return
    for entry in cell_cfg.nodes:
        if entry.HasField("node") and entry.node.public_key == cell_node_cfg.node.public_key:
            entry.CopyFrom(cell_node_cfg)
            return
    cell_cfg.nodes.add().CopyFrom(cell_node_cfg)


def add_application(cell_cfg: config_pb2.CellConfig, app: config_pb2.CellApplicationConfig) -> None:
    """Replace the app entry with the same `public_key`, else append."""
    for entry in cell_cfg.apps:
        if entry.public_key == app.public_key:
            entry.CopyFrom(app)
            return
    cell_cfg.apps.add().CopyFrom(app)


def create_cell_node_config(node_cfg: config_pb2.LocalNodeConfig, roles: Iterable[int]) -> config_pb2.CellNodeConfig:
    """This node as a cell member: public key, id, name (generated if empty), public addresses."""
    pk = _require_public_key(node_cfg.public_key, "public_key", NODE_YAML)
    roles = list(roles)
    for i, role in enumerate(roles):
        _validate_role(int(role), f"roles[{i}]", "cell node")
    out = config_pb2.CellNodeConfig(
        node=config_pb2.NodeConfig(
            public_key=node_cfg.public_key,
            id=node_cfg.id or str(PeerId.from_public_key(pk)),
            name=node_cfg.name or pk.generate_name(),
        ),
        roles=[int(r) for r in roles],
    )
    if node_cfg.HasField("addresses"):
        out.node.addresses.CopyFrom(node_cfg.addresses)
    return out


# ---------------------------------------------------------------------------------------------
# Node directory (SPEC 1.5)
# ---------------------------------------------------------------------------------------------


class NodeDirectory:
    """A node folder: ``node.yaml`` and ``cells/<cell_id>/{cell.yaml,chain,store,apps,tmp}``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"NodeDirectory({str(self.root)!r})"

    @property
    def node_yaml(self) -> Path:
        return self.root / NODE_YAML

    @property
    def cells_dir(self) -> Path:
        return self.root / "cells"

    def cell_dir(self, cell_id: str | CellId) -> Path:
        # parsing guards against path traversal through a crafted id
        return self.cells_dir / str(PeerId.from_str(str(cell_id)))

    def cell_yaml(self, cell_id: str | CellId) -> Path:
        return self.cell_dir(cell_id) / CELL_YAML

    def chain_dir(self, cell_id: str | CellId) -> Path:
        return self.cell_dir(cell_id) / "chain"

    def store_dir(self, cell_id: str | CellId) -> Path:
        return self.cell_dir(cell_id) / "store"

    def apps_dir(self, cell_id: str | CellId) -> Path:
        return self.cell_dir(cell_id) / "apps"

    def tmp_dir(self, cell_id: str | CellId) -> Path:
        return self.cell_dir(cell_id) / "tmp"

    def exists(self) -> bool:
        return self.node_yaml.is_file()

    def load_node_config(self) -> config_pb2.LocalNodeConfig:
        return load_node_config(self.node_yaml)

    def save_node_config(self, cfg: config_pb2.LocalNodeConfig) -> None:
        save_node_config(cfg, self.node_yaml)

    def _load_cell_entry(self, entry: config_pb2.NodeCellConfig, index: int) -> config_pb2.CellConfig:
        if entry.HasField("inline"):
            cell = config_pb2.CellConfig()
            cell.CopyFrom(entry.inline)
            return cell
        path = self.cell_yaml(entry.id)
        if not path.is_file():
            raise ConfigError(str(self.node_yaml), f"cells[{index}].id", f"cell {entry.id}: {path} does not exist")
        cell = load_cell_config(path)
        cell_id = str(PeerId.from_public_key(PublicKey.decode_base58(cell.public_key)))
        if cell_id != entry.id:
            raise ConfigError(
                str(path), "public_key", f"is the key of cell {cell_id}, but this file is for cell {entry.id}"
            )
        return cell

    def load_cell_configs(self, node_cfg: config_pb2.LocalNodeConfig | None = None) -> list[config_pb2.CellConfig]:
        """The configs of the node's cells, in `cells[]` order (`{id}` entries read from disk)."""
        if node_cfg is None:
            node_cfg = self.load_node_config()
        return [self._load_cell_entry(entry, i) for i, entry in enumerate(node_cfg.cells)]

    def save_cell_config(self, cfg: config_pb2.CellConfig) -> CellId:
        """Write ``cells/<id>/cell.yaml`` and make node.yaml reference it by `{id}` if it does not.

        An empty `id` is filled in the written file. An inline entry of the same cell in
        node.yaml is replaced by the `{id}` entry, so the written file is the one in effect.
        """
        cell_id = validate_cell_config(cfg, CELL_YAML)
        to_write = config_pb2.CellConfig()
        to_write.CopyFrom(cfg)
        to_write.id = str(cell_id)
        save_cell_config(to_write, self.cell_yaml(cell_id))
        node_cfg = self.load_node_config()
        if not any(c.id == str(cell_id) and not c.HasField("inline") for c in node_cfg.cells):
            add_cell(node_cfg, config_pb2.NodeCellConfig(id=str(cell_id)))
            self.save_node_config(node_cfg)
        return cell_id

    def inlined_node_config(self) -> config_pb2.LocalNodeConfig:
        """The node config with every `cells[]` entry's `inline:` filled (one self-contained YAML)."""
        node_cfg = self.load_node_config()
        out = config_pb2.LocalNodeConfig()
        out.CopyFrom(node_cfg)
        for i, entry in enumerate(out.cells):
            if not entry.HasField("inline"):
                entry.inline.CopyFrom(self._load_cell_entry(entry, i))
        return out

    def load_local_node(self) -> LocalNode:
        return LocalNode.from_config(self.load_node_config(), root=self.root, source=str(self.node_yaml))

    def load_cells(self, local_node: LocalNode | None = None) -> list[Cell]:
        if local_node is None:
            local_node = self.load_local_node()
        return [
            Cell.from_config(c, local_node, source=f"cell {c.id or c.public_key}")
            for c in self.load_cell_configs(local_node.config)
        ]


# ---------------------------------------------------------------------------------------------
# Runtime model (SPEC 1.3, 1.4)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Addresses:
    """A node's addresses: p2p multiaddrs, http URLs and one gRPC ``host:port`` per service."""

    p2p: tuple[str, ...] = ()
    http: tuple[str, ...] = ()
    chain: str = ""
    store: str = ""
    gateway: str = ""
    apphost: str = ""

    @classmethod
    def from_config(cls, msg: config_pb2.NodeAddresses | None) -> Addresses:
        if msg is None:
            return cls()
        return cls(
            p2p=tuple(msg.p2p),
            http=tuple(msg.http),
            chain=msg.chain,
            store=msg.store,
            gateway=msg.gateway,
            apphost=msg.apphost,
        )

    def to_config(self) -> config_pb2.NodeAddresses:
        return config_pb2.NodeAddresses(
            p2p=list(self.p2p),
            http=list(self.http),
            chain=self.chain,
            store=self.store,
            gateway=self.gateway,
            apphost=self.apphost,
        )

    def or_else(self, fallback: Addresses) -> Addresses:
        """Each empty field replaced by `fallback`'s."""
        return Addresses(
            p2p=self.p2p or fallback.p2p,
            http=self.http or fallback.http,
            chain=self.chain or fallback.chain,
            store=self.store or fallback.store,
            gateway=self.gateway or fallback.gateway,
            apphost=self.apphost or fallback.apphost,
        )

    def is_empty(self) -> bool:
        return self == Addresses()


@dataclass(frozen=True, eq=False)
class LocalNode:
    """The node running this process. Equality and hash follow `node_id`."""

    keypair: Keypair
    public_key: PublicKey
    node_id: NodeId
    name: str
    addresses: Addresses
    listen_addresses: Addresses
    config: config_pb2.LocalNodeConfig
    root: Path | None = None

    @classmethod
    def from_config(
        cls,
        cfg: config_pb2.LocalNodeConfig,
        root: str | os.PathLike[str] | None = None,
        source: str = NODE_YAML,
    ) -> LocalNode:
        """Validate `cfg` and build the node; listen addresses fall back, field by field, to the
        public addresses."""
        node_id = validate_node_config(cfg, source)
        keypair = Keypair.decode_base58(cfg.keypair)
        addresses = Addresses.from_config(cfg.addresses)
        own = config_pb2.LocalNodeConfig()
        own.CopyFrom(cfg)
        return cls(
            keypair=keypair,
            public_key=keypair.public_key,
            node_id=node_id,
            name=cfg.name or keypair.public_key.generate_name(),
            addresses=addresses,
            listen_addresses=Addresses.from_config(cfg.listen_addresses).or_else(addresses),
            config=own,
            root=None if root is None else Path(root),
        )

    @classmethod
    def generate(cls, name: str | None = None) -> LocalNode:
        return cls.from_config(generate_node_config(name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalNode) and self.node_id == other.node_id

    def __hash__(self) -> int:
        return hash(self.node_id)


@dataclass(frozen=True)
class CellNode:
    """A member node of a cell as seen by this node, with its roles in the cell."""

    node_id: NodeId
    public_key: PublicKey
    name: str
    addresses: Addresses = field(default_factory=Addresses)
    roles: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, entry: config_pb2.CellNodeConfig, source: str = "cell node") -> CellNode:
        node_id = validate_cell_node_config(entry, source)
        pk = PublicKey.decode_base58(entry.node.public_key)
        return cls(
            node_id=node_id,
            public_key=pk,
            name=entry.node.name or pk.generate_name(),
            addresses=Addresses.from_config(entry.node.addresses),
            roles=frozenset(Role(r) for r in entry.roles),
        )

    @classmethod
    def from_local(cls, node: LocalNode, roles: Iterable[int] = ()) -> CellNode:
        return cls(node.node_id, node.public_key, node.name, node.addresses, frozenset(Role(r) for r in roles))

    def has_role(self, role: int) -> bool:
        return role in self.roles


@dataclass(eq=False)
class Cell:
    """A cell as seen from the local node (SPEC 1.4); full if it holds the cell keypair."""

    id: CellId
    public_key: PublicKey
    keypair: Keypair | None
    name: str
    nodes: dict[str, CellNode]
    local_node: LocalNode
    config: config_pb2.CellConfig

    @classmethod
    def from_config(cls, cell_cfg: config_pb2.CellConfig, local_node: LocalNode, source: str = CELL_YAML) -> Cell:
        """Validate `cell_cfg`; the local node is inserted first with no roles, then every
        configured node is added (overwriting the local entry when it is listed)."""
        cell_id = validate_cell_config(cell_cfg, source)
        pk = PublicKey.decode_base58(cell_cfg.public_key)
        nodes: dict[str, CellNode] = {str(local_node.node_id): CellNode.from_local(local_node)}
        for i, entry in enumerate(cell_cfg.nodes):
            node = CellNode.from_config(entry, f"{source}: nodes[{i}]")
            nodes[str(node.node_id)] = node
        own = config_pb2.CellConfig()
        own.CopyFrom(cell_cfg)
        return cls(
            id=cell_id,
            public_key=pk,
            keypair=Keypair.decode_base58(cell_cfg.keypair) if cell_cfg.keypair else None,
            name=cell_cfg.name or pk.generate_name(),
            nodes=nodes,
            local_node=local_node,
            config=own,
        )

    @property
    def is_full(self) -> bool:
        return self.keypair is not None

    @property
    def local_cell_node(self) -> CellNode:
        return self.nodes[str(self.local_node.node_id)]

    def local_roles(self) -> frozenset[int]:
        return self.local_cell_node.roles

    def nodes_with_role(self, role: int) -> list[CellNode]:
        """Nodes having `role`, in insertion order (local node first)."""
        return [n for n in self.nodes.values() if role in n.roles]

    def node_count(self, role: int | None = None) -> int:
        return len(self.nodes) if role is None else len(self.nodes_with_role(role))

    def has_quorum(self, count: int, role: int | None = None) -> bool:
        """``n > 0 and count > n // 2`` with n the nodes (having `role` when given)."""
        n = self.node_count(role)
        return n > 0 and count > n // 2


# ---------------------------------------------------------------------------------------------
# Settings resolved from the config wrappers, with the original's defaults (SPEC 1.6, 3.10)
# ---------------------------------------------------------------------------------------------


def _wrapped(msg: Message | None, name: str, default: int) -> int:
    if msg is not None and msg.HasField(name):
        return int(getattr(msg, name).value)
    return default


@dataclass(frozen=True)
class MutationIndexSettings:
    # 1, not SPEC 3.10's 2: each commit makes one tantivy segment per writer thread, and the store commits
    # the pending index per batch of events, so two threads doubled the segments to build and merge (store
    # CPU per mutation about -20% with one under load; `make bench-store`). With tantivy's default reader
    # policy one thread also made the reload after each commit wait ~100 ms; the store reloads manually
    # (`MutationIndex`), which removed that wait.
    indexer_num_threads: int = 1
    # 100 MB, not SPEC 3.10's 30: tantivy flushes a segment whenever its writer's arena reaches the heap size,
    # and a batch of 20,000 notes (a burst, a chain-index round) took ~60 MB: two segments a commit, merged
    # later. With one a commit, a 100,000-note burst cost the store 10-11 s of CPU instead of ~12, and its
    # chain indexing after it 7 s instead of 9-10 (`make bench-store`), for the same peak memory.
    indexer_heap_size_bytes: int = 100_000_000
    entity_mutations_cache_size: int = 5000

    @classmethod
    def from_config(cls, cfg: config_pb2.MutationIndexConfig | None) -> MutationIndexSettings:
        d = cls()
        return cls(
            indexer_num_threads=_wrapped(cfg, "indexer_num_threads", d.indexer_num_threads),
            indexer_heap_size_bytes=_wrapped(cfg, "indexer_heap_size_bytes", d.indexer_heap_size_bytes),
            entity_mutations_cache_size=_wrapped(cfg, "entity_mutations_cache_size", d.entity_mutations_cache_size),
        )


@dataclass(frozen=True)
class GarbageCollectorSettings:
    run_interval_secs: int = 13
    queue_size: int = 500

    @classmethod
    def from_config(cls, cfg: config_pb2.EntityGarbageCollectorConfig | None) -> GarbageCollectorSettings:
        d = cls()
        return cls(
            run_interval_secs=_wrapped(cfg, "run_interval_secs", d.run_interval_secs),
            queue_size=_wrapped(cfg, "queue_size", d.queue_size),
        )


@dataclass(frozen=True)
class EntityIndexSettings:
    """`chain_index_deferred_interval_secs` None = deferral disabled (configured as 0; the
    original turned 0 into a zero-period timer, which panicked)."""

    chain_index_min_depth: int = 3
    chain_index_depth_leeway: int = 10
    chain_index_deferred_interval_secs: int | None = 5
    chain_index_deferred_query_secs: int = 15
    chain_index_deferred_max_secs: int = 300
    # New: nor while pending writes keep coming (0: no wait), and neither wait holds once the pending index has
    # this many operations (0: no bound). A chain-index round during a burst takes CPU and the indexing
    # thread from the pending index; measured with `make bench-store` (100,000 notes, open loop), the 2 s
    # wait made the burst searchable at 8,300-10,300/s instead of ~8,000, the store's CPU for the load and
    # the chain indexing after it together 24.3 s instead of 27.7 s, the same peak memory (~1.05 GB); the
    # burst is chain-indexed later (a round of every 20,000 operations once writes stop).
    chain_index_deferred_write_secs: int = 2
    chain_index_deferred_max_pending: int = 100_000
    pending_index: MutationIndexSettings = field(default_factory=MutationIndexSettings)
    chain_index: MutationIndexSettings = field(default_factory=MutationIndexSettings)
    garbage_collector: GarbageCollectorSettings = field(default_factory=GarbageCollectorSettings)

    @classmethod
    def from_config(cls, cfg: config_pb2.EntityIndexConfig | None) -> EntityIndexSettings:
        d = cls()
        has = cfg is not None
        deferred = _wrapped(cfg, "chain_index_deferred_interval_secs", d.chain_index_deferred_interval_secs or 0)
        return cls(
            chain_index_min_depth=_wrapped(cfg, "chain_index_min_depth", d.chain_index_min_depth),
            chain_index_depth_leeway=_wrapped(cfg, "chain_index_depth_leeway", d.chain_index_depth_leeway),
            chain_index_deferred_interval_secs=deferred or None,
            chain_index_deferred_query_secs=_wrapped(
                cfg, "chain_index_deferred_query_secs", d.chain_index_deferred_query_secs
            ),
            chain_index_deferred_max_secs=_wrapped(
                cfg, "chain_index_deferred_max_secs", d.chain_index_deferred_max_secs
            ),
            chain_index_deferred_write_secs=_wrapped(
                cfg, "chain_index_deferred_write_secs", d.chain_index_deferred_write_secs
            ),
            chain_index_deferred_max_pending=_wrapped(
                cfg, "chain_index_deferred_max_pending", d.chain_index_deferred_max_pending
            ),
            pending_index=MutationIndexSettings.from_config(
                cfg.pending_index if has and cfg.HasField("pending_index") else None
            ),
            chain_index=MutationIndexSettings.from_config(
                cfg.chain_index if has and cfg.HasField("chain_index") else None
            ),
            garbage_collector=GarbageCollectorSettings.from_config(
                cfg.garbage_collector if has and cfg.HasField("garbage_collector") else None
            ),
        )


@dataclass(frozen=True)
class StoreSettings:
    query_parallelism: int = 4
    index: EntityIndexSettings = field(default_factory=EntityIndexSettings)

    @classmethod
    def from_config(cls, cfg: config_pb2.NodeStoreConfig | None) -> StoreSettings:
        return cls(
            query_parallelism=_wrapped(cfg, "query_parallelism", cls.query_parallelism),
            index=EntityIndexSettings.from_config(cfg.index if cfg is not None and cfg.HasField("index") else None),
        )


@dataclass(frozen=True)
class ChainStorageSettings:
    segment_max_size: int = 200 * 1024 * 1024
    segment_max_open_mmap: int = 20

    @classmethod
    def from_config(cls, cfg: config_pb2.ChainConfig | None) -> ChainStorageSettings:
        return cls(
            segment_max_size=_wrapped(cfg, "segment_max_size", cls.segment_max_size),
            segment_max_open_mmap=_wrapped(cfg, "segment_max_open_mmap", cls.segment_max_open_mmap),
        )


__all__ = [
    "APP_HOST_ROLE",
    "CELL_YAML",
    "CHAIN_ROLE",
    "NODE_YAML",
    "STORE_ROLE",
    "Addresses",
    "Cell",
    "CellNode",
    "ChainStorageSettings",
    "ConfigError",
    "EntityIndexSettings",
    "GarbageCollectorSettings",
    "LocalNode",
    "MutationIndexSettings",
    "NodeDirectory",
    "Role",
    "StoreSettings",
    "add_application",
    "add_cell",
    "add_node",
    "atomic_write_text",
    "cell_config_from_yaml",
    "cell_config_to_yaml",
    "cell_entry_id",
    "cell_node_config_from_yaml",
    "cell_node_config_to_yaml",
    "create_cell_node_config",
    "generate_cell_config",
    "generate_node_config",
    "is_grpc_address",
    "load_cell_config",
    "load_node_config",
    "message_from_data",
    "message_from_yaml",
    "message_to_data",
    "message_to_yaml",
    "node_config_from_yaml",
    "node_config_to_yaml",
    "save_cell_config",
    "save_node_config",
    "validate_cell_config",
    "validate_cell_node_config",
    "validate_node_config",
]
