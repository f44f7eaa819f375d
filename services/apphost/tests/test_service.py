"""The AppHost service in process: the cell's installed apps run, `Status` and `RestartApp` over
gRPC (with health and reflection), cell.yaml changes start and stop apps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exoapphost.runner import REPLY_TYPES, AppSpec
from exoapphost.runtime import WasmEngine
from exoapphost.service import AppHostService, registrations
from exoapphost.settings import AppHostSettings, AppLimits, RestartPolicy
from exocli.main import main as exo_main
from exocommon.apps import install_package, package_app
from exocommon.clock import Clock
from exocommon.config import NodeDirectory
from exocommon.grpc_util import ServiceServer
from exocommon.keys import Keypair
from exocore.apps import runtime_pb2
from exocore.apps.v1 import app_host_pb2, app_host_pb2_grpc

pytestmark = pytest.mark.timeout(60)

RUNNING = app_host_pb2.APP_STATE_RUNNING
BACKOFF = app_host_pb2.APP_STATE_BACKOFF
STOPPED = app_host_pb2.APP_STATE_STOPPED


class AnsweringBridge:
    def submit(self, app, message: runtime_pb2.OutMessage, reply: Callable) -> None:
        reply(runtime_pb2.InMessage(type=REPLY_TYPES[message.type], rendez_vous_id=message.rendez_vous_id))


def make_app(root: Path, name: str, wasm: bytes) -> tuple[Path, str]:
    """An app folder with a new key around `wasm`; (package zip, app id)."""
    folder = root / name
    folder.mkdir()
    keypair = Keypair.generate()
    (folder / "app.yaml").write_text(
        f"name: {name}\nversion: 1.0.0\npublic_key: {keypair.public_key.encode_base58()}\nmodule: {{file: app.wasm}}\n"
    )
    (folder / "app.wasm").write_bytes(wasm)
    from exocommon.ids import PeerId

    return package_app(folder), str(PeerId.from_public_key(keypair.public_key))


@pytest.fixture
def node(tmp_path: Path) -> NodeDirectory:
    directory = NodeDirectory(tmp_path / "node")
    assert exo_main(["-d", str(directory.root), "node", "init", "--name", "host"]) == 0
    assert exo_main(["-d", str(directory.root), "cell", "init", "--name", "c", "--no-genesis"]) == 0
    return directory


async def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_status_restart_and_reload(node: NodeDirectory, tmp_path: Path, example_wasm: Path, wat_guest):
    (cell,) = node.load_cells()
    cell_id = str(cell.id)
    example_zip, example_id = make_app(tmp_path, "example", example_wasm.read_bytes())
    install_package(node, cell_id, str(example_zip))

    settings = AppHostSettings(
        limits=AppLimits(call_timeout_ms=500),
        restart=RestartPolicy(backoff_initial_ms=50, backoff_max_ms=100),
    )
    engine = WasmEngine()
    service = AppHostService(node, cell, settings, engine, AnsweringBridge(), store_address="127.0.0.1:1")
    # Every app reads the node's consistent clock (SPEC 11: not the bare wall clock).
    assert service.clock.clock_id == Clock.for_node(cell.local_node.node_id).clock_id
    assert service._make_runner(AppSpec("id", "app", "1", wasm=b"")).guest_clock is service.clock
    await asyncio.to_thread(service.reconcile)
    server = ServiceServer("apphost", "127.0.0.1:0", registrations(service), drain_delay_s=0)
    await server.start()
    watcher = asyncio.create_task(service.watch(0.05))
    channel = grpc.aio.insecure_channel(server.address)
    stub = app_host_pb2_grpc.AppHostStub(channel)
    try:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="exocore.apps.v1.AppHost"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        async def app_status(app_id: str) -> app_host_pb2.AppStatus | None:
            status = await stub.Status(app_host_pb2.AppHostStatusRequest(), timeout=5)
            return next((a for a in status.apps if a.app_id == app_id), None)

        async def running_with_requests() -> bool:
            s = await app_status(example_id)
            return s is not None and s.state == RUNNING and s.store_requests >= 2 and s.ticks >= 2

        deadline = time.monotonic() + 10
        while not await running_with_requests():
            assert time.monotonic() < deadline, "example app running"
            await asyncio.sleep(0.05)
        status = await stub.Status(app_host_pb2.AppHostStatusRequest(), timeout=5)
        assert status.cell_id == cell_id and status.node_id == str(cell.local_node.node_id)
        assert status.limits.call_timeout_ms == 500 and status.store_address == "127.0.0.1:1"
        (example,) = status.apps
        assert (example.name, example.version, example.restarts, example.last_error) == ("example", "1.0.0", 0, "")
        assert example.memory_bytes >= 65536 and example.fuel_consumed > 0 and example.messages >= 2
        assert example.started_at.seconds > 0 and example.path.endswith(f"{example_id}_1.0.0")

        # RestartApp: restarted at once; an unknown app is NOT_FOUND.
        await stub.RestartApp(app_host_pb2.RestartAppRequest(app_id=example_id), timeout=5)
        await wait_for(lambda: service.runners[example_id].status().restarts == 1, what="the restart")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RestartApp(app_host_pb2.RestartAppRequest(app_id="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        # Installing a crashing app while the service runs: started, fails, visible in Status.
        crash_zip, crash_id = make_app(tmp_path, "crash", wat_guest(tick="unreachable"))
        install_package(node, cell_id, str(crash_zip))
        await wait_for(lambda: crash_id in service.runners, what="the new app started")
        await wait_for(lambda: service.runners[crash_id].status().restarts >= 2, what="the new app's restarts")
        crash = await app_status(crash_id)
        assert crash is not None and crash.state in (BACKOFF, app_host_pb2.APP_STATE_STARTING, RUNNING)
        assert crash.last_error.startswith("trap in __exocore_tick") and crash.last_error_at.seconds > 0
        example_now = await app_status(example_id)
        assert example_now is not None and example_now.state == RUNNING  # unaffected

        # Removing it from cell.yaml stops it.
        (cell_config,) = node.load_cell_configs()
        kept = [a for a in cell_config.apps if a.name != "crash"]
        del cell_config.apps[:]
        cell_config.apps.extend(kept)
        node.save_cell_config(cell_config)
        await wait_for(lambda: crash_id not in service.runners, what="the removed app stopped")
        assert await app_status(crash_id) is None

        # An app whose folder disappeared is listed as not installed.
        runner = service.runners[example_id]
        import shutil

        shutil.rmtree(runner.spec.directory)
        (cell_config,) = node.load_cell_configs()
        node.save_cell_config(cell_config)  # touch cell.yaml
        await wait_for(lambda: example_id not in service.runners, what="the uninstalled app stopped")
        gone = await app_status(example_id)
        assert gone is not None and gone.state == STOPPED and "not installed on this node" in gone.last_error
    finally:
        watcher.cancel()
        await channel.close()
        await server.stop()
        await asyncio.to_thread(service.stop_all)
        engine.close()
