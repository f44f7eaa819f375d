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
