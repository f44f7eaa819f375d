import pytest

from exocommon.base58 import b58encode
from exocommon.errors import InvalidArgument
from exocommon.keys import KeyDecodeError, Keypair, PublicKey

VECTOR_KEYPAIR = "ae47e1cvAPimcM7dQFwUQSNXdVfhUk3q1Hua4W7AG991mT5dhYEDoixFU9WPQV7CKZDU1qTbjxk3VCZMSAVugL47Lp"
VECTOR_PUBLIC = "peHozo7MdJBzjF11nYXnbojD1QLsCRv2w33jDW3fXrmgtc"


def test_vector_keypair_decodes_to_its_public_key():
    kp = Keypair.decode_base58(VECTOR_KEYPAIR)
    assert kp.public_key.encode_base58() == VECTOR_PUBLIC
    assert kp.public_key == PublicKey.decode_base58(VECTOR_PUBLIC)
    assert kp.encode_base58() == VECTOR_KEYPAIR
    # The last 32 of the 64 key bytes are the public key.
    assert b58encode(kp.to_bytes()[2 + 32 :]) == VECTOR_PUBLIC[2:]


def test_byte_layouts():
    kp = Keypair.from_seed(bytes(range(32)))
    kb = kp.to_bytes()
    assert len(kb) == 66 and kb[:2] == b"ae" and kb[2:34] == bytes(range(32))
    assert kb[34:] == kp.public_key.raw
    pb = kp.public_key.to_bytes()
    assert len(pb) == 34 and pb[:2] == b"pe" and pb[2:] == kp.public_key.raw
    assert len(kp.public_key.raw) == 32


def test_round_trips():
    kp = Keypair.generate()
    assert Keypair.from_bytes(kp.to_bytes()) == kp
    assert Keypair.decode_base58(kp.encode_base58()) == kp
    pk = kp.public_key
    assert PublicKey.from_bytes(pk.to_bytes()) == pk
    assert PublicKey.decode_base58(pk.encode_base58()) == pk
    assert hash(PublicKey.decode_base58(pk.encode_base58())) == hash(pk)
    assert pk.encode_base58().startswith("pe") and kp.encode_base58().startswith("ae")
    assert Keypair.generate() != kp


def test_repr_hides_secret():
    kp = Keypair.decode_base58(VECTOR_KEYPAIR)
    assert VECTOR_KEYPAIR[2:] not in repr(kp)
    assert VECTOR_PUBLIC in repr(kp)


def test_sign_verify():
    kp = Keypair.generate()
    msg = b"hello exocore"
    sig = kp.sign(msg)
    assert len(sig) == 64
    assert kp.public_key.verify(msg, sig)
    assert not kp.public_key.verify(msg + b"!", sig)
    assert not kp.public_key.verify(msg, bytes([sig[0] ^ 1]) + sig[1:])
    assert not kp.public_key.verify(msg, b"")
    assert not kp.public_key.verify(msg, sig[:-1])
    assert not Keypair.generate().public_key.verify(msg, sig)


@pytest.mark.parametrize("text", ["", "a", "ae", "aeb"])
def test_keypair_decode_too_short(text):
    with pytest.raises(KeyDecodeError):
        Keypair.decode_base58(text)


@pytest.mark.parametrize("text", ["", "p", "pe", "peb"])
def test_public_decode_too_short(text):
    with pytest.raises(KeyDecodeError):
        PublicKey.decode_base58(text)


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x00\x00", b"\x00\x00\x00"])
def test_raw_decode_too_short(raw):
    with pytest.raises(KeyDecodeError):
        Keypair.from_bytes(raw)
    with pytest.raises(KeyDecodeError):
        PublicKey.from_bytes(raw)


def test_decode_errors_say_what_is_wrong():
    kp = Keypair.generate()
    pk_text = kp.public_key.encode_base58()
    cases = [
        (lambda: PublicKey.decode_base58("ae" + pk_text[2:]), "must start with 'p'"),
        (lambda: Keypair.decode_base58(pk_text), "must start with 'a'"),
        (lambda: PublicKey.decode_base58("px" + pk_text[2:]), "unknown algorithm 'x'"),
        (lambda: PublicKey.decode_base58("pc" + pk_text[2:]), "secp256k1"),
        # 33 bytes (a digit appended to the text is not enough: for 1 key in 58 it still decodes to 32)
        (lambda: PublicKey.decode_base58("pe" + b58encode(b"\xff" + kp.public_key.raw)), "expected 32"),
        (lambda: PublicKey.decode_base58("pe" + b58encode(b"\x05" * 31)), "expected 32"),
        (lambda: PublicKey.decode_base58(pk_text[:-1] + "0"), "not valid base58"),
        (lambda: Keypair.from_bytes(kp.to_bytes()[:-1]), "expected 64"),
        (lambda: PublicKey.from_bytes(b"pe" + b"\x01" * 33), "expected 32"),
        (lambda: PublicKey.from_bytes(b"xe" + b"\x01" * 32), "must start with 'p'"),
        (lambda: Keypair.from_bytes(b"aq" + b"\x01" * 64), "unknown algorithm 'q'"),
        (lambda: Keypair.from_seed(b"\x01" * 31), "32 bytes"),
    ]
    for fn, needle in cases:
        with pytest.raises(KeyDecodeError) as exc:
            fn()
        assert isinstance(exc.value, InvalidArgument)
        assert needle in str(exc.value), (needle, str(exc.value))


def test_keypair_with_mismatched_public_key_rejected():
    a, b = Keypair.generate(), Keypair.generate()
    forged = b"ae" + a.seed + b.public_key.raw
    with pytest.raises(KeyDecodeError, match="does not match"):
        Keypair.from_bytes(forged)
    with pytest.raises(KeyDecodeError, match="does not match"):
        Keypair.decode_base58("ae" + b58encode(forged[2:]))


def test_generate_name_is_deterministic_and_varies():
    pk = PublicKey.decode_base58(VECTOR_PUBLIC)
    name = pk.generate_name()
    assert name == PublicKey.decode_base58(VECTOR_PUBLIC).generate_name()
    parts = name.split("-")
    assert len(parts) == 3 and all(p.isalpha() and p.islower() for p in parts)
    names = {Keypair.generate().public_key.generate_name() for _ in range(50)}
    assert len(names) > 40


def test_name_word_lists_have_no_duplicates():
    from exocommon import keys

    for words in (keys._ADVERBS, keys._ADJECTIVES, keys._ANIMALS):
        assert len(words) == len(set(words)) == 64
