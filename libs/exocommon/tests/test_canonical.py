import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from exocommon import canonical
from exocommon.errors import InvalidArgument


def test_deterministic_bytes_is_stable_for_maps():
    # Struct is a map<string, Value>; insertion order must not change the bytes.
    a = struct_pb2.Struct()
    b = struct_pb2.Struct()
    keys = [f"k{i}" for i in range(50)]
    for k in keys:
        a.fields[k].number_value = 1
    for k in reversed(keys):
        b.fields[k].number_value = 1
    assert canonical.deterministic_bytes(a) == canonical.deterministic_bytes(b)
    assert struct_pb2.Struct.FromString(canonical.deterministic_bytes(a)) == a


def test_deterministic_bytes_matches_plain_serialization_without_maps():
    ts = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123)
    assert canonical.deterministic_bytes(ts) == ts.SerializeToString()


def test_signing_payload_layout():
    assert canonical.signing_payload(canonical.OPERATION, b"body") == b"exocore/operation/v1\x00body"
    assert canonical.signing_payload(canonical.BLOCK, b"") == b"exocore/block/v1\x00"


def test_domains_separate_payloads():
    body = b"same bytes"
    payloads = {canonical.signing_payload(d, body) for d in canonical.DOMAINS}
    assert len(payloads) == len(canonical.DOMAINS)
    for d in canonical.DOMAINS:
        assert d.isascii() and "\x00" not in d


def test_unknown_domain_refused():
    with pytest.raises(InvalidArgument):
        canonical.signing_payload("operation/v2", b"x")


def test_auth_token_payload_has_no_domain():
    data = b"\x0a\x03abc"
    assert canonical.auth_token_signing_payload(data) == data


def test_merkle_proofs_verify_for_every_size_and_index():
    import hashlib

    from exocommon.canonical import merkle_root_and_proofs, merkle_root_from_proof

    for size in range(1, 18):
        hashes = [hashlib.sha3_256(bytes([i])).digest() for i in range(size)]
        root, proofs = merkle_root_and_proofs(hashes)
        for index, proof in enumerate(proofs):
            assert merkle_root_from_proof(hashes[index], index, size, proof) == root
            # Another leaf, another position or a truncated path does not lead to the root.
            assert merkle_root_from_proof(hashes[(index + 1) % size], index, size, proof) != root or size == 1
            if size > 1:
                assert merkle_root_from_proof(hashes[index], (index + 1) % size, size, proof) != root
                assert merkle_root_from_proof(hashes[index], index, size, proof[:-1]) != root
        assert merkle_root_from_proof(hashes[0], size, size, proofs[0]) is None


def test_peer_envelope_payload_binds_every_field():
    from exocommon.canonical import peer_envelope_payload

    base = peer_envelope_payload("cell", "a", "b", 1, b"m")
    assert base != peer_envelope_payload("cell", "ab", "", 1, b"m")
    assert base != peer_envelope_payload("cell", "a", "b", 2, b"m")
    assert base != peer_envelope_payload("cel", "a", "b", 1, b"m")
