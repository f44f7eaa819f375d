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
