"""Mapping the project's error hierarchy (`exocommon.errors`) to gRPC status codes and back.

Server side: every async handler is wrapped (all four RPC kinds, coroutine and async-generator
styles) by `ServiceServer` when it registers it, or by `ErrorMappingInterceptor` (both in `_served`).
An `ExocoreError` raised by the handler ends the call with ``getattr(grpc.StatusCode,
exc.grpc_status)`` and ``str(exc)`` as details; any other exception ends it with INTERNAL and the
generic details ``"internal error"`` (the text and traceback are logged, never sent). gRPC's own
exceptions (`grpc.aio.BaseError`: the `AbortError` raised by ``context.abort``, write-after-cancel
errors, ...) and cancellation pass through untouched.

Client side: `exception_from_rpc_error(e)` turns a failed call into the matching typed error:
``raise exception_from_rpc_error(e) from e``.
"""

from __future__ import annotations

import logging

import grpc
import grpc.aio

from exocommon import errors as _errors
from exocommon.errors import ExocoreError

__all__ = ["INTERNAL_ERROR_DETAILS", "exception_from_rpc_error", "exception_from_status", "status_code_of"]

_log = logging.getLogger("exocommon.grpc.errors")

INTERNAL_ERROR_DETAILS = "internal error"


def status_code_of(exc: ExocoreError) -> grpc.StatusCode:
    """The `grpc.StatusCode` named by ``exc.grpc_status`` (UNKNOWN if the name is not a code)."""
    code = getattr(grpc.StatusCode, exc.grpc_status, None)
    if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
        return grpc.StatusCode.UNKNOWN
    return code


def _status_for(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ExocoreError):
        code = status_code_of(exc)
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            _log.error("handler failed", exc_info=exc, extra={"method": method, "code": code.name})
        return code, str(exc)
    _log.error(
        "unexpected exception in handler",
        exc_info=exc,
        extra={"method": method, "error": type(exc).__name__},
    )
    return grpc.StatusCode.INTERNAL, INTERNAL_ERROR_DETAILS


def _code_to_class() -> dict[grpc.StatusCode, type[ExocoreError]]:
    mapping: dict[grpc.StatusCode, type[ExocoreError]] = {}
    for name in _errors.__all__:
        cls = getattr(_errors, name, None)
        if isinstance(cls, type) and issubclass(cls, ExocoreError):
            code = getattr(grpc.StatusCode, cls.grpc_status, None)
            # Prefer the class that names the code directly over a subclass of it.
            if isinstance(code, grpc.StatusCode) and (code not in mapping or issubclass(mapping[code], cls)):
                mapping[code] = cls
    return mapping


_CODE_TO_CLASS = _code_to_class()


def exception_from_rpc_error(e: grpc.aio.AioRpcError | grpc.RpcError) -> ExocoreError:
    """The typed `ExocoreError` for a failed call; message = the status details.

    Codes without a class of their own (CANCELLED, UNIMPLEMENTED, OUT_OF_RANGE, DATA_LOSS, ...)
    give a plain `ExocoreError` whose message starts with the code name.
    """
    code_fn = getattr(e, "code", None)
    details_fn = getattr(e, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or ""
    if not isinstance(code, grpc.StatusCode):
        return ExocoreError(details or str(e))
    return exception_from_status(code, details)


def exception_from_status(code: grpc.StatusCode, details: str) -> ExocoreError:
    """The typed `ExocoreError` for a status (e.g. of a call over a link), as `exception_from_rpc_error`."""
    cls = _CODE_TO_CLASS.get(code)
    if cls is None:
        return ExocoreError(f"{code.name}: {details}" if details else code.name)
    return cls(details)
