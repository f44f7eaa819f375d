"""Rebuilding a `grpc.RpcMethodHandler` with wrapped behaviours (private helper for interceptors).

grpc.aio picks the calling convention from the *type* of the behaviour function:

* ``async def`` (coroutine function): awaited; for streaming responses it uses ``context.write``;
* ``async def ... yield`` (async generator function): iterated, each item written;
* anything else: a sync handler, run in the server's thread pool (with a sync context).

So a wrapper must have the same kind as what it wraps. `wrap_handler` asks the caller for a
coroutine wrapper or an async-generator wrapper accordingly, and leaves sync behaviours alone.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

# (request_or_iterator, context) -> awaitable result
CoroBehavior = Callable[[Any, Any], Awaitable[Any]]
# (request_or_iterator, context) -> async iterator of responses
GenBehavior = Callable[[Any, Any], AsyncIterator[Any]]


def is_async_behavior(behavior: object) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_coro: Callable[[CoroBehavior], CoroBehavior],
    wrap_gen: Callable[[GenBehavior], GenBehavior],
) -> grpc.RpcMethodHandler:
    """Returns a handler equivalent to `handler` whose async behaviour is wrapped."""

    def wrap(behavior: Any) -> Any:
        if inspect.isasyncgenfunction(behavior):
            return wrap_gen(behavior)
        if inspect.iscoroutinefunction(behavior):
            return wrap_coro(behavior)
        return behavior  # sync behaviour: runs in a thread pool, leave it as is

    des = handler.request_deserializer
    ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), des, ser)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), des, ser)


class WrappedHandlers:
    """Per interceptor: the wrapped handler of each method, built once. The handler a method
    resolves to does not change while a server runs, and rebuilding it (inspecting the behaviour,
    new closures, a new handler) on every call cost a measurable share of a short call."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self, method: str, handler: grpc.RpcMethodHandler, build: Callable[[], grpc.RpcMethodHandler]
    ) -> grpc.RpcMethodHandler:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = build()
        self._by_method[method] = (handler, wrapped)
        return wrapped

