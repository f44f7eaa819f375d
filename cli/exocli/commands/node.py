"""`exo node init`: create the node's keys and config."""

from __future__ import annotations

import argparse

from exocli.context import Context
from exocommon.config import NodeDirectory
from exocommon.errors import AlreadyExists
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocommon.net import free_ports
from exocore.core import config_pb2

# One gRPC port per service, plus the gateway's HTTP endpoints.
SERVICES = ("chain", "store", "gateway", "apphost")


def register(commands: argparse._SubParsersAction) -> None:
    node = commands.add_parser("node", help="manage this node")
    sub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    init = sub.add_parser("init", help="create the node: keys and node.yaml with free local ports")
    init.add_argument("--name", help="node name (default: generated from its public key)")
    init.add_argument("--host", default="127.0.0.1", help="address the services listen on (default %(default)s)")
    init.set_defaults(handler=init_node)


def new_node_config(
    name: str | None, host: str = "127.0.0.1", ports: list[int] | None = None
) -> config_pb2.LocalNodeConfig:
    """`ports`: one per service plus the HTTP one (default: free ports now)."""
    keypair = Keypair.generate()
    public_key = keypair.public_key
    ports = ports or free_ports(len(SERVICES) + 1)
    addresses = config_pb2.NodeAddresses(http=[f"http://{host}:{ports[-1]}"])
    for service, port in zip(SERVICES, ports, strict=False):
        setattr(addresses, service, f"{host}:{port}")
    return config_pb2.LocalNodeConfig(
        keypair=keypair.encode_base58(),
        public_key=public_key.encode_base58(),
        name=name or public_key.generate_name(),
        id=str(PeerId.from_public_key(public_key)),
        addresses=addresses,
    )


def init_node(ctx: Context, args: argparse.Namespace) -> None:
    directory = NodeDirectory(ctx.node_dir)
    if directory.node_yaml.exists():
        raise AlreadyExists(f"a node already exists in {ctx.node_dir} ({directory.node_yaml})")
    cfg = new_node_config(args.name, args.host)
    directory.save_node_config(cfg)
    print(f"Node {cfg.name} created in {ctx.node_dir}")
    print(f"  id:         {cfg.id}")
    print(f"  public key: {cfg.public_key}")
    for service in SERVICES:
        print(f"  {service + ':':<11} {getattr(cfg.addresses, service)}")
    print(f"Next: exo -d {ctx.node_dir} cell init --name <name>")
