"""The app host as a user runs it: `exo daemon` on a one-node cell (chain, store, gateway, app host).

The example app (installed before the start) runs its golden path against the real store, then
keeps its counter entity up to date; a client writes entities and reads the counter through the
gateway. An app generated, built and installed while the daemon runs starts by itself (its log line
appears in the daemon's output). `AppHost.Status` reports both apps over gRPC.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cluster import exo, wait_until
from processes import cell_id_of, one_node_cell
from test_daemon import Lines

from exocommon.client import MutationBuilder, QueryBuilder, SyncClient
from exocore.apps.v1 import app_host_pb2, app_host_pb2_grpc
from exocore.test import test_pb2

pytestmark = pytest.mark.timeout(90)

APPHOST = Path(__file__).resolve().parents[2] / "services" / "apphost"
EXAMPLE = APPHOST / "examples" / "example"
SDK_FLAGS = [
    "--target=wasm32-freestanding",
    "-O2",
    "-s",
    "-nostdlib",
    "-mbulk-memory",
    f"-I{APPHOST / 'sdk'}",
    "-Wl,--no-entry",
    "-Wl,-z,stack-size=65536",
]


def example_wasm() -> Path:
    wasm = EXAMPLE / "example.wasm"
    sources = [EXAMPLE / "example.c", APPHOST / "sdk" / "exocore.c", APPHOST / "sdk" / "exocore.h"]
    if not wasm.exists() or any(wasm.stat().st_mtime < s.stat().st_mtime for s in sources):
        cmd = [sys.executable, "-m", "ziglang", "cc", *SDK_FLAGS, "-o", str(wasm), str(sources[0]), str(sources[1])]
        subprocess.run(cmd, check=True, timeout=120)
    return wasm


def counter_value(client: SyncClient) -> int | None:
    results = client.query(QueryBuilder.ids("example-counter"))
    if not results.entities:
        return None
    message = test_pb2.TestMessage()
    results.entities[0].entity.traits[0].message.Unpack(message)
    return message.uint1


def test_apps_run_under_the_daemon_and_write_through_the_gateway(tmp_path: Path):
    directory = one_node_cell(tmp_path / "node")
    d = str(directory.root)
    exo("app", "package", str(example_wasm().parent), "-o", str(tmp_path / "example.zip"))
    exo("-d", d, "cell", "app", "install", str(tmp_path / "example.zip"))
    apphost_address = directory.load_node_config().addresses.apphost

    daemon = subprocess.Popen(
        [sys.executable, "-m", "exocli", "-d", d, "daemon"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = Lines(daemon)
    try:
        output.wait_for(r"apphost of cell solo .* started: listening on")
        output.wait_for(r'msg="application initialized" app=example', timeout=30)
        output.wait_for(r'msg="mutation (success|error)', timeout=30)
        output.wait_for(r'msg="query success" app=example', timeout=30)
        output.wait_for(r'msg="task done" app=example')

        with SyncClient.for_node(directory.root) as client:
            for i in range(3):
                client.mutate(MutationBuilder().put_trait(f"note{i}", test_pb2.TestMessage(string1=f"note {i}")))
            # The app counts them (every 2 s) and writes the count into its entity.
            wait_until(lambda: counter_value(client) == 3, 30, "the example's counter to reach 3")

        # A new app, generated, built and installed while the daemon runs, starts by itself.
        demo = tmp_path / "demo"
        exo("app", "generate", "demo", "--dir", str(demo))
        subprocess.run(["make", "-s", "-C", str(demo), "package"], check=True, timeout=120, capture_output=True)
        exo("-d", d, "cell", "app", "install", str(demo / "demo.zip"))
        output.wait_for(r'msg="demo started" app=demo', timeout=30)

        with grpc.insecure_channel(apphost_address) as channel:
            status = app_host_pb2_grpc.AppHostStub(channel).Status(app_host_pb2.AppHostStatusRequest(), timeout=5)
        assert status.cell_id == cell_id_of(directory)
        assert status.store_address == directory.load_node_config().addresses.gateway
        apps = {app.name: app for app in status.apps}
        assert set(apps) == {"example", "demo"}
        for app in apps.values():
            assert app.state == app_host_pb2.APP_STATE_RUNNING and app.restarts == 0 and not app.last_error
        assert apps["example"].store_requests >= 4

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        print("\n".join(output.seen))
