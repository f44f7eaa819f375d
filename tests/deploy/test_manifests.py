"""deploy/: every Kubernetes overlay renders (`kubectl kustomize`) and passes `kubernetes-validate
--strict`, with the properties the deployment relies on; every compose file passes `docker-compose
config -q`. Offline and fast: part of `make test` (`make test-deploy` runs the containers)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from exocli.main import main

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "deploy" / "compose"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
CHAIN_NODES = {"dev": 1, "three-node": 3}
# The oldest Kubernetes the manifests claim (native gRPC probes are GA in 1.27) and the newest known.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


def test_every_overlay_is_known():
    assert set(OVERLAYS) == set(CHAIN_NODES)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """deploy/k8s copied, a cell rendered into each overlay, each overlay through `kubectl kustomize`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot run `kubectl kustomize`")
    tmp = tmp_path_factory.mktemp("k8s")
    copy = tmp / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("generated", "cells"))
    out: dict[str, list[dict]] = {}
    for overlay in OVERLAYS:
        folder = copy / "overlays" / overlay
        argv = [
            "deploy",
            "k8s",
            "render",
            "--cell",
            str(tmp / "cells" / overlay),
            "--nodes",
            str(CHAIN_NODES[overlay]),
            "--out",
            str(folder / "generated"),
        ]
        assert main(argv) == 0
        result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        out[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def by_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_passes_strict_validation(rendered, overlay, version):
    for document in rendered[overlay]:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{overlay}: {document['kind']}/{document['metadata']['name']}: {exc}") from None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_shape(rendered, overlay):
    documents = rendered[overlay]
    assert all(d["metadata"].get("namespace") == "exocore" for d in documents if d["kind"] != "Namespace")
    secrets = by_kind(documents, "Secret")
    assert len(secrets) == 1
    secret_name, secret = next(iter(secrets.items()))
    assert secret_name.startswith("exo-cell-")  # hashed: a new cell config rolls the pods
    nodes = CHAIN_NODES[overlay]
    assert {f"node-{i}.yaml" for i in range(nodes)} <= set(secret["data"])
    assert {"store-node.yaml", "apphost-node.yaml", "cell.yaml"} <= set(secret["data"])

    chain = by_kind(documents, "StatefulSet")["exo-chain"]
    assert chain["spec"]["replicas"] == nodes
    assert chain["spec"]["serviceName"] == "exo-chain-peers"
    assert chain["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    peers = by_kind(documents, "Service")["exo-chain-peers"]
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
    deployments = by_kind(documents, "Deployment")
    assert deployments["exo-apphost"]["spec"]["replicas"] == 1
    assert deployments["exo-apphost"]["spec"]["strategy"]["type"] == "Recreate"
    assert set(by_kind(documents, "PodDisruptionBudget")) == {"exo-chain", "exo-store", "exo-gateway"}

    for workload in [chain, *deployments.values()]:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        mounts = set()
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "grpc" in c["readinessProbe"] and "grpc" in c["livenessProbe"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert c["image"] == "localhost/exocore:latest"
            mounts |= {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts  # the only writable place besides /data
        volumes = {v["name"]: v for v in pod["volumes"]}
        if "config" in volumes:
            assert volumes["config"]["secret"]["secretName"] == secret_name
    store = deployments["exo-store"]["spec"]["template"]["spec"]["containers"][0]
    assert store["readinessProbe"]["grpc"]["service"] == "exocore.store.v1.EntityStore"


def test_three_node_overlay_scales(rendered):
    documents = rendered["three-node"]
    deployments = by_kind(documents, "Deployment")
    assert deployments["exo-store"]["spec"]["replicas"] == 2
    assert deployments["exo-gateway"]["spec"]["replicas"] == 2
    hpa = by_kind(documents, "HorizontalPodAutoscaler")["exo-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "exo-gateway" and hpa["spec"]["minReplicas"] == 2


COMPOSE_FILES = sorted(COMPOSE.glob("*-node.yaml"))


def test_compose_files_exist():
    assert [p.name for p in COMPOSE_FILES] == ["one-node.yaml", "three-node.yaml"]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_passes_docker_compose_config(path):
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip(
            "docker-compose (Debian's v1, `make deploy-setup`) is not installed: no offline compose schema check"
        )
    result = subprocess.run(
        [docker_compose, "-f", str(path), "config", "-q"], capture_output=True, text=True, check=False, cwd=COMPOSE
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_shape(path):
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    nodes = 1 if path.name.startswith("one") else 3
    expected = {f"node{i}-{s}" for i in range(1, nodes + 1) for s in ("chain", "store", "gateway")}
    assert set(services) == expected | {"node1-apphost", "store-replica", "discovery"}
    for name, service in services.items():
        assert service["restart"] == "unless-stopped" and service["init"] is True
        assert "healthcheck" in service and "exocommon.grpc_util.healthcheck" in service["healthcheck"]["test"]
        for dependency in (service.get("depends_on") or {}).values():
            assert dependency["condition"] == "service_healthy"
        if name.endswith("-chain"):
            assert f"{name}:/data/chain" in service["volumes"]
        if name.endswith("-store"):
            assert f"{name}:/data/store" in service["volumes"]
    assert set(compose["volumes"]) == {f"node{i}-{k}" for i in range(1, nodes + 1) for k in ("chain", "store")} | {
        "node1-apps"
    }
