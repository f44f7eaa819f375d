"""Base58 with the Bitcoin alphabet (the one used by keys, peer ids and auth tokens)."""

from __future__ import annotations

from exocommon.errors import InvalidArgument

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


class Base58DecodeError(InvalidArgument):
    """The text is not valid base58 (Bitcoin alphabet)."""


def b58encode(data: bytes) -> str:
    """Encode bytes; each leading zero byte becomes a leading '1'."""
    data = bytes(data)
    stripped = data.lstrip(b"\x00")
    zeros = len(data) - len(stripped)
    n = int.from_bytes(stripped, "big")
    out: list[str] = []
    while n:
        n, rem = divmod(n, 58)
        out.append(ALPHABET[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Decode text; each leading '1' becomes a leading zero byte."""
    if not isinstance(text, str):
        raise Base58DecodeError(f"base58 input must be a str, got {type(text).__name__}")
    n = 0
    for pos, c in enumerate(text):
        digit = _INDEX.get(c)
        if digit is None:
            raise Base58DecodeError(f"invalid base58 character {c!r} at position {pos}")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * zeros + body


__all__ = ["ALPHABET", "Base58DecodeError", "b58decode", "b58encode"]
