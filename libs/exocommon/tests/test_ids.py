import re

import pytest

from exocommon.base58 import b58encode
from exocommon.errors import InvalidArgument
from exocommon.ids import (
    AppId,
    CellId,
    NodeId,
    PeerId,
    PeerIdError,
    consistent_clock_id,
    generate_entity_id,
    generate_trait_id,
)
from exocommon.keys import Keypair, PublicKey

VECTORS = [
    (
        "peHozo7MdJBzjF11nYXnbojD1QLsCRv2w33jDW3fXrmgtc",
        "12D3KooWSdMxrVD1NtzjQuHyAPM9W16EqCF4wj1X1KaXRegkfdcY",
    ),
    (
        "pe2N17w6mbsfhZs8TUAGc1DtxaiX6kTottJc6eLcf3hx85",
        "12D3KooWBBNHgEMK4Zy4H1xtnsMLzh3RCr9PVVyNGCTfibowbtr1",
    ),
    (
        "pe8Fij7YgKsgoBmp9JBVd196XH1SgWMZVddhmKqBFwBVS6",
        "12D3KooWH55trgG34b4gBheip6NLutc7Vmj9PFa7bJ8MDAQq5SA2",
    ),
]


@pytest.mark.parametrize(("pk", "peer_id"), VECTORS)
def test_spec_vectors(pk, peer_id):
    pid = PeerId.from_public_key(PublicKey.decode_base58(pk))
    assert str(pid) == peer_id
    assert PeerId.from_str(peer_id) == pid
    assert pid.public_key() == PublicKey.decode_base58(pk)


def test_keypair_vector_to_node_id():
    kp = Keypair.decode_base58(
        "ae47e1cvAPimcM7dQFwUQSNXdVfhUk3q1Hua4W7AG991mT5dhYEDoixFU9WPQV7CKZDU1qTbjxk3VCZMSAVugL47Lp"
    )
    assert str(NodeId.from_public_key(kp.public_key)) == VECTORS[0][1]


def test_bytes_layout_and_round_trip():
    pk = Keypair.generate().public_key
    pid = PeerId.from_public_key(pk)
    b = pid.to_bytes()
    assert len(b) == 38
    assert b[:6] == bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
    assert b[6:] == pk.raw
    assert PeerId.from_bytes(b) == pid
    assert str(pid).startswith("12D3KooW")
    assert str(pid) == b58encode(b)


def test_aliases_are_the_same_type():
    assert NodeId is PeerId and CellId is PeerId and AppId is PeerId


def test_equality_hash_ordering():
    ids = [PeerId.from_public_key(Keypair.generate().public_key) for _ in range(10)]
    assert sorted(ids) == sorted(ids, key=str)
    again = PeerId.from_str(str(ids[0]))
    assert again == ids[0] and hash(again) == hash(ids[0])
    assert len({*ids, again}) == 10
    assert ids[0] != str(ids[0])


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "12D3KooW",
        "12D3KooWSdMxrVD1NtzjQuHyAPM9W16EqCF4wj1X1KaXRegkfdc0",  # '0' is not base58
        "12D3KooWSdMxrVD1NtzjQuHyAPM9W16EqCF4wj1X1KaXRegkfdcYY",  # too long
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash peer id (RSA keys)
    ],
)
def test_from_str_rejects(bad):
    with pytest.raises(PeerIdError) as exc:
        PeerId.from_str(bad)
    assert isinstance(exc.value, InvalidArgument)


def test_from_bytes_rejects():
    good = PeerId.from_public_key(Keypair.generate().public_key).to_bytes()
    for bad in (b"", good[:-1], good + b"\x00", b"\x12\x20" + good[2:], bytes([0, 0x24, 8, 0]) + good[4:]):
        with pytest.raises(PeerIdError):
            PeerId.from_bytes(bad)


def test_consistent_clock_id_last_byte_is_low():
    pid = PeerId.from_public_key(PublicKey.decode_base58(VECTORS[0][0]))
    b = pid.to_bytes()
    assert consistent_clock_id(pid) == (b[-2] << 8) | b[-1]
    # SPEC Appendix B's clock id 17245 is this very node's.
    assert consistent_clock_id(pid) == 17245
    raw = bytes(range(1, 31)) + b"\x12\x34"
    assert consistent_clock_id(PeerId.from_public_key(PublicKey(raw))) == 0x1234


def test_generated_ids():
    e, t = generate_entity_id(), generate_trait_id()
    assert re.fullmatch(r"et[0-9a-f]{32}", e)
    assert re.fullmatch(r"trt[0-9a-f]{32}", t)
    assert generate_entity_id() != e
