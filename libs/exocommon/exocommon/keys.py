"""Ed25519 keys and their byte/text encodings (SPEC 1.1).

* public key bytes: ``b"pe" + 32-byte Ed25519 public key`` (34 bytes)
* keypair bytes:    ``b"ae" + 32-byte seed + 32-byte public key`` (66 bytes, libp2p layout)
* text forms: the two prefix chars verbatim, then base58 (Bitcoin alphabet) of the rest.

Only Ed25519 (algorithm char ``e``) is supported; ``c`` (secp256k1) is recognised only to give a
clearer error.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.exceptions
import nacl.signing

from exocommon.base58 import b58decode, b58encode
from exocommon.errors import InvalidArgument

ED25519 = "e"
_SECP256K1 = "c"
PUBLIC_PREFIX = "p"
KEYPAIR_PREFIX = "a"

SEED_LEN = 32
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64


class KeyDecodeError(InvalidArgument):
    """Bytes or text that should encode a key do not; the message says what is wrong."""


def _split(data: bytes, kind: str, prefix: str, body_len: int) -> bytes:
    """Check the 2-byte prefix of an encoded key and return its body (of exactly `body_len`)."""
    if len(data) < 3:
        raise KeyDecodeError(f"{kind} is too short: {len(data)} bytes, need a 2-byte prefix and a key")
    _check_prefix(chr(data[0]), chr(data[1]), kind, prefix)
    body = data[2:]
    if len(body) != body_len:
        raise KeyDecodeError(f"{kind} has {len(body)} key bytes after its prefix, expected {body_len}")
    return body


def _split_text(text: str, kind: str, prefix: str, body_len: int) -> bytes:
    if not isinstance(text, str):
        raise KeyDecodeError(f"{kind} text must be a str, got {type(text).__name__}")
    if len(text) < 3:
        raise KeyDecodeError(f"{kind} {text!r} is too short: need a 2-char prefix and base58 key")
    _check_prefix(text[0], text[1], kind, prefix)
    try:
        body = b58decode(text[2:])
    except InvalidArgument as e:
        raise KeyDecodeError(f"{kind} is not valid base58 after its prefix: {e}") from None
    if len(body) != body_len:
        raise KeyDecodeError(f"{kind} decodes to {len(body)} key bytes after its prefix, expected {body_len}")
    return body


def _check_prefix(first: str, algo: str, kind: str, prefix: str) -> None:
    if first != prefix:
        raise KeyDecodeError(f"{kind} must start with {prefix!r}, got {first!r}")
    if algo == _SECP256K1:
        raise KeyDecodeError(f"{kind} uses secp256k1 ('c'), which is not supported; only ed25519 ('e')")
    if algo != ED25519:
        raise KeyDecodeError(f"{kind} has unknown algorithm {algo!r}; only ed25519 ('e') is supported")


class PublicKey:
    """An Ed25519 public key. Immutable, hashable, compared by its bytes."""

    __slots__ = ("_raw", "_verify_key")

    def __init__(self, raw: bytes) -> None:
        raw = bytes(raw)
        if len(raw) != PUBLIC_KEY_LEN:
            raise KeyDecodeError(f"ed25519 public key must be {PUBLIC_KEY_LEN} bytes, got {len(raw)}")
        self._raw = raw
        self._verify_key = nacl.signing.VerifyKey(raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKey:
        return cls(_split(bytes(data), "public key", PUBLIC_PREFIX, PUBLIC_KEY_LEN))

    @classmethod
    def decode_base58(cls, text: str) -> PublicKey:
        return cls(_split_text(text, "public key", PUBLIC_PREFIX, PUBLIC_KEY_LEN))

    @property
    def raw(self) -> bytes:
        """The bare 32-byte Ed25519 key."""
        return self._raw

    def to_bytes(self) -> bytes:
        return (PUBLIC_PREFIX + ED25519).encode() + self._raw

    def encode_base58(self) -> str:
        return PUBLIC_PREFIX + ED25519 + b58encode(self._raw)

    def verify(self, msg: bytes, signature: bytes) -> bool:
        """True iff `signature` is a valid Ed25519 signature of `msg`; never raises on bad input."""
        try:
            self._verify_key.verify(bytes(msg), bytes(signature))
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True

    def generate_name(self) -> str:
        """Deterministic cosmetic ``adverb-adjective-animal`` name (not bit-exact with the original)."""
        h = hashlib.sha3_256(b"exocore/name/v1\x00" + self.to_bytes()).digest()
        return "-".join(
            words[int.from_bytes(h[i * 4 : i * 4 + 4], "big") % len(words)]
            for i, words in enumerate((_ADVERBS, _ADJECTIVES, _ANIMALS))
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self._raw == other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __str__(self) -> str:
        return self.encode_base58()

    def __repr__(self) -> str:
        return f"PublicKey({self.encode_base58()!r})"


class Keypair:
    """An Ed25519 keypair. `repr` never shows the secret."""

    __slots__ = ("_public", "_signing_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self._public = PublicKey(bytes(signing_key.verify_key))

    @classmethod
    def generate(cls) -> Keypair:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Keypair:
        seed = bytes(seed)
        if len(seed) != SEED_LEN:
            raise KeyDecodeError(f"ed25519 seed must be {SEED_LEN} bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def _from_body(cls, body: bytes) -> Keypair:
        kp = cls.from_seed(body[:SEED_LEN])
        # The layout stores the public key redundantly; a mismatch means corruption or tampering.
        if not hmac.compare_digest(kp._public.raw, body[SEED_LEN:]):
            raise KeyDecodeError("keypair's embedded public key does not match its secret seed")
        return kp

    @classmethod
    def from_bytes(cls, data: bytes) -> Keypair:
        return cls._from_body(_split(bytes(data), "keypair", KEYPAIR_PREFIX, SEED_LEN + PUBLIC_KEY_LEN))

    @classmethod
    def decode_base58(cls, text: str) -> Keypair:
        return cls._from_body(_split_text(text, "keypair", KEYPAIR_PREFIX, SEED_LEN + PUBLIC_KEY_LEN))

    @property
    def public_key(self) -> PublicKey:
        return self._public

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Secret: only for encoding and key derivation (see sealed.py)."""
        return bytes(self._signing_key)

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        """The underlying PyNaCl key (for Curve25519 conversion in sealed.py)."""
        return self._signing_key

    def to_bytes(self) -> bytes:
        return (KEYPAIR_PREFIX + ED25519).encode() + self.seed + self._public.raw

    def encode_base58(self) -> str:
        return KEYPAIR_PREFIX + ED25519 + b58encode(self.seed + self._public.raw)

    def sign(self, msg: bytes) -> bytes:
        """64-byte Ed25519 signature of `msg`."""
        return self._signing_key.sign(bytes(msg)).signature

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keypair) and hmac.compare_digest(self.seed, other.seed)

    def __hash__(self) -> int:
        return hash(self._public)

    def __repr__(self) -> str:
        return f"Keypair(public_key={self._public.encode_base58()!r})"


# Small built-in word lists for generate_name (64 each -> 262,144 names).
_ADVERBS = (
    "ably amply aptly boldly briskly calmly cleanly closely deftly duly eagerly early easily "
    "evenly fairly firmly fondly freely fully gently gladly grandly hardly highly humbly "
    "jointly justly keenly kindly largely lightly loosely loudly mainly merely mildly neatly "
    "newly nicely openly partly plainly politely poorly presently promptly properly proudly "
    "quickly quietly rapidly rarely really safely sharply simply slowly smoothly softly solely "
    "surely swiftly truly wholly"
).split()
_ADJECTIVES = (
    "able amazed amused bold brave bright calm clean clever cool crisp curious daring eager "
    "easy epic fair famous fancy fine fit fresh funny gentle giving glad golden good grand "
    "happy hardy honest humble jolly keen kind large lively loyal lucky merry mighty modest "
    "neat noble polite proud quick quiet rapid ready robust safe sharp shiny smart snappy solid "
    "steady sunny swift tidy vivid witty"
).split()
_ANIMALS = (
    "alpaca badger beaver bison bobcat camel caribou cheetah cobra condor corgi coyote crane "
    "dingo dolphin eagle falcon ferret finch gannet gazelle gecko gibbon gopher heron hyena "
    "ibex iguana impala jackal jaguar koala lemur leopard llama lynx magpie marmot marten mink "
    "moose narwhal newt ocelot osprey otter owl panda parrot pelican penguin puffin quail "
    "rabbit raven salmon seal sparrow stork tapir toucan walrus wombat zebra"
).split()

__all__ = ["KeyDecodeError", "Keypair", "PublicKey"]
