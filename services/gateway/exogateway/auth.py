"""Client authentication: auth tokens (SPEC.md 1.11) checked against the cell's member nodes.

A client sends its token as ``authorization: Bearer <base58 token>`` gRPC metadata, or on the HTTP
endpoints as ``?token=<base58>`` or the same header. `Authenticator.authenticate(text)` returns the
client's `Identity` or raises one of the `exocommon.auth_token` errors, all `Unauthenticated`:

| error | why |
| --- | --- |
| `MissingToken` | no token at all, or an `authorization` value that is not ``Bearer <token>`` |
| `TokenDecodeError` | not base58 of an encoded `AuthToken` with a valid `AuthTokenData` |
| `ForeignCell` | made for another cell |
| `UnknownNode` | signed by a node that is not a member of the cell |
| `TokenExpired` | expiration date not after now |
| `InvalidSignature` | the signature does not verify with the node's public key |

Verifying an Ed25519 signature costs tens of microseconds, so a token that validated is cached (by its
text, bounded, oldest evicted first) with its expiration, which is still checked on every call. The
cache is emptied when the cell's members change (`set_members`), so a removed node's tokens stop working
at the next reload of the cell configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exocommon.auth_token import AuthToken, TokenExpired
from exocommon.clock import SystemTimeSource, TimeSource
from exocommon.errors import Unauthenticated
from exocommon.keys import PublicKey

__all__ = ["TOKEN_CACHE_MAX", "Authenticator", "Identity", "MissingToken", "bearer_token"]

TOKEN_CACHE_MAX = 10_000

MISSING_TOKEN_HINT = (
    "send an auth token as `authorization: Bearer <token>` metadata "
    "(make one with `exo cell generate-auth-token`)"
)


class MissingToken(Unauthenticated):
    """No token in the request, or an `authorization` value that is not ``Bearer <token>``."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a validated token speaks for."""

    token: str
    node_id: str
    expiration_ns: int | None


def bearer_token(value: str | None) -> str:
    """The token of an ``authorization`` value ``Bearer <token>`` (scheme case-insensitive)."""
    if value is None or not value.strip():
        raise MissingToken(f"missing auth token: {MISSING_TOKEN_HINT}")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise MissingToken(f"malformed authorization metadata: expected `Bearer <token>`, got {_preview(value)}")
    return token


def _preview(value: str, limit: int = 20) -> str:
    value = value.strip()
    return repr(value if len(value) <= limit else value[:limit] + "...")


class Authenticator:
    """Validates tokens for one cell (see module docstring)."""

    def __init__(
        self,
        cell_id: str,
        members: Mapping[str, PublicKey],
        time_source: TimeSource | None = None,
        cache_max: int = TOKEN_CACHE_MAX,
    ) -> None:
        if cache_max < 1:
            raise ValueError("cache_max must be at least 1")
        self.cell_id = cell_id
        self._members = dict(members)
        self._time = time_source or SystemTimeSource()
        self._cache: dict[str, Identity] = {}
        self._cache_max = cache_max

    @property
    def members(self) -> Mapping[str, PublicKey]:
        return self._members

    def set_members(self, members: Mapping[str, PublicKey]) -> None:
        """New member list (node id -> public key); forgets every validated token if it changed."""
        new = dict(members)
        if new != self._members:
            self._members = new
            self._cache.clear()

    def authenticate_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Identity:
        """The identity of gRPC invocation metadata's ``authorization: Bearer <token>``."""
        value: str | None = None
        for key, item in metadata or ():
            if key == "authorization":
                value = item.decode(errors="replace") if isinstance(item, bytes) else item
                break
        return self.authenticate(bearer_token(value))

    def authenticate(self, token: str) -> Identity:
        now = self._time.now_ns()
        identity = self._cache.get(token)
        if identity is not None:
            if identity.expiration_ns is not None and identity.expiration_ns <= now:
                del self._cache[token]
                raise TokenExpired("auth token has expired")
            return identity
        if not token:
            raise MissingToken(f"missing auth token: {MISSING_TOKEN_HINT}")
        decoded = AuthToken.decode_base58(token)
        decoded.validate(self.cell_id, self._members, now)
        identity = Identity(token, str(decoded.node_id), decoded.expiration_date_ns)
        if len(self._cache) >= self._cache_max:
            del self._cache[next(iter(self._cache))]  # oldest first (dicts keep insertion order)
        self._cache[token] = identity
        return identity

    def statistics(self) -> dict[str, int]:
        return {"cached_tokens": len(self._cache), "members": len(self._members)}
