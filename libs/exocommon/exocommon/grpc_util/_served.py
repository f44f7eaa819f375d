"""How every served method handler is wrapped: the request log line and the error mapping in one
wrapper, built once per method. `ServiceServer` wraps each handler so when it registers it (see
`server`); `RequestLoggingInterceptor` and `ErrorMappingInterceptor` are the same wrapper, one half
each, as interceptors for other grpc.aio servers.

A handler's `ExocoreError` ends the call with its status, any other exception with INTERNAL and generic
details (gRPC's own errors and cancellation pass through), and one line is logged per call with the
final code. As interceptors they cost every call grpc's interceptor chain and one more coroutine each:
a `ServiceServer` does not use them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from ._handlers import CoroBehavior, GenBehavior, WrappedHandlers, wrap_handler
from .errors import _status_for
from .logging import _finish, _peer_of, _request_log, log_unimplemented

__all__ = ["ErrorMappingInterceptor", "RequestLoggingInterceptor", "served_handler"]


def _maps(exc: BaseException) -> bool:
    """Whether the error mapping turns `exc` into a status (else it passes through)."""
    return isinstance(exc, Exception) and not isinstance(exc, grpc.aio.BaseError)


def _peer(context: grpc.aio.ServicerContext) -> str:
    # Only read when a line may be logged (every failed call logs at INFO): it formats a string.
    return _peer_of(context) if _request_log.isEnabledFor(logging.INFO) else "?"


def served_handler(
    method: str, handler: grpc.RpcMethodHandler, *, log: bool = True, map_errors: bool = True
) -> grpc.RpcMethodHandler:
    """`handler` with its async behaviour logged (`log`) and its errors mapped (`map_errors`); sync
    behaviours as they are."""

    def wrap_coro(behavior: CoroBehavior) -> CoroBehavior:
        async def served(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.monotonic()
            peer = _peer(context) if log else ""
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                if map_errors and _maps(exc) and not context.done():
                    code, details = _status_for(exc, method)  # type: ignore[arg-type]
                    await context.abort(code, details)
                raise
            finally:
                if log:
                    _finish(method, context, start, error, peer)

        return served

    def wrap_gen(behavior: GenBehavior) -> GenBehavior:
        async def served(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.monotonic()
            peer = _peer(context) if log else ""
            error: BaseException | None = None
            try:
                # aclosing: the wrapped generator's `finally` runs as soon as we stop.
                async with contextlib.aclosing(behavior(request, context)) as responses:  # type: ignore[type-var]
                    async for response in responses:
                        yield response
            except BaseException as exc:
                error = exc
                if map_errors and _maps(exc) and not context.done():
                    code, details = _status_for(exc, method)  # type: ignore[arg-type]
                    await context.abort(code, details)
                raise
            finally:
                if log:
                    _finish(method, context, start, error, peer)

        return served

    return wrap_handler(handler, wrap_coro, wrap_gen)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Server interceptor turning handler exceptions into gRPC statuses (see `exocommon.grpc_util.errors`)."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        return self._wrapped.get(method, handler, lambda: served_handler(method, handler, log=False))


class RequestLoggingInterceptor(grpc.aio.ServerInterceptor):
    """Server interceptor logging one line per call (see `exocommon.grpc_util.logging`). It should be
    the outermost interceptor so it sees the status set by `ErrorMappingInterceptor`."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = await continuation(handler_call_details)
        if handler is None:
            log_unimplemented(method)
            return handler
        return self._wrapped.get(method, handler, lambda: served_handler(method, handler, map_errors=False))
