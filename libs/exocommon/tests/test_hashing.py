import hashlib
import io

import pytest

from exocommon.base58 import b58decode
from exocommon.errors import InvalidArgument
from exocommon.hashing import (
    Crc64,
    MultihashError,
    Sha3Multihasher,
    check_multihash,
    crc64_ecma_182,
    crc64_of_u64s,
    multihash_file,
    multihash_sha3_256,
    multihash_to_base58,
    verify,
)

# SHA3-256("") per FIPS 202.
SHA3_EMPTY = bytes.fromhex("a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a")


def test_multihash_layout():
    mh = multihash_sha3_256(b"")
    assert len(mh) == 34
    assert mh[:2] == b"\x16\x20"
    assert mh[2:] == SHA3_EMPTY


def test_streaming_equals_one_shot():
    data = bytes(range(256)) * 1000
    h = Sha3Multihasher()
    for i in range(0, len(data), 777):
        h.update(data[i : i + 777])
    assert h.digest() == multihash_sha3_256(data)
    assert Sha3Multihasher().update_file(io.BytesIO(data)).digest() == multihash_sha3_256(data)


def test_multihash_file(tmp_path):
    p = tmp_path / "module.wasm"
    p.write_bytes(b"\x00asm" + b"x" * 200_000)
    assert multihash_file(p) == multihash_sha3_256(p.read_bytes())


def test_verify():
    mh = multihash_sha3_256(b"hello")
    assert verify(b"hello", mh)
    assert not verify(b"hellO", mh)
    tampered = mh[:-1] + bytes([mh[-1] ^ 1])
    assert not verify(b"hello", tampered)
    # Malformed expectations are just False, not an exception.
    assert not verify(b"hello", b"")
    assert not verify(b"hello", b"\x14\x20" + mh[2:])
    assert not verify(b"hello", mh[:-1])


def test_base58_text_form():
    mh = multihash_sha3_256(b"abc")
    text = multihash_to_base58(mh)
    assert b58decode(text) == mh
    with pytest.raises(MultihashError):
        multihash_to_base58(b"\x16\x20" + b"\x00" * 31)
    with pytest.raises(MultihashError):
        check_multihash(b"\x12\x20" + hashlib.sha256(b"abc").digest())


def test_crc64_ecma_182_check_value():
    assert crc64_ecma_182(b"123456789") == 0x6C40DF5F0B497347
    assert crc64_ecma_182(b"") == 0


def test_crc64_incremental_matches_one_shot():
    data = b"The quick brown fox jumps over the lazy dog"
    c = Crc64()
    for i in range(0, len(data), 5):
        c.update(data[i : i + 5])
    assert c.digest() == crc64_ecma_182(data)


def test_crc64_u64_little_endian():
    values = [0, 1, 0x0102030405060708, 2**64 - 1]
    expected = crc64_ecma_182(b"".join(v.to_bytes(8, "little") for v in values))
    assert crc64_of_u64s(values) == expected
    # Order matters (it is used for ordered result sets).
    assert crc64_of_u64s(reversed(values)) != expected
    # Not big-endian.
    assert crc64_of_u64s([1]) != crc64_ecma_182((1).to_bytes(8, "big"))


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_crc64_u64_range(bad):
    with pytest.raises(InvalidArgument) as exc:
        Crc64().update_u64(bad)
    assert "u64" in str(exc.value)
