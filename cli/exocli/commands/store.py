"""`exo store mutate|query|watch`: use the cell's entities through a gateway, with the client library.

Messages are protobuf JSON. Traits are `google.protobuf.Any` with an ``@type``
(``type.googleapis.com/exocore.test.TestMessage``), resolved with the store's trait registry:
built-in types plus the cell's `schemas:` files, so the same JSON works for the user's own types.
A trait of a type this registry does not know is printed as ``{"@type": ..., "value": <base64>}``.

    exo -d NODE store mutate --json '{"mutations": [...], "returnEntities": true}'   (or stdin)
    exo -d NODE store query --query-string "hello"      # or --trait NAME, --ids a,b, --json '{...}'
    exo -d NODE store watch --trait exocore.test.TestMessage   # one JSON line per new result

With a member node's folder (`exo -d NODE store ...`) the commands reach that node's gateway
(`addresses.gateway`) with an auth token they sign with the node's key. `--endpoint HOST:PORT` and
`--token TOKEN` (or `EXO_ENDPOINT`, `EXO_TOKEN`) target any gateway; without `--token`, a node folder
still signs one (then the folder is also read for schemas). `exo store watch` re-subscribes when its
stream breaks (a store replica or the gateway restarting) and goes on printing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from exocli.context import Context
from exocommon.auth_token import AuthToken
from exocommon.client import SyncClient
from exocommon.clock import now_ns
from exocommon.config import Cell, NodeDirectory, Role
from exocommon.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exostore.registry import TraitRegistry, type_name_from_url
from exostore.setup import ConfigurationProblem, load_registry

DEADLINE_S = 15.0
MUTATE_DEADLINE_S = 45.0  # wait_committed waits up to 30 s
# A token signed with the node's key for one command.
TOKEN_LIFETIME_S = 3600


def register(commands: argparse._SubParsersAction) -> None:
    store = commands.add_parser("store", help="write and query entities through a store service")
    store.add_argument(
        "--endpoint",
        default=os.environ.get("EXO_ENDPOINT") or None,
        help="gateway address host:port (env EXO_ENDPOINT; default: this node's addresses.gateway)",
    )
    store.add_argument(
        "--token",
        default=os.environ.get("EXO_TOKEN") or None,
        help="auth token (env EXO_TOKEN; default: one signed with this node's key)",
    )
    store.add_argument("-n", "--cell-name", help="the cell, when the node has several")
    sub = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")

    mutate = sub.add_parser("mutate", help="apply a MutationRequest (protobuf JSON); prints the MutationResult")
    mutate.add_argument("--json", help="the MutationRequest as JSON (default: read from stdin)")
    mutate.set_defaults(handler=mutate_command)

    for name, help_text, handler in (
        ("query", "run an EntityQuery; prints the EntityResults as JSON", query_command),
        ("watch", "watch an EntityQuery; prints each new EntityResults as one JSON line until Ctrl-C", watch_command),
    ):
        parser = sub.add_parser(name, help=help_text)
        what = parser.add_mutually_exclusive_group()
        what.add_argument("--json", help="the EntityQuery as JSON ('-' reads stdin)")
        what.add_argument("--query-string", help='a query string, e.g. "hello type:test -sort:created"')
        what.add_argument("--trait", help="entities having a trait of this type (full or short name)")
        what.add_argument("--ids", help="comma-separated entity ids")
        what.add_argument("--match", help="full-text match")
        what.add_argument("--all", action="store_true", help="every entity")
        parser.add_argument("--count", type=int, help="page size (default 10)")
        parser.add_argument("--include-deleted", action="store_true", help="also return deleted entities")
        parser.set_defaults(handler=handler)


# -- plumbing -------------------------------------------------------------------------------------


def _cell(directory: NodeDirectory, name: str | None) -> Cell | None:
    cells = directory.load_cells()
    if name:
        matches = [c for c in cells if c.name == name]
        if not matches:
            raise NotFound(f"this node has no cell named {name!r}")
        return matches[0]
    with_store = [c for c in cells if Role.STORE in c.local_roles()] or cells
    if len(with_store) > 1:
        raise FailedPrecondition(f"this node has {len(with_store)} cells; select one with `exo store -n NAME`")
    return with_store[0] if with_store else None


def _node_token(directory: NodeDirectory, cell: Cell) -> str:
    now = now_ns()
    local = directory.load_local_node()
    return AuthToken.create(str(cell.id), local.keypair, now, now + TOKEN_LIFETIME_S * 1_000_000_000).encode_base58()


def _client(ctx: Context, args: argparse.Namespace) -> tuple[TraitRegistry, SyncClient]:
    """The trait registry for JSON, and a client of the gateway to use (see the module docstring)."""
    directory = ctx.directory
    if not directory.node_yaml.exists():
        if args.endpoint:
            return TraitRegistry(), SyncClient(args.endpoint, args.token)
        ctx.existing_directory()  # raises the usual "no node" error
    cell = _cell(directory, args.cell_name)
    try:
        registry = load_registry(directory, cell) if cell is not None else TraitRegistry()
    except ConfigurationProblem as exc:
        raise FailedPrecondition(str(exc)) from None
    endpoint = args.endpoint or directory.load_local_node().addresses.gateway
    if not endpoint:
        raise FailedPrecondition("this node has no gateway address (addresses.gateway in node.yaml); use --endpoint")
    token = args.token or (_node_token(directory, cell) if cell is not None else None)
    return registry, SyncClient(endpoint, token)


def _unavailable(error: Unavailable, endpoint: str) -> Unavailable:
    return Unavailable(f"gateway at {endpoint} is not available: {error} (is the daemon running?)")


def parse_json(text: str, message: Message, registry: TraitRegistry, what: str) -> Message:
    try:
        return json_format.Parse(text, message, descriptor_pool=registry.pool)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"invalid {what} JSON: {exc}") from None


def _trait_paths(message: Message) -> list[entity_pb2.Trait]:
    if isinstance(message, mutation_pb2.MutationResult):
        return [t for e in message.entities for t in e.traits]
    if isinstance(message, query_pb2.EntityResults):
        return [t for r in message.entities for t in r.entity.traits]
    return []


def to_json_dict(message: Message, registry: TraitRegistry) -> dict[str, Any]:
    """Protobuf JSON of a result; traits of types the registry does not know keep their raw bytes."""
    copy = type(message)()
    copy.CopyFrom(message)
    raw: list[tuple[str, bytes]] = []
    for trait in _trait_paths(copy):
        if registry.message_descriptor(type_name_from_url(trait.message.type_url)) is None:
            raw.append((trait.message.type_url, trait.message.value))
            trait.ClearField("message")
        else:
            raw.append(("", b""))
    data = json_format.MessageToDict(copy, descriptor_pool=registry.pool)
    dicts: list[dict[str, Any]] = []
    if isinstance(copy, mutation_pb2.MutationResult):
        dicts = [t for e in data.get("entities", []) for t in e.get("traits", [])]
    elif isinstance(copy, query_pb2.EntityResults):
        dicts = [t for r in data.get("entities", []) for t in r.get("entity", {}).get("traits", [])]
    for trait_dict, (type_url, value) in zip(dicts, raw, strict=False):
        if type_url:
            trait_dict["message"] = {"@type": type_url, "value": base64.b64encode(value).decode()}
    return data


# -- commands -------------------------------------------------------------------------------------


def mutate_command(ctx: Context, args: argparse.Namespace) -> int:
    registry, client = _client(ctx, args)
    text = args.json if args.json is not None else sys.stdin.read()
    request = parse_json(text, mutation_pb2.MutationRequest(), registry, "MutationRequest")
    try:
        result = client.mutate(request, timeout=MUTATE_DEADLINE_S)
    except Unavailable as exc:
        raise _unavailable(exc, client.endpoint) from None
    finally:
        client.close()
    print(json.dumps(to_json_dict(result, registry), indent=2))
    return 0


def build_query(args: argparse.Namespace, registry: TraitRegistry) -> query_pb2.EntityQuery:
    query = query_pb2.EntityQuery()
    if args.json is not None:
        text = sys.stdin.read() if args.json == "-" else args.json
        parse_json(text, query, registry, "EntityQuery")
    elif args.query_string is not None:
        query.query_string.query = args.query_string
    elif args.trait is not None:
        query.trait.trait_name = args.trait
    elif args.ids is not None:
        query.ids.ids.extend(i.strip() for i in args.ids.split(",") if i.strip())
    elif args.match is not None:
        query.match.query = args.match
    elif args.all:
        query.all.SetInParent()
    else:
        raise InvalidArgument("say what to query: --json, --query-string, --trait, --ids, --match or --all")
    if args.count is not None:
        query.paging.count = args.count
    if args.include_deleted:
        query.include_deleted = True
    return query


def query_command(ctx: Context, args: argparse.Namespace) -> int:
    registry, client = _client(ctx, args)
    query = build_query(args, registry)
    try:
        results = client.query(query, timeout=DEADLINE_S)
    except Unavailable as exc:
        raise _unavailable(exc, client.endpoint) from None
    finally:
        client.close()
    print(json.dumps(to_json_dict(results, registry), indent=2))
    return 0


def watch_command(ctx: Context, args: argparse.Namespace) -> int:
    registry, client = _client(ctx, args)
    query = build_query(args, registry)
    try:
        for results in client.watch(query):
            print(json.dumps(to_json_dict(results, registry), separators=(",", ":")), flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
    return 0
