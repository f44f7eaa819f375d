"""`exo dev cluster`: an N-node cell on this machine, ready for `exo -d D/nodeI daemon`.

Every node gets its own folder (`D/node1` .. `D/nodeN`, made like `exo node init` with ports that
are distinct across the whole cluster), the same cell.yaml (with the cell keypair, so every store
can read the data), the chain and store roles; node1 also gets the app-host role (one per cell).
The genesis block is built once with the cell key and written to every node's chain folder, so all
chains start from identical bytes.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from exochain.model import build_genesis
from exochain.storage.leveldb import LevelDbStorage
from exocli.commands.node import SERVICES, new_node_config
from exocli.context import Context
from exocommon.config import NodeDirectory, Role, create_cell_node_config, generate_cell_config
from exocommon.errors import AlreadyExists, InvalidArgument
from exocommon.keys import Keypair
from exocommon.net import free_ports
from exocore.core import config_pb2

MAX_NODES = 64


def register(commands: argparse._SubParsersAction) -> None:
    dev = commands.add_parser("dev", help="development helpers")
    sub = dev.add_subparsers(dest="dev_command", required=True, metavar="COMMAND")
    cluster = sub.add_parser("cluster", help="create an N-node cell on this machine (D/node1..D/nodeN)")
    cluster.add_argument("--nodes", type=int, default=3, help="number of nodes (default %(default)s)")
    cluster.add_argument("--dir", required=True, type=Path, help="folder that receives node1..nodeN")
    cluster.add_argument("--name", default="cell", help="cell name (default %(default)s)")
    cluster.add_argument("--host", default="127.0.0.1", help="address the services listen on (default %(default)s)")
    cluster.set_defaults(handler=create_cluster)


def cluster_directories(root: Path, count: int) -> list[NodeDirectory]:
    """`root/node1` .. `root/nodeN`, refused if one exists and is not empty."""
    if not 1 <= count <= MAX_NODES:
        raise InvalidArgument(f"--nodes must be from 1 to {MAX_NODES}, got {count}")
    directories = [NodeDirectory(root / f"node{i}") for i in range(1, count + 1)]
    for directory in directories:
        if directory.root.exists() and any(directory.root.iterdir()):
            raise AlreadyExists(f"{directory.root} already exists and is not empty")
    return directories


def cluster_cell_config(name: str, node_configs: list[config_pb2.LocalNodeConfig]) -> config_pb2.CellConfig:
    """A new cell (with its keypair) where every node has the chain and store roles, node1 also app-host."""
    cell_config = generate_cell_config(name)
    for i, node_config in enumerate(node_configs):
        roles = [Role.CHAIN, Role.STORE] + ([Role.APP_HOST] if i == 0 else [])
        cell_config.nodes.add().CopyFrom(create_cell_node_config(node_config, roles))
    return cell_config


def write_cluster(
    directories: list[NodeDirectory],
    node_configs: list[config_pb2.LocalNodeConfig],
    cell_config: config_pb2.CellConfig,
    genesis: bool = True,
) -> None:
    """Writes each node folder (node.yaml, the same cell.yaml) and, if `genesis`, the same genesis block."""
    block = build_genesis(cell_config.id, Keypair.decode_base58(cell_config.keypair)) if genesis else None
    for directory, node_config in zip(directories, node_configs, strict=True):
        directory.root.mkdir(parents=True, exist_ok=True)
        directory.save_node_config(node_config)
        directory.save_cell_config(cell_config)
        if block is not None:
            with LevelDbStorage(directory.chain_dir(cell_config.id)) as storage:
                storage.chain.write_block(block)


def create_cluster(ctx: Context, args: argparse.Namespace) -> None:
    count = args.nodes
    root: Path = args.dir.expanduser()
    directories = cluster_directories(root, count)

    # All ports at once, so that no two nodes (nor two services) share one.
    per_node = len(SERVICES) + 1
    ports = free_ports(count * per_node, args.host if args.host != "0.0.0.0" else "127.0.0.1")
    node_configs = [
        new_node_config(f"node{i + 1}", args.host, ports[i * per_node : (i + 1) * per_node]) for i in range(count)
    ]
    cell_config = cluster_cell_config(args.name, node_configs)
    if getattr(args, "log", "info") not in ("debug", "trace"):
        logging.getLogger("exochain.storage").setLevel(logging.WARNING)
    write_cluster(directories, node_configs, cell_config)

    print(f"Cell {cell_config.name} ({cell_config.id}) with {count} node(s) in {root}")
    for i, (directory, node_config) in enumerate(zip(directories, node_configs, strict=True)):
        roles = "chain, store" + (", app-host" if i == 0 else "")
        print(f"  {node_config.name}: {directory.root}  chain {node_config.addresses.chain}  roles: {roles}")
    print("Start each node (one terminal each, or append ' &'):")
    for directory in directories:
        print(f"  exo -d {shlex.quote(str(directory.root))} daemon")
