"""`python -m exogateway --dir NODE_DIR --cell CELL_ID`: the gateway of one cell on this node.

Serves `exocore.store.v1.EntityStore` with auth tokens and routing over the cell's store replicas
on the node's `listen_addresses.gateway` (else `addresses.gateway`), and the thin-client HTTP
endpoints on its first `listen_addresses.http` (else `addresses.http`) URL.

Options:
  --listen HOST:PORT     gRPC address instead of the node's (for extra replicas of the gateway on one
                         node; such a replica serves HTTP only if --http is given too)
  --http HOST:PORT|none  HTTP address instead of the node's; `none` disables the HTTP endpoints
  --store HOST:PORT      an extra store replica (repeatable), besides the cell's store-role nodes
  --resolve-stores       each store address stands for every address its host name resolves to,
                         looked up again every 10 s (store pods behind a Kubernetes headless Service)
  --no-store-links       one gRPC call to a store per unary call, rather than a stream per store replica
                         that carries them all (a comparison, for benchmarks)
  --link-gather-ms MS    with many calls in flight, how long a link frame waits for more calls (default
                         1.5; 0: frames go at once)
  --request-bytes-max N, --streams-per-token-max N, --calls-per-token-max N   per-client limits

Exit status: 0 after a graceful stop (SIGTERM/SIGINT), 1 on a runtime failure (cannot listen),
2 when the configuration does not allow running (no node, no such cell, no gateway address).
"""

from __future__ import annotations

from exocommon.grpc_io import prefer_poller_io

if __name__ == "__main__":
    # Measured on the gateway: the EventEngine's thread hand-offs were a quarter of its CPU per
    # proxied call (~375 -> ~300 us with 32 clients).
    prefer_poller_io()  # before anything imports grpc (see exocommon.grpc_io)

import argparse
import asyncio
import faulthandler
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from exocommon.config import NodeDirectory
from exocommon.errors import ExocoreError
from exocommon.grpc_util import configure_logging
from exocommon.grpc_util.server import stop_on_signals
from exocommon.process import EXIT_CONFIG, EXIT_FAILURE, ConfigurationProblem, tune_garbage_collector
from exogateway.gateway import Gateway, GatewaySettings, directory_cell_source
from exogateway.limits import LimitSettings
from exogateway.routing import LINK_GATHER_S

log = logging.getLogger("exogateway")


def http_bind_of_url(url: str) -> str:
    """``host:port`` of an http URL of node.yaml (port 80 when it has none, as the original)."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if not parts.hostname:
        raise ConfigurationProblem(f"invalid http address {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigurationProblem(f"invalid http address {url!r}") from None
    return f"{host}:{port}"


def build_settings(args: argparse.Namespace) -> tuple[GatewaySettings, list[Path]]:
    directory = NodeDirectory(Path(args.dir).expanduser())
    if not directory.node_yaml.exists():
        raise ConfigurationProblem(f"no node in {args.dir} (no node.yaml)")
    try:
        local = directory.load_local_node()
        cells = [c for c in directory.load_cells(local) if str(c.id) == args.cell]
    except ExocoreError as exc:
        raise ConfigurationProblem(str(exc)) from None
    if not cells:
        raise ConfigurationProblem(f"node {local.name} has no cell {args.cell}")
    grpc_bind = args.listen or local.listen_addresses.gateway
    if not grpc_bind:
        raise ConfigurationProblem(f"node {local.name} has no gateway address (addresses.gateway in node.yaml)")
    if args.http is not None:
        http_bind = None if args.http.lower() == "none" else http_bind_of_url(args.http)
    elif args.listen:
        http_bind = None  # an extra replica: the node's HTTP address belongs to the main one
    else:
        http_bind = http_bind_of_url(local.listen_addresses.http[0]) if local.listen_addresses.http else None
    try:
        limits = LimitSettings(
            request_bytes_max=args.request_bytes_max,
            streams_per_token_max=args.streams_per_token_max,
            calls_per_token_max=args.calls_per_token_max,
        )
    except ValueError as exc:
        raise ConfigurationProblem(str(exc)) from None
    settings = GatewaySettings(
        grpc_bind=grpc_bind,
        http_bind=http_bind,
        extra_store_addresses=tuple(args.store),
        resolve_store_names=args.resolve_stores,
        store_links=not args.no_store_links,
        link_gather_s=args.link_gather_ms / 1000,
        limits=limits,
    )
    watched = [directory.node_yaml, directory.cell_yaml(args.cell)]
    return settings, watched


async def run(settings: GatewaySettings, node_dir: Path, cell_id: str, watched: list[Path]) -> int:
    gateway = Gateway(settings, directory_cell_source(node_dir, cell_id), watched)
    try:
        await gateway.start()
    except OSError as exc:
        await gateway.stop()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    log.info(
        "gateway of cell %s (%s) listening on %s",
        gateway.cell.name,
        gateway.cell.cell_id,
        gateway.grpc_address,
        extra={
            "http": gateway.http_url or "off",
            "store_replicas": ",".join(r.address for r in gateway.router.replicas) or "none",
            "healthy": ",".join(gateway.router.healthy_addresses()) or "none",
        },
    )
    stop = asyncio.Event()
    stop_on_signals(stop)
    try:
        await stop.wait()
    finally:
        await gateway.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exogateway", description="Run the gateway (client API with auth) of one cell."
    )
    parser.add_argument("--dir", required=True, help="node directory (holds node.yaml)")
    parser.add_argument("--cell", required=True, help="id of the cell (12D3KooW...)")
    parser.add_argument("--listen", help="gRPC address HOST:PORT instead of the node's addresses.gateway")
    parser.add_argument("--http", help="HTTP address HOST:PORT instead of the node's addresses.http[0]; none: off")
    parser.add_argument("--store", action="append", default=[], help="extra store replica HOST:PORT (repeatable)")
    parser.add_argument(
        "--resolve-stores",
        action="store_true",
        help="each store address stands for every address its name resolves to (a Kubernetes headless Service)",
    )
    parser.add_argument(
        "--no-store-links", action="store_true", help="one gRPC call to a store per call, without the link stream"
    )
    parser.add_argument(
        "--link-gather-ms",
        type=float,
        default=LINK_GATHER_S * 1000,
        help="with many calls in flight, how long a link frame to a store waits for more calls (0: none)",
    )
    defaults = LimitSettings()
    parser.add_argument("--request-bytes-max", type=int, default=defaults.request_bytes_max)
    parser.add_argument("--streams-per-token-max", type=int, default=defaults.streams_per_token_max)
    parser.add_argument("--calls-per-token-max", type=int, default=defaults.calls_per_token_max)
    parser.add_argument("--log", default="info", help="log level: off, error, warn, info, debug, trace")
    args = parser.parse_args(argv)
    faulthandler.enable()
    try:
        configure_logging(args.log, "gateway")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        settings, watched = build_settings(args)
    except ConfigurationProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        tune_garbage_collector()  # set up: what exists now lives as long as the process
        return asyncio.run(run(settings, Path(args.dir).expanduser(), args.cell, watched))
    except ExocoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
