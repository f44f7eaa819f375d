"""`python -m exocli.container SERVICE [service flags]`: the entrypoint of the Exocore image.

SERVICE is chain, store, gateway or apphost (run as ``python -m exo<service> --dir NODE_DIR --cell
CELL_ID --log LEVEL [service flags]``), or discovery (``exo discovery daemon [flags]``). The
process *replaces* itself with the service (``exec``), so SIGTERM from the container runtime goes
straight to the service, which stops gracefully.

Before that it assembles a node folder from mounted files, so that configs and keys never live in
the image and data never lives in the config mount:

* ``$EXO_NODE_DIR`` (default /tmp/exo-node) is recreated at each start with symlinks:
  ``node.yaml`` -> the node config, ``cells/<id>/cell.yaml`` -> each cell config, and the service's
  data folder ``cells/<id>/{chain,store,apps}`` -> ``$EXO_DATA_DIR/{chain,store,apps}`` (default
  /data: a volume). Symlinks (not copies) let the gateway notice config changes (it reloads the cell).
* The node config is ``$EXO_NODE_CONFIG`` (default ``$EXO_CONFIG_DIR/node.yaml``, EXO_CONFIG_DIR
  default /config). ``{index}`` in it is replaced by ``$EXO_NODE_INDEX``, else by the trailing
  number of the host name: a Kubernetes StatefulSet pod ``exo-chain-2`` reads ``node-2.yaml``.
* A cell config is ``$EXO_CONFIG_DIR/cells/<id>/cell.yaml`` (the layout of a node folder, as
  ``exo deploy compose`` writes it), else ``$EXO_CELL_CONFIG`` (default ``$EXO_CONFIG_DIR/cell.yaml``,
  as ``exo deploy k8s render`` writes it; only for a node with one cell).
* The cell is ``$EXO_CELL`` (an id or a name), else the node's only cell.
* Before the service starts, the host name of its own address in node.yaml (`node3-chain` in
  compose) must resolve, for up to $EXO_DNS_WAIT_S seconds (default 10; 0 = no wait): a container
  that (re)starts can see its first DNS queries dropped while the network's DNS server is updated,
  and gRPC then waits long before it resolves the peers' names again.
* chain: when the chain folder has no block yet and the cell config holds the cell keypair, the
  genesis block is written (it is deterministic: every node writes the same bytes); a node without
  the keypair downloads it from its peers.

Exit status: the service's; 2 (configuration problem, not worth restarting) when the files are
missing or invalid.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from exocommon.config import Cell, NodeDirectory, cell_entry_id, load_node_config
from exocommon.errors import ExocoreError
from exocommon.process import EXIT_CONFIG

SERVICE_MODULES = {"chain": "exochain", "store": "exostore", "gateway": "exogateway", "apphost": "exoapphost"}
# The data folder of each service inside a cell folder, and its volume under EXO_DATA_DIR.
DATA_FOLDERS = {"chain": "chain", "store": "store", "apphost": "apps"}

log = logging.getLogger("exocli.container")


class ContainerSetupError(Exception):
    """The mounted configuration does not allow the service to run."""


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def node_index(hostname: str | None = None) -> str:
    """$EXO_NODE_INDEX, else the trailing number of the host name (StatefulSet ordinal)."""
    value = os.environ.get("EXO_NODE_INDEX")
    if value:
        return value
    hostname = hostname or socket.gethostname()
    match = re.search(r"-(\d+)$", hostname)
    if not match:
        raise ContainerSetupError(
            f"EXO_NODE_CONFIG has {{index}} but EXO_NODE_INDEX is unset and the host name {hostname!r} "
            "does not end with -<ordinal>"
        )
    return match.group(1)


def node_config_path(config_dir: Path) -> Path:
    template = os.environ.get("EXO_NODE_CONFIG") or str(config_dir / "node.yaml")
    if "{index}" in template:
        template = template.replace("{index}", node_index())
    return Path(template)


def cell_config_path(config_dir: Path, cell_id: str, single: bool) -> Path:
    in_node_layout = config_dir / "cells" / cell_id / "cell.yaml"
    if in_node_layout.is_file():
        return in_node_layout
    explicit = os.environ.get("EXO_CELL_CONFIG")
    if explicit or single:
        return Path(explicit or config_dir / "cell.yaml")
    raise ContainerSetupError(
        f"no config for cell {cell_id}: {in_node_layout} does not exist (several cells: EXO_CELL_CONFIG "
        "only applies to a node with one cell)"
    )


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def prepare_node_dir(service: str) -> tuple[NodeDirectory, str]:
    """Builds $EXO_NODE_DIR (see the module docstring); returns it and the cell id to serve."""
    config_dir = Path(_env("EXO_CONFIG_DIR", "/config"))
    data_dir = Path(_env("EXO_DATA_DIR", "/data"))
    node_dir = Path(_env("EXO_NODE_DIR", "/tmp/exo-node"))
    node_yaml = node_config_path(config_dir)
    if not node_yaml.is_file():
        raise ContainerSetupError(
            f"no node config at {node_yaml}: mount the node's folder (or the cell's Secret) at {config_dir}"
        )
    try:
        node_cfg = load_node_config(node_yaml)
    except ExocoreError as exc:
        raise ContainerSetupError(str(exc)) from None
    cell_ids = [cell_entry_id(entry) for entry in node_cfg.cells]
    if not cell_ids:
        raise ContainerSetupError(f"the node config {node_yaml} has no cell")

    if node_dir.exists():
        shutil.rmtree(node_dir)
    node_dir.mkdir(parents=True)
    directory = NodeDirectory(node_dir)
    _link(node_yaml.absolute(), directory.node_yaml)
    for entry, cell_id in zip(node_cfg.cells, cell_ids, strict=True):
        if not entry.HasField("inline"):
            _link(cell_config_path(config_dir, cell_id, len(cell_ids) == 1).absolute(), directory.cell_yaml(cell_id))

    try:
        cells = directory.load_cells()
    except ExocoreError as exc:
        raise ContainerSetupError(str(exc)) from None
    wanted = os.environ.get("EXO_CELL")
    if wanted:
        matches = [c for c in cells if wanted in (str(c.id), c.name)]
        if not matches:
            raise ContainerSetupError(f"EXO_CELL={wanted}: the node has no such cell (id or name)")
        cell = matches[0]
    elif len(cells) == 1:
        cell = cells[0]
    else:
        raise ContainerSetupError(f"the node has {len(cells)} cells: choose one with EXO_CELL (id or name)")

    folder = DATA_FOLDERS.get(service)
    if folder is not None:
        target = data_dir / folder
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ContainerSetupError(f"cannot create {target}: {exc} (mount a volume there)") from None
        if not os.access(target, os.W_OK):
            raise ContainerSetupError(
                f"{target} is not writable by uid {os.getuid()}: give the volume to that user "
                "(Kubernetes: securityContext.fsGroup)"
            )
        _link(target, directory.cell_dir(cell.id) / folder)
    if service == "chain":
        _ensure_genesis(directory, cell)
    return directory, str(cell.id)


def _ensure_genesis(directory: NodeDirectory, cell: Cell) -> None:
    from exochain.storage.leveldb import LevelDbStorage
    from exochain.tools import write_genesis

    keypair = cell.keypair
    cell_id = str(cell.id)
    if keypair is None:
        return  # a chain-only node: the chain service downloads the genesis block from its peers
    logging.getLogger("exochain.storage").setLevel(logging.WARNING)
    with LevelDbStorage(directory.chain_dir(cell_id)) as storage:
        if storage.chain.last_block() is None:
            write_genesis(storage.chain, cell_id, keypair)
            print(f"genesis block of cell {cell_id} written", file=sys.stderr, flush=True)


def wait_for_dns(address: str, timeout_s: float) -> bool:
    """Waits until the host of `address` ("host:port") resolves; False after `timeout_s`."""
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    if not host or timeout_s <= 0:
        return True
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(host, None)
            return True
        except (socket.gaierror, UnicodeError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def service_argv(service: str, directory: NodeDirectory, cell_id: str, extra: Sequence[str]) -> list[str]:
    log_level = _env("EXO_LOG", "info")
    return [
        sys.executable,
        "-m",
        SERVICE_MODULES[service],
        "--dir",
        str(directory.root),
        "--cell",
        cell_id,
        "--log",
        log_level,
        *extra,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exocli.container",
        description="Container entrypoint: prepare the node folder from /config and /data, then exec the service.",
        epilog="Environment: EXO_CONFIG_DIR, EXO_NODE_CONFIG, EXO_NODE_INDEX, EXO_CELL_CONFIG, EXO_CELL, "
        "EXO_DATA_DIR, EXO_NODE_DIR, EXO_LOG (see the module docstring).",
    )
    parser.add_argument("service", choices=[*SERVICE_MODULES, "discovery"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="flags passed to the service")
    args = parser.parse_args(argv)
    if args.service == "discovery":
        argv_out = [sys.executable, "-m", "exocli", "discovery", "daemon", *args.args]
    else:
        try:
            directory, cell_id = prepare_node_dir(args.service)
        except (ContainerSetupError, ExocoreError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        own = getattr(directory.load_local_node().addresses, args.service)
        wait_s = float(_env("EXO_DNS_WAIT_S", "10"))
        if own and not wait_for_dns(own, wait_s):
            print(f"warning: {own} does not resolve after {wait_s:g}s; starting anyway", file=sys.stderr, flush=True)
        argv_out = service_argv(args.service, directory, cell_id, args.args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv_out[0], argv_out)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
