"""The one place that defines the bytes of anything hashed or signed.

Anything that is hashed or signed must get its bytes from a function here, so that two nodes
(or two versions of this code) never disagree about what was signed.

Signing payloads are domain separated: ``b"exocore/" + <domain> + b"\\x00" + <body>``. The domain
names what is signed and its format version, so a signature made for one purpose (e.g. an
operation) can never be replayed as another (e.g. a block). The NUL byte ends the domain; domains
are ASCII constants below and never contain NUL, so the framing is unambiguous.

Exception — auth tokens: to stay compatible with the original (SPEC 1.11) and with clients that
produce tokens themselves, an auth token signature is plain Ed25519 over the raw encoded
``AuthTokenData`` bytes, with NO domain prefix (see `auth_token_signing_payload`).
"""

from __future__ import annotations

from google.protobuf.message import Message

from exocommon.errors import InvalidArgument

_PREFIX = b"exocore/"
_SEPARATOR = b"\x00"

# Domains (bump the version suffix whenever the body format of a domain changes).
OPERATION = "operation/v1"
BLOCK = "block/v1"
GENESIS = "genesis/v1"

DOMAINS = frozenset({OPERATION, BLOCK, GENESIS})


def deterministic_bytes(msg: Message) -> bytes:
    """Protobuf bytes with deterministic map ordering, for hashing/signing a message.

    Only stable within one protobuf runtime and schema; for data that is verified by other nodes,
    hash/sign the bytes that were actually transmitted and stored rather than re-serializing.
    """
    return msg.SerializeToString(deterministic=True)


def signing_payload(domain: str, body: bytes) -> bytes:
    """The exact bytes to sign (and verify) for `body` in `domain`."""
    if domain not in DOMAINS:
        # A typo'd domain would silently create signatures nobody verifies; refuse it.
        raise InvalidArgument(f"unknown signing domain {domain!r}")
    return _PREFIX + domain.encode("ascii") + _SEPARATOR + bytes(body)


def auth_token_signing_payload(encoded_token_data: bytes) -> bytes:
    """Auth tokens sign the raw encoded AuthTokenData bytes, no domain (original format, SPEC 1.11)."""
    return bytes(encoded_token_data)


__all__ = [
    "BLOCK",
    "DOMAINS",
    "GENESIS",
    "OPERATION",
    "auth_token_signing_payload",
    "deterministic_bytes",
    "signing_payload",
]
