"""The app host service: runs the cell's installed apps and serves `exocore.apps.v1.AppHost`.

* At start and whenever cell.yaml changes (polled every `APPS_RELOAD_INTERVAL_MS`), the cell's
  apps are reconciled with the runners: an installed app with a module gets a runner, an app that
  was removed or whose installed folder changed (new version) is stopped (and the new one started).
  Apps listed in cell.yaml but not unpacked on this node are shown as STOPPED.
* `Status` lists every app with its state, restarts, last error and resource use; `RestartApp`
  restarts one at once (also out of its restart backoff).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio

from exocommon.apps import InstalledApp, installed_apps
from exocommon.clock import Clock
from exocommon.config import Cell, NodeDirectory
from exocommon.errors import ExocoreError, NotFound
from exocommon.ids import PeerId
from exocommon.keys import PublicKey
from exocore.apps.v1 import app_host_pb2, app_host_pb2_grpc

from .runner import AppRunner, AppSpec, AppState, AppStatusSnapshot, StoreBridge
from .runtime import WasmEngine
from .settings import APPS_RELOAD_INTERVAL_MS, AppHostSettings

log = logging.getLogger(__name__)

RunnerFactory = Callable[[AppSpec], AppRunner]


class AppHostService:
    """The apps of one cell on this node (see module docstring)."""

    def __init__(
        self,
        directory: NodeDirectory,
        cell: Cell,
        settings: AppHostSettings,
        engine: WasmEngine,
        bridge: StoreBridge,
        *,
        store_address: str = "",
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.directory = directory
        self.cell = cell
        self.settings = settings
        self.engine = engine
        self.bridge = bridge
        self.store_address = store_address
        self.stop_timeout_s = stop_timeout_s
        self.runners: dict[str, AppRunner] = {}
        # The apps' time: the node's consistent clock, shared (two apps never read the same instant).
        self.clock = Clock.for_node(cell.local_node.node_id)
        self._listed: list[InstalledApp] = []
        self._cell_stamp: tuple[int, int] | None = None

    @property
    def cell_id(self) -> str:
        return str(self.cell.id)

    def _cell_yaml_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.directory.cell_yaml(self.cell_id).stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load_cell_apps(self) -> list[InstalledApp]:
        for cfg in self.directory.load_cell_configs():
            if (cfg.id or str(PeerId.from_public_key(PublicKey.decode_base58(cfg.public_key)))) == self.cell_id:
                return installed_apps(self.directory, cfg)
        raise NotFound(f"cell {self.cell_id} is no longer configured on this node")

    def _make_runner(self, spec: AppSpec) -> AppRunner:
        return AppRunner(
            spec, self.engine, self.settings.limits, self.settings.restart, self.bridge, guest_clock=self.clock
        )

    def reconcile(self) -> None:
        """Start, stop or replace runners so they match the cell's installed apps. Blocking (a
        runner's stop waits for its thread): call it off the event loop."""
        self._cell_stamp = self._cell_yaml_stamp()
        try:
            apps = self._load_cell_apps()
        except ExocoreError as exc:
            log.warning("cannot read the cell's apps, keeping the running ones: %s", exc)
            return
        runnable: dict[str, InstalledApp] = {}
        for app in apps:
            if not app.loaded:
                continue
            try:
                if not app.manifest().has_module:
                    continue  # schemas only: nothing to run
            except ExocoreError:
                pass  # the runner reports it (invalid package) and retries with backoff
            runnable[app.app_id] = app
        for app_id, runner in list(self.runners.items()):
            app = runnable.get(app_id)
            if app is None or runner.spec.directory != app.directory:
                log.info("stopping app %s", runner.spec.label)
                runner.stop(self.stop_timeout_s)
                del self.runners[app_id]
        for app_id, app in runnable.items():
            if app_id not in self.runners:
                spec = AppSpec(app_id, app.name, app.version, directory=app.directory)
                runner = self._make_runner(spec)
                self.runners[app_id] = runner
                log.info("starting app %s from %s", spec.label, app.directory)
                runner.start()
        self._listed = apps

    async def watch(self, interval_s: float = APPS_RELOAD_INTERVAL_MS / 1000) -> None:
        """Reconcile whenever cell.yaml changes (until cancelled)."""
        while True:
            await asyncio.sleep(interval_s)
            if self._cell_yaml_stamp() != self._cell_stamp:
                await asyncio.to_thread(self.reconcile)

    def stop_all(self) -> None:
        for runner in self.runners.values():
            runner.stop(0)
        for runner in self.runners.values():
            runner.stop(self.stop_timeout_s)

    def restart_app(self, app_id: str) -> None:
        runner = self.runners.get(app_id)
        if runner is None:
            raise NotFound(f"no running app {app_id!r} (see AppHost.Status)")
        log.info("restart of app %s requested", runner.spec.label)
        runner.restart()

    def status(self) -> app_host_pb2.AppHostStatus:
        limits = self.settings.limits
        out = app_host_pb2.AppHostStatus(
            node_id=str(self.cell.local_node.node_id),
            cell_id=self.cell_id,
            limits=app_host_pb2.AppLimits(
                fuel_per_call=limits.fuel_per_call,
                call_timeout_ms=limits.call_timeout_ms,
                memory_max_bytes=limits.memory_max_bytes,
                store_requests_in_flight_max=limits.store_requests_in_flight_max,
                store_request_timeout_ms=limits.store_request_timeout_ms,
            ),
            store_address=self.store_address,
        )
        listed = set()
        for app in self._listed:
            listed.add(app.app_id)
            runner = self.runners.get(app.app_id)
            if runner is not None:
                out.apps.append(app_status_proto(runner.status()))
                continue
            entry = app_host_pb2.AppStatus(
                app_id=app.app_id,
                name=app.name,
                version=app.version,
                state=app_host_pb2.APP_STATE_STOPPED,
                path=str(app.directory),
            )
            if not app.loaded:
                entry.last_error = f"not installed on this node (no {app.directory.name} in the cell's apps folder)"
            out.apps.append(entry)
        for app_id, runner in self.runners.items():
            if app_id not in listed:
                out.apps.append(app_status_proto(runner.status()))
        return out


def app_status_proto(snapshot: AppStatusSnapshot) -> app_host_pb2.AppStatus:
    spec = snapshot.spec
    status = app_host_pb2.AppStatus(
        app_id=spec.app_id,
        name=spec.name,
        version=spec.version,
        state=int(snapshot.state),
        last_error=snapshot.last_error,
        restarts=snapshot.restarts,
        ticks=snapshot.ticks,
        store_requests=snapshot.store_requests,
        memory_bytes=snapshot.memory_bytes,
        fuel_consumed=snapshot.fuel_consumed,
        store_requests_in_flight=snapshot.store_requests_in_flight,
        messages=snapshot.messages,
        path=str(spec.directory or spec.module_path or ""),
    )
    if snapshot.started_at_ns and snapshot.state in (AppState.RUNNING, AppState.STARTING):
        status.started_at.FromNanoseconds(snapshot.started_at_ns)
    if snapshot.last_error_at_ns:
        status.last_error_at.FromNanoseconds(snapshot.last_error_at_ns)
    return status


class AppHostServicer(app_host_pb2_grpc.AppHostServicer):
    def __init__(self, service: AppHostService) -> None:
        self.service = service

    async def Status(
        self, request: app_host_pb2.AppHostStatusRequest, context: grpc.aio.ServicerContext
    ) -> app_host_pb2.AppHostStatus:
        return self.service.status()

    async def RestartApp(
        self, request: app_host_pb2.RestartAppRequest, context: grpc.aio.ServicerContext
    ) -> app_host_pb2.RestartAppResponse:
        self.service.restart_app(request.app_id)
        return app_host_pb2.RestartAppResponse()


def registrations(service: AppHostService) -> list[tuple[Callable[..., None], object, str]]:
    return [
        (
            app_host_pb2_grpc.add_AppHostServicer_to_server,
            AppHostServicer(service),
            app_host_pb2.DESCRIPTOR.services_by_name["AppHost"].full_name,
        )
    ]


def compiled_cache_dir(directory: NodeDirectory, cell_id: str) -> Path:
    """Where compiled modules are kept (deletable: they are rebuilt from the packages)."""
    return directory.tmp_dir(cell_id) / "compiled-modules"
