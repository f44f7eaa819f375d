"""Client side: channels with retries and keepalive, deadlines, readiness and health checks.

* `create_channel(target)` -> `grpc.aio.Channel` with a service config retrying UNAVAILABLE
  (4 attempts, 0.1 s initial backoff x2 up to 2 s), keepalive pings every 30 s (also on idle
  long-lived streams; `ServiceServer` accepts them), `max_message_bytes` both ways, and a name
  looked up again 1 s after a failed connection (`DNS_MIN_RESOLUTION_INTERVAL_MS`), a lookup given
  up after 2 s (`DNS_QUERY_TIMEOUT_MS`).
  Retries only happen before the server sent any response message or header, so a stream that
  already delivered data is never replayed.
* Every outgoing call passes a timeout: ``stub.Query(req, timeout=deadline())`` uses
  `DEFAULT_DEADLINE_S`, ``deadline(2.0)`` a given one. Long-lived streams pass ``timeout=None``
  explicitly.
* `wait_ready(channel, timeout)` waits for the connection (raises `Unavailable`);
  `check_health(channel, service)` asks `grpc.health.v1.Health/Check` and returns True only for
  SERVING.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exocommon.errors import Unavailable

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DNS_MIN_RESOLUTION_INTERVAL_MS",
    "DNS_QUERY_TIMEOUT_MS",
    "RETRY_POLICY",
    "check_health",
    "create_channel",
    "deadline",
    "wait_ready",
]

DEFAULT_DEADLINE_S = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

_KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # Keep pinging during long idle streams (default: stop after 2 pings without data).
    ("grpc.http2.max_pings_without_data", 0),
]


# A name is looked up again at most this often after a connection to its address failed. grpc's
# default is 30 s: a container or pod that comes back at another address, or whose name first
# resolved elsewhere, stays unreachable that long (measured: a name moved to another address was
# reached 30.1 s later by default, 2.0 s with this; in `make test-deploy` a chain node once reached
# neither peer for exactly 30 s after start-up, not seen since). A lookup costs next to nothing.
DNS_MIN_RESOLUTION_INTERVAL_MS = 1_000
# A lookup by grpc's own resolver (c-ares, its default; our image has grpc use the C library's,
# bounded by RES_OPTIONS in deploy/Containerfile) gives up after this instead of 120 s: a DNS server
# that never answers (podman's forwards a name it does not know yet, here to servers that never
# answer) kept a peer unreachable all that time. A failed lookup is tried again within seconds
# (measured against a server that never answers: the name was reached 2-4 s after it appeared in
# /etc/hosts, 24.7 s later with grpc's default).
DNS_QUERY_TIMEOUT_MS = 2_000


def _service_config(retry: bool) -> str:
    method_config: dict[str, Any] = {"name": [{}]}  # [{}] = every method of every service
    if retry:
        method_config["retryPolicy"] = RETRY_POLICY
    return json.dumps({"methodConfig": [method_config]})


def create_channel(
    target: str,
    *,
    retry: bool = True,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A `grpc.aio.Channel` to `target` ("host:port"); TLS when `credentials` is given."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retry else 0),
        ("grpc.service_config", _service_config(retry)),
        # Our service config wins over one a DNS TXT record could provide.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RESOLUTION_INTERVAL_MS),
        ("grpc.dns_ares_query_timeout", DNS_QUERY_TIMEOUT_MS),
        *_KEEPALIVE_OPTIONS,
    ]
    overridden = {key for key, _ in options}
    opts = [(k, v) for k, v in opts if k not in overridden] + list(options)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


def deadline(seconds: float | None = None) -> float:
    """The timeout (seconds) to pass as ``timeout=`` on a call: `seconds`, or the default."""
    value = DEFAULT_DEADLINE_S if seconds is None else float(seconds)
    if value <= 0:
        raise ValueError(f"deadline must be positive, got {value}")
    return value


async def wait_ready(channel: grpc.aio.Channel, timeout: float) -> None:
    """Waits until `channel` is connected; raises `Unavailable` after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            await channel.channel_ready()
    except TimeoutError:
        raise Unavailable(f"channel not ready after {timeout:g}s") from None


async def check_health(channel: grpc.aio.Channel, service: str = "", timeout: float = 2.0) -> bool:
    """True if `service` ("" = the whole server) reports SERVING; False on any other answer
    or error (NOT_SERVING, unknown service, unreachable, deadline)."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING
