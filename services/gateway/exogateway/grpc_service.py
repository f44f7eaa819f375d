"""`exocore.store.v1.EntityStore` as the gateway serves it: authenticate, limit, route.

Each call goes through, in order:

1. authentication of the ``authorization: Bearer <token>`` metadata (`auth.Authenticator`); any
   problem ends the call with UNAUTHENTICATED before a store is contacted;
2. limits (`limits.Limits`): request size, concurrent calls and streams per token -> RESOURCE_EXHAUSTED;
3. routing (`routing.Router`) to a healthy store replica, with failover on UNAVAILABLE.

The gateway never decodes requests or responses: the handlers are registered without
(de)serializers and pass the protobuf bytes through, so it costs one extra hop and no protobuf work.
The client's deadline is passed on to the store (capped at `call_timeout_s`). A store's error status
(INVALID_ARGUMENT, NOT_FOUND...) reaches the client unchanged.

A `WatchQuery` stream is bound to the replica that serves it; when that replica dies the stream
ends with UNAVAILABLE (the client library re-subscribes, through any healthy replica).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from exocommon.errors import Unavailable
from exogateway.auth import Authenticator
from exogateway.limits import Limits
from exogateway.routing import STORE_SERVICE, Router, StoreStatusError, iterate_stream

__all__ = ["CALL_TIMEOUT_S", "EntityStoreProxy", "registration"]

log = logging.getLogger(__name__)

# Deadline of a call to a store when the client gave none (or a longer one).
CALL_TIMEOUT_S = 30.0

MUTATE = f"/{STORE_SERVICE}/Mutate"
QUERY = f"/{STORE_SERVICE}/Query"
WATCH_QUERY = f"/{STORE_SERVICE}/WatchQuery"


class EntityStoreProxy:
    """The gRPC handlers (raw bytes in, raw bytes out)."""

    def __init__(
        self, authenticator: Authenticator, router: Router, limits: Limits, call_timeout_s: float = CALL_TIMEOUT_S
    ) -> None:
        self.authenticator = authenticator
        self.router = router
        self.limits = limits
        self.call_timeout_s = call_timeout_s

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.call_timeout_s
        return max(0.001, min(remaining, self.call_timeout_s))

    async def _unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # Every call goes through here: kept lean (no context manager, no extra awaits).
        token = self.authenticator.authenticate_metadata(context.invocation_metadata()).token
        limits = self.limits
        limits.check_request_size(len(request))
        limits.acquire_call(token)
        try:
            return await self.router.unary(method, request, self._timeout(context))
        except StoreStatusError as exc:
            await context.abort(exc.code, exc.details)
            raise  # unreachable: abort raises
        finally:
            limits.release_call(token)

    async def mutate(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(MUTATE, request, context)

    async def query(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._unary(QUERY, request, context)

    async def watch_query(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        identity = self.authenticator.authenticate_metadata(context.invocation_metadata())
        self.limits.check_request_size(len(request))
        with self.limits.stream(identity.token):
            try:
                replica, call, first = await self.router.open_stream(WATCH_QUERY, request)
            except StoreStatusError as exc:
                await context.abort(exc.code, exc.details)
                return
            try:
                if first is None:
                    return
                yield first
                async for item in iterate_stream(call):
                    yield item
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self.router.mark_failed(replica)
                    raise Unavailable(
                        f"the store replica serving this stream ({replica.address}) went away: {exc.details()}; "
                        "subscribe again"
                    ) from None
                await context.abort(code, exc.details() or "")
            finally:
                call.cancel()


def registration(proxy: EntityStoreProxy) -> tuple[Any, EntityStoreProxy, str]:
    """The `ServiceServer` registration triple of the proxy."""
    return (_add_proxy_to_server, proxy, STORE_SERVICE)


def _add_proxy_to_server(proxy: EntityStoreProxy, server: grpc.aio.Server) -> None:
    # Like the generated add_EntityStoreServicer_to_server, without (de)serializers: bytes pass through.
    handlers = {
        "Mutate": grpc.unary_unary_rpc_method_handler(proxy.mutate),
        "Query": grpc.unary_unary_rpc_method_handler(proxy.query),
        "WatchQuery": grpc.unary_stream_rpc_method_handler(proxy.watch_query),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(STORE_SERVICE, handlers),))
    server.add_registered_method_handlers(STORE_SERVICE, handlers)
