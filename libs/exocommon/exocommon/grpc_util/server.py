"""A grpc.aio server with the behaviour every Exocore service needs.

Public surface:

* ``ServiceServer(service, bind, registrations, *, max_message_bytes, interceptors, drain_delay_s,
  grace_s, maximum_concurrent_rpcs, options)``: `registrations` is a list of
  ``(add_XServicer_to_server, servicer, "full.service.Name")`` triples (a `Registration`).
  Every method's handler is wrapped once, when it is registered, with what `RequestLoggingInterceptor`
  and `ErrorMappingInterceptor` do (one line logged per call; an `ExocoreError` becomes its status);
  grpc interceptors would cost each call their chain of coroutines (measured, ~10 µs of a ~150 µs
  call). `interceptors`: extra ones, which run before the handler's wrapping.
* ``await server.start() -> int``: binds (port 0 picks a free port, see `bound_port`), adds
  ``grpc.health.v1.Health`` and server reflection (registered services + health + reflection),
  starts, then sets health SERVING for "" and each registered service.
* ``server.health``: the `HealthServicer`, to flip one service to NOT_SERVING while it e.g.
  catches up.
* ``await server.stop(grace=None)``: graceful and idempotent: every health status becomes
  NOT_SERVING first (load balancers and gateways drain), then after `drain_delay_s` the server
  stops accepting calls and gives running ones `grace` seconds (default `grace_s`) to finish.
* ``server.install_signal_handlers()``: SIGTERM / SIGINT start `stop()` once; later signals are
  logged and ignored.
* ``await server.wait_for_termination()``: returns when the server has stopped.
* ``async with ServiceServer(...) as server``: start / stop.
* ``await serve(service, bind, registrations, **kwargs)``: all of the above for a ``main``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from ._served import served_handler
from .client import DEFAULT_MAX_MESSAGE_BYTES
from .logging import log_unimplemented

__all__ = ["Registration", "ServiceServer", "serve"]

_log = logging.getLogger("exocommon.grpc.server")

_SERVING = health_pb2.HealthCheckResponse.SERVING


class Registration(NamedTuple):
    """One service on the server: ``add(servicer, server)`` registers it as `name`."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str


def _split_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bind address must be host:port, got {bind!r}")
    return host, int(port)


# How often a client may ping on a connection that carries no data (e.g. an idle Subscribe stream)
# before the server answers GOAWAY too_many_pings. grpc core reads this exact key and ignores unknown
# ones silently: a misspelt key left the 5 min default, and every store's chain subscription was cut
# after 90 s of quiet.
MIN_PING_INTERVAL_OPTION = "grpc.http2.min_ping_interval_without_data_ms"


class _ServedHandlers(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come wrapped by `served_handler` (built once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = served_handler(method, handler)
        self._by_method[method] = (handler, wrapped)
        return wrapped


class _ServedRegistrations:
    """What the registrations add their services to: the server, with every handler wrapped."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_ServedHandlers(h) for h in generic_rpc_handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {name: served_handler(f"/{service_name}/{name}", h) for name, h in method_handlers.items()},
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _UnimplementedLogger(grpc.GenericRpcHandler):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        log_unimplemented(handler_call_details.method)  # type: ignore[attr-defined]
        return None


class ServiceServer:
    """See the module docstring."""

    def __init__(
        self,
        service: str,
        bind: str,
        registrations: Iterable[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]] = (),
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        drain_delay_s: float = 1.0,
        grace_s: float = 5.0,
        maximum_concurrent_rpcs: int | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.service = service
        self.bind = bind
        self._host, _ = _split_bind(bind)
        self.registrations = [Registration(*r) for r in registrations]
        self.max_message_bytes = max_message_bytes
        self.drain_delay_s = drain_delay_s
        self.grace_s = grace_s
        self._interceptors = list(interceptors)
        self._maximum_concurrent_rpcs = maximum_concurrent_rpcs
        self._options = list(options)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._bound_port: int | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._signal_loop: asyncio.AbstractEventLoop | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def bound_port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("server not started")
        return self._bound_port

    @property
    def address(self) -> str:
        """The bind host with the actual port, e.g. "127.0.0.1:43121"."""
        return f"{self._host}:{self.bound_port}"

    @property
    def health(self) -> health.aio.HealthServicer:
        return self._health

    @property
    def service_names(self) -> list[str]:
        """Registered services plus health and reflection (what reflection lists)."""
        return [r.name for r in self.registrations] + [health.SERVICE_NAME, reflection.SERVICE_NAME]

    @property
    def stopping(self) -> bool:
        return self._stop_task is not None

    # -- lifecycle --------------------------------------------------------------------------

    def _server_options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Linux default is SO_REUSEPORT: a second process could bind the same port silently.
            ("grpc.so_reuseport", 0),
            # Accept the clients' keepalive pings (every 30 s, also on idle streams); the
            # default policy answers pings more frequent than 5 min with GOAWAY too_many_pings.
            ("grpc.keepalive_permit_without_calls", 1),
            (MIN_PING_INTERVAL_OPTION, 10_000),
            # Detect dead clients holding long-lived streams.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        overridden = {key for key, _ in self._options}
        return [(k, v) for k, v in opts if k not in overridden] + self._options

    async def start(self) -> int:
        """Binds, registers everything and starts serving; returns the bound port."""
        if self._server is not None or self._stop_task is not None:
            raise RuntimeError("server already started or stopped")
        server = grpc.aio.server(
            interceptors=self._interceptors or None,
            options=self._server_options(),
            maximum_concurrent_rpcs=self._maximum_concurrent_rpcs,
        )
        served = _ServedRegistrations(server)
        for reg in self.registrations:
            reg.add(reg.servicer, served)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, served)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(self.service_names), served
        )
        # Last: asked only for a method no one serves, which it logs (grpc then answers UNIMPLEMENTED).
        server.add_generic_rpc_handlers((_UnimplementedLogger(),))
        try:
            port = server.add_insecure_port(self.bind)
        except RuntimeError as exc:
            raise OSError(f"cannot bind {self.bind}: {exc}") from exc
        if not port:  # older grpc versions return 0 instead of raising
            raise OSError(f"cannot bind {self.bind}")
        self._server = server
        self._bound_port = port
        await server.start()
        for name in ["", *(r.name for r in self.registrations)]:
            await self._health.set(name, _SERVING)
        _log.info(
            "listening",
            extra={"address": self.address, "services": ",".join(r.name for r in self.registrations)},
        )
        return port

    def _begin_stop(self, grace: float | None) -> asyncio.Task[None]:
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(
                self._do_stop(self.grace_s if grace is None else grace), name=f"{self.service}-stop"
            )
        return self._stop_task

    async def _do_stop(self, grace: float) -> None:
        try:
            if self._server is None:
                return
            _log.info("shutdown started", extra={"drain_delay_s": self.drain_delay_s, "grace_s": grace})
            await self._health.enter_graceful_shutdown()
            if self.drain_delay_s > 0:
                await asyncio.sleep(self.drain_delay_s)
            await self._server.stop(grace)
            _log.info("shutdown complete")
        finally:
            self._remove_signal_handlers()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (see module docstring); concurrent and repeated calls share one stop."""
        await asyncio.shield(self._begin_stop(grace))

    async def wait_for_termination(self) -> None:
        """Returns once the server has stopped (including the shutdown steps of `stop`)."""
        if self._server is None:
            raise RuntimeError("server not started")
        await self._server.wait_for_termination()
        if self._stop_task is not None:
            await asyncio.shield(self._stop_task)

    # -- signals ----------------------------------------------------------------------------

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """SIGTERM and SIGINT start a graceful `stop()` (once). Must run in the main thread."""
        loop = loop or asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._signal_loop = loop

    def _remove_signal_handlers(self) -> None:
        loop, self._signal_loop = self._signal_loop, None
        if loop is not None and not loop.is_closed():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_task is not None:
            _log.info("signal received, shutdown already in progress", extra={"signal": sig.name})
            return
        _log.info("signal received, shutting down", extra={"signal": sig.name})
        self._begin_stop(None)

    # -- context manager --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(
    service: str,
    bind: str,
    registrations: Iterable[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]] = (),
    **kwargs: Any,
) -> None:
    """Runs a `ServiceServer` until SIGTERM/SIGINT, then stops it gracefully."""
    server = ServiceServer(service, bind, registrations, **kwargs)
    await server.start()
    server.install_signal_handlers()
    await server.wait_for_termination()


def stop_on_signals(stop: asyncio.Event, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """SIGTERM and SIGINT set `stop` (once; later signals are logged): the services' `__main__`
    wait on it, then shut down in their own order."""
    loop = loop or asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            _log.info("signal %s received, shutdown already in progress", sig.name)
        else:
            _log.info("signal %s received, shutting down", sig.name)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
