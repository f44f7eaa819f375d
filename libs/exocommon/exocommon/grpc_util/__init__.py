"""gRPC plumbing shared by every Exocore service and client.

Server: `ServiceServer` / `serve` (health, reflection, graceful SIGTERM shutdown, request log and
error mapping), `ErrorMappingInterceptor` (ExocoreError -> status), `RequestLoggingInterceptor`,
`configure_logging`. Client: `create_channel` (retries, keepalive, fast DNS re-resolution), `deadline`,
`DEFAULT_DEADLINE_S`, `wait_ready`, `check_health`, `exception_from_rpc_error` (status -> typed
ExocoreError). See each module's docstring.
"""

from ._served import ErrorMappingInterceptor, RequestLoggingInterceptor
from .client import (
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DNS_MIN_RESOLUTION_INTERVAL_MS,
    DNS_QUERY_TIMEOUT_MS,
    check_health,
    create_channel,
    deadline,
    wait_ready,
)
from .errors import exception_from_rpc_error, exception_from_status
from .logging import configure_logging
from .server import Registration, ServiceServer, serve

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DNS_MIN_RESOLUTION_INTERVAL_MS",
    "DNS_QUERY_TIMEOUT_MS",
    "ErrorMappingInterceptor",
    "Registration",
    "RequestLoggingInterceptor",
    "ServiceServer",
    "check_health",
    "configure_logging",
    "create_channel",
    "deadline",
    "exception_from_rpc_error",
    "exception_from_status",
    "serve",
    "wait_ready",
]
