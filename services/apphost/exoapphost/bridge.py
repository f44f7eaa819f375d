"""Apps' store requests over gRPC: `OutMessage` -> `exocore.store.v1.EntityStore` -> `InMessage`.

`GrpcStoreBridge.submit` may be called from any thread (the app runners): it hands the request to
the service's event loop, which calls `Query` or `Mutate` with a deadline and the app's identity
in the metadata (``x-exocore-app-id``, ``x-exocore-app``) and in the logs, plus the node's auth
token (``authorization: Bearer …``, SPEC 1.11) so the target may be a gateway as well as a store.
The request bytes were validated by the runtime and go through unchanged; the reply carries the
result bytes or the error text, with the request's rendez-vous id.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

import grpc
import grpc.aio

from exocommon.auth_token import AuthToken
from exocommon.grpc_util import create_channel
from exocommon.keys import Keypair
from exocore.apps import runtime_pb2

from .runner import REPLY_TYPES, AppSpec, error_reply

log = logging.getLogger(__name__)

QUERY_METHOD = "/exocore.store.v1.EntityStore/Query"
MUTATE_METHOD = "/exocore.store.v1.EntityStore/Mutate"
TOKEN_LIFETIME_NS = 24 * 3600 * 1_000_000_000

_NOT_ASCII = re.compile(r"[^\x20-\x7e]")


class NodeToken:
    """An auth token of the node for the cell, renewed when half of its lifetime has passed."""

    def __init__(self, cell_id: str, keypair: Keypair, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.cell_id = cell_id
        self.keypair = keypair
        self.clock_ns = clock_ns
        self._token = ""
        self._renew_at = 0

    def bearer(self) -> str:
        now = self.clock_ns()
        if now >= self._renew_at:
            token = AuthToken.create(self.cell_id, self.keypair, now, now + TOKEN_LIFETIME_NS)
            self._token = token.encode_base58()
            self._renew_at = now + TOKEN_LIFETIME_NS // 2
        return f"Bearer {self._token}"


class GrpcStoreBridge:
    """See the module docstring. Create and close it on the service's event loop."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        token: NodeToken | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.token = token
        self._loop = loop or asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._channel: grpc.aio.Channel | None = None
        self._methods: dict[int, grpc.aio.UnaryUnaryMultiCallable] = {}
        if target:
            self._channel = create_channel(target)
            # No serializers: the validated request bytes go as they are, the reply bytes come back.
            self._methods = {
                runtime_pb2.STORE_ENTITY_QUERY: self._channel.unary_unary(QUERY_METHOD),
                runtime_pb2.STORE_MUTATION_REQUEST: self._channel.unary_unary(MUTATE_METHOD),
            }

    def submit(
        self, app: AppSpec, message: runtime_pb2.OutMessage, reply: Callable[[runtime_pb2.InMessage], None]
    ) -> None:
        try:
            self._loop.call_soon_threadsafe(self._spawn, app, message, reply)
        except RuntimeError:  # loop closed: the service is stopping
            reply(error_reply(message, "the app host is stopping"))

    def _spawn(
        self, app: AppSpec, message: runtime_pb2.OutMessage, reply: Callable[[runtime_pb2.InMessage], None]
    ) -> None:
        if self._closed:
            reply(error_reply(message, "the app host is stopping"))
            return
        task = self._loop.create_task(self._handle(app, message, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _metadata(self, app: AppSpec) -> list[tuple[str, str]]:
        metadata = [("x-exocore-app-id", app.app_id), ("x-exocore-app", _NOT_ASCII.sub("?", app.name))]
        if self.token is not None:
            metadata.append(("authorization", self.token.bearer()))
        return metadata

    async def _handle(
        self, app: AppSpec, message: runtime_pb2.OutMessage, reply: Callable[[runtime_pb2.InMessage], None]
    ) -> None:
        method = self._methods.get(message.type)
        if method is None:
            reply(error_reply(message, "no store address configured for the app host"))
            return
        kind = runtime_pb2.OutMessageType.Name(message.type)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "store request of app %s",
                app.name,
                extra={
                    "app": app.name,
                    "app_id": app.app_id,
                    "request": kind,
                    "rendez_vous_id": message.rendez_vous_id,
                },
            )
        try:
            # wait_for_ready: a target still starting (the daemon starts every service at once) or
            # restarting delays the request, up to its deadline, instead of failing it at once.
            data = await method(message.data, timeout=self.timeout_s, metadata=self._metadata(app), wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            log.info(
                "store request of app %s failed: %s",
                app.name,
                exc.code().name,
                extra={"app": app.name, "app_id": app.app_id, "request": kind, "details": exc.details()},
            )
            reply(error_reply(message, f"{exc.code().name}: {exc.details()}"))
            return
        except asyncio.CancelledError:
            reply(error_reply(message, "cancelled: the app host is stopping"))
            raise
        except Exception as exc:
            log.exception("store request of app %s failed", app.name, extra={"app": app.name, "app_id": app.app_id})
            reply(error_reply(message, f"INTERNAL: {exc}"))
            return
        reply(runtime_pb2.InMessage(type=REPLY_TYPES[message.type], rendez_vous_id=message.rendez_vous_id, data=data))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
