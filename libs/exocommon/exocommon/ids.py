"""Identifiers (SPEC 1.2): peer ids for nodes, cells and apps; entity and trait ids.

A peer id is exactly a libp2p ``PeerId`` of an Ed25519 public key: the protobuf-encoded libp2p
``PublicKey{Type=Ed25519, Data=<32 bytes>}`` (``08 01 12 20 <pk>``) wrapped in an identity
multihash (``00 24``), 38 bytes, whose base58btc text starts with ``12D3KooW``.
"""

from __future__ import annotations

import functools
import uuid

from exocommon.base58 import b58decode, b58encode
from exocommon.errors import InvalidArgument
from exocommon.keys import PublicKey

# identity multihash (code 0x00, length 36) + protobuf tag/values of libp2p's ed25519 PublicKey
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
PEER_ID_LEN = len(_PEER_ID_PREFIX) + 32  # 38


class PeerIdError(InvalidArgument):
    """Bytes or text that should be an Ed25519 peer id are not one."""


@functools.total_ordering
class PeerId:
    """An Ed25519 libp2p peer id. Equality, hash and ordering follow the string form."""

    __slots__ = ("_bytes", "_str")

    def __init__(self, data: bytes) -> None:
        data = bytes(data)
        if len(data) != PEER_ID_LEN:
            raise PeerIdError(f"peer id must be {PEER_ID_LEN} bytes, got {len(data)}")
        if data[: len(_PEER_ID_PREFIX)] != _PEER_ID_PREFIX:
            raise PeerIdError(
                f"peer id must start with {_PEER_ID_PREFIX.hex()} (identity multihash of an ed25519 key), "
                f"got {data[: len(_PEER_ID_PREFIX)].hex()}"
            )
        self._bytes = data
        self._str = b58encode(data)

    @classmethod
    def from_public_key(cls, pk: PublicKey) -> PeerId:
        return cls(_PEER_ID_PREFIX + pk.raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        return cls(data)

    @classmethod
    def from_str(cls, text: str) -> PeerId:
        if not isinstance(text, str) or not text:
            raise PeerIdError("peer id text is empty or not a str")
        try:
            data = b58decode(text)
        except InvalidArgument as e:
            raise PeerIdError(f"peer id {text!r} is not valid base58: {e}") from None
        return cls(data)

    def to_bytes(self) -> bytes:
        return self._bytes

    def public_key(self) -> PublicKey:
        """The Ed25519 public key the id was derived from (it is embedded verbatim)."""
        return PublicKey(self._bytes[len(_PEER_ID_PREFIX) :])

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return f"PeerId({self._str!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerId) and self._str == other._str

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, PeerId):
            return NotImplemented
        return self._str < other._str

    def __hash__(self) -> int:
        return hash(self._str)


# Nodes, cells and apps all use the same derivation; the aliases document intent at use sites.
NodeId = PeerId
CellId = PeerId
AppId = PeerId


def consistent_clock_id(node_id: PeerId) -> int:
    """u16 from the id's last two bytes, last byte low (``u16::from_le_bytes([b[n-1], b[n-2]])``)."""
    b = node_id.to_bytes()
    return b[-1] | (b[-2] << 8)


def generate_entity_id() -> str:
    """``"et"`` + 32 hex chars of a random uuid4."""
    return "et" + uuid.uuid4().hex


def generate_trait_id() -> str:
    """``"trt"`` + 32 hex chars of a random uuid4."""
    return "trt" + uuid.uuid4().hex


__all__ = [
    "AppId",
    "CellId",
    "NodeId",
    "PeerId",
    "PeerIdError",
    "consistent_clock_id",
    "generate_entity_id",
    "generate_trait_id",
]
