"""`python -m exoapphost --dir NODE_DIR --cell CELL_ID [--log info]`: the app host of one cell.

Runs the cell's installed apps (cells/<cell id>/apps/<app id>_<version>/) and serves
`exocore.apps.v1.AppHost` (with health and reflection) on the node's `listen_addresses.apphost`
(else `addresses.apphost`). Apps' store requests go to node.yaml's `apphost.store_address`, else
the node's gateway (`addresses.gateway`: `exo daemon` runs one beside the app host; the requests
carry the node's auth token), else the node's own store, else the first store node of the cell.
Limits: node.yaml `apphost:` (exoapphost.settings).

Exit status: 0 after a graceful stop (SIGTERM/SIGINT), 1 on a runtime failure (cannot listen),
2 when the configuration does not allow running (no such cell, no app-host role, no apphost
address): `exo daemon` restarts the service after 1, never after 2.
"""

from __future__ import annotations

from exocommon.grpc_io import prefer_poller_io

if __name__ == "__main__":
    prefer_poller_io()  # before anything imports grpc (see exocommon.grpc_io)

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exocommon.config import Cell, NodeDirectory, Role
from exocommon.errors import ExocoreError
from exocommon.grpc_util import ServiceServer, configure_logging
from exocommon.grpc_util.server import stop_on_signals
from exocommon.process import EXIT_CONFIG, EXIT_FAILURE, ConfigurationProblem

from .bridge import GrpcStoreBridge, NodeToken
from .runtime import WasmEngine
from .service import AppHostService, compiled_cache_dir, registrations
from .settings import AppHostSettings

log = logging.getLogger("exoapphost")


@dataclass(frozen=True)
class AppHostSetup:
    directory: NodeDirectory
    cell: Cell
    bind: str
    settings: AppHostSettings
    store_address: str


def store_address_of(cell: Cell, settings: AppHostSettings) -> str:
    """Where the apps' store requests go (see module docstring); "" if nowhere."""
    if settings.store_address:
        return settings.store_address
    local = cell.local_node
    if local.addresses.gateway:  # `exo daemon` runs a gateway next to the app host
        return local.addresses.gateway
    if Role.STORE in cell.local_roles() and local.addresses.store:
        return local.addresses.store
    for node in cell.nodes_with_role(Role.STORE):
        if node.addresses.store:
            return node.addresses.store
    return local.addresses.store


def load_setup(node_dir: Path, cell_id: str) -> AppHostSetup:
    directory = NodeDirectory(node_dir)
    if not directory.node_yaml.exists():
        raise ConfigurationProblem(f"no node in {node_dir} (no node.yaml)")
    try:
        local = directory.load_local_node()
        cells = [c for c in directory.load_cells(local) if str(c.id) == cell_id]
        settings = AppHostSettings.from_node_config(local.config, str(directory.node_yaml))
    except ExocoreError as exc:
        raise ConfigurationProblem(str(exc)) from None
    if not cells:
        raise ConfigurationProblem(f"node {local.name} has no cell {cell_id}")
    cell = cells[0]
    if Role.APP_HOST not in cell.local_roles():
        raise ConfigurationProblem(f"node {local.name} does not have the app-host role in cell {cell.name} ({cell.id})")
    bind = local.listen_addresses.apphost
    if not bind:
        raise ConfigurationProblem(f"node {local.name} has no apphost address (addresses.apphost in node.yaml)")
    return AppHostSetup(directory, cell, bind, settings, store_address_of(cell, settings))


async def run(setup: AppHostSetup) -> int:
    cell = setup.cell
    engine = WasmEngine(cache_dir=compiled_cache_dir(setup.directory, str(cell.id)))
    token = NodeToken(str(cell.id), cell.local_node.keypair)
    bridge = GrpcStoreBridge(
        setup.store_address, timeout_s=setup.settings.limits.store_request_timeout_ms / 1000, token=token
    )
    service = AppHostService(setup.directory, cell, setup.settings, engine, bridge, store_address=setup.store_address)
    server = ServiceServer("apphost", setup.bind, registrations(service))
    try:
        await server.start()
    except OSError as exc:
        print(f"error: cannot listen on {setup.bind}: {exc}", file=sys.stderr)
        await bridge.close()
        return EXIT_FAILURE
    await asyncio.to_thread(service.reconcile)
    log.info(
        "app host of cell %s (%s) listening on %s",
        cell.name,
        cell.id,
        server.address,
        extra={
            "node": cell.local_node.name,
            "apps": len(service.runners),
            "store": setup.store_address or "none",
            "apps_dir": str(setup.directory.apps_dir(cell.id)),
        },
    )
    stop = asyncio.Event()
    stop_on_signals(stop)
    watcher = asyncio.create_task(service.watch(), name="apps-watch")
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await server.stop()
        await asyncio.to_thread(service.stop_all)
        await bridge.close()
        engine.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exoapphost", description="Run the app host of one cell.")
    parser.add_argument("--dir", required=True, help="node directory (holds node.yaml)")
    parser.add_argument("--cell", required=True, help="id of the cell (12D3KooW...)")
    parser.add_argument("--log", default="info", help="log level: off, error, warn, info, debug, trace")
    args = parser.parse_args(argv)
    faulthandler.enable()
    try:
        configure_logging(args.log, "apphost")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        setup = load_setup(Path(args.dir).expanduser(), args.cell)
    except ConfigurationProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(run(setup))
    except ExocoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
