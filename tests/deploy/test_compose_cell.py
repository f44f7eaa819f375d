"""The container end-to-end test of `make test-deploy` (skipped by `make test`): a real three-node cell
of podman containers started with podman-compose from deploy/compose/three-node.yaml.

It writes through node1's gateway and reads through node3's, SIGKILLs the service process of a store
container and of a chain container (the restart policy brings each back) while writing on, checks
both catch up with every acknowledged write, scales node1's gateway to 2 and reads through both
replicas, then removes everything. The timings (start-up of the cell, recovery and catch-up of the
killed containers) are printed and written to build/test-deploy/results.json.

Needs the image (`make images`, a dependency of `make test-deploy`), podman (with
deploy/containers.conf) and podman-compose. The cell lives in build/test-deploy with its own compose
project (`exotest`), so it never touches a `make compose-up` cell.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exocommon.client import MutationBuilder, QueryBuilder, SyncClient
from exocore.test import test_pb2

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "build" / "test-deploy"
IMAGE = os.environ.get("EXO_IMAGE", "localhost/exocore:latest")

pytestmark = [
    pytest.mark.skipif(os.environ.get("EXO_TEST_DEPLOY") != "1", reason="real containers: run by `make test-deploy`"),
    pytest.mark.timeout(900),
]


def load_composectl() -> Any:
    spec = importlib.util.spec_from_file_location("composectl", REPO / "deploy" / "compose" / "composectl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["composectl"] = module
    spec.loader.exec_module(module)
    return module


ctl = load_composectl()

# Run inside a container with `podman exec -i CTR python3 - ARGS` (the image has the project).
KILL_SERVICE = """
import os, signal
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        except OSError:
            continue
        if b"-m" in argv and any(a.startswith(b"exo") for a in argv):
            os.kill(int(pid), signal.SIGKILL)
            print(pid)
"""
CHAIN_PROBE = """
import json, sys, grpc
from exocore.chain.v1 import chain_pb2, chain_pb2_grpc
ids = [int(i) for i in json.loads(sys.argv[1])]
with grpc.insecure_channel("127.0.0.1:3310") as channel:
    stub = chain_pb2_grpc.ChainLogStub(channel)
    status = stub.Status(chain_pb2.StatusRequest(), timeout=5)
    ops = stub.GetOperations(chain_pb2.GetOperationsRequest(operation_ids=ids), timeout=5).operations
committed = sum(1 for op in ops if op.status == chain_pb2.OPERATION_STATUS_COMMITTED)
print(json.dumps({"height": status.height, "found": len(ops), "committed": committed}))
"""
STORE_PROBE = """
import json, sys
from exocommon.client import QueryBuilder, SyncClient
ids = json.loads(sys.argv[1])
with SyncClient("127.0.0.1:3320") as client:
    results = client.query(QueryBuilder.ids(*ids).count(len(ids) + 10), timeout=5)
print(json.dumps(sorted(r.entity.id for r in results.entities)))
"""


def podman(*args: str, check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], env=ctl.environment(), text=True, capture_output=True, input=input_text, check=check
    )


def in_container(container: str, script: str, *args: str) -> Any:
    result = podman("exec", "-i", container, "python3", "-", *args, input_text=script, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{container}: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout)


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> float:
    started = time.monotonic()
    last_error = ""
    while time.monotonic() - started < timeout_s:
        try:
            if condition():
                return time.monotonic() - started
        except (RuntimeError, subprocess.CalledProcessError, ValueError) as exc:
            last_error = str(exc)
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not after {timeout_s:.0f}s {last_error}")


class Cell:
    """The running test cell: containers by service, gateways, probes."""

    def __init__(self, compose_cell: Any) -> None:
        self.compose = compose_cell
        self.token = ""

    def container(self, service: str, index: int = 0) -> str:
        return ctl.containers(self.compose, service)[index].name

    def restarts(self, container: str) -> int:
        return int(podman("inspect", container, "--format", "{{.RestartCount}}").stdout.strip())

    def kill_service(self, service: str) -> tuple[str, int]:
        """SIGKILLs the service process inside the container (a crash: the restart policy applies)."""
        name = self.container(service)
        before = self.restarts(name)
        # The container stops with its service, often before `podman exec` returns (exit 255 then);
        # `back_and_healthy` checks that it did restart.
        result = podman("exec", "-i", name, "python3", "-", input_text=KILL_SERVICE, check=False)
        assert result.returncode in (0, 255, 137), f"cannot kill the service in {name}: {result.stderr}"
        return name, before

    def back_and_healthy(self, name: str, restarts_before: int) -> bool:
        state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
        return state == "running" and self.restarts(name) > restarts_before and ctl.healthy(name)

    def client(self, gateway_container: str) -> SyncClient:
        return SyncClient(ctl.published(gateway_container, ctl.GATEWAY_PORT), self.token)

    def chain(self, service: str, op_ids: list[int]) -> dict[str, int]:
        return in_container(self.container(service), CHAIN_PROBE, json.dumps(op_ids))

    def store_ids(self, service: str, ids: list[str]) -> list[str]:
        return in_container(self.container(service), STORE_PROBE, json.dumps(ids))


def write(client: SyncClient, prefix: str, count: int, acked: dict[str, int], committed: bool = False) -> None:
    """Writes `count` entities one request each; records the acknowledged ones (id -> operation id)."""
    for i in range(count):
        entity = f"{prefix}-{i}"
        builder = MutationBuilder().put_trait(entity, test_pb2.TestMessage(string1=f"{prefix} value {i}"), "t")
        builder = builder.wait_committed() if committed else builder.wait_indexed()
        result = client.mutate(builder, timeout=45)
        acked[entity] = result.operation_ids[0]


class Writer(threading.Thread):
    """`write` in a thread (the client is thread-safe); the last write waits for a quorum commit if
    `last_committed`. `finished`: monotonic time of the last acknowledgement."""

    def __init__(
        self, client: SyncClient, prefix: str, count: int, acked: dict[str, int], last_committed: bool = False
    ) -> None:
        super().__init__(name=f"writer-{prefix}", daemon=True)
        self.args = (client, prefix, count, acked, last_committed)
        self.error: BaseException | None = None
        self.finished = 0.0
        self.start()

    def run(self) -> None:
        client, prefix, count, acked, last_committed = self.args
        try:
            write(client, prefix, count - 1, acked)
            write(client, f"{prefix}-last", 1, acked, committed=last_committed)
        except BaseException as exc:  # reported by join()
            self.error = exc
        self.finished = time.monotonic()

    def join(self, timeout: float | None = 120) -> None:
        super().join(timeout)
        assert not self.is_alive(), f"{self.name} still writing"
        if self.error is not None:
            raise AssertionError(f"{self.name}: a write failed: {self.error!r}") from self.error


def visible_ids(client: SyncClient, ids: list[str]) -> set[str]:
    results = client.query(QueryBuilder.ids(*ids).count(len(ids) + 10), timeout=10)
    return {r.entity.id for r in results.entities}


@pytest.fixture(scope="module")
def compose_cell():
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is missing: `make images` (make test-deploy builds it)")
    cell = ctl.ComposeCell(3, root=ROOT, project_name="exotest")
    ctl.down(cell)  # leftovers of an interrupted run
    if ROOT.exists():
        subprocess.run(["rm", "-rf", str(ROOT)], check=True)
    ROOT.mkdir(parents=True)
    (ROOT / "three-node.yaml").write_text((REPO / "deploy" / "compose" / "three-node.yaml").read_text())
    ctl.generate(cell)
    try:
        yield cell
    finally:
        logs = ROOT / "logs"
        logs.mkdir(exist_ok=True)
        for container in ctl.containers(cell):
            result = podman("logs", container.name, check=False)
            (logs / f"{container.name}.log").write_text(result.stdout + result.stderr)
        started = time.monotonic()
        ctl.down(cell)
        print(f"cell removed in {time.monotonic() - started:.1f} s")


def test_three_node_cell_in_containers(compose_cell):
    cell = Cell(compose_cell)
    results: dict[str, Any] = {}

    # -- start-up: `up -d` until the 11 containers (3 x chain/store/gateway, apphost, discovery) are healthy
    started = time.monotonic()
    ctl.compose(compose_cell, "up", "-d")
    ctl.wait_healthy(compose_cell, timeout_s=300)
    results["startup_s"] = round(time.monotonic() - started, 1)
    results["containers"] = len(ctl.containers(compose_cell))
    assert results["containers"] == 11
    print(f"\n3-node cell: {results['containers']} containers healthy {results['startup_s']} s after `up -d`")

    cell.token = ctl.token(compose_cell)
    acked: dict[str, int] = {}
    with cell.client(cell.container("node1-gateway")) as node1, cell.client(cell.container("node3-gateway")) as node3:
        # -- write through node1's gateway, read through node3's
        started = time.monotonic()
        write(node1, "first-a", 1, acked)
        results["first_write_s"] = round(time.monotonic() - started, 1)
        write(node1, "first", 19, acked)
        results["first_writes_s"] = round(time.monotonic() - started, 1)
        wait_for("node3's gateway reads node1's writes", lambda: visible_ids(node3, list(acked)) == set(acked), 60)
        results["first_writes_read_s"] = round(time.monotonic() - started, 1)
        print(
            f"20 writes through node1's gateway, all read through node3's: {results['first_writes_read_s']} s "
            f"(first write acknowledged after {results['first_write_s']} s, all after {results['first_writes_s']} s)"
        )

        # -- a store crashes: SIGKILL node2-store's service while writes go on; it restarts and catches up
        name, restarts = cell.kill_service("node2-store")
        killed = time.monotonic()
        writer = Writer(node1, "store-down", 10, acked)
        wait_for(f"{name} restarted and healthy", lambda: cell.back_and_healthy(name, restarts), 120)
        results["store_back_healthy_s"] = round(time.monotonic() - killed, 1)
        writer.join()
        ids = list(acked)
        wait_for(
            "node2-store holds every acknowledged entity", lambda: cell.store_ids("node2-store", ids) == sorted(ids), 60
        )
        results["store_caught_up_s"] = round(time.monotonic() - killed, 1)
        print(
            f"store container killed: healthy again after {results['store_back_healthy_s']} s, "
            f"all {len(ids)} acknowledged entities in it {results['store_caught_up_s']} s after the kill"
        )

        # -- a chain node crashes: SIGKILL node3-chain's service while writes go on (committed by a
        # quorum of 2 of 3); it restarts and catches up from its peers
        name, restarts = cell.kill_service("node3-chain")
        killed = time.monotonic()
        writer = Writer(node1, "chain-down", 10, acked, last_committed=True)
        wait_for(f"{name} restarted and healthy", lambda: cell.back_and_healthy(name, restarts), 120, 0.2)
        back = time.monotonic()
        results["chain_back_healthy_s"] = round(back - killed, 1)
        writer.join()
        reference = cell.chain("node1-chain", [])["height"]
        op_ids = list(acked.values())

        def chain_caught_up() -> bool:
            probe = cell.chain("node3-chain", op_ids)
            return probe["height"] >= reference and probe["committed"] == len(op_ids)

        wait_for("node3-chain has every acknowledged operation committed", chain_caught_up, 180, 0.2)
        done = time.monotonic()
        results["chain_caught_up_s"] = round(done - killed, 1)
        results["chain_catch_up_after_last_write_s"] = round(done - max(back, writer.finished), 1)
        ids = list(acked)
        wait_for(
            "node3-store (tailing node3-chain) holds every entity",
            lambda: cell.store_ids("node3-store", ids) == sorted(ids),
            180,
        )
        results["chain_node_store_caught_up_s"] = round(time.monotonic() - killed, 1)
        print(
            f"chain container killed: healthy again after {results['chain_back_healthy_s']} s; all "
            f"{len(op_ids)} acknowledged operations committed on it {results['chain_caught_up_s']} s after the kill "
            f"({results['chain_catch_up_after_last_write_s']} s after it was back and the last write was "
            f"acknowledged); its store has every entity {results['chain_node_store_caught_up_s']} s after the kill"
        )

        # -- nothing acknowledged is lost, anywhere. Replication is asynchronous: a write failed over
        # to another store while node3-chain was down is committed by a quorum that need not include
        # node1, which gets it by its next pending or chain sync (every 5 s by default).
        probes: dict[str, dict[str, int]] = {}

        def every_chain_committed_all() -> bool:
            probes.update({n: cell.chain(f"{n}-chain", op_ids) for n in ("node1", "node2", "node3")})
            return all(probe["committed"] == len(op_ids) for probe in probes.values())

        started = time.monotonic()
        try:
            wait_for("every chain committed every acknowledged operation", every_chain_committed_all, 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last probes: {probes}") from None
        results["all_chains_committed_s"] = round(time.monotonic() - started, 1)
        print(f"every chain has all {len(op_ids)} operations committed {results['all_chains_committed_s']} s later")
        assert visible_ids(node3, ids) == set(ids)
        assert visible_ids(node1, ids) == set(ids)
        results["acknowledged_writes"] = len(acked)

    # -- scale node1's gateway to 2: both replicas answer
    started = time.monotonic()
    ctl.compose(compose_cell, "up", "-d", "--scale", "node1-gateway=2")
    ctl.wait_healthy(compose_cell, timeout_s=120, services={"node1-gateway"})
    gateways = [c.name for c in ctl.containers(compose_cell, "node1-gateway")]
    assert len(gateways) == 2, gateways
    for gateway in gateways:
        with cell.client(gateway) as client:
            assert visible_ids(client, ids) == set(ids), gateway
    results["gateway_scaled_s"] = round(time.monotonic() - started, 1)
    print(f"node1-gateway scaled to 2: both answer ({results['gateway_scaled_s']} s)")

    (ROOT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
