import os

import pytest

from exocommon.base58 import Base58DecodeError, b58decode, b58encode
from exocommon.errors import InvalidArgument

# Bitcoin-alphabet vectors (from the base58 draft RFC / bitcoin core tests).
VECTORS = [
    (b"", ""),
    (b"\x00", "1"),
    (b"\x00\x00", "11"),
    (b"\x00\x00\x00\x01", "1112"),
    (b"Hello World!", "2NEpo7TZRRrLZSi2U"),
    (
        b"The quick brown fox jumps over the lazy dog.",
        "USm3fpXnKG5EUBx2ndxBDMPVciP5hGey2Jh4NDv6gmeo1LkMeiKrLJUUBk6Z",
    ),
    (bytes.fromhex("0000287fb4cd"), "11233QC4"),
    (bytes.fromhex("61"), "2g"),
    (bytes.fromhex("626262"), "a3gV"),
]


@pytest.mark.parametrize(("raw", "text"), VECTORS)
def test_vectors(raw, text):
    assert b58encode(raw) == text
    assert b58decode(text) == raw


def test_random_round_trips_keep_leading_zeros():
    for n in range(0, 70):
        for zeros in (0, 1, 3):
            raw = b"\x00" * zeros + os.urandom(n)
            assert b58decode(b58encode(raw)) == raw


@pytest.mark.parametrize("bad", ["0", "O", "I", "l", "abc+", "ab c", "é"])
def test_rejects_chars_outside_alphabet(bad):
    with pytest.raises(Base58DecodeError) as exc:
        b58decode(bad)
    assert isinstance(exc.value, InvalidArgument)
    assert "invalid base58 character" in str(exc.value)


def test_rejects_non_str():
    with pytest.raises(Base58DecodeError):
        b58decode(b"abc")  # type: ignore[arg-type]
