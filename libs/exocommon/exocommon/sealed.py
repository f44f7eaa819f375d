"""Sealed (encrypted + authenticated) payloads.

* Secret-key sealing (entry payloads on the chain): XSalsa20-Poly1305 (`nacl.secret.SecretBox`)
  under a key derived from the cell keypair, so a chain-only node without the cell keypair stores
  and replicates ciphertext it cannot read. Format: ``0x01 | 24-byte random nonce | MAC+ciphertext``.
* Public-key sealing (e.g. cell config sent to a joining node): anonymous `nacl.public.SealedBox`
  to the recipient's Ed25519 key converted to Curve25519. Format: ``0x02 | sealed box``.

The leading byte names the format so it can change later; the two formats use different bytes so
that handing one to the other's opener fails with a clear message.
"""

from __future__ import annotations

import os

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public
import nacl.secret
import nacl.signing

from exocommon.errors import InvalidArgument
from exocommon.keys import Keypair, PublicKey

KEY_LEN = nacl.secret.SecretBox.KEY_SIZE  # 32
SECRET_BOX_V1 = 0x01
SEALED_BOX_V1 = 0x02

_SECRET_BOX_V1_BYTE = bytes([SECRET_BOX_V1])
_NONCE_LEN = nacl.secret.SecretBox.NONCE_SIZE  # 24: random nonces do not repeat in practice
_CELL_DATA_KEY_CONTEXT = b"exocore/cell-data-key/v1"
_SECRET_BOX_MIN_LEN = 1 + nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES
_SEALED_BOX_MIN_LEN = 1 + nacl.bindings.crypto_box_SEALBYTES  # ephemeral public key + MAC


class SealedPayloadError(InvalidArgument):
    """A sealed payload cannot be opened (tampered, wrong key, truncated, unknown format)."""


def derive_cell_data_key(cell_keypair: Keypair) -> bytes:
    """32-byte payload key of a cell: keyed BLAKE2b of a fixed context under the cell seed.

    The raw seed is never used as an encryption key (it is also the signing secret); the
    versioned context lets a future key be derived without touching this one.
    """
    return nacl.hash.blake2b(
        _CELL_DATA_KEY_CONTEXT, digest_size=KEY_LEN, key=cell_keypair.seed, encoder=nacl.encoding.RawEncoder
    )


def _secret_box(key: bytes) -> nacl.secret.SecretBox:
    key = bytes(key)
    if len(key) != KEY_LEN:
        raise SealedPayloadError(f"sealing key must be {KEY_LEN} bytes, got {len(key)}")
    return nacl.secret.SecretBox(key)


def seal(key: bytes, plaintext: bytes) -> bytes:
    """Encrypt and authenticate `plaintext` under `key` (random nonce).

    The same bytes as ``SecretBox(key).encrypt`` (nonce, then MAC and ciphertext) without its objects:
    every mutation of a store's Mutate path is sealed, and the box, its nonce and `EncryptedMessage`
    cost about a third of a seal."""
    key = bytes(key)
    if len(key) != KEY_LEN:
        raise SealedPayloadError(f"sealing key must be {KEY_LEN} bytes, got {len(key)}")
    nonce = os.urandom(_NONCE_LEN)
    return _SECRET_BOX_V1_BYTE + nonce + nacl.bindings.crypto_secretbox_easy(bytes(plaintext), nonce, key)


def open_sealed(key: bytes, ciphertext: bytes) -> bytes:
    """Inverse of `seal`; raises `SealedPayloadError` if the payload was not sealed with `key` as-is."""
    box = _secret_box(key)
    data = bytes(ciphertext)
    _check_header(data, SECRET_BOX_V1, _SECRET_BOX_MIN_LEN)
    try:
        return box.decrypt(data[1:])
    except nacl.exceptions.CryptoError:
        raise SealedPayloadError("sealed payload failed authentication (tampered or wrong key)") from None


def seal_to_public_key(pk: PublicKey, data: bytes) -> bytes:
    """Encrypt `data` so that only the holder of `pk`'s keypair can read it (sender is anonymous)."""
    try:
        curve_pk = nacl.signing.VerifyKey(pk.raw).to_curve25519_public_key()
    except nacl.exceptions.CryptoError:
        # libsodium refuses small-order / off-curve points (its message is just "Unexpected library error").
        raise SealedPayloadError(
            f"public key {pk.encode_base58()} is not a valid ed25519 point; cannot encrypt to it"
        ) from None
    return bytes([SEALED_BOX_V1]) + nacl.public.SealedBox(curve_pk).encrypt(bytes(data))


def open_sealed_box(kp: Keypair, data: bytes) -> bytes:
    """Inverse of `seal_to_public_key` for the recipient keypair `kp`."""
    data = bytes(data)
    _check_header(data, SEALED_BOX_V1, _SEALED_BOX_MIN_LEN)
    box = nacl.public.SealedBox(kp.signing_key.to_curve25519_private_key())
    try:
        return box.decrypt(data[1:])
    except nacl.exceptions.CryptoError:
        raise SealedPayloadError("sealed box failed authentication (tampered or not sealed to this key)") from None


def _check_header(data: bytes, version: int, min_len: int) -> None:
    if not data:
        raise SealedPayloadError("sealed payload is empty")
    if data[0] != version:
        known = {SECRET_BOX_V1: "secret-key sealed payload", SEALED_BOX_V1: "public-key sealed box"}
        what = known.get(data[0], f"unknown format {data[0]:#04x}")
        raise SealedPayloadError(f"expected {known[version]} (format {version:#04x}), got {what}")
    if len(data) < min_len:
        raise SealedPayloadError(f"sealed payload is truncated: {len(data)} bytes, need at least {min_len}")


__all__ = [
    "KEY_LEN",
    "SealedPayloadError",
    "derive_cell_data_key",
    "open_sealed",
    "open_sealed_box",
    "seal",
    "seal_to_public_key",
]
