"""`exo cell`: create and inspect the cells this node belongs to."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from exochain.core.common import ChainCell
from exochain.model import BlockView
from exochain.service import chain_cell_of
from exochain.storage.leveldb import LevelDbStorage, StorageInUse
from exochain.tools import InvalidChain, blocks_from_service, write_genesis
from exochain.tools import check_chain as check_chain_blocks
from exocli.commands.app import register_cell_app
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
    init.add_argument("--no-genesis", action="store_true", help="do not create the chain's genesis block")
    init.set_defaults(handler=init_cell)

    sub.add_parser("list", help="list the node's cells").set_defaults(handler=list_cells)
    sub.add_parser("print", help="print the cell's cell.yaml").set_defaults(handler=print_cell)

    node = sub.add_parser("node", help="the cell's nodes")
    node_sub = node.add_subparsers(dest="cell_node_command", required=True, metavar="COMMAND")
    node_sub.add_parser("list", help="list the cell's nodes and roles").set_defaults(handler=list_nodes)
    from exocli.commands import join  # `join`, `node add`, `generate-auth-token` (imports this module)

    join.register(sub, node_sub)

    chain = sub.add_parser("chain", help="the cell's chain on this node")
    chain_sub = chain.add_subparsers(dest="cell_chain_command", required=True, metavar="COMMAND")
    chain_sub.add_parser(
        "init", help="write the genesis block of the (empty) local chain; needs the cell keypair"
    ).set_defaults(handler=init_chain)
    chain_sub.add_parser(
        "check", help="validate every block of the local chain (through the chain service if it runs)"
    ).set_defaults(handler=check_chain)

    register_cell_app(sub)  # exo cell app install|list


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
    if not (args.no_genesis or args.no_chain):
        _quiet_storage_logs(args)
        chain_dir = _write_genesis(directory, cell_config.id, keypair)
        print(f"  chain:      {chain_dir} (genesis block written)")


def _quiet_storage_logs(args: argparse.Namespace) -> None:
    """The storage logs each open at info: noise in a CLI command, unless debugging."""
    if getattr(args, "log", "info") not in ("debug", "trace"):
        logging.getLogger("exochain.storage").setLevel(logging.WARNING)


def _open_chain(directory: NodeDirectory, cell_id: str) -> LevelDbStorage:
    chain_dir = directory.chain_dir(cell_id)
    try:
        return LevelDbStorage(chain_dir)
    except StorageInUse:
        raise StorageInUse(
            f"the chain of cell {cell_id} ({chain_dir}) is in use by a running chain service; stop `exo daemon` first"
        ) from None


def _write_genesis(directory: NodeDirectory, cell_id: str, keypair: Keypair) -> Path:
    with _open_chain(directory, cell_id) as storage:
        write_genesis(storage.chain, cell_id, keypair)
    return directory.chain_dir(cell_id)


def init_chain(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.existing_directory()
    cell = CellModel.from_config(select_cell(directory, args), directory.load_local_node())
    if cell.keypair is None:
        raise FailedPrecondition(
            f"this node does not hold the keypair of cell {cell.name}: only a node holding it can create the "
            "genesis block (other chain nodes download it from their peers)"
        )
    _quiet_storage_logs(args)
    chain_dir = _write_genesis(directory, str(cell.id), cell.keypair)
    print(f"genesis block of cell {cell.name} written to {chain_dir}")


def check_chain(ctx: Context, args: argparse.Namespace) -> int:
    """Validates the local chain: from its LevelDB folder, or through the running chain service
    when that holds the folder (one writer process per LevelDB folder)."""
    directory = ctx.existing_directory()
    local = directory.load_local_node()
    cell = CellModel.from_config(select_cell(directory, args), local)
    chain_dir = directory.chain_dir(cell.id)
    if not chain_dir.is_dir():
        raise NotFound(f"cell {cell.name} has no chain on this node ({chain_dir} does not exist)")
    chain_cell = chain_cell_of(cell)
    _quiet_storage_logs(args)
    try:
        storage = LevelDbStorage(chain_dir)
    except StorageInUse:
        address = local.addresses.chain or local.listen_addresses.chain
        print(f"the chain is in use by the chain service: checking it through {address}", file=sys.stderr)
        blocks = blocks_from_service(address)
        outcome = _check(blocks, chain_cell)
    else:
        with storage:
            outcome = _check(storage.chain.blocks_from(0), chain_cell)
    print(outcome[1])
    return outcome[0]


def _check(blocks: Iterable[BlockView], chain_cell: ChainCell) -> tuple[int, str]:
    try:
        return 0, check_chain_blocks(blocks, chain_cell).describe()
    except InvalidChain as exc:
        return 1, str(exc)


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
