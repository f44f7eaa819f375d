import nacl.hash
import nacl.secret
import pytest

from exocommon.errors import InvalidArgument
from exocommon.keys import Keypair, PublicKey
from exocommon.sealed import (
    SealedPayloadError,
    derive_cell_data_key,
    open_sealed,
    open_sealed_box,
    seal,
    seal_to_public_key,
)

CELL = Keypair.decode_base58(
    "ae47e1cvAPimcM7dQFwUQSNXdVfhUk3q1Hua4W7AG991mT5dhYEDoixFU9WPQV7CKZDU1qTbjxk3VCZMSAVugL47Lp"
)


def test_derived_key_is_deterministic_and_not_the_seed():
    key = derive_cell_data_key(CELL)
    assert len(key) == 32
    assert key == derive_cell_data_key(Keypair.from_bytes(CELL.to_bytes()))
    assert key != CELL.seed
    assert key != nacl.hash.blake2b(b"", digest_size=32, key=CELL.seed, encoder=nacl.encoding.RawEncoder)
    assert derive_cell_data_key(Keypair.generate()) != key


def test_seal_round_trip_and_randomized():
    key = derive_cell_data_key(CELL)
    for msg in (b"", b"x", b"entity payload" * 1000):
        sealed = seal(key, msg)
        assert open_sealed(key, sealed) == msg
        assert msg not in sealed or len(msg) < 8  # a 1-byte message may appear in random bytes
        assert sealed[0] == 0x01
        assert len(sealed) == 1 + 24 + 16 + len(msg)
    assert seal(key, b"same") != seal(key, b"same")  # random nonce


def test_sealed_payloads_are_secret_boxes_behind_the_format_byte():
    # The format byte, then exactly what nacl's SecretBox makes (nonce, MAC + ciphertext), both ways:
    # entries sealed before (through SecretBox) and after open alike.
    key = derive_cell_data_key(CELL)
    assert nacl.secret.SecretBox(key).decrypt(seal(key, b"payload")[1:]) == b"payload"
    assert open_sealed(key, b"\x01" + bytes(nacl.secret.SecretBox(key).encrypt(b"older"))) == b"older"
    assert seal(bytearray(key), memoryview(b"views")) != b""  # bytes-like arguments, as before


def test_tampering_is_detected_everywhere():
    key = derive_cell_data_key(CELL)
    sealed = seal(key, b"secret payload")
    for i in range(1, len(sealed)):  # every nonce, MAC and ciphertext byte
        tampered = sealed[:i] + bytes([sealed[i] ^ 0x01]) + sealed[i + 1 :]
        with pytest.raises(SealedPayloadError):
            open_sealed(key, tampered)


def test_wrong_key_fails():
    sealed = seal(derive_cell_data_key(CELL), b"secret")
    with pytest.raises(SealedPayloadError, match="authentication") as exc:
        open_sealed(derive_cell_data_key(Keypair.generate()), sealed)
    assert isinstance(exc.value, InvalidArgument)


@pytest.mark.parametrize("bad", [b"", b"\x01", b"\x01" + b"\x00" * 39])
def test_short_input_fails(bad):
    with pytest.raises(SealedPayloadError):
        open_sealed(derive_cell_data_key(CELL), bad)


def test_unknown_version_and_format_mixup():
    key = derive_cell_data_key(CELL)
    sealed = seal(key, b"x")
    with pytest.raises(SealedPayloadError, match="unknown format 0x07"):
        open_sealed(key, b"\x07" + sealed[1:])
    boxed = seal_to_public_key(CELL.public_key, b"x")
    with pytest.raises(SealedPayloadError, match="public-key sealed box"):
        open_sealed(key, boxed)
    with pytest.raises(SealedPayloadError, match="secret-key sealed payload"):
        open_sealed_box(CELL, sealed)


def test_bad_key_length():
    with pytest.raises(SealedPayloadError, match="32 bytes"):
        seal(b"short", b"x")
    with pytest.raises(SealedPayloadError, match="32 bytes"):
        open_sealed(b"\x00" * 33, seal(b"\x00" * 32, b"x"))


def test_sealed_box_round_trip():
    node = Keypair.generate()
    config = b"cell config yaml\n" * 50
    boxed = seal_to_public_key(node.public_key, config)
    assert boxed[0] == 0x02
    assert open_sealed_box(node, boxed) == config
    assert open_sealed_box(node, seal_to_public_key(node.public_key, b"")) == b""


def test_sealed_box_other_recipient_and_tamper_fail():
    node = Keypair.generate()
    boxed = seal_to_public_key(node.public_key, b"cell config")
    with pytest.raises(SealedPayloadError):
        open_sealed_box(Keypair.generate(), boxed)
    for i in (1, 20, 40, len(boxed) - 1):
        with pytest.raises(SealedPayloadError):
            open_sealed_box(node, boxed[:i] + bytes([boxed[i] ^ 0x80]) + boxed[i + 1 :])
    with pytest.raises(SealedPayloadError, match="truncated"):
        open_sealed_box(node, boxed[:40])


def test_sealed_box_to_invalid_point_refused():
    # The all-zero key is a small-order point: libsodium refuses to convert it.
    with pytest.raises(SealedPayloadError, match="not a valid ed25519 point"):
        seal_to_public_key(PublicKey(b"\x00" * 32), b"x")
