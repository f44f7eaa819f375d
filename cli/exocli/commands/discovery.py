"""`exo discovery daemon`: run a discovery mailbox (SPEC.md 7), REST and gRPC, until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal

from exocli.context import Context
from exocommon.discovery import DEFAULT_PORT
from exocommon.errors import Unavailable

DEFAULT_HOST = "0.0.0.0"


def register(commands: argparse._SubParsersAction) -> None:
    discovery = commands.add_parser("discovery", help="the discovery mailbox used to join cells")
    sub = discovery.add_subparsers(dest="discovery_command", required=True, metavar="COMMAND")
    daemon = sub.add_parser("daemon", help="run a discovery server (REST API and gRPC service) until stopped")
    daemon.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    daemon.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="REST API port (default %(default)s; 0 = any free port)"
    )
    daemon.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="gRPC port of exocore.discovery.v1.Discovery (default: REST port + 1, or any free port if the REST "
        "port is 0)",
    )
    daemon.add_argument("--no-grpc", action="store_true", help="serve the REST API only")
    daemon.set_defaults(handler=run_discovery_daemon)


def run_discovery_daemon(ctx: Context, args: argparse.Namespace) -> int:
    if args.no_grpc:
        grpc_port = None
    elif args.grpc_port is not None:
        grpc_port = args.grpc_port
    else:
        grpc_port = args.port + 1 if args.port else 0
    return asyncio.run(_serve(args.host, args.port, grpc_port))


async def _serve(host: str, port: int, grpc_port: int | None) -> int:
    from exogateway.discovery import DiscoveryServer  # aiohttp is only loaded by this command

    server = DiscoveryServer(host, port, grpc_port)
    try:
        await server.start()
    except OSError as exc:
        await server.stop()
        raise Unavailable(f"cannot listen on {host}: {exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"discovery REST API: {server.http_url} (listening on {host}:{server.http_port})", flush=True)
    if server.grpc_address is not None:
        print(f"discovery gRPC (exocore.discovery.v1.Discovery): {server.grpc_address}", flush=True)
    print("Ctrl-C stops it.", flush=True)
    await stop.wait()
    await server.stop()
    return 0
