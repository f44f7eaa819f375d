"""`exo cell`: create and inspect the cells this node belongs to."""

from __future__ import annotations

import argparse

from exocli.context import Context
from exocli.output import check, print_table
from exocommon.config import Cell as CellModel
from exocommon.config import (
    NodeDirectory,
    cell_config_to_yaml,
    create_cell_node_config,
)
from exocommon.errors import FailedPrecondition, NotFound
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.core import config_pb2

Role = config_pb2.CellNodeConfig.Role


def register(commands: argparse._SubParsersAction) -> None:
    cell = commands.add_parser("cell", help="manage the node's cells")
    cell.add_argument("-p", "--public-key", help="select the cell by public key")
    cell.add_argument("-n", "--name", dest="cell_name", help="select the cell by name")
    sub = cell.add_subparsers(dest="cell_command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create a new cell with this node as its first member")
    init.add_argument("--name", help="cell name (default: generated from its public key)")
    init.add_argument("--no-chain", action="store_true", help="this node does not get the chain role")
    init.add_argument("--no-store", action="store_true", help="this node does not get the store role")
    init.add_argument("--no-app-host", action="store_true", help="this node does not get the app-host role")
    init.set_defaults(handler=init_cell)

    sub.add_parser("list", help="list the node's cells").set_defaults(handler=list_cells)
    sub.add_parser("print", help="print the cell's cell.yaml").set_defaults(handler=print_cell)

    node = sub.add_parser("node", help="the cell's nodes")
    node_sub = node.add_subparsers(dest="cell_node_command", required=True, metavar="COMMAND")
    node_sub.add_parser("list", help="list the cell's nodes and roles").set_defaults(handler=list_nodes)


def select_cell(directory: NodeDirectory, args: argparse.Namespace) -> config_pb2.CellConfig:
    """The cell named by -p/-n, or the only cell of the node."""
    cells = directory.load_cell_configs()
    local = directory.load_local_node()
    if args.public_key:
        matches = [c for c in cells if c.public_key == args.public_key]
        wanted = f"with public key {args.public_key}"
    elif args.cell_name:
        matches = [c for c in cells if CellModel.from_config(c, local).name == args.cell_name]
        wanted = f"named {args.cell_name!r}"
    else:
        if not cells:
            raise NotFound("this node has no cell; create one with `exo cell init` or join one")
        if len(cells) > 1:
            raise FailedPrecondition(f"this node has {len(cells)} cells; select one with -p or -n")
        return cells[0]
    if not matches:
        raise NotFound(f"no cell {wanted} in {directory.root}")
    return matches[0]


def init_cell(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.existing_directory()
    node_config = directory.load_node_config()
    roles = [
        role
        for role, excluded in (
            (Role.CHAIN_ROLE, args.no_chain),
            (Role.STORE_ROLE, args.no_store),
            (Role.APP_HOST_ROLE, args.no_app_host),
        )
        if not excluded
    ]
    keypair = Keypair.generate()
    public_key = keypair.public_key
    cell_config = config_pb2.CellConfig(
        keypair=keypair.encode_base58(),
        public_key=public_key.encode_base58(),
        name=args.name or public_key.generate_name(),
        id=str(PeerId.from_public_key(public_key)),
        nodes=[create_cell_node_config(node_config, roles)],
    )
    directory.save_cell_config(cell_config)
    print(f"Cell {cell_config.name} created")
    print(f"  id:         {cell_config.id}")
    print(f"  public key: {cell_config.public_key}")
    print(f"  config:     {directory.cell_yaml(cell_config.id)}")


def list_cells(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.existing_directory()
    cells = directory.load_cells()
    print_table(["ID", "Name", "Public key"], [[str(c.id), c.name, c.public_key.encode_base58()] for c in cells])


def print_cell(ctx: Context, args: argparse.Namespace) -> None:
    print(cell_config_to_yaml(select_cell(ctx.existing_directory(), args)), end="")


def list_nodes(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.existing_directory()
    cell = CellModel.from_config(select_cell(directory, args), directory.load_local_node())
    rows = [
        [
            node.name,
            node.public_key.encode_base58(),
            check(Role.CHAIN_ROLE in node.roles),
            check(Role.STORE_ROLE in node.roles),
            check(Role.APP_HOST_ROLE in node.roles),
        ]
        for node in cell.nodes.values()
    ]
    print_table(["Name", "Public key", "Chain", "Store", "AppHost"], rows)
