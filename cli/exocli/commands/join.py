"""Cell membership (SPEC.md 1.8, 1.11): `exo cell join`, `exo cell node add`, `exo cell generate-auth-token`.

Through the discovery mailbox (`--discovery-service`, env EXO_DISCOVERY):

1. the joining node (`exo cell join --chain --store`) posts its `CellNodeConfig` YAML (public key,
   addresses, requested roles) expecting a reply, prints the PIN and polls the reply slot;
2. a member (`exo cell node add --pin PIN`) reads it, shows it, asks to confirm (unless `--yes`),
   adds the node to its cell.yaml and replies with the whole cell config **sealed to the joining
   node's public key** (the mailbox only ever sees ciphertext, never the cell keypair);
3. the joining node opens the reply with its keypair, checks that the cell lists it and writes
   ``cells/<id>/cell.yaml`` + the `{id}` entry of node.yaml.

Without a mailbox: `exo config print --cell > n.yaml`, `exo cell node add --from-file n.yaml --chain
--store`, `exo cell print > c.yaml`, `exo cell join --from-file c.yaml` (`-` reads stdin).

Cell configs are not replicated between members: after adding a node, give the new cell.yaml to
the other members too (`exo cell print > c.yaml`, then `exo cell join --from-file c.yaml` on each).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from exocli.context import Context
from exocommon.auth_token import AuthToken, expiration_after_days
from exocommon.clock import now_ns
from exocommon.config import (
    Cell,
    ConfigError,
    LocalNode,
    NodeDirectory,
    Role,
    add_node,
    cell_config_from_yaml,
    cell_config_to_yaml,
    cell_node_config_from_yaml,
    cell_node_config_to_yaml,
    create_cell_node_config,
    message_from_yaml,
    validate_cell_config,
    validate_cell_node_config,
)
from exocommon.discovery import (
    DiscoveryClient,
    InvalidReply,
    PayloadNotFound,
    format_expiration,
    format_pin,
    parse_pin,
)
from exocommon.errors import (
    DeadlineExceeded,
    ExocoreError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from exocommon.keys import PublicKey
from exocommon.sealed import SealedPayloadError, open_sealed_box, seal_to_public_key
from exocore.core import config_pb2

DEFAULT_JOIN_TIMEOUT_S = 60.0
DEFAULT_TOKEN_DAYS = 30
ROLE_NAMES = {Role.CHAIN: "chain", Role.STORE: "store", Role.APP_HOST: "app-host"}


def register(sub: argparse._SubParsersAction, node_sub: argparse._SubParsersAction) -> None:
    """Adds `join` and `generate-auth-token` to `exo cell`, `add` to `exo cell node`."""
    join = sub.add_parser(
        "join",
        help="join a cell: through the discovery mailbox (prints a PIN for `exo cell node add` on a member) "
        "or from a cell.yaml (--from-file)",
    )
    _role_flags(join, "ask for the {} role")
    join.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_JOIN_TIMEOUT_S,
        help="seconds to wait for a member to add this node (default %(default)g)",
    )
    join.add_argument(
        "--from-file",
        metavar="FILE",
        help="write this cell config (`exo cell print` on a member; '-' = stdin) instead of using discovery",
    )
    join.set_defaults(handler=join_cell)

    add = node_sub.add_parser(
        "add",
        help="add a node to the cell: the one that shows a PIN (`exo cell join`), or one from a file (--from-file)",
    )
    add.add_argument("--pin", help="the PIN shown by `exo cell join` (asked for when omitted on a terminal)")
    add.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add.add_argument(
        "--from-file",
        metavar="FILE",
        help="the node's config (`exo config print --cell` on it; '-' = stdin) instead of using discovery",
    )
    _role_flags(add, "give it the {} role (role flags replace the roles it asked for)")
    add.set_defaults(handler=add_node_to_cell)

    token = sub.add_parser(
        "generate-auth-token", help="print an auth token for clients, signed by this node's key for the cell"
    )
    token.add_argument(
        "--expiration-days",
        type=int,
        default=DEFAULT_TOKEN_DAYS,
        help="days until the token expires (default %(default)s; 0 = never)",
    )
    token.add_argument("-q", "--quiet", action="store_true", help="print the token only")
    token.set_defaults(handler=generate_auth_token)


def _role_flags(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--chain", action="store_true", help=help_text.format("chain"))
    parser.add_argument("--store", action="store_true", help=help_text.format("store"))
    parser.add_argument("--app-host", action="store_true", help=help_text.format("app-host"))


def _flag_roles(args: argparse.Namespace) -> list[int]:
    return [
        int(role)
        for role, wanted in ((Role.CHAIN, args.chain), (Role.STORE, args.store), (Role.APP_HOST, args.app_host))
        if wanted
    ]


def describe_roles(roles: Iterable[int]) -> str:
    names = [ROLE_NAMES.get(r, str(r)) for r in roles]
    return ", ".join(names) if names else "none"


def _read_input_file(name: str) -> tuple[str, str]:
    """(text, source label) of FILE, '-' being stdin."""
    if name == "-":
        return sys.stdin.read(), "<stdin>"
    path = Path(name)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise NotFound(f"no file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}") from None


def _select_cell(directory: NodeDirectory, args: argparse.Namespace) -> config_pb2.CellConfig:
    from exocli.commands.cell import select_cell  # cell.py registers this module

    return select_cell(directory, args)


# ---------------------------------------------------------------------------------------------
# exo cell join
# ---------------------------------------------------------------------------------------------


def join_cell(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.existing_directory()
    local = directory.load_local_node()
    if args.from_file is not None:
        if _flag_roles(args):
            raise InvalidArgument(
                "--chain/--store/--app-host do not apply with --from-file: the roles are those the cell file gives"
            )
        text, source = _read_input_file(args.from_file)
        accept_cell_config(directory, local, cell_config_from_yaml(text, source))
        return
    if args.timeout <= 0:
        raise InvalidArgument("--timeout must be positive")
    roles = _flag_roles(args)
    request = create_cell_node_config(local.config, roles)
    client = DiscoveryClient(ctx.discovery_url)
    created = client.create(cell_node_config_to_yaml(request).encode(), expect_reply=True)
    if created.reply_pin is None:
        raise Unavailable(f"the discovery service at {ctx.discovery_url} did not open a reply slot")
    pin = format_pin(created.pin)
    print(f"Joining as node {local.name} with roles: {describe_roles(roles)}")
    print(f"  public key: {local.public_key.encode_base58()}")
    print(f"PIN: {pin}")
    print(f'On a member node of the cell, run: exo cell node add --pin "{pin}"')
    print(f"  (it shows this node's public key: check it is the one above). Waiting up to {args.timeout:g} s...")
    sys.stdout.flush()
    try:
        reply = client.get_loop(created.reply_pin, args.timeout)
    except PayloadNotFound:
        raise DeadlineExceeded(
            f"no member added this node within {args.timeout:g} s (PIN {pin}); run `exo cell join` again"
        ) from None
    try:
        text = open_sealed_box(local.keypair, reply.data)
    except SealedPayloadError as exc:
        raise InvalidArgument(
            f"the reply is not a cell config sealed to this node's key ({exc}); the member must add this node "
            "with this version of `exo cell node add`"
        ) from None
    accept_cell_config(directory, local, cell_config_from_yaml(text, "cell config received through discovery"))


def accept_cell_config(directory: NodeDirectory, local: LocalNode, cell_cfg: config_pb2.CellConfig) -> None:
    """Writes `cell_cfg` as one of this node's cells once sure it lists this node."""
    own_key = local.public_key.encode_base58()
    entries = [e for e in cell_cfg.nodes if e.HasField("node") and e.node.public_key == own_key]
    cell = Cell.from_config(cell_cfg, local)
    if not entries:
        raise FailedPrecondition(
            f"cell {cell.name} ({cell.id}) does not list this node ({own_key}); add it on a member first "
            f"(`exo cell node add`)"
        )
    roles = list(entries[0].roles)
    if Role.STORE in roles and not cell_cfg.keypair:
        print(
            "warning: this node has the store role but the cell config has no cell keypair: its store cannot run",
            file=sys.stderr,
        )
    cell_id = directory.save_cell_config(cell_cfg)
    print(f"Joined cell {cell.name} ({cell_id}) with roles: {describe_roles(roles)}")
    print(f"  config: {directory.cell_yaml(cell_id)}")
    if Role.CHAIN in roles:
        print("  chain:  empty; the chain service downloads the blocks from the other chain nodes")
    print(f"Next: exo -d {directory.root} daemon")


# ---------------------------------------------------------------------------------------------
# exo cell node add
# ---------------------------------------------------------------------------------------------


def _node_from_file(text: str, source: str) -> tuple[config_pb2.CellNodeConfig, bool]:
    """A `NodeConfig` (`exo config print --cell`: no roles) or a `CellNodeConfig` (`node:` and
    `roles:`); the flag says which."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, f"invalid YAML: {exc}") from None
    if isinstance(data, dict) and "node" in data:
        return cell_node_config_from_yaml(text, source), True
    node = message_from_yaml(text, config_pb2.NodeConfig, source)
    entry = config_pb2.CellNodeConfig(node=node)
    validate_cell_node_config(entry, source)
    return entry, False


def _confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _show_node(entry: config_pb2.CellNodeConfig) -> None:
    node = entry.node
    public_key = PublicKey.decode_base58(node.public_key)
    print(f"  name:       {node.name or public_key.generate_name()}")
    print(f"  public key: {node.public_key}")
    print(f"  id:         {node.id or '(not given)'}")
    addresses = node.addresses
    shown = [f"{f}={getattr(addresses, f)}" for f in ("chain", "store", "gateway", "apphost") if getattr(addresses, f)]
    shown += [f"p2p={a}" for a in addresses.p2p] + [f"http={a}" for a in addresses.http]
    print(f"  addresses:  {', '.join(shown) if shown else 'none'}")
    print(f"  roles:      {describe_roles(entry.roles)}")


def _with_node(cell_cfg: config_pb2.CellConfig, entry: config_pb2.CellNodeConfig) -> config_pb2.CellConfig:
    updated = config_pb2.CellConfig()
    updated.CopyFrom(cell_cfg)
    add_node(updated, entry)
    try:
        validate_cell_config(updated, "cell config with the new node")
    except ConfigError as exc:
        raise FailedPrecondition(f"cannot add this node: {exc}") from None
    return updated


def add_node_to_cell(ctx: Context, args: argparse.Namespace) -> None:
    directory = ctx.existing_directory()
    local = directory.load_local_node()
    cell_cfg = _select_cell(directory, args)
    cell = Cell.from_config(cell_cfg, local)
    overrides = _flag_roles(args)

    if args.from_file is not None:
        if args.pin is not None:
            raise InvalidArgument("--pin and --from-file exclude each other")
        text, source = _read_input_file(args.from_file)
        entry, has_roles = _node_from_file(text, source)
        if overrides or not has_roles:
            del entry.roles[:]
            entry.roles.extend(overrides)
        updated = _with_node(cell_cfg, entry)
        directory.save_cell_config(updated)
        print(f"Node {entry.node.name or entry.node.public_key} added to cell {cell.name} ({cell.id})")
        _show_node(entry)
        print(f"Next: give it the cell config: exo -d {directory.root} cell print > cell.yaml, then on that node:")
        print("  exo cell join --from-file cell.yaml")
        _warn_missing_keypair(cell_cfg, entry)
        return

    interactive = sys.stdin.isatty()
    # The mailbox forgets a payload once read: refuse before reading if we could not confirm.
    if not args.yes and not interactive:
        raise FailedPrecondition(
            "stdin is not a terminal, so the node cannot be confirmed: check its public key and pass --yes"
        )
    if args.pin is None:
        if not interactive:
            raise InvalidArgument("--pin is required when stdin is not a terminal")
        print("PIN shown by `exo cell join` on the joining node: ", end="", file=sys.stderr, flush=True)
        pin_text = sys.stdin.readline()
    else:
        pin_text = args.pin
    pin = parse_pin(pin_text)
    client = DiscoveryClient(ctx.discovery_url)
    try:
        payload = client.get(pin)
    except PayloadNotFound:
        raise NotFound(
            f"no joining node under PIN {format_pin(pin)} (wrong PIN, expired after 90 s, or already read)"
        ) from None
    if payload.reply_pin is None or payload.reply_token is None:
        raise InvalidArgument(f"the payload under PIN {format_pin(pin)} expects no reply: not from `exo cell join`")
    try:
        entry = cell_node_config_from_yaml(payload.data, f"node under PIN {format_pin(pin)}")
    except ExocoreError as exc:
        raise InvalidArgument(f"the payload under PIN {format_pin(pin)} is not a joining node: {exc}") from None
    if overrides:
        del entry.roles[:]
        entry.roles.extend(overrides)
    updated = _with_node(cell_cfg, entry)

    print(f"Node asking to join cell {cell.name} ({cell.id}):")
    _show_node(entry)
    _warn_missing_keypair(cell_cfg, entry)
    if not args.yes and not _confirm(f"Add this node to cell {cell.name}?"):
        print("Not added (the joining node will time out).")
        return
    directory.save_cell_config(updated)
    sealed = seal_to_public_key(PublicKey.decode_base58(entry.node.public_key), cell_config_to_yaml(updated).encode())
    try:
        client.reply(payload.reply_pin, payload.reply_token, sealed)
    except (InvalidReply, Unavailable) as exc:
        raise Unavailable(
            f"the node was added to {directory.cell_yaml(cell.id)} but the cell config could not be sent to it "
            f"({exc}); send it by file: `exo cell print > cell.yaml`, then `exo cell join --from-file cell.yaml` "
            "on that node"
        ) from None
    print(f"Node added to cell {cell.name} ({cell.id}); the cell config was sent to it, sealed to its public key.")
    if len(updated.nodes) > 2:
        print(
            "The other members need the new cell config too: `exo cell print > cell.yaml` here, then "
            "`exo cell join --from-file cell.yaml` on each."
        )


def _warn_missing_keypair(cell_cfg: config_pb2.CellConfig, entry: config_pb2.CellNodeConfig) -> None:
    if not cell_cfg.keypair and Role.STORE in entry.roles:
        print(
            "warning: this node does not hold the cell keypair, so the new node will not get it and its store "
            "cannot run; add it from a node that holds the keypair",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------
# exo cell generate-auth-token
# ---------------------------------------------------------------------------------------------


def generate_auth_token(ctx: Context, args: argparse.Namespace) -> None:
    if args.expiration_days < 0:
        raise InvalidArgument("--expiration-days must be 0 (never expires) or more")
    directory = ctx.existing_directory()
    local = directory.load_local_node()
    cell_cfg = _select_cell(directory, args)
    cell = Cell.from_config(cell_cfg, local)
    own_key = local.public_key.encode_base58()
    if not any(e.HasField("node") and e.node.public_key == own_key for e in cell_cfg.nodes):
        raise FailedPrecondition(
            f"this node is not listed in cell {cell.name}: its tokens would be refused (tokens are signed by a "
            "member node)"
        )
    now = now_ns()
    expiration = expiration_after_days(now, args.expiration_days)
    token = AuthToken.create(str(cell.id), local.keypair, now, expiration)
    if args.quiet:
        print(token.encode_base58())
        return
    print(f"expiration: {'never' if expiration is None else format_expiration(expiration / 1e9)}")
    print(f"token: {token.encode_base58()}")
