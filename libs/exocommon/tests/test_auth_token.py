import pytest

from exocommon.auth_token import (
    AuthToken,
    ForeignCell,
    InvalidSignature,
    TokenDecodeError,
    TokenExpired,
    UnknownNode,
    expiration_after_days,
)
from exocommon.errors import Unauthenticated
from exocommon.ids import PeerId
from exocommon.keys import Keypair

NOW = 1_700_000_000 * 1_000_000_000
CELL = str(PeerId.from_public_key(Keypair.generate().public_key))


@pytest.fixture
def node():
    keypair = Keypair.generate()
    return keypair, {str(PeerId.from_public_key(keypair.public_key)): keypair.public_key}


def test_fresh_token_is_valid_and_round_trips(node):
    keypair, members = node
    token = AuthToken.create(CELL, keypair, NOW, NOW + 10**9)
    decoded = AuthToken.decode_base58(token.encode_base58())
    assert decoded == token
    assert decoded.cell_id == CELL and decoded.node_id == PeerId.from_public_key(keypair.public_key)
    decoded.validate(CELL, members, NOW)


def test_expiration_is_strictly_after_now(node):
    keypair, members = node
    token = AuthToken.create(CELL, keypair, NOW, NOW + 100_000_000)
    token.validate(CELL, members, NOW + 99_999_999)
    with pytest.raises(TokenExpired):
        token.validate(CELL, members, NOW + 100_000_000)


def test_no_expiration_never_expires(node):
    keypair, members = node
    token = AuthToken.create(CELL, keypair, NOW, expiration_after_days(NOW, 0))
    assert token.expiration_date_ns is None
    AuthToken.decode(token.encode()).validate(CELL, members, NOW * 10)


def test_modified_or_empty_signature_is_invalid(node):
    keypair, members = node
    token = AuthToken.create(CELL, keypair, NOW)
    tampered = bytes([token.signature[0] ^ 1]) + token.signature[1:]
    for signature in (tampered, b""):
        bad = AuthToken.decode(AuthToken(**{**token.__dict__, "signature": signature}).encode())
        with pytest.raises(InvalidSignature):
            bad.validate(CELL, members, NOW)


def test_modified_data_is_invalid(node):
    keypair, members = node
    token = AuthToken.create(CELL, keypair, NOW, NOW + 10**9)
    later = AuthToken.create(CELL, keypair, NOW, NOW + 10**12)
    forged = AuthToken.decode(AuthToken(**{**later.__dict__, "signature": token.signature}).encode())
    with pytest.raises(InvalidSignature):
        forged.validate(CELL, members, NOW)


def test_unknown_node_and_foreign_cell_are_distinct_errors(node):
    keypair, members = node
    stranger = AuthToken.create(CELL, Keypair.generate(), NOW)
    with pytest.raises(UnknownNode):
        stranger.validate(CELL, members, NOW)
    other_cell = AuthToken.create("12D3KooWOther", keypair, NOW)
    with pytest.raises(ForeignCell):
        other_cell.validate(CELL, members, NOW)


@pytest.mark.parametrize("text", ["", "0OIl", "abc", "3mJr7AoUXx2Wqd"])
def test_malformed_tokens_are_unauthenticated(text):
    with pytest.raises(TokenDecodeError) as info:
        AuthToken.decode_base58(text)
    assert isinstance(info.value, Unauthenticated)
