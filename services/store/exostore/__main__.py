"""`python -m exostore --dir NODE_DIR --cell CELL_ID [--log info]`: the store service of one cell.

Listens on the node's `listen_addresses.store` (else `addresses.store`) and tails the node's chain
service (`addresses.chain`); data in `cells/<cell id>/store/` (`payloads/` LevelDB, `chain/` tantivy
chain index). `--data-dir` and `--listen` run an extra replica of the same node next to the first.

Health: the process answers as soon as it listens; `exocore.store.v1.EntityStore` stays NOT_SERVING
until the store has caught up with the chain once (a gateway then routes elsewhere).

Exit status: 0 after a graceful stop (SIGTERM/SIGINT), 1 on a runtime failure (data folder busy or
broken, cannot listen), 2 when the configuration does not allow running (no such cell, no store or
chain role, no cell keypair, unreadable schema): `exo daemon` restarts a service after 1, never after 2.
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
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grpc_health.v1 import health_pb2

from exocommon.config import StoreSettings
from exocommon.errors import ExocoreError, FailedPrecondition
from exocommon.grpc_util import ServiceServer, configure_logging, create_channel
from exocommon.grpc_util.link import CHAIN_LOG_LINK_SERVICE, LinkClient
from exocommon.grpc_util.server import stop_on_signals
from exocommon.process import EXIT_CONFIG, EXIT_FAILURE, tune_garbage_collector
from exocommon.sealed import derive_cell_data_key
from exocore.chain.v1 import chain_pb2_grpc
from exostore.entity_index import EntityIndex
from exostore.gc import GarbageCollector, GcConfig
from exostore.link import store_link_registration
from exostore.payloads import PayloadStore
from exostore.registry import TraitRegistry
from exostore.service import SERVICE_NAME, StoreService, registrations
from exostore.setup import ConfigurationProblem, StoreSetup, load_registry, load_setup
from exostore.tailer import ChainTailer

log = logging.getLogger("exostore")


# Reconnect quickly to a chain service that restarted (grpc's default backoff grows to 120 s).
_CHAIN_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


async def run(setup: StoreSetup, registry: TraitRegistry, payloads: PayloadStore) -> int:
    cell = setup.cell
    assert cell.keypair is not None
    settings = StoreSettings.from_config(
        cell.local_node.config.store if cell.local_node.config.HasField("store") else None
    )
    data_key = derive_cell_data_key(cell.keypair)
    gc_settings = settings.index.garbage_collector
    gc_config = GcConfig(run_interval_secs=gc_settings.run_interval_secs, queue_size=gc_settings.queue_size)
    gc: GarbageCollector | None = None
    index = EntityIndex(
        setup.data_dir,
        registry,
        settings.index,
        payloads,
        data_key,
        gc_flagger=lambda agg: gc.flag(agg) if gc is not None else None,
    )
    gc = GarbageCollector(gc_config, index.entity_mutations, time.time_ns)
    indexer = ThreadPoolExecutor(1, thread_name_prefix="store-indexer")
    queries = ThreadPoolExecutor(settings.query_parallelism, thread_name_prefix="store-query")
    channel = create_channel(setup.chain_address, options=_CHAIN_CHANNEL_OPTIONS)
    chain = chain_pb2_grpc.ChainLogStub(channel)
    service = StoreService(
        index,
        chain,
        data_key,
        registry,
        queries,
        query_parallelism=settings.query_parallelism,
        gc=gc,
        chain_link=LinkClient(channel, CHAIN_LOG_LINK_SERVICE),
    )
    tailer = ChainTailer(chain, index, indexer, service.on_update)
    server = ServiceServer("store", setup.bind, [*registrations(service), store_link_registration(service)])
    try:
        await server.start()
    except OSError as exc:
        raise FailedPrecondition(f"cannot listen on {setup.bind}: {exc}") from None
    await server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info(
        "store service of cell %s (%s) listening on %s, tailing the chain at %s",
        cell.name,
        cell.id,
        server.address,
        setup.chain_address,
        extra={
            "store_dir": str(setup.data_dir),
            "chain_indexed": index.chain_indexed.offset if index.chain_indexed else None,
            "trait_types": len(registry.message_names()),
        },
    )

    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(tailer.run(), name="chain-tailer"),
        asyncio.create_task(tailer.run_deferred_indexing(), name="deferred-indexing"),
        asyncio.create_task(service.run_gc(gc_config.run_interval_secs), name="gc"),
    ]

    async def mark_serving() -> None:
        await tailer.caught_up.wait()
        if not server.stopping:
            await server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            log.info("caught up with the chain: serving")

    tasks.append(asyncio.create_task(mark_serving(), name="mark-serving"))
    failed: list[BaseException] = []

    def on_task_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("task %s failed; stopping the store", task.get_name(), exc_info=task.exception())
            failed.append(task.exception())  # type: ignore[arg-type]
            stop.set()

    for task in tasks:
        task.add_done_callback(on_task_done)

    stop_on_signals(stop)
    try:
        await stop.wait()
    finally:
        await service.watches.close()  # long-lived streams end first
        await server.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
        indexer.submit(index.close).result()
        indexer.shutdown()
        queries.shutdown()
    return EXIT_FAILURE if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exostore", description="Run the store service of one cell.")
    parser.add_argument("--dir", required=True, help="node directory (holds node.yaml)")
    parser.add_argument("--cell", required=True, help="id of the cell (12D3KooW...)")
    parser.add_argument("--log", default="info", help="log level: off, error, warn, info, debug, trace")
    parser.add_argument("--data-dir", help="data folder (default: cells/<cell id>/store of the node)")
    parser.add_argument("--listen", help="host:port to listen on (default: the node's store address)")
    args = parser.parse_args(argv)
    faulthandler.enable()
    try:
        configure_logging(args.log, "store")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        setup = load_setup(
            Path(args.dir).expanduser(),
            args.cell,
            Path(args.data_dir).expanduser() if args.data_dir else None,
            args.listen,
        )
        registry = load_registry(setup.directory, setup.cell)
    except ConfigurationProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        payloads = PayloadStore(setup.data_dir / "payloads")
    except ExocoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        tune_garbage_collector()  # set up: what exists now lives as long as the process
        return asyncio.run(run(setup, registry, payloads))
    except ExocoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
    finally:
        payloads.close()


if __name__ == "__main__":
    sys.exit(main())
