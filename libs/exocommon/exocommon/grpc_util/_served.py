"""How `ServiceServer` wraps every method handler: the request log line and the error mapping in one
wrapper, built once per method at registration (see `server`).

It does what `RequestLoggingInterceptor` around `ErrorMappingInterceptor` do: a handler's
`ExocoreError` ends the call with its status, any other exception with INTERNAL and generic details
(gRPC's own errors and cancellation pass through), and one line is logged per call with the final
code. As interceptors, they cost every call grpc's interceptor chain and two more coroutines.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from ._handlers import CoroBehavior, GenBehavior, wrap_handler
from .errors import _status_for
from .logging import _finish, _peer_of, _request_log


def _maps(exc: BaseException) -> bool:
    """Whether the error mapping turns `exc` into a status (else it passes through)."""
    return isinstance(exc, Exception) and not isinstance(exc, grpc.aio.BaseError)


def _peer(context: grpc.aio.ServicerContext) -> str:
    # Only read when a line may be logged (every failed call logs at INFO): it formats a string.
    return _peer_of(context) if _request_log.isEnabledFor(logging.INFO) else "?"


def served_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its async behaviour logged and its errors mapped (sync behaviours as they are)."""

    def wrap_coro(behavior: CoroBehavior) -> CoroBehavior:
        async def served(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.monotonic()
            peer = _peer(context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                if _maps(exc) and not context.done():
                    code, details = _status_for(exc, method)  # type: ignore[arg-type]
                    await context.abort(code, details)
                raise
            finally:
                _finish(method, context, start, error, peer)

        return served

    def wrap_gen(behavior: GenBehavior) -> GenBehavior:
        async def served(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.monotonic()
            peer = _peer(context)
            error: BaseException | None = None
            try:
                # aclosing: the wrapped generator's `finally` runs as soon as we stop.
                async with contextlib.aclosing(behavior(request, context)) as responses:  # type: ignore[type-var]
                    async for response in responses:
                        yield response
            except BaseException as exc:
                error = exc
                if _maps(exc) and not context.done():
                    code, details = _status_for(exc, method)  # type: ignore[arg-type]
                    await context.abort(code, details)
                raise
            finally:
                _finish(method, context, start, error, peer)

        return served

    return wrap_handler(handler, wrap_coro, wrap_gen)
