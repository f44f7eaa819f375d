"""`python -m exocommon.grpc_util.healthcheck ADDR [--service NAME] [--timeout S]`: a gRPC health probe.

Asks ``grpc.health.v1.Health/Check`` at `ADDR` (``host:port``) for `NAME` ("" = the whole server,
the default) and exits 0 when the answer is SERVING, 1 for any other answer (NOT_SERVING, unknown
service) or error (unreachable, deadline), printing one line saying which. Container healthchecks
(compose) and Kubernetes exec probes run it inside the service's container; it only imports grpc
and the health stubs, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_UNHEALTHY = 1


def check(address: str, service: str = "", timeout_s: float = 2.0) -> tuple[bool, str]:
    """(serving, what was seen) for `service` at `address`."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "ERROR"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return False, f"{name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exocommon.grpc_util.healthcheck",
        description="Exit 0 if the gRPC server at ADDR reports SERVING (grpc.health.v1), else 1.",
    )
    parser.add_argument("address", metavar="ADDR", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help='service name to ask about (default "": the whole server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    serving, seen = check(args.address, args.service, args.timeout)
    what = f"{args.address} {args.service}".rstrip()
    print(f"{what}: {seen}", file=sys.stdout if serving else sys.stderr)
    return EXIT_SERVING if serving else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
