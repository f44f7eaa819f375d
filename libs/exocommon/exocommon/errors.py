"""The one error hierarchy for the whole project.

Every error that may cross a process boundary derives from `ExocoreError`; its `grpc_status`
names the `grpc.StatusCode` member it maps to (a plain string, so this module does not import
grpc). Domain errors subclass the fitting class below, e.g. `KeyDecodeError(InvalidArgument)`.
"""

from __future__ import annotations


class ExocoreError(Exception):
    """Base of all project errors; the message is meant to be shown to the caller."""

    grpc_status: str = "UNKNOWN"


class InvalidArgument(ExocoreError):
    grpc_status = "INVALID_ARGUMENT"


class NotFound(ExocoreError):
    grpc_status = "NOT_FOUND"


class AlreadyExists(ExocoreError):
    grpc_status = "ALREADY_EXISTS"


class Unauthenticated(ExocoreError):
    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(ExocoreError):
    grpc_status = "PERMISSION_DENIED"


class FailedPrecondition(ExocoreError):
    grpc_status = "FAILED_PRECONDITION"


class ResourceExhausted(ExocoreError):
    grpc_status = "RESOURCE_EXHAUSTED"


class Unavailable(ExocoreError):
    grpc_status = "UNAVAILABLE"


class DeadlineExceeded(ExocoreError):
    grpc_status = "DEADLINE_EXCEEDED"


class Internal(ExocoreError):
    grpc_status = "INTERNAL"


class Aborted(ExocoreError):
    grpc_status = "ABORTED"


__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "ExocoreError",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
