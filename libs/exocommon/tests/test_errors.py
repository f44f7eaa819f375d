import pytest

from exocommon import errors
from exocommon.errors import ExocoreError, InvalidArgument

EXPECTED = {
    "InvalidArgument": "INVALID_ARGUMENT",
    "NotFound": "NOT_FOUND",
    "AlreadyExists": "ALREADY_EXISTS",
    "Unauthenticated": "UNAUTHENTICATED",
    "PermissionDenied": "PERMISSION_DENIED",
    "FailedPrecondition": "FAILED_PRECONDITION",
    "ResourceExhausted": "RESOURCE_EXHAUSTED",
    "Unavailable": "UNAVAILABLE",
    "DeadlineExceeded": "DEADLINE_EXCEEDED",
    "Internal": "INTERNAL",
    "Aborted": "ABORTED",
}


@pytest.mark.parametrize(("name", "status"), sorted(EXPECTED.items()))
def test_each_error_names_its_grpc_status(name, status):
    cls = getattr(errors, name)
    assert issubclass(cls, ExocoreError)
    assert cls.grpc_status == status
    assert cls("boom").grpc_status == status


def test_domain_subclass_inherits_status_and_message():
    class KeyBad(InvalidArgument):
        pass

    e = KeyBad("key is bad")
    assert isinstance(e, ExocoreError)
    assert e.grpc_status == "INVALID_ARGUMENT"
    assert str(e) == "key is bad"


def test_status_names_are_grpc_status_code_members():
    grpc = pytest.importorskip("grpc")
    for status in [*EXPECTED.values(), ExocoreError.grpc_status]:
        assert status in grpc.StatusCode.__members__
