"""`exo deploy`: a cell as containers (compose) or on Kubernetes.

exo deploy compose --nodes N --dir D [--name NAME] [--group GID]
    D/node1 .. D/nodeN for deploy/compose: node folders made like `exo dev cluster` (same code),
    but every service listens on 0.0.0.0 on a fixed container port and the addresses are the
    compose service names (node2-chain:3310, node2-store:3320, ...). No chain data is written:
    each chain container writes the (deterministic) genesis block into its volume at first start.
exo deploy k8s render --cell DIR --out OUT [--nodes N] [--name NAME]
    The Secret (node and cell configs: keys) and the ConfigMap (cell id, name, chain nodes) of a
    cell for deploy/k8s, as a kustomization in OUT (an overlay's `generated/` folder). DIR holds the
    cell's node folders (node1..nodeN: `exo deploy compose`/`exo dev cluster` output, or made here
    with --nodes if DIR is empty); their addresses are rewritten for Kubernetes DNS names.
exo deploy k8s apply (--overlay DIR | -f FILE) | status | scale SERVICE N
    Talk to the cluster with the `kubernetes` Python client (--kubeconfig, --context, -n).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from exocli.commands.dev import cluster_cell_config, cluster_directories, write_cluster
from exocli.commands.node import new_node_config
from exocli.context import Context
from exocommon.config import (
    NodeDirectory,
    Role,
    cell_config_to_yaml,
    node_config_to_yaml,
)
from exocommon.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from exocore.core import config_pb2

# Fixed ports inside containers and pods (every container has its own network namespace).
PORTS = {"chain": 3310, "store": 3320, "gateway": 3330, "apphost": 3340}
HTTP_PORT = 8080
# The user the image runs as: the generated configs must be readable by its group.
CONTAINER_GID = 10001
DEFAULT_NAMESPACE = "exocore"
PART_OF = "app.kubernetes.io/part-of=exocore"

# service -> (workload kind, plural, name) in deploy/k8s
WORKLOADS = {
    "chain": ("StatefulSet", "statefulsets", "exo-chain"),
    "store": ("Deployment", "deployments", "exo-store"),
    "gateway": ("Deployment", "deployments", "exo-gateway"),
    "apphost": ("Deployment", "deployments", "exo-apphost"),
    "discovery": ("Deployment", "deployments", "exo-discovery"),
}


def register(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser("deploy", help="run a cell as containers (compose) or on Kubernetes")
    sub = deploy.add_subparsers(dest="deploy_command", required=True, metavar="COMMAND")

    compose = sub.add_parser("compose", help="create the node folders of a cell for deploy/compose")
    compose.add_argument("--nodes", type=int, default=3, help="number of nodes (default %(default)s)")
    compose.add_argument("--dir", required=True, type=Path, help="folder that receives node1..nodeN")
    compose.add_argument("--name", default="cell", help="cell name (default %(default)s)")
    compose.add_argument(
        "--group",
        type=int,
        default=CONTAINER_GID,
        help="group that may read the files (the containers' group, default %(default)s; applied when root)",
    )
    compose.set_defaults(handler=compose_command)

    k8s = sub.add_parser("k8s", help="Kubernetes: render a cell's Secret, apply, status, scale")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True, metavar="COMMAND")
    render = k8s_sub.add_parser("render", help="write the Secret and ConfigMap of a cell (a kustomization)")
    render.add_argument("--cell", required=True, type=Path, help="folder with the cell's node folders node1..nodeN")
    render.add_argument("--out", required=True, type=Path, help="output folder (e.g. deploy/k8s/overlays/X/generated)")
    render.add_argument("--nodes", type=int, default=1, help="nodes of a new cell when --cell is empty (default 1)")
    render.add_argument("--name", default="cell", help="name of a new cell (default %(default)s)")
    render.set_defaults(handler=k8s_render_command)

    def cluster_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
        parser.add_argument("--context", help="kubeconfig context (default: the current one)")
        parser.add_argument("-n", "--namespace", help=f"namespace (default: the context's, else {DEFAULT_NAMESPACE})")

    apply = k8s_sub.add_parser("apply", help="create or update the manifests of an overlay in the cluster")
    source = apply.add_mutually_exclusive_group(required=True)
    source.add_argument("--overlay", type=Path, help="kustomize folder (rendered with `kubectl kustomize`)")
    source.add_argument("-f", "--file", help="rendered manifests (YAML, '-' = stdin)")
    apply.add_argument(
        "--no-namespace",
        action="store_true",
        help="leave namespaces alone (they exist; for accounts limited to one namespace)",
    )
    cluster_flags(apply)
    apply.set_defaults(handler=k8s_apply_command)

    status = k8s_sub.add_parser("status", help="the cell's workloads: ready / desired replicas")
    cluster_flags(status)
    status.set_defaults(handler=k8s_status_command)

    scale = k8s_sub.add_parser("scale", help="set the replicas of one service")
    scale.add_argument("service", choices=sorted(WORKLOADS))
    scale.add_argument("replicas", type=int)
    cluster_flags(scale)
    scale.set_defaults(handler=k8s_scale_command)


# -- node configs with container addresses ----------------------------------------------------------


def _set_addresses(cfg: config_pb2.LocalNodeConfig, hosts: dict[str, str], http_host: str) -> None:
    """Public addresses `hosts[service]:port`; listen addresses 0.0.0.0 on the same fixed ports."""
    cfg.ClearField("addresses")
    cfg.ClearField("listen_addresses")
    for service, port in PORTS.items():
        setattr(cfg.addresses, service, f"{hosts[service]}:{port}")
        setattr(cfg.listen_addresses, service, f"0.0.0.0:{port}")
    cfg.addresses.http.append(f"http://{http_host}:{HTTP_PORT}")
    cfg.listen_addresses.http.append(f"http://0.0.0.0:{HTTP_PORT}")


def compose_hosts(number: int) -> tuple[dict[str, str], str]:
    """Service host names of node `number` (1-based) in deploy/compose."""
    return {service: f"node{number}-{service}" for service in PORTS}, f"node{number}-gateway"


def k8s_hosts(index: int) -> tuple[dict[str, str], str]:
    """Service host names of the node of StatefulSet ordinal `index` in deploy/k8s (namespace-relative)."""
    hosts = {
        "chain": f"exo-chain-{index}.exo-chain-peers",
        "store": "exo-store",
        "gateway": "exo-gateway",
        "apphost": "exo-apphost",
    }
    return hosts, "exo-gateway"


def container_cluster(
    root: Path, count: int, name: str, hosts_of: Callable[[int], tuple[dict[str, str], str]]
) -> tuple[list[NodeDirectory], config_pb2.CellConfig]:
    """`exo dev cluster` with container addresses: node folders node1..nodeN, no chain data."""
    directories = cluster_directories(root, count)
    node_configs = []
    for i in range(count):
        cfg = new_node_config(f"node{i + 1}", "0.0.0.0", [*PORTS.values(), HTTP_PORT])
        _set_addresses(cfg, *hosts_of(i))
        node_configs.append(cfg)
    cell_config = cluster_cell_config(name, node_configs)
    write_cluster(directories, node_configs, cell_config, genesis=False)
    return directories, cell_config


def share_with_group(root: Path, gid: int) -> bool:
    """Makes `root` readable by group `gid` (the containers' user); False if not allowed (not root)."""
    if os.geteuid() != 0:
        return False
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chown(path, -1, gid)
        mode = path.stat().st_mode
        path.chmod(mode | (0o050 if path.is_dir() else 0o040))
    return True


def compose_command(ctx: Context, args: argparse.Namespace) -> None:
    root: Path = args.dir.expanduser()
    directories, cell_config = container_cluster(root, args.nodes, args.name, lambda i: compose_hosts(i + 1))
    shared = share_with_group(root, args.group)
    print(f"Cell {cell_config.name} ({cell_config.id}) with {args.nodes} node(s) for compose in {root}")
    for i, directory in enumerate(directories, start=1):
        roles = "chain, store" + (", app-host" if i == 1 else "")
        print(f"  node{i}: {directory.root}  chain node{i}-chain:{PORTS['chain']}  roles: {roles}")
    if not shared:
        print(
            f"The containers run as uid/gid {CONTAINER_GID}: let them read the files, e.g. "
            f"`podman unshare chgrp -R {args.group} {root} && chmod -R g+rX {root}`"
        )
    print(f"Keep {root} private: it holds the node and cell keys.")


# -- Kubernetes: render ----------------------------------------------------------------------------


def _node_folders(root: Path) -> list[NodeDirectory]:
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = re.fullmatch(r"node(\d+)", path.name)
        if match and (path / "node.yaml").is_file():
            found.append((int(match.group(1)), NodeDirectory(path)))
    return [directory for _, directory in sorted(found, key=lambda item: item[0])]


@dataclass
class RenderedCell:
    cell: config_pb2.CellConfig
    nodes: list[config_pb2.LocalNodeConfig]  # by StatefulSet ordinal
    store_node: config_pb2.LocalNodeConfig
    apphost_node: config_pb2.LocalNodeConfig | None


def render_cell(directories: Sequence[NodeDirectory]) -> RenderedCell:
    """The node and cell configs of `directories` with Kubernetes addresses (see k8s_hosts)."""
    node_configs = [d.load_node_config() for d in directories]
    cell_ids = set()
    cell_config: config_pb2.CellConfig | None = None
    for directory, cfg in zip(directories, node_configs, strict=True):
        cells = directory.load_cell_configs(cfg)
        if len(cells) != 1:
            raise FailedPrecondition(f"{directory.root} has {len(cells)} cells: a Kubernetes deployment runs one")
        cell_ids.add(cells[0].id)
        if cell_config is None or (cells[0].keypair and not cell_config.keypair):
            cell_config = cells[0]
    if len(cell_ids) != 1 or cell_config is None:
        raise FailedPrecondition(f"the node folders belong to different cells: {', '.join(sorted(cell_ids))}")
    if not cell_config.keypair:
        raise FailedPrecondition("no node folder holds the cell keypair: the store cannot read the cell's data")

    index_of = {cfg.id: i for i, cfg in enumerate(node_configs)}
    cell = config_pb2.CellConfig()
    cell.CopyFrom(cell_config)
    roles_of: dict[str, set[int]] = {}
    for entry in cell.nodes:
        roles_of[entry.node.id] = set(entry.roles)
        if entry.node.id not in index_of:
            raise FailedPrecondition(
                f"cell node {entry.node.name} ({entry.node.id}) has no node folder: every member runs as a chain pod"
            )
        hosts, http_host = k8s_hosts(index_of[entry.node.id])
        scratch = config_pb2.LocalNodeConfig()
        _set_addresses(scratch, hosts, http_host)
        entry.node.addresses.CopyFrom(scratch.addresses)

    nodes = []
    for i, cfg in enumerate(node_configs):
        roles = roles_of.get(cfg.id, set())
        if Role.CHAIN not in roles:
            raise FailedPrecondition(f"node {cfg.name} has no chain role: each node of the folder runs as a chain pod")
        out = config_pb2.LocalNodeConfig()
        out.CopyFrom(cfg)
        _set_addresses(out, *k8s_hosts(i))
        nodes.append(out)

    store_index = next((i for i, cfg in enumerate(node_configs) if Role.STORE in roles_of[cfg.id]), None)
    if store_index is None:
        raise FailedPrecondition("no node has the store role")
    store_node = config_pb2.LocalNodeConfig()
    store_node.CopyFrom(nodes[store_index])
    # Store pods tail whichever chain pod the `exo-chain` Service picks (they all hold the same chain).
    store_node.addresses.chain = f"exo-chain:{PORTS['chain']}"
    apphost_index = next((i for i, cfg in enumerate(node_configs) if Role.APP_HOST in roles_of[cfg.id]), None)
    apphost_node = nodes[apphost_index] if apphost_index is not None else None
    return RenderedCell(cell, nodes, store_node, apphost_node)


KUSTOMIZATION_HEADER = """\
# Generated by `exo deploy k8s render` for cell {name} ({id}): do not edit, re-render.
# The Secret holds the node and cell keypairs: keep this folder private (never commit it).
"""


def write_rendered(rendered: RenderedCell, out: Path) -> list[str]:
    """Writes OUT/{node-I.yaml, store-node.yaml, apphost-node.yaml, cell.yaml, kustomization.yaml}."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {f"node-{i}.yaml": node_config_to_yaml(cfg) for i, cfg in enumerate(rendered.nodes)}
    files["store-node.yaml"] = node_config_to_yaml(rendered.store_node)
    if rendered.apphost_node is not None:
        files["apphost-node.yaml"] = node_config_to_yaml(rendered.apphost_node)
    files["cell.yaml"] = cell_config_to_yaml(rendered.cell)
    for stale in out.glob("*.yaml"):
        if stale.name not in files and stale.name != "kustomization.yaml":
            stale.unlink()
    for name, text in files.items():
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    labels = {"app.kubernetes.io/part-of": "exocore", "app.kubernetes.io/name": "exocore"}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "secretGenerator": [
            {
                "name": "exo-cell",
                "files": sorted(files),
                "options": {"labels": {**labels, "app.kubernetes.io/component": "cell-config"}},
            }
        ],
        "configMapGenerator": [
            {
                "name": "exo-cell-info",
                "literals": [
                    f"cell-id={rendered.cell.id}",
                    f"cell-name={rendered.cell.name}",
                    f"public-key={rendered.cell.public_key}",
                    f"chain-nodes={len(rendered.nodes)}",
                ],
                "options": {"labels": {**labels, "app.kubernetes.io/component": "cell-info"}},
            }
        ],
    }
    header = KUSTOMIZATION_HEADER.format(name=rendered.cell.name, id=rendered.cell.id)
    (out / "kustomization.yaml").write_text(header + yaml.safe_dump(kustomization, sort_keys=False))
    return sorted(files)


def k8s_render_command(ctx: Context, args: argparse.Namespace) -> None:
    root: Path = args.cell.expanduser()
    directories = _node_folders(root)
    if not directories:
        if root.exists() and any(root.iterdir()):
            raise NotFound(f"{root} holds no node folder (node1/node.yaml ...) and is not empty")
        directories, cell = container_cluster(root, args.nodes, args.name, k8s_hosts)
        print(f"Cell {cell.name} ({cell.id}) with {args.nodes} node(s) created in {root} (keep it private)")
    rendered = render_cell(directories)
    files = write_rendered(rendered, args.out.expanduser())
    print(
        f"Secret exo-cell ({', '.join(files)}) and ConfigMap exo-cell-info of cell {rendered.cell.name} "
        f"({rendered.cell.id}, {len(rendered.nodes)} chain node(s)) written to {args.out}/kustomization.yaml"
    )
    if rendered.apphost_node is None:
        print("warning: no node has the app-host role: scale exo-apphost to 0", file=sys.stderr)
    if len(rendered.nodes) > 1:
        print(f"The chain StatefulSet must run {len(rendered.nodes)} replicas (one per node).")


# -- Kubernetes: API access ------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    plural: str
    namespaced: bool = True


KINDS: dict[str, Kind] = {
    "Namespace": Kind("namespaces", namespaced=False),
    "ServiceAccount": Kind("serviceaccounts"),
    "Secret": Kind("secrets"),
    "ConfigMap": Kind("configmaps"),
    "PersistentVolumeClaim": Kind("persistentvolumeclaims"),
    "Service": Kind("services"),
    "StatefulSet": Kind("statefulsets"),
    "Deployment": Kind("deployments"),
    "PodDisruptionBudget": Kind("poddisruptionbudgets"),
    "HorizontalPodAutoscaler": Kind("horizontalpodautoscalers"),
}
APPLY_ORDER = list(KINDS)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KubeApi:
    """Raw REST calls through the `kubernetes` client (its auth and TLS), JSON in and out.

    The typed API classes are not used: applying arbitrary manifests needs only the URL of each kind.
    """

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    @staticmethod
    def path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
        info = KINDS.get(kind)
        if info is None:
            raise InvalidArgument(f"unsupported kind {kind} (supported: {', '.join(KINDS)})")
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if info.namespaced:
            if not namespace:
                raise InvalidArgument(f"{kind} {name or ''} needs a namespace")
            base += f"/namespaces/{namespace}"
        path = f"{base}/{info.plural}"
        return f"{path}/{name}" if name else path

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: Sequence[tuple[str, str]] = (),
    ) -> dict[str, Any]:
        import urllib3.exceptions

        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api_client.call_api(*params, _request_timeout=30)
            response.read()
        except urllib3.exceptions.HTTPError as exc:
            host = self.api_client.configuration.host
            raise Unavailable(f"cannot reach the Kubernetes API at {host}: {exc}") from None
        except Exception as exc:  # kubernetes.client.ApiException: an HTTP error status
            status = getattr(exc, "status", None)
            if status is None:
                raise
            raise ApiError(int(status), _status_message(getattr(exc, "body", None) or str(exc))) from None
        data = response.data or b"{}"
        if not 200 <= response.status < 300:
            raise ApiError(response.status, _status_message(data))
        try:
            return json.loads(data)
        except ValueError:
            return {}

    def close(self) -> None:
        self.api_client.close()

    def get(self, path: str, query: Sequence[tuple[str, str]] = ()) -> dict[str, Any] | None:
        try:
            return self.request("GET", path, query=query)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")


def _status_message(data: bytes | str) -> str:
    try:
        payload = json.loads(data)
        return str(payload.get("message") or payload.get("reason") or payload)
    except (ValueError, AttributeError):
        return str(data)[:300]


def connect(args: argparse.Namespace) -> tuple[KubeApi, str]:
    """The API client and namespace from --kubeconfig/--context/--namespace."""
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException

    config_file = args.kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        api_client = kube_config.new_client_from_config(config_file=config_file, context=args.context)
    except (ConfigException, OSError, TypeError) as exc:
        raise FailedPrecondition(f"cannot load the kubeconfig ({config_file or '~/.kube/config'}): {exc}") from None
    namespace = args.namespace
    if not namespace:
        try:
            contexts, current = kube_config.list_kube_config_contexts(config_file=config_file)
            chosen = next((c for c in contexts if c.get("name") == args.context), current) if args.context else current
            namespace = (chosen or {}).get("context", {}).get("namespace")
        except (ConfigException, OSError):
            namespace = None
    return KubeApi(api_client), namespace or DEFAULT_NAMESPACE


@contextlib.contextmanager
def connected(args: argparse.Namespace) -> Iterator[tuple[KubeApi, str]]:
    """`connect`, closing the client (its connection pool) afterwards."""
    api, namespace = connect(args)
    try:
        yield api, namespace
    finally:
        api.close()


# -- Kubernetes: apply -----------------------------------------------------------------------------


def kustomize(folder: Path) -> str:
    """`kubectl kustomize FOLDER` (or `kustomize build FOLDER`)."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(folder)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(folder)]
    else:
        raise FailedPrecondition("rendering an overlay needs `kubectl` (or `kustomize`) on the PATH; or pass -f")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FailedPrecondition(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def load_manifests(text: str) -> list[dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(text) if d]
    for document in documents:
        if not isinstance(document, dict) or "kind" not in document or "apiVersion" not in document:
            raise InvalidArgument("every manifest needs apiVersion and kind")
    return documents


def apply_manifests(
    api: KubeApi, documents: Iterable[dict[str, Any]], namespace: str, manage_namespaces: bool = True
) -> list[str]:
    """Creates each object, or merge-patches it when it exists (creating the namespaces first unless
    `manage_namespaces` is False). Returns one line per object."""
    documents = sorted(documents, key=lambda d: APPLY_ORDER.index(d["kind"]) if d["kind"] in KINDS else 99)
    lines: list[str] = []
    if not manage_namespaces:
        documents = [d for d in documents if d["kind"] != "Namespace"]
    namespaces = {
        d["metadata"].get("namespace") or namespace for d in documents if KINDS.get(d["kind"], Kind("")).namespaced
    }
    declared = {d["metadata"]["name"] for d in documents if d["kind"] == "Namespace"}
    for ns in sorted(namespaces - declared) if manage_namespaces else []:
        if api.get(KubeApi.path("v1", "Namespace", None, ns)) is None:
            api.request(
                "POST",
                KubeApi.path("v1", "Namespace", None),
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
            lines.append(f"namespace/{ns} created")
    for document in documents:
        kind, name = document["kind"], document["metadata"]["name"]
        info = KINDS.get(kind)
        if info is None:
            raise InvalidArgument(f"{kind}/{name}: unsupported kind (supported: {', '.join(KINDS)})")
        ns = (document["metadata"].get("namespace") or namespace) if info.namespaced else None
        if ns and info.namespaced:
            document["metadata"]["namespace"] = ns
        try:
            api.request("POST", KubeApi.path(document["apiVersion"], kind, ns), document)
            lines.append(f"{kind.lower()}/{name} created")
        except ApiError as exc:
            if exc.status != 409:
                raise FailedPrecondition(f"{kind}/{name}: {exc}") from None
            api.patch(KubeApi.path(document["apiVersion"], kind, ns, name), document)
            lines.append(f"{kind.lower()}/{name} configured")
    return lines


def k8s_apply_command(ctx: Context, args: argparse.Namespace) -> None:
    if args.overlay is not None:
        text = kustomize(args.overlay)
    elif args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise NotFound(f"cannot read {args.file}: {exc}") from None
    documents = load_manifests(text)
    with connected(args) as (api, namespace):
        for line in apply_manifests(api, documents, namespace, manage_namespaces=not args.no_namespace):
            print(line)


# -- Kubernetes: status and scale ------------------------------------------------------------------


def _items(api: KubeApi, api_version: str, kind: str, namespace: str) -> list[dict[str, Any]]:
    listing = api.get(KubeApi.path(api_version, kind, namespace), query=[("labelSelector", PART_OF)])
    items = (listing or {}).get("items") or []
    return [i for i in items if i.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/part-of") == "exocore"]


def cell_info(api: KubeApi, namespace: str) -> dict[str, str]:
    for item in _items(api, "v1", "ConfigMap", namespace):
        if item["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "cell-info":
            return dict(item.get("data") or {})
    return {}


def k8s_status_command(ctx: Context, args: argparse.Namespace) -> int:
    with connected(args) as (api, namespace):
        info = cell_info(api, namespace)
        if info:
            print(
                f"cell {info.get('cell-name', '?')} ({info.get('cell-id', '?')}), "
                f"{info.get('chain-nodes', '?')} chain node(s), namespace {namespace}"
            )
        else:
            print(f"namespace {namespace}: no exo-cell-info ConfigMap (render and apply the cell first)")
        rows = []
        by_name = {}
        for kind in ("StatefulSet", "Deployment"):
            for item in _items(api, "apps/v1", kind, namespace):
                by_name[item["metadata"]["name"]] = (kind, item)
        if not by_name:
            print("no Exocore workload in this namespace")
            return 1
        all_ready = True
        for service, (kind, _, name) in WORKLOADS.items():
            if name not in by_name:
                continue
            item = by_name[name][1]
            desired = int(item.get("spec", {}).get("replicas", 1))
            status = item.get("status") or {}
            ready = int(status.get("readyReplicas") or 0)
            all_ready &= ready >= desired
            rows.append((service, f"{kind.lower()}/{name}", f"{ready}/{desired}"))
        for hpa in _items(api, "autoscaling/v2", "HorizontalPodAutoscaler", namespace):
            spec = hpa.get("spec", {})
            target = spec.get("scaleTargetRef", {}).get("name", "?")
            current = (hpa.get("status") or {}).get("currentReplicas", "?")
            rows.append(
                (
                    "  hpa",
                    f"hpa/{hpa['metadata']['name']} -> {target}",
                    f"{current} (min {spec.get('minReplicas', 1)}, max {spec.get('maxReplicas')})",
                )
            )
        width = max((len(r[1]) for r in rows), default=8)
        print(f"{'SERVICE':<10} {'WORKLOAD':<{width}} READY")
        for service, workload, ready in rows:
            print(f"{service:<10} {workload:<{width}} {ready}")
        print("all ready" if all_ready else "not all replicas are ready")
        return 0


def k8s_scale_command(ctx: Context, args: argparse.Namespace) -> None:
    service, replicas = args.service, args.replicas
    if replicas < 0:
        raise InvalidArgument("replicas must be >= 0")
    if service == "apphost" and replicas > 1:
        raise InvalidArgument("the app host is a singleton: 0 or 1 replica")
    with connected(args) as (api, namespace):
        kind, _, name = WORKLOADS[service]
        path = KubeApi.path("apps/v1", kind, namespace, name)
        current = api.get(path)
        if current is None:
            raise NotFound(f"{kind.lower()}/{name} does not exist in namespace {namespace} (apply an overlay first)")
        if service == "chain":
            nodes = cell_info(api, namespace).get("chain-nodes")
            if nodes is None:
                raise FailedPrecondition("no exo-cell-info ConfigMap: cannot tell how many chain nodes the cell has")
            if replicas > int(nodes):
                raise FailedPrecondition(
                    f"the cell has {nodes} chain node(s): chain pods are its members, one identity each. Add "
                    "nodes to the cell (`exo cell node add`), re-render (`exo deploy k8s render`) and apply before "
                    "scaling the chain"
                )
            if replicas < int(nodes) // 2 + 1:
                print(
                    f"warning: {replicas} of {nodes} chain nodes is below a quorum: no block commits", file=sys.stderr
                )
        if service == "gateway":
            for hpa in _items(api, "autoscaling/v2", "HorizontalPodAutoscaler", namespace):
                if hpa.get("spec", {}).get("scaleTargetRef", {}).get("name") == name:
                    print(
                        f"warning: hpa/{hpa['metadata']['name']} manages {name}'s replicas and may change them",
                        file=sys.stderr,
                    )
        before = current.get("spec", {}).get("replicas", 1)
        api.patch(path, {"spec": {"replicas": replicas}})
        print(f"{service}: {kind.lower()}/{name} {before} -> {replicas} replica(s)")
