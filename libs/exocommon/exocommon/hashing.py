"""Hashes used across the project (SPEC 1.10, Appendix B).

* SHA3-256 multihash: ``0x16 0x20 <32-byte digest>`` (34 bytes); text form is base58 of those bytes.
  Used for operation frames, block headers, operations hashes, sync range hashes and app modules.
* CRC-64/ECMA-182 (the ``crc`` crate's ``CRC_64_ECMA_182``): cheap non-cryptographic hash of
  entity/result sets, fed u64 values as 8-byte little-endian.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from exocommon.base58 import b58encode
from exocommon.errors import InvalidArgument

SHA3_256_CODE = 0x16
SHA3_256_DIGEST_LEN = 32
SHA3_256_PREFIX = bytes([SHA3_256_CODE, SHA3_256_DIGEST_LEN])
MULTIHASH_SHA3_256_LEN = len(SHA3_256_PREFIX) + SHA3_256_DIGEST_LEN  # 34

_FILE_CHUNK = 1 << 16


class MultihashError(InvalidArgument):
    """Bytes that should be a SHA3-256 multihash are not one."""


def multihash_sha3_256(data: bytes) -> bytes:
    """The 34-byte SHA3-256 multihash of `data`."""
    return SHA3_256_PREFIX + hashlib.sha3_256(data).digest()


class Sha3Multihasher:
    """Streaming SHA3-256 multihash, for data too large to hold at once (files, frame sequences)."""

    def __init__(self) -> None:
        self._h = hashlib.sha3_256()

    def update(self, data: bytes) -> Sha3Multihasher:
        self._h.update(data)
        return self

    def update_file(self, f: BinaryIO) -> Sha3Multihasher:
        """Feed a binary file object to its end, in chunks."""
        while chunk := f.read(_FILE_CHUNK):
            self._h.update(chunk)
        return self

    def digest(self) -> bytes:
        """The multihash of everything fed so far (the hasher may still be fed afterwards)."""
        return SHA3_256_PREFIX + self._h.digest()


def multihash_file(path: str | Path) -> bytes:
    """SHA3-256 multihash of a file's content (app module integrity)."""
    with open(path, "rb") as f:
        return Sha3Multihasher().update_file(f).digest()


def check_multihash(mh: bytes) -> bytes:
    """Return `mh` if it is a well-formed SHA3-256 multihash, else raise `MultihashError`."""
    if len(mh) != MULTIHASH_SHA3_256_LEN:
        raise MultihashError(f"SHA3-256 multihash must be {MULTIHASH_SHA3_256_LEN} bytes, got {len(mh)}")
    if mh[:2] != SHA3_256_PREFIX:
        raise MultihashError(
            f"unsupported multihash prefix {mh[:2].hex()} (expected {SHA3_256_PREFIX.hex()}, SHA3-256)"
        )
    return mh


def multihash_to_base58(mh: bytes) -> str:
    return b58encode(check_multihash(mh))


def verify(data: bytes, expected: bytes) -> bool:
    """True iff `expected` is the SHA3-256 multihash of `data`; malformed `expected` is just False."""
    if len(expected) != MULTIHASH_SHA3_256_LEN or expected[:2] != SHA3_256_PREFIX:
        return False
    return hmac.compare_digest(multihash_sha3_256(data), expected)


# --- CRC-64/ECMA-182 -------------------------------------------------------------------------

CRC64_ECMA_182_POLY = 0x42F0E1EBA9EA3693
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def _make_crc64_table() -> tuple[int, ...]:
    # MSB-first (non-reflected) table: entry i is the CRC register after shifting byte i through.
    table = []
    for i in range(256):
        crc = i << 56
        for _ in range(8):
            crc = ((crc << 1) ^ CRC64_ECMA_182_POLY) if crc & (1 << 63) else (crc << 1)
            crc &= _MASK64
        table.append(crc)
    return tuple(table)


_CRC64_TABLE = _make_crc64_table()


class Crc64:
    """Incremental CRC-64/ECMA-182 (init 0, no reflection, xorout 0)."""

    __slots__ = ("_crc",)

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes) -> Crc64:
        crc = self._crc
        table = _CRC64_TABLE
        for b in data:
            crc = table[((crc >> 56) ^ b) & 0xFF] ^ ((crc << 8) & _MASK64)
        self._crc = crc
        return self

    def update_u64(self, value: int) -> Crc64:
        """Feed a u64 as 8 little-endian bytes, as the original does on x86/ARM."""
        if not 0 <= value <= _MASK64:
            raise InvalidArgument(f"value {value} does not fit in a u64")
        return self.update(value.to_bytes(8, "little"))

    def digest(self) -> int:
        return self._crc


def crc64_ecma_182(data: bytes) -> int:
    return Crc64().update(data).digest()


def crc64_of_u64s(values: Iterable[int]) -> int:
    """CRC-64/ECMA-182 over a sequence of u64 values (entity/result hashes)."""
    crc = Crc64()
    for v in values:
        crc.update_u64(v)
    return crc.digest()


__all__ = [
    "CRC64_ECMA_182_POLY",
    "MULTIHASH_SHA3_256_LEN",
    "SHA3_256_CODE",
    "SHA3_256_PREFIX",
    "Crc64",
    "MultihashError",
    "Sha3Multihasher",
    "check_multihash",
    "crc64_ecma_182",
    "crc64_of_u64s",
    "multihash_file",
    "multihash_sha3_256",
    "multihash_to_base58",
    "verify",
]
