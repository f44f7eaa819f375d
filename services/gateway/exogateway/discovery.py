"""The discovery mailbox (SPEC.md 7): a core with no I/O and its two servers (REST and gRPC).

* `Mailbox`: payloads under random 9-digit PINs, one-shot reads, reply slots guarded by a random
  u64 token, expiries (payload 90 s, reply slot 180 s) and limits (5000 payloads and reply slots
  together -> `MailboxFull`, 5 MiB of data -> `PayloadTooLarge`). Time comes from injectable clocks;
  `purge()` drops what expired (expired entries are also never served between two purges).
* `create_http_app(mailbox)`: the REST API as an aiohttp application (`POST /`, `GET /<pin>`,
  `PUT /<reply_pin>`, any `OPTIONS` -> 200, CORS headers on every answer, JSON bodies with base64
  data, the original's status codes). It routes on the path *below where it is mounted*, so the
  gateway can serve it with ``app.add_subapp("/discovery/", create_http_app(mailbox))``.
* `DiscoveryServicer(mailbox)`: `exocore.discovery.v1.Discovery` over the same mailbox (errors are
  `ExocoreError`s, mapped to gRPC statuses by `ServiceServer`'s interceptor: NOT_FOUND,
  UNAUTHENTICATED, RESOURCE_EXHAUSTED). `registration(mailbox)` is its `ServiceServer` triple.
* `run_purger(mailbox)`: the coroutine that purges every `cleanup_interval_s` (1 s).
* `DiscoveryServer`: all of the above in one asyncio loop, as run by `exo discovery daemon`.

The mailbox stores and serves opaque bytes: `exo cell join` seals the cell config to the joining
node's public key, so the keypair of a cell never reaches the mailbox in clear.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc.aio
from aiohttp import web
from google.protobuf import timestamp_pb2

from exocommon.discovery import (
    DEFAULT_PORT,
    PIN_MAX,
    PIN_MIN,
    InvalidPin,
    InvalidReply,
    InvalidRequest,
    MailboxFull,
    PayloadNotFound,
    PayloadTooLarge,
    format_expiration,
    parse_pin,
)
from exocommon.errors import ExocoreError
from exocommon.grpc_util import ServiceServer
from exocore.discovery.v1 import discovery_pb2, discovery_pb2_grpc

log = logging.getLogger("exogateway.discovery")

SERVICE_NAME = "exocore.discovery.v1.Discovery"
DEFAULT_GRPC_PORT = DEFAULT_PORT + 1
U64_MAX = 2**64 - 1

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, PUT, GET",
    "Access-Control-Allow-Headers": "Origin, X-Requested-With, Content-Type, Accept, Authorization",
}


@dataclass(frozen=True)
class MailboxConfig:
    payload_expiration_s: float = 90.0
    reply_expiration_s: float = 180.0
    # Live payloads plus open reply slots (a slot is memory too, and outlives its payload).
    max_payloads: int = 5000
    # Bytes of payload data (decoded). The REST API also refuses a body larger than what such
    # data takes once base64-encoded in JSON (see `max_http_body`).
    max_payload_size: int = 5 * 1024 * 1024
    cleanup_interval_s: float = 1.0

    @property
    def max_http_body(self) -> int:
        return 4 * ((self.max_payload_size + 2) // 3) + 1024


@dataclass(frozen=True)
class Created:
    """Where a payload was stored, until when (Unix seconds) and its reply slot's PIN if any."""

    pin: int
    expiration_unix_s: float
    reply_pin: int | None


@dataclass(frozen=True)
class Taken:
    """A payload read (and removed) from the mailbox."""

    pin: int
    data: bytes
    reply_pin: int | None
    reply_token: int | None


@dataclass
class _Payload:
    data: bytes
    expires_at: float
    expiration_unix_s: float
    reply_pin: int | None
    reply_token: int | None


@dataclass
class _ReplySlot:
    token: int
    expires_at: float


class Mailbox:
    """The mailbox state machine (see module doc). Thread-safe; no I/O, no sleeps.

    `monotonic` drives expiries, `wall_clock` only the expiration dates shown to clients; `rng`
    draws PINs and reply tokens (a CSPRNG by default: both must be unguessable).
    """

    def __init__(
        self,
        config: MailboxConfig | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config if config is not None else MailboxConfig()
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._rng = rng or secrets.SystemRandom()
        self._payloads: dict[int, _Payload] = {}
        self._slots: dict[int, _ReplySlot] = {}
        self._lock = threading.Lock()

    # -- inspection (tests, metrics) --------------------------------------------------------

    def __len__(self) -> int:
        """Live payloads plus open reply slots (what `max_payloads` bounds)."""
        with self._lock:
            return len(self._payloads) + len(self._slots)

    def stored_data(self) -> list[bytes]:
        """Every payload's data as stored (a debug hook: what the mailbox operator could see)."""
        with self._lock:
            return [p.data for p in self._payloads.values()]

    # -- operations -------------------------------------------------------------------------

    def create(self, data: bytes, expect_reply: bool = False) -> Created:
        """Stores `data` under a new PIN, with a reply slot first if `expect_reply`."""
        with self._lock:
            self._check_size(data)
            self._check_room(2 if expect_reply else 1)
            now = self._monotonic()
            reply_pin, reply_token = self._open_slot(now) if expect_reply else (None, None)
            return self._store(self._new_pin(), bytes(data), now, reply_pin, reply_token)

    def get(self, pin: int | str) -> Taken:
        """Removes and returns the payload under `pin` (one-shot); `PayloadNotFound` if absent."""
        pin = parse_pin(pin)
        with self._lock:
            payload = self._payloads.pop(pin, None)
            if payload is None or payload.expires_at <= self._monotonic():
                raise PayloadNotFound(f"no payload under PIN {pin} (never created, expired or already read)")
            return Taken(pin, payload.data, payload.reply_pin, payload.reply_token)

    def reply(self, reply_pin: int | str, reply_token: int, data: bytes, expect_reply: bool = False) -> Created:
        """Stores `data` under `reply_pin` if `reply_token` is that slot's; the slot is consumed."""
        reply_pin = parse_pin(reply_pin)
        with self._lock:
            now = self._monotonic()
            slot = self._slots.get(reply_pin)
            if slot is None or slot.expires_at <= now:
                raise InvalidReply(f"no reply expected under PIN {reply_pin} (unknown or expired)")
            if not secrets.compare_digest(slot.token.to_bytes(8, "big"), _u64(reply_token).to_bytes(8, "big")):
                raise InvalidReply(f"wrong reply token for PIN {reply_pin}")
            self._check_size(data)
            # The slot becomes the payload: one entry more only if a new slot is opened.
            self._check_room(1 if expect_reply else 0)
            del self._slots[reply_pin]
            next_pin, next_token = self._open_slot(now) if expect_reply else (None, None)
            return self._store(reply_pin, bytes(data), now, next_pin, next_token)

    def purge(self) -> int:
        """Drops expired payloads and reply slots; returns how many."""
        with self._lock:
            now = self._monotonic()
            expired_payloads = [pin for pin, p in self._payloads.items() if p.expires_at <= now]
            expired_slots = [pin for pin, s in self._slots.items() if s.expires_at <= now]
            for pin in expired_payloads:
                del self._payloads[pin]
            for pin in expired_slots:
                del self._slots[pin]
            return len(expired_payloads) + len(expired_slots)

    # -- internals (lock held) --------------------------------------------------------------

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.config.max_payload_size:
            raise PayloadTooLarge(
                f"payload of {len(data)} bytes is larger than the maximum of {self.config.max_payload_size}"
            )

    def _check_room(self, needed: int) -> None:
        if len(self._payloads) + len(self._slots) + needed > self.config.max_payloads:
            raise MailboxFull(f"the mailbox is full ({self.config.max_payloads} payloads); try again later")

    def _new_pin(self) -> int:
        while True:
            pin = self._rng.randint(PIN_MIN, PIN_MAX)
            if pin not in self._payloads and pin not in self._slots:
                return pin

    def _open_slot(self, now: float) -> tuple[int, int]:
        pin = self._new_pin()
        token = self._rng.randint(1, U64_MAX)
        self._slots[pin] = _ReplySlot(token, now + self.config.reply_expiration_s)
        return pin, token

    def _store(self, pin: int, data: bytes, now: float, reply_pin: int | None, reply_token: int | None) -> Created:
        expiration = self._wall_clock() + self.config.payload_expiration_s
        self._payloads[pin] = _Payload(data, now + self.config.payload_expiration_s, expiration, reply_pin, reply_token)
        return Created(pin, expiration, reply_pin)


def _u64(value: int) -> int:
    """A reply token as sent by a client; anything that is not a u64 cannot match a slot."""
    return value if 0 <= value <= U64_MAX else 0


async def run_purger(mailbox: Mailbox) -> None:
    """Purges `mailbox` every `cleanup_interval_s` until cancelled."""
    while True:
        await asyncio.sleep(mailbox.config.cleanup_interval_s)
        purged = mailbox.purge()
        if purged:
            log.debug("purged %d expired payloads and reply slots", purged)


# ---------------------------------------------------------------------------------------------
# REST
# ---------------------------------------------------------------------------------------------


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, headers=CORS_HEADERS)


def _created_body(created: Created) -> dict[str, Any]:
    return {
        "pin": created.pin,
        "expiration": format_expiration(created.expiration_unix_s),
        "reply_pin": created.reply_pin,
    }


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes is larger than {limit}")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_body(raw: bytes, reply: bool) -> tuple[bytes, bool, int]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    encoded = body.get("data")
    if not isinstance(encoded, str):
        raise InvalidRequest("`data` (base64 string) is required")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise InvalidRequest("`data` is not valid base64") from None
    expect_reply = body.get("expect_reply", False)
    if expect_reply is None:
        expect_reply = False
    if not isinstance(expect_reply, bool):
        raise InvalidRequest("`expect_reply` must be true or false")
    token = 0
    if reply:
        token_value = body.get("reply_token")
        if isinstance(token_value, str) and token_value.strip().isdigit():
            token_value = int(token_value)  # clients that cannot hold a u64 in a JSON number
        if isinstance(token_value, bool) or not isinstance(token_value, int):
            raise InvalidRequest("`reply_token` (unsigned 64-bit integer) is required")
        token = token_value
    return data, expect_reply, token


def create_http_app(mailbox: Mailbox) -> web.Application:
    """The REST API over `mailbox` (see module doc)."""

    async def handle(request: web.Request) -> web.Response:
        method = request.method
        tail = request.match_info.get("tail", "").strip("/")
        try:
            if method == "OPTIONS":
                return web.Response(status=200, headers=CORS_HEADERS)
            if method == "POST" and tail == "":
                data, expect_reply, _ = _parse_body(await _read_body(request, mailbox.config.max_http_body), False)
                return _json(200, _created_body(mailbox.create(data, expect_reply)))
            if method in ("GET", "PUT") and tail:
                pin = parse_pin(tail)
                if method == "GET":
                    taken = mailbox.get(pin)
                    body = {
                        "pin": taken.pin,
                        "data": base64.b64encode(taken.data).decode("ascii"),
                        "reply_pin": taken.reply_pin,
                        "reply_token": taken.reply_token,
                    }
                    return _json(200, body)
                raw = await _read_body(request, mailbox.config.max_http_body)
                data, expect_reply, token = _parse_body(raw, True)
                return _json(200, _created_body(mailbox.reply(pin, token, data, expect_reply)))
            raise InvalidPin(f"no route for {method} /{tail}")
        except ExocoreError as exc:
            status = getattr(exc, "http_status", 500)
            if status == 500:
                log.error("discovery request failed: %s", exc)
            return _json(status, {"error": str(exc)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


# ---------------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------------


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(unix_s * 1_000_000_000))
    return ts


def _create_response(created: Created) -> discovery_pb2.CreateResponse:
    return discovery_pb2.CreateResponse(
        pin=created.pin, expiration=_timestamp(created.expiration_unix_s), reply_pin=created.reply_pin or 0
    )


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServicer):
    """`exocore.discovery.v1.Discovery` over a `Mailbox`; 0 stands for "none" in pins and tokens."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

    async def Create(
        self, request: discovery_pb2.CreateRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.CreateResponse:
        return _create_response(self.mailbox.create(request.data, request.expect_reply))

    async def Get(
        self, request: discovery_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.GetResponse:
        taken = self.mailbox.get(request.pin)
        return discovery_pb2.GetResponse(
            pin=taken.pin, data=taken.data, reply_pin=taken.reply_pin or 0, reply_token=taken.reply_token or 0
        )

    async def Reply(
        self, request: discovery_pb2.ReplyRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.CreateResponse:
        created = self.mailbox.reply(request.reply_pin, request.reply_token, request.data, request.expect_reply)
        return _create_response(created)


def registration(mailbox: Mailbox) -> tuple[Callable[[Any, grpc.aio.Server], None], Any, str]:
    """The `ServiceServer` registration triple of the Discovery service."""
    return (discovery_pb2_grpc.add_DiscoveryServicer_to_server, DiscoveryServicer(mailbox), SERVICE_NAME)


# ---------------------------------------------------------------------------------------------
# Both servers together
# ---------------------------------------------------------------------------------------------


class DiscoveryServer:
    """The REST API on `host:http_port` and (unless `grpc_port` is None) the gRPC service on
    `host:grpc_port`, over one mailbox, with the purger. Port 0 picks a free port."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        http_port: int = DEFAULT_PORT,
        grpc_port: int | None = DEFAULT_GRPC_PORT,
        mailbox: Mailbox | None = None,
    ) -> None:
        self.host = host
        self.mailbox = mailbox if mailbox is not None else Mailbox()
        self._http_port = http_port
        self._grpc_port = grpc_port
        self._runner: web.AppRunner | None = None
        self._grpc: ServiceServer | None = None
        self._purger: asyncio.Task[None] | None = None
        self.http_port: int | None = None

    @property
    def grpc_server(self) -> ServiceServer | None:
        return self._grpc

    @property
    def http_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def grpc_address(self) -> str | None:
        return None if self._grpc is None else self._grpc.address

    async def start(self) -> None:
        self._runner = web.AppRunner(create_http_app(self.mailbox), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._http_port, reuse_port=False)
        await site.start()
        self.http_port = _bound_port(self._runner)
        if self._grpc_port is not None:
            self._grpc = ServiceServer(
                "discovery",
                f"{self.host}:{self._grpc_port}",
                [registration(self.mailbox)],
                drain_delay_s=0.0,
                grace_s=1.0,
            )
            await self._grpc.start()
        self._purger = asyncio.get_running_loop().create_task(run_purger(self.mailbox), name="discovery-purger")

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        if self._grpc is not None:
            await self._grpc.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> DiscoveryServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("discovery HTTP server is not bound")


__all__ = [
    "CORS_HEADERS",
    "DEFAULT_GRPC_PORT",
    "DEFAULT_PORT",
    "SERVICE_NAME",
    "Created",
    "DiscoveryServer",
    "DiscoveryServicer",
    "Mailbox",
    "MailboxConfig",
    "Taken",
    "create_http_app",
    "registration",
    "run_purger",
]
