"""The gateway of one cell: gRPC `EntityStore` with auth and routing, and the HTTP endpoints.

`Gateway(settings, cell_source)` wires the parts (`auth`, `limits`, `routing`, `grpc_service`,
`http_service`) and runs them in one event loop:

* the gRPC server (`ServiceServer`: health, reflection, graceful SIGTERM drain) on `grpc_bind`; its
  health reports `exocore.store.v1.EntityStore` SERVING while at least one store replica is healthy;
* the aiohttp server on `http_bind` (None: no HTTP endpoints);
* the router's health checks of the store replicas;
* a reload task: every `reload_interval_s` it re-reads the cell (through `cell_source`) when the
  node or cell configuration files changed, so nodes added to or removed from the cell change the
  accepted tokens and the store replicas without a restart.

The gateway keeps no state: run as many as wanted (`python -m exogateway --listen ADDR`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from grpc_health.v1 import health_pb2

from exocommon.client.registry import load_generated_modules
from exocommon.config import Cell, NodeDirectory, Role
from exocommon.errors import ExocoreError
from exocommon.grpc_util import ServiceServer
from exocommon.keys import PublicKey
from exogateway.auth import Authenticator
from exogateway.grpc_service import CALL_TIMEOUT_S, EntityStoreProxy, registration
from exogateway.http_service import create_http_app
from exogateway.limits import Limits, LimitSettings
from exogateway.routing import HEALTH_INTERVAL_S, LINK_GATHER_S, STORE_SERVICE, Router

__all__ = ["CellView", "Gateway", "GatewaySettings", "cell_view", "directory_cell_source"]

log = logging.getLogger("exogateway")

RELOAD_INTERVAL_S = 2.0


@dataclass(frozen=True)
class GatewaySettings:
    grpc_bind: str
    http_bind: str | None = None
    extra_store_addresses: tuple[str, ...] = ()
    # Each store address stands for every address its host name resolves to (see `Router`).
    resolve_store_names: bool = False
    # Unary calls go to each store replica over one multiplexed stream (see `Router`).
    store_links: bool = True
    # How long a link frame waits for more calls while many are in flight (`Router`'s `link_gather_s`).
    link_gather_s: float = LINK_GATHER_S
    limits: LimitSettings = field(default_factory=LimitSettings)
    call_timeout_s: float = CALL_TIMEOUT_S
    health_interval_s: float = HEALTH_INTERVAL_S
    reload_interval_s: float = RELOAD_INTERVAL_S
    # Room above `request_bytes_max` so a too-large request gets the gateway's clear answer.
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class CellView:
    """What the gateway needs of a cell: its id and name, members' keys, store replica addresses."""

    cell_id: str
    name: str
    members: Mapping[str, PublicKey]
    store_addresses: tuple[str, ...]


def cell_view(cell: Cell) -> CellView:
    """The view of a loaded cell. The local node's store address comes from its node.yaml."""
    local_id = str(cell.local_node.node_id)
    addresses = []
    for node_id, node in cell.nodes.items():
        if Role.STORE not in node.roles:
            continue
        address = cell.local_node.addresses.store if node_id == local_id else node.addresses.store
        if address:
            addresses.append(address)
    members = {node_id: node.public_key for node_id, node in cell.nodes.items()}
    return CellView(str(cell.id), cell.name, members, tuple(addresses))


def directory_cell_source(node_dir: Path, cell_id: str) -> Callable[[], CellView]:
    """Loads the cell `cell_id` of the node in `node_dir` (raises ExocoreError if it cannot)."""
    directory = NodeDirectory(node_dir)

    def load() -> CellView:
        local = directory.load_local_node()
        cells = [c for c in directory.load_cells(local) if str(c.id) == cell_id]
        if not cells:
            raise ExocoreError(f"node {local.name} has no cell {cell_id}")
        return cell_view(cells[0])

    return load


def _config_stamp(paths: Sequence[Path]) -> tuple[float, ...]:
    stamp = []
    for path in paths:
        try:
            stamp.append(path.stat().st_mtime)
        except OSError:
            stamp.append(-1.0)
    return tuple(stamp)


class Gateway:
    """See the module docstring."""

    def __init__(
        self,
        settings: GatewaySettings,
        cell_source: Callable[[], CellView],
        watched_files: Sequence[Path] = (),
        extra_http_apps: Mapping[str, web.Application] | None = None,
    ) -> None:
        load_generated_modules()  # reflection and JSON know every project type (traits in `Any`)
        self.settings = settings
        self._cell_source = cell_source
        self._watched_files = list(watched_files)
        self._extra_http_apps = dict(extra_http_apps or {})
        self.cell = cell_source()
        self.authenticator = Authenticator(self.cell.cell_id, self.cell.members)
        self.limits = Limits(settings.limits)
        self.router = Router(
            self._store_addresses(self.cell),
            health_interval_s=settings.health_interval_s,
            max_message_bytes=settings.max_message_bytes,
            resolve_names=settings.resolve_store_names,
            use_links=settings.store_links,
            link_gather_s=settings.link_gather_s,
        )
        self.proxy = EntityStoreProxy(self.authenticator, self.router, self.limits, settings.call_timeout_s)
        self.grpc_server = ServiceServer(
            "gateway", settings.grpc_bind, [registration(self.proxy)], max_message_bytes=settings.max_message_bytes
        )
        self._http_runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._stamp = _config_stamp(self._watched_files)

    def _store_addresses(self, cell: CellView) -> list[str]:
        return [*cell.store_addresses, *self.settings.extra_store_addresses]

    @property
    def grpc_address(self) -> str:
        return self.grpc_server.address

    @property
    def http_url(self) -> str | None:
        if self.http_port is None or self.settings.http_bind is None:
            return None
        host = self.settings.http_bind.rpartition(":")[0]
        return f"http://{host}:{self.http_port}"

    async def start(self) -> None:
        await self.router.start()
        await self.grpc_server.start()
        # The EntityStore health status says whether a store replica is reachable ("" stays SERVING:
        # the gateway itself is up and answers UNAVAILABLE with an explanation).
        self.router.on_availability_change = self._on_availability_change
        await self._set_store_health(self.router.available)
        if self.settings.http_bind is not None:
            await self._start_http(self.settings.http_bind)
        self._reload_task = asyncio.create_task(self._reload_loop(), name="gateway-reload")

    async def _start_http(self, bind: str) -> None:
        app = create_http_app(self.authenticator, self.router, self.limits, self.settings.call_timeout_s)
        for prefix, sub_app in self._extra_http_apps.items():
            app.add_subapp(prefix, sub_app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port = bind.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]") or None, int(port), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot listen on http://{bind}: {exc}") from exc
        self._http_runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else int(port)

    def _on_availability_change(self, available: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._set_store_health(available))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _set_store_health(self, available: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if available else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.grpc_server.health.set(STORE_SERVICE, status)

    async def stop(self) -> None:
        """Graceful: health NOT_SERVING, drain, stop both servers, then the router."""
        if self._reload_task is not None:
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload_task
            self._reload_task = None
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        await self.grpc_server.stop()
        await self.router.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- configuration reload -------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            stamp = _config_stamp(self._watched_files)
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            await self.reload()

    async def reload(self) -> None:
        """Re-reads the cell; keeps the current view if the files do not load (logged)."""
        try:
            cell = self._cell_source()
        except ExocoreError as exc:
            log.warning("cannot reload the cell configuration; keeping the current one: %s", exc)
            return
        if cell == self.cell:
            return
        log.info(
            "cell configuration changed: %d member(s), store replicas %s",
            len(cell.members),
            ", ".join(cell.store_addresses) or "none",
        )
        self.cell = cell
        self.authenticator.set_members(cell.members)
        await self.router.set_addresses(self._store_addresses(cell))

    def statistics(self) -> dict[str, object]:
        return {**self.router.statistics(), **self.limits.statistics(), **self.authenticator.statistics()}
