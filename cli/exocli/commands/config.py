"""`exo config print|validate`: show and check the node's configuration."""

from __future__ import annotations

import argparse

from exocli.context import Context
from exocommon.config import create_cell_node_config, message_to_yaml, node_config_to_yaml


def register(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="node configuration")
    sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    show = sub.add_parser("print", help="print node.yaml")
    show.add_argument(
        "--cell",
        action="store_true",
        help="print this node as a cell member (NodeConfig: id, name, public_key, addresses)",
    )
    show.add_argument("--inline", action="store_true", help="inline the cells' configs")
    show.set_defaults(handler=print_config)
    validate = sub.add_parser("validate", help="load and check node.yaml and every cell config")
    validate.set_defaults(handler=validate_config)


def print_config(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.existing_directory()
    if args.cell:
        node_config = create_cell_node_config(directory.load_node_config(), roles=[]).node
        print(message_to_yaml(node_config), end="")
    elif args.inline:
        print(node_config_to_yaml(directory.inlined_node_config()), end="")
    else:
        print(node_config_to_yaml(directory.load_node_config()), end="")


def validate_config(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.existing_directory()
    local = directory.load_local_node()
    cells = directory.load_cells(local)
    print(f"node {local.name} ({local.node_id}): valid")
    for cell in cells:
        print(f"cell {cell.name} ({cell.id}): valid, {len(cell.nodes)} node(s)")
