"""Token checks of the gateway: every kind of bad token gets its own Unauthenticated error."""

from __future__ import annotations

import pytest

from exocommon.auth_token import (
    AuthToken,
    ForeignCell,
    InvalidSignature,
    TokenDecodeError,
    TokenExpired,
    UnknownNode,
)
from exocommon.base58 import b58encode
from exocommon.clock import MockTimeSource
from exocommon.errors import Unauthenticated
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.core import auth_pb2
from exogateway.auth import Authenticator, MissingToken, bearer_token
from exogateway.limits import Limits, LimitSettings, RequestTooLarge, TooManyCalls, TooManyStreams

NS = 1_000_000_000


def _cell_id() -> str:
    return str(PeerId.from_public_key(Keypair.generate().public_key))


@pytest.fixture
def setup():
    node = Keypair.generate()
    cell_id = _cell_id()
    clock = MockTimeSource()
    members = {str(PeerId.from_public_key(node.public_key)): node.public_key}
    return node, cell_id, clock, Authenticator(cell_id, members, clock)


def test_a_valid_token_gives_the_signing_node_identity(setup):
    node, cell_id, clock, auth = setup
    token = AuthToken.create(cell_id, node, clock.now_ns(), clock.now_ns() + 60 * NS).encode_base58()
    identity = auth.authenticate(token)
    assert identity.node_id == str(PeerId.from_public_key(node.public_key))
    assert identity.token == token
    assert auth.authenticate_metadata([("authorization", f"Bearer {token}")]) == identity
    assert auth.authenticate_metadata([("x-other", "1"), ("authorization", f"bearer {token}")]) == identity


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "Basic abc", "Bearer", "Bearer   ", "token-without-scheme"],
)
def test_missing_or_malformed_authorization_values_are_refused(value):
    with pytest.raises(MissingToken):
        bearer_token(value)


def test_no_authorization_metadata_is_refused_with_a_hint(setup):
    *_, auth = setup
    with pytest.raises(MissingToken, match="authorization: Bearer"):
        auth.authenticate_metadata([("user-agent", "x")])


def test_each_kind_of_bad_token_has_its_error(setup):
    node, cell_id, clock, auth = setup
    now = clock.now_ns()
    cases: list[tuple[str, type[Unauthenticated]]] = [
        ("not-base58-0OIl", TokenDecodeError),
        (b58encode(b"\xff\xff garbage"), TokenDecodeError),
        (b58encode(auth_pb2.AuthToken(data=b"\x01\x02", signature=b"").SerializeToString()), TokenDecodeError),
        (AuthToken.create(_cell_id(), node, now).encode_base58(), ForeignCell),
        (AuthToken.create(cell_id, Keypair.generate(), now).encode_base58(), UnknownNode),
        (AuthToken.create(cell_id, node, now - 10 * NS, now - NS).encode_base58(), TokenExpired),
        (AuthToken.create(cell_id, node, now - 10 * NS, now).encode_base58(), TokenExpired),  # strictly after now
    ]
    good = AuthToken.create(cell_id, node, now)
    forged = AuthToken(good.cell_id, good.node_id, now, None, good.data, bytes(64))
    cases.append((forged.encode_base58(), InvalidSignature))
    for text, error in cases:
        with pytest.raises(error):
            auth.authenticate(text)
    assert auth.statistics()["cached_tokens"] == 0  # refused tokens are never cached


def test_a_cached_token_still_expires(setup):
    node, cell_id, clock, auth = setup
    token = AuthToken.create(cell_id, node, clock.now_ns(), clock.now_ns() + 5 * NS).encode_base58()
    auth.authenticate(token)
    auth.authenticate(token)
    assert auth.statistics()["cached_tokens"] == 1
    clock.advance(5 * NS)
    with pytest.raises(TokenExpired):
        auth.authenticate(token)
    assert auth.statistics()["cached_tokens"] == 0


def test_removing_a_member_revokes_its_cached_tokens(setup):
    node, cell_id, clock, auth = setup
    token = AuthToken.create(cell_id, node, clock.now_ns()).encode_base58()
    auth.authenticate(token)
    auth.set_members({})
    with pytest.raises(UnknownNode):
        auth.authenticate(token)


def test_the_token_cache_is_bounded(setup):
    node, cell_id, clock, _ = setup
    auth = Authenticator(cell_id, {str(PeerId.from_public_key(node.public_key)): node.public_key}, clock, cache_max=3)
    tokens = [AuthToken.create(cell_id, node, clock.now_ns() + i).encode_base58() for i in range(5)]
    for token in tokens:
        auth.authenticate(token)
    assert auth.statistics()["cached_tokens"] == 3
    assert auth.authenticate(tokens[0]).token == tokens[0]  # evicted, validated again


def test_limits_count_per_token():
    limits = Limits(LimitSettings(request_bytes_max=10, streams_per_token_max=2, calls_per_token_max=1))
    limits.check_request_size(10)
    with pytest.raises(RequestTooLarge, match="11 bytes"):
        limits.check_request_size(11)
    with limits.stream("a"), limits.stream("a"):
        with pytest.raises(TooManyStreams), limits.stream("a"):
            pass
        with limits.stream("b"):
            assert limits.statistics()["open_streams"] == 3
    with limits.stream("a"):
        pass
    with limits.call("a"):
        with pytest.raises(TooManyCalls), limits.call("a"):
            pass
    assert limits.statistics() == {"open_streams": 0, "calls_in_flight": 0, "tokens_with_streams": 0}
    with pytest.raises(ValueError):
        LimitSettings(streams_per_token_max=0)
