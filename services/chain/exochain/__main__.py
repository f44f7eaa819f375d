"""`python -m exochain --dir NODE_DIR --cell CELL_ID [--log info]`: the chain service of one cell.

Listens on the node's `listen_addresses.chain` (else `addresses.chain`); storage in
`cells/<cell id>/chain/`. Exit status: 0 after a graceful stop (SIGTERM/SIGINT), 1 on a runtime
failure (storage busy or broken, cannot listen, engine failure), 2 when the configuration does not
allow running (no such cell, no chain role, no genesis block and no peer): `exo daemon` restarts
a service after 1, never after 2.
"""

from __future__ import annotations

from exocommon.grpc_io import prefer_poller_io

if __name__ == "__main__":
    prefer_poller_io()  # before anything imports grpc (see exocommon.grpc_io)

import argparse
import asyncio
import faulthandler
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exochain.core.common import LocalChainNode
from exochain.core.engine import Engine
from exochain.model import validate_genesis
from exochain.service import ChainService, ShellConfig, chain_cell_of, peer_addresses_of, registrations
from exochain.settings import engine_config_from_node
from exochain.storage.leveldb import LevelDbStorage
from exocommon.clock import SystemTimeSource
from exocommon.config import Cell, NodeDirectory, Role
from exocommon.errors import ExocoreError, FailedPrecondition
from exocommon.grpc_util import ServiceServer, configure_logging
from exocommon.grpc_util.server import stop_on_signals
from exocommon.process import EXIT_CONFIG, EXIT_FAILURE, ConfigurationProblem, tune_garbage_collector

log = logging.getLogger("exochain")


@dataclass(frozen=True)
class ChainNodeSetup:
    directory: NodeDirectory
    cell: Cell
    bind: str


def load_setup(node_dir: Path, cell_id: str) -> ChainNodeSetup:
    """The node and cell to run, checked; ConfigurationProblem says why it cannot run."""
    directory = NodeDirectory(node_dir)
    if not directory.node_yaml.exists():
        raise ConfigurationProblem(f"no node in {node_dir} (no node.yaml)")
    try:
        local = directory.load_local_node()
        cells = [c for c in directory.load_cells(local) if str(c.id) == cell_id]
    except ExocoreError as exc:
        raise ConfigurationProblem(str(exc)) from None
    if not cells:
        raise ConfigurationProblem(f"node {local.name} has no cell {cell_id}")
    cell = cells[0]
    if Role.CHAIN not in cell.local_roles():
        raise ConfigurationProblem(f"node {local.name} does not have the chain role in cell {cell.name} ({cell.id})")
    bind = local.listen_addresses.chain
    if not bind:
        raise ConfigurationProblem(f"node {local.name} has no chain address (addresses.chain in node.yaml)")
    return ChainNodeSetup(directory, cell, bind)


def check_genesis(storage: LevelDbStorage, cell: Cell) -> None:
    genesis = storage.chain.get_block(0)
    if genesis is None:
        if not any(peer_addresses_of(cell).values()):
            raise ConfigurationProblem(
                f"the chain of cell {cell.name} ({cell.id}) has no genesis block and no peer to download it from; "
                "create it with `exo cell chain init`"
            )
        return
    try:
        validate_genesis(genesis, str(cell.id), cell.public_key)
    except ExocoreError as exc:
        raise ConfigurationProblem(f"the local chain does not belong to cell {cell.id}: {exc}") from None


async def run(setup: ChainNodeSetup, storage: LevelDbStorage) -> int:
    cell = setup.cell
    engine_config = engine_config_from_node(cell.local_node.config, str(setup.directory.node_yaml))
    time_source = SystemTimeSource()
    local = LocalChainNode(str(cell.local_node.node_id), cell.local_node.keypair)
    chain_cell = chain_cell_of(cell)
    engine = Engine(engine_config, local, chain_cell, storage.chain, storage.pending, storage.meta, time_source)
    stop = asyncio.Event()
    service = ChainService(
        engine,
        peer_addresses_of(cell),
        time_source,
        ShellConfig(tick_interval_s=engine_config.tick_interval_ns / 1e9),
        on_fatal=lambda _exc: stop.set(),
        durability=storage,
    )
    server = ServiceServer("chain", setup.bind, registrations(service))
    try:
        await server.start()
    except OSError as exc:
        raise FailedPrecondition(f"cannot listen on {setup.bind}: {exc}") from None
    await service.start()
    status = engine.status()
    log.info(
        "chain service of cell %s (%s) listening on %s",
        cell.name,
        cell.id,
        server.address,
        extra={
            "node": cell.local_node.name,
            "chain_dir": str(setup.directory.chain_dir(cell.id)),
            "blocks": storage.chain.block_count(),
            "height": status.height,
            "pending_operations": status.pending_operations,
            "peers": len(service.peers),
        },
    )

    stop_on_signals(stop)
    try:
        await stop.wait()
    finally:
        # Long-lived streams end first, so the graceful stop only waits for short calls.
        service.end_streams()
        await server.stop()
        await service.close()
    return EXIT_FAILURE if service.fatal_error is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exochain", description="Run the chain service of one cell.")
    parser.add_argument("--dir", required=True, help="node directory (holds node.yaml)")
    parser.add_argument("--cell", required=True, help="id of the cell (12D3KooW...)")
    parser.add_argument("--log", default="info", help="log level: off, error, warn, info, debug, trace")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash in a C extension (grpc, plyvel) still leaves a traceback
    try:
        configure_logging(args.log, "chain")
    except ValueError as exc:
        parser.error(str(exc))

    node_dir = Path(args.dir).expanduser()
    try:
        setup = load_setup(node_dir, args.cell)
    except ConfigurationProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    chain_dir = setup.directory.chain_dir(setup.cell.id)
    # Until the service runs, its only output is a one-line error if it cannot (the listening line
    # says what the storage holds).
    storage_log = logging.getLogger("exochain.storage")
    storage_log.setLevel(logging.WARNING)
    try:
        # Group commit: writes are made durable by the service's storage syncs (see exochain.service).
        storage = LevelDbStorage(chain_dir, sync_writes=False)
    except ExocoreError as exc:  # busy (another process holds the LevelDB lock) or broken
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        storage_log.setLevel(logging.NOTSET)
    try:
        check_genesis(storage, setup.cell)
        tune_garbage_collector()
        return asyncio.run(run(setup, storage))
    except ConfigurationProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ExocoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
    finally:
        storage.close()


if __name__ == "__main__":
    sys.exit(main())
