"""Auth tokens that let a client act for a cell member node (SPEC.md 1.11).

A token is an encoded `AuthToken{data, signature}` where `data` is an encoded `AuthTokenData`
(cell id, signing node id, signature date, optional expiration) and `signature` is the node's
Ed25519 signature of exactly those bytes. Its text form is base58 of the encoded `AuthToken`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from exocommon.base58 import b58decode, b58encode
from exocommon.canonical import auth_token_signing_payload
from exocommon.clock import proto_to_ns, timestamp_to_proto
from exocommon.errors import ExocoreError, Unauthenticated
from exocommon.ids import PeerId
from exocommon.keys import Keypair, PublicKey
from exocore.core import auth_pb2

NS_PER_DAY = 86_400 * 1_000_000_000


class TokenDecodeError(Unauthenticated):
    """The token is not base58 of an encoded AuthToken with a valid AuthTokenData."""


class ForeignCell(Unauthenticated):
    """The token was made for another cell."""


class UnknownNode(Unauthenticated):
    """The signing node is not a member of the cell."""


class TokenExpired(Unauthenticated):
    """The token's expiration date is not after now."""


class InvalidSignature(Unauthenticated):
    """The signature does not verify with the node's public key."""


@dataclass(frozen=True)
class AuthToken:
    cell_id: str
    node_id: PeerId
    signature_date_ns: int
    expiration_date_ns: int | None
    data: bytes
    signature: bytes

    @classmethod
    def create(
        cls, cell_id: str, keypair: Keypair, now_ns: int, expiration_ns: int | None = None
    ) -> AuthToken:
        """A token signed by `keypair`'s node; `expiration_ns` None means it never expires."""
        node_id = PeerId.from_public_key(keypair.public_key)
        token_data = auth_pb2.AuthTokenData(
            cell_id=cell_id.encode(),
            node_id=node_id.to_bytes(),
            signature_date=timestamp_to_proto(now_ns),
        )
        if expiration_ns is not None:
            token_data.expiration_date.CopyFrom(timestamp_to_proto(expiration_ns))
        data = token_data.SerializeToString()
        signature = keypair.sign(auth_token_signing_payload(data))
        return cls(cell_id, node_id, now_ns, expiration_ns, data, signature)

    def encode(self) -> bytes:
        return auth_pb2.AuthToken(data=self.data, signature=self.signature).SerializeToString()

    def encode_base58(self) -> str:
        return b58encode(self.encode())

    @classmethod
    def decode(cls, encoded: bytes) -> AuthToken:
        try:
            token = auth_pb2.AuthToken.FromString(encoded)
            token_data = auth_pb2.AuthTokenData.FromString(token.data)
            node_id = PeerId.from_bytes(token_data.node_id)
            cell_id = token_data.cell_id.decode()
        except (DecodeError, UnicodeDecodeError, ExocoreError) as exc:
            raise TokenDecodeError(f"malformed auth token: {exc}") from exc
        if not token_data.HasField("signature_date"):
            raise TokenDecodeError("malformed auth token: no signature date")
        expiration = (
            proto_to_ns(token_data.expiration_date) if token_data.HasField("expiration_date") else None
        )
        return cls(
            cell_id,
            node_id,
            proto_to_ns(token_data.signature_date),
            expiration,
            bytes(token.data),
            bytes(token.signature),
        )

    @classmethod
    def decode_base58(cls, text: str) -> AuthToken:
        try:
            encoded = b58decode(text.strip())
        except ExocoreError as exc:
            raise TokenDecodeError(f"malformed auth token: {exc}") from exc
        return cls.decode(encoded)

    def validate(self, cell_id: str, members: Mapping[str, PublicKey], now_ns: int) -> None:
        """Raises unless the token is for `cell_id`, signed by one of `members` (node id -> key),
        not expired at `now_ns` (expiration must be strictly after now) and correctly signed."""
        if self.cell_id != cell_id:
            raise ForeignCell(f"auth token is for cell {self.cell_id}, not {cell_id}")
        public_key = members.get(str(self.node_id))
        if public_key is None:
            raise UnknownNode(f"auth token signed by {self.node_id}, which is not a node of the cell")
        if self.expiration_date_ns is not None and self.expiration_date_ns <= now_ns:
            raise TokenExpired("auth token has expired")
        if not public_key.verify(auth_token_signing_payload(self.data), self.signature):
            raise InvalidSignature(f"auth token signature does not verify with {self.node_id}'s key")


def expiration_after_days(now_ns: int, days: int) -> int | None:
    """Expiration `days` after now; 0 days means no expiration (as the original's clients)."""
    return now_ns + days * NS_PER_DAY if days > 0 else None
