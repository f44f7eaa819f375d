"""Routing calls to the cell's store replicas: health checks, round robin, failover.

The replicas are the `addresses.store` of the cell's nodes with the store role, plus any extra
address given on the command line. Each gets one gRPC channel (no automatic retries: the router
decides where a call goes next) and is asked ``grpc.health.v1.Health/Check`` for
``exocore.store.v1.EntityStore`` every `health_interval_s`. A replica answering anything but
SERVING (down, starting, catching up, draining before shutdown) is skipped.

`Router.unary(method, request)` sends the request bytes (never decoded: the gateway is a byte
proxy) to the next healthy replica in round-robin order, over the replica's link (one stream that
carries many calls, `exocommon.grpc_util.link`: much less CPU per call on both sides than a gRPC
call each) unless the replica has none (it answered UNIMPLEMENTED: then as EntityStore calls). A
call failing with UNAVAILABLE marks the replica unhealthy until its next good health check and goes
to the next candidate, healthy ones first, then the others as a last resort (one may have come back
since its last check), each replica at most once per call. Any other status is the store's answer
and is returned to the client as is (`StoreStatusError`); a link that breaks counts as UNAVAILABLE
for the calls it carried. `Router.open_stream` does the same for `WatchQuery` (always its own gRPC
call) until the first message.

With `resolve_names`, every configured address stands for all the addresses its host name resolves
to, looked up again every `resolve_interval_s`: behind a Kubernetes headless Service (or a scaled
compose service) each store pod is then a replica of its own, with its own connection and health
check. Without it, one name is one connection, which a Service balances per connection, not per call.

A mutation that fails over after UNAVAILABLE may have reached the first replica (e.g. it died after
appending to the chain but before answering); the client then sees one success, and the first write
may also exist. Clients that cannot accept that set their own entity and trait ids (puts are then
idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from exocommon.errors import InvalidArgument, Unavailable
from exocommon.grpc_util import check_health, create_channel
from exocommon.grpc_util.link import LinkBroken, LinkCallError, LinkClient
from exocommon.net import split_host_port

__all__ = ["LINK_GATHER_S", "STORE_SERVICE", "Replica", "Router", "StoreStatusError"]

log = logging.getLogger(__name__)

STORE_SERVICE = "exocore.store.v1.EntityStore"
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 1.0
RESOLVE_INTERVAL_S = 10.0
# With many calls in flight, a link frame to a store waits this long for more calls (`LinkClient`'s
# `gather_s`). Measured with 32 clients sending Mutate calls: about one call per frame without it, 5
# with 1.5 ms, and 40 µs of gateway CPU less per call; a client with few calls in flight never waits.
LINK_GATHER_S = 0.0015

# Reconnect quickly to a replica that restarts (grpc's default backoff grows to 120 s).
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class StoreStatusError(Exception):
    """A store replica answered with a status other than OK or UNAVAILABLE: relayed to the client."""

    def __init__(self, code: grpc.StatusCode, details: str, replica: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.replica = replica


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    healthy: bool = False
    checked: bool = False
    calls: int = 0
    failures: int = 0
    # Unary calls go over it while the replica serves links (None: the router does not use links).
    link: LinkClient | None = None
    _methods: dict[str, Any] = field(default_factory=dict)

    def unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        callable_ = self._methods.get(method)
        if callable_ is None:
            # No serializers: request and response bytes pass through untouched.
            callable_ = self.channel.unary_unary(method)
            self._methods[method] = callable_
        return callable_

    def stream(self, method: str) -> grpc.aio.UnaryStreamMultiCallable:
        callable_ = self._methods.get(method)
        if callable_ is None:
            callable_ = self.channel.unary_stream(method)
            self._methods[method] = callable_
        return callable_


class Router:
    """Store replicas of one cell (see module docstring). Use from one event loop."""

    def __init__(
        self,
        addresses: Iterable[str] = (),
        *,
        health_interval_s: float = HEALTH_INTERVAL_S,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        service: str = STORE_SERVICE,
        max_message_bytes: int | None = None,
        resolve_names: bool = False,
        resolve_interval_s: float = RESOLVE_INTERVAL_S,
        use_links: bool = True,
        link_gather_s: float = LINK_GATHER_S,
    ) -> None:
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.service = service
        self._max_message_bytes = max_message_bytes
        self._addresses = _unique(addresses)
        self.resolve_names = resolve_names
        self.resolve_interval_s = resolve_interval_s
        self.use_links = use_links
        self.link_gather_s = link_gather_s
        self._resolved_at = 0.0
        # Per configured address: what it resolved to last (kept when a lookup fails).
        self._resolved: dict[str, list[str]] = {}
        self._replicas: list[Replica] = []
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Called with True / False when the first replica becomes healthy / the last one stops being.
        self.on_availability_change: Callable[[bool], None] | None = None
        self._available = False

    @property
    def replicas(self) -> Sequence[Replica]:
        return tuple(self._replicas)

    def healthy_addresses(self) -> list[str]:
        return [r.address for r in self._replicas if r.healthy]

    async def start(self) -> None:
        """Opens the channels, checks every replica once, then keeps checking in the background."""
        await self.set_addresses(self._addresses)
        self._task = asyncio.create_task(self._health_loop(), name="store-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        replicas, self._replicas = self._replicas, []
        await asyncio.gather(*(_close(r) for r in replicas), return_exceptions=True)

    async def set_addresses(self, addresses: Iterable[str]) -> None:
        """Adds new replicas (checked before they get calls) and closes removed ones."""
        self._addresses = _unique(addresses)
        await self._apply(await self._expand(self._addresses))

    async def _expand(self, addresses: list[str]) -> list[str]:
        """The replica addresses of the configured ones (see `resolve_names`)."""
        self._resolved_at = time.monotonic()
        if not self.resolve_names:
            return addresses
        expanded: list[str] = []
        loop = asyncio.get_running_loop()
        for address in addresses:
            try:
                host, port = split_host_port(address)
            except InvalidArgument:
                expanded.append(address)  # not host:port: tried as it is (and reported by its health check)
                continue
            if _is_ip(host):
                expanded.append(address)
                continue
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                previous = self._resolved.get(address)
                log.warning(
                    "cannot resolve store address %s (%s); %s",
                    address,
                    exc,
                    "keeping its last addresses" if previous else "trying it as it is",
                )
                expanded.extend(previous or [address])
                continue
            found = _unique(_join(info[4][0], port) for info in infos)
            self._resolved[address] = found
            expanded.extend(found)
        return _unique(expanded)

    async def _apply(self, wanted: list[str]) -> None:
        current = {r.address: r for r in self._replicas}
        added = [self._open(a) for a in wanted if a not in current]
        await asyncio.gather(*(self._check(r) for r in added))
        removed = [r for a, r in current.items() if a not in wanted]
        self._replicas = [current[a] if a in current else next(r for r in added if r.address == a) for a in wanted]
        for replica in removed:
            await _close(replica)
        self._notify_availability()
        if added or removed:
            log.info(
                "store replicas: %s",
                ", ".join(f"{r.address} ({'up' if r.healthy else 'down'})" for r in self._replicas) or "none",
            )

    def _open(self, address: str) -> Replica:
        kwargs: dict[str, Any] = {}
        if self._max_message_bytes is not None:
            kwargs["max_message_bytes"] = self._max_message_bytes
        channel = create_channel(address, retry=False, options=_CHANNEL_OPTIONS, **kwargs)
        link = LinkClient(channel, gather_s=self.link_gather_s) if self.use_links else None
        return Replica(address, channel, link=link)

    # --- health ---------------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.health_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            if self.resolve_names and time.monotonic() - self._resolved_at >= self.resolve_interval_s:
                await self._apply(await self._expand(self._addresses))  # pods come and go
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(r) for r in self._replicas))

    async def _check(self, replica: Replica) -> None:
        healthy = await check_health(replica.channel, self.service, timeout=self.health_timeout_s)
        if healthy != replica.healthy or not replica.checked:
            level = logging.INFO if replica.checked or not healthy else logging.DEBUG
            log.log(level, "store replica %s is %s", replica.address, "up" if healthy else "down")
        replica.healthy = healthy
        replica.checked = True
        self._notify_availability()

    @property
    def available(self) -> bool:
        """True when at least one replica is healthy."""
        return any(r.healthy for r in self._replicas)

    def _notify_availability(self) -> None:
        available = self.available
        if available != self._available:
            self._available = available
            if self.on_availability_change is not None:
                self.on_availability_change(available)

    def mark_failed(self, replica: Replica) -> None:
        if replica.healthy:
            log.info("store replica %s is unavailable; failing over", replica.address)
        replica.healthy = False
        replica.failures += 1
        self._notify_availability()
        self._wake.set()  # re-check soon rather than at the next interval

    def candidates(self) -> list[Replica]:
        """Replicas in the order a call tries them: healthy ones in round robin, then the others."""
        healthy = [r for r in self._replicas if r.healthy]
        others = [r for r in self._replicas if not r.healthy]
        if healthy:
            start = self._next % len(healthy)
            self._next += 1
            healthy = healthy[start:] + healthy[:start]
        return healthy + others

    # --- calls ----------------------------------------------------------------------------------------

    def _no_replica(self, errors: list[str]) -> Unavailable:
        if not self._replicas:
            return Unavailable("no store replica is configured for this cell (no node with the store role)")
        tried = "; ".join(errors) if errors else "none is healthy"
        return Unavailable(f"no store replica of the cell is available ({tried})")

    async def unary(self, method: str, request: bytes, timeout: float) -> bytes:
        """The response bytes of the first replica that answers (see module docstring)."""
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        for replica in self.candidates():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            replica.calls += 1
            link = replica.link
            try:
                if link is not None and not link.unsupported:
                    try:
                        return await link.call(method, request, remaining)
                    except LinkBroken as exc:
                        if not exc.unsupported:
                            raise
                        log.info("store replica %s serves no link: calling it directly", replica.address)
                return await replica.unary(method)(request, timeout=remaining)
            except (LinkCallError, LinkBroken) as exc:
                # A broken link, or UNAVAILABLE answered over it, fails over as it does from a direct call
                # (say, the replica's chain node is restarting: nothing was written)
                if isinstance(exc, LinkCallError) and exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise StoreStatusError(exc.code, exc.details, replica.address) from None
                self.mark_failed(replica)
                errors.append(f"{replica.address}: {exc.details}")
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise StoreStatusError(exc.code(), exc.details() or "", replica.address) from None
                self.mark_failed(replica)
                errors.append(f"{replica.address}: {exc.details()}")
        raise self._no_replica(errors)

    async def open_stream(self, method: str, request: bytes) -> tuple[Replica, grpc.aio.UnaryStreamCall, bytes | None]:
        """A started stream on the first replica that answers, and its first message (None if it ended
        without any). Fails over like `unary` until a replica sends its first message."""
        errors: list[str] = []
        for replica in self.candidates():
            replica.calls += 1
            call = replica.stream(method)(request, timeout=None)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                call.cancel()
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise StoreStatusError(exc.code(), exc.details() or "", replica.address) from None
                self.mark_failed(replica)
                errors.append(f"{replica.address}: {exc.details()}")
                continue
            except BaseException:
                call.cancel()
                raise
            return replica, call, (None if first is grpc.aio.EOF else first)
        raise self._no_replica(errors)

    def statistics(self) -> dict[str, Any]:
        return {
            "replicas": [
                {
                    "address": r.address,
                    "healthy": r.healthy,
                    "calls": r.calls,
                    "failures": r.failures,
                    "link": r.link is not None and not r.link.unsupported,
                    **({"link_frames": r.link.statistics()} if r.link is not None else {}),
                }
                for r in self._replicas
            ]
        }


async def iterate_stream(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[bytes]:
    """The remaining messages of a started stream (raises the call's AioRpcError if it fails)."""
    while True:
        item = await call.read()
        if item is grpc.aio.EOF:
            return
        yield item


async def _close(replica: Replica) -> None:
    if replica.link is not None:
        await replica.link.close()
    await replica.channel.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _join(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _unique(addresses: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for address in addresses:
        if address:
            seen.setdefault(address, None)
    return list(seen)
