"""`exo deploy`: compose and Kubernetes configs, the container entrypoint, and the `exo deploy k8s`
commands against the kmock in-memory Kubernetes API emulator (no real cluster runs in the tests)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from exocli import container
from exocli.commands.deploy import PORTS, _node_folders, apply_manifests, render_cell
from exocli.main import main
from exocommon.config import NodeDirectory, Role, load_node_config

KUSTOMIZE = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def exo(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- exo deploy compose ------------------------------------------------------------------------------


def test_compose_cell_uses_service_names_and_fixed_ports(tmp_path, capsys):
    code, out, _ = exo(capsys, "deploy", "compose", "--nodes", "3", "--dir", str(tmp_path / "cell"))
    assert code == 0, out
    directories = _node_folders(tmp_path / "cell")
    assert [d.root.name for d in directories] == ["node1", "node2", "node3"]
    cells = [d.load_cells() for d in directories]
    assert len({str(c[0].id) for c in cells}) == 1
    for i, directory in enumerate(directories, start=1):
        local = directory.load_local_node()
        assert local.addresses.chain == f"node{i}-chain:3310"
        assert local.addresses.store == f"node{i}-store:3320"
        assert local.addresses.gateway == f"node{i}-gateway:3330"
        assert local.addresses.http == (f"http://node{i}-gateway:8080",)
        assert local.listen_addresses.chain == "0.0.0.0:3310"
        assert local.listen_addresses.http == ("http://0.0.0.0:8080",)
        # No chain data: each chain container writes the genesis block into its volume.
        assert not directory.chain_dir(cells[0][0].id).exists()
    cell = cells[0][0]
    roles = {node.name: node.roles for node in cell.nodes.values()}
    assert Role.APP_HOST in roles["node1"] and Role.APP_HOST not in roles["node2"]
    assert cell.nodes[str(directories[1].load_local_node().node_id)].addresses.chain == "node2-chain:3310"
    if os.geteuid() == 0:  # readable by the containers' group, not by others
        mode = directories[0].node_yaml.stat()
        assert mode.st_gid == 10001 and mode.st_mode & 0o777 == 0o640


def test_compose_refuses_an_existing_cell(tmp_path, capsys):
    assert exo(capsys, "deploy", "compose", "--nodes", "1", "--dir", str(tmp_path))[0] == 0
    code, _, err = exo(capsys, "deploy", "compose", "--nodes", "1", "--dir", str(tmp_path))
    assert code == 1 and "already exists" in err


# -- the container entrypoint ------------------------------------------------------------------------


@pytest.fixture
def container_env(tmp_path, monkeypatch):
    def setup(config: Path, **env: str) -> Path:
        for name in ("EXO_NODE_CONFIG", "EXO_NODE_INDEX", "EXO_CELL_CONFIG", "EXO_CELL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("EXO_CONFIG_DIR", str(config))
        monkeypatch.setenv("EXO_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("EXO_NODE_DIR", str(tmp_path / "node"))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return tmp_path

    return setup


def test_entrypoint_assembles_a_node_folder_and_writes_the_genesis(tmp_path, capsys, container_env):
    exo(capsys, "deploy", "compose", "--nodes", "2", "--dir", str(tmp_path / "cell"))
    container_env(tmp_path / "cell" / "node2")
    directory, cell_id = container.prepare_node_dir("chain")
    assert directory.node_yaml.resolve() == (tmp_path / "cell" / "node2" / "node.yaml").resolve()
    assert directory.chain_dir(cell_id).resolve() == (tmp_path / "data" / "chain").resolve()
    assert (tmp_path / "data" / "chain" / "CURRENT").exists()  # LevelDB with the genesis block
    argv = container.service_argv("chain", directory, cell_id, ["--foo"])
    assert argv[1:] == ["-m", "exochain", "--dir", str(directory.root), "--cell", cell_id, "--log", "info", "--foo"]
    # A restart rebuilds the folder and keeps the data.
    directory, _ = container.prepare_node_dir("chain")
    assert directory.load_local_node().name == "node2"


def test_entrypoint_reads_the_kubernetes_layout_by_ordinal(tmp_path, capsys, container_env, monkeypatch):
    exo(
        capsys,
        "deploy",
        "k8s",
        "render",
        "--cell",
        str(tmp_path / "cell"),
        "--nodes",
        "3",
        "--out",
        str(tmp_path / "secret"),
    )
    container_env(tmp_path / "secret", EXO_NODE_CONFIG=str(tmp_path / "secret" / "node-{index}.yaml"))
    monkeypatch.setattr(container.socket, "gethostname", lambda: "exo-chain-2")
    directory, _ = container.prepare_node_dir("chain")
    local = directory.load_local_node()
    assert local.name == "node3"
    assert local.addresses.chain == "exo-chain-2.exo-chain-peers:3310"
    monkeypatch.setenv("EXO_NODE_INDEX", "0")
    assert container.prepare_node_dir("gateway")[0].load_local_node().name == "node1"


def test_entrypoint_config_problems_exit_2(tmp_path, capsys, container_env):
    container_env(tmp_path / "nothing")
    assert container.main(["store"]) == 2
    assert "no node config at" in capsys.readouterr().err


# -- exo deploy k8s render ---------------------------------------------------------------------------


def test_render_rewrites_addresses_for_kubernetes(tmp_path, capsys):
    exo(capsys, "deploy", "compose", "--nodes", "3", "--dir", str(tmp_path / "cell"))
    out = tmp_path / "generated"
    code, text, _ = exo(capsys, "deploy", "k8s", "render", "--cell", str(tmp_path / "cell"), "--out", str(out))
    assert code == 0, text
    names = {"node-0.yaml", "node-1.yaml", "node-2.yaml", "store-node.yaml", "apphost-node.yaml", "cell.yaml"}
    assert {p.name for p in out.iterdir()} == names | {"kustomization.yaml"}
    assert all((out / n).stat().st_mode & 0o077 == 0 for n in names)
    node1 = load_node_config(out / "node-1.yaml")
    assert node1.addresses.chain == "exo-chain-1.exo-chain-peers:3310"
    assert node1.addresses.store == "exo-store:3320" and node1.listen_addresses.store == "0.0.0.0:3320"
    assert load_node_config(out / "store-node.yaml").addresses.chain == "exo-chain:3310"
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert sorted(kustomization["secretGenerator"][0]["files"]) == sorted(names)
    assert "chain-nodes=3" in kustomization["configMapGenerator"][0]["literals"]
    # The identities are the compose cell's; only addresses change.
    original = NodeDirectory(tmp_path / "cell" / "node2").load_node_config()
    assert node1.keypair == original.keypair
    assert render_cell(_node_folders(tmp_path / "cell")).cell.id == original.cells[0].id


def test_render_refuses_a_folder_without_nodes(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    code, _, err = exo(
        capsys, "deploy", "k8s", "render", "--cell", str(tmp_path / "junk"), "--out", str(tmp_path / "o")
    )
    assert code == 1 and "holds no node folder" in err


# -- exo deploy k8s apply / status / scale against kmock ---------------------------------------------


@pytest.fixture
def rendered_overlay(tmp_path, capsys) -> Path:
    """deploy/k8s copied with the three-node overlay's cell rendered: `kubectl kustomize` output."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    copy = tmp_path / "k8s"
    shutil.copytree(KUSTOMIZE, copy, ignore=shutil.ignore_patterns("generated", "cells"))
    exo(
        capsys,
        "deploy",
        "k8s",
        "render",
        "--cell",
        str(tmp_path / "cell"),
        "--nodes",
        "3",
        "--out",
        str(copy / "overlays" / "three-node" / "generated"),
    )
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(
        subprocess.run(
            ["kubectl", "kustomize", str(copy / "overlays" / "three-node")], check=True, capture_output=True, text=True
        ).stdout
    )
    return manifests


def kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": url.rstrip("/")}}],
                "users": [{"name": "me", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "me"}}],
                "current-context": "kmock",
            }
        )
    )
    return path


async def run_exo(capsys, *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def get_json(kmock, path: str) -> dict:
    response = await kmock.get(path)
    return json.loads(await response.read())


async def test_k8s_apply_status_scale(kmock, tmp_path, rendered_overlay, capsys):
    config = str(kubeconfig(tmp_path, str(kmock.url)))
    flags = ["--kubeconfig", config]
    # kmock 0.8 cannot serve /api/v1/namespaces (cluster-scoped objects named like the namespace URL part).
    apply = ["deploy", "k8s", "apply", "--no-namespace", "-f", str(rendered_overlay), *flags]
    code, out, err = await run_exo(capsys, *apply)
    assert code == 0, err
    assert "statefulset/exo-chain created" in out and "horizontalpodautoscaler/exo-gateway created" in out
    assert "namespace" not in out
    chain = await get_json(kmock, "/apis/apps/v1/namespaces/exocore/statefulsets/exo-chain")
    assert chain["spec"]["replicas"] == 3
    # A second apply updates in place.
    code, out, err = await run_exo(capsys, *apply)
    assert code == 0, err
    assert "deployment/exo-store configured" in out and "created" not in out

    code, out, err = await run_exo(capsys, "deploy", "k8s", "status", *flags)
    assert code == 0, err
    assert "3 chain node(s), namespace exocore" in out
    assert "statefulset/exo-chain" in out and "0/3" in out  # the emulator runs no pods
    assert "hpa/exo-gateway -> exo-gateway" in out

    code, out, err = await run_exo(capsys, "deploy", "k8s", "scale", "store", "4", *flags)
    assert code == 0, err
    assert "deployment/exo-store 2 -> 4" in out
    store = await get_json(kmock, "/apis/apps/v1/namespaces/exocore/deployments/exo-store")
    assert store["spec"]["replicas"] == 4

    code, out, err = await run_exo(capsys, "deploy", "k8s", "scale", "gateway", "3", *flags)
    assert code == 0 and "hpa/exo-gateway manages" in err

    # The chain is membership: never more pods than the cell has chain nodes.
    code, out, err = await run_exo(capsys, "deploy", "k8s", "scale", "chain", "5", *flags)
    assert code == 1 and "the cell has 3 chain node(s)" in err
    code, out, err = await run_exo(capsys, "deploy", "k8s", "scale", "chain", "1", *flags)
    assert code == 0 and "below a quorum" in err
    code, out, err = await run_exo(capsys, "deploy", "k8s", "scale", "apphost", "2", *flags)
    assert code == 1 and "singleton" in err


async def test_k8s_commands_report_missing_objects_and_servers(kmock, tmp_path, capsys):
    flags = ["--kubeconfig", str(kubeconfig(tmp_path, str(kmock.url))), "-n", "elsewhere"]
    code, _, err = await run_exo(capsys, "deploy", "k8s", "scale", "store", "2", *flags)
    assert code == 1 and "does not exist in namespace elsewhere" in err
    dead = ["--kubeconfig", str(kubeconfig(tmp_path, "http://127.0.0.1:9"))]
    code, _, err = await run_exo(capsys, "deploy", "k8s", "status", *dead)
    assert code == 1 and "cannot reach the Kubernetes API" in err
    code, _, err = await run_exo(capsys, "deploy", "k8s", "status", "--kubeconfig", str(tmp_path / "none"))
    assert code == 1 and "cannot load the kubeconfig" in err


def test_ports_are_the_compose_and_k8s_ports():
    text = (KUSTOMIZE / "base" / "chain.yaml").read_text()
    assert f"containerPort: {PORTS['chain']}" in text


class RecordingApi:
    """Stands in for KubeApi where kmock cannot (namespaces): records the calls, nothing exists."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def get(self, path: str, query=()) -> dict | None:
        self.calls.append(("GET", path))
        return None

    def request(self, method: str, path: str, body=None, **kwargs) -> dict:
        self.calls.append((method, path))
        return {}


def test_apply_creates_the_namespace_first():
    api = RecordingApi()
    documents = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "exo-store"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "exo-cell", "namespace": "mine"}},
    ]
    lines = apply_manifests(api, documents, "exocore")  # type: ignore[arg-type]
    assert lines == [
        "namespace/exocore created",
        "namespace/mine created",
        "secret/exo-cell created",
        "deployment/exo-store created",
    ]
    posts = [path for method, path in api.calls if method == "POST"]
    assert posts == [
        "/api/v1/namespaces",
        "/api/v1/namespaces",
        "/api/v1/namespaces/mine/secrets",
        "/apis/apps/v1/namespaces/exocore/deployments",
    ]


def test_entrypoint_waits_for_its_own_name_to_resolve():
    assert container.wait_for_dns("localhost:3310", 1.0)
    started = time.monotonic()
    assert not container.wait_for_dns("no-such-host.invalid:3310", 0.3)
    assert time.monotonic() - started < 5
    assert container.wait_for_dns("no-such-host.invalid:3310", 0)  # 0 = do not wait


def test_waiting_for_a_healthy_compose_cell_says_what_it_waits_for(monkeypatch, capsys):
    path = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "composectl.py"
    spec = importlib.util.spec_from_file_location("composectl_under_test", path)
    assert spec is not None and spec.loader is not None
    ctl = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "composectl_under_test", ctl)
    spec.loader.exec_module(ctl)

    class Clock:  # `time` as composectl sees it: sleeping moves the clock
        now = 1000.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = Clock()
    monkeypatch.setattr(ctl, "time", clock)
    cell = [
        ctl.Container("exo_node1-chain_1", "node1-chain", "running"),
        ctl.Container("exo_node1-store_1", "node1-store", "running"),
    ]
    monkeypatch.setattr(ctl, "containers", lambda _cell, service=None: cell)
    monkeypatch.setattr(ctl, "healthy", lambda name: name.endswith("chain_1") or clock.now >= 1025)

    assert ctl.wait_healthy(ctl.ComposeCell(3), timeout_s=60) == 25
    assert capsys.readouterr().err.splitlines() == [
        "waited 10s for health: exo_node1-store_1",
        "waited 20s for health: exo_node1-store_1",
    ]
    monkeypatch.setattr(ctl, "healthy", lambda name: "store" not in name)
    with pytest.raises(TimeoutError, match="not healthy after 5s: exo_node1-store_1"):
        ctl.wait_healthy(ctl.ComposeCell(3), timeout_s=5)
