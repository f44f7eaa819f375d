"""`exo sec`: keys and hashes."""

from __future__ import annotations

import argparse
from pathlib import Path

from exocli.context import Context
from exocommon.errors import NotFound
from exocommon.hashing import Sha3Multihasher, multihash_to_base58
from exocommon.ids import PeerId
from exocommon.keys import Keypair, PublicKey


def register(commands: argparse._SubParsersAction) -> None:
    sec = commands.add_parser("sec", help="keys and hashes")
    sub = sec.add_subparsers(dest="sec_command", required=True, metavar="COMMAND")
    sub.add_parser("generate-key", help="generate an Ed25519 keypair").set_defaults(handler=generate_key)
    parse = sub.add_parser("parse-public-key", help="print the id (12D3KooW…) of a pe… public key")
    parse.add_argument("public_key")
    parse.set_defaults(handler=parse_public_key)
    multihash = sub.add_parser("multihash-file", help="print the base58 SHA3-256 multihash of a file")
    multihash.add_argument("file", type=Path)
    multihash.set_defaults(handler=multihash_file)


def generate_key(ctx: Context, args: argparse.Namespace) -> None:
    keypair = Keypair.generate()
    public_key = keypair.public_key
    print(f"keypair: {keypair.encode_base58()}")
    print(f"public_key: {public_key.encode_base58()}")
    print(f"name: {public_key.generate_name()}")
    print(f"id: {PeerId.from_public_key(public_key)}")


def parse_public_key(ctx: Context, args: argparse.Namespace) -> None:
    print(PeerId.from_public_key(PublicKey.decode_base58(args.public_key)))


def multihash_file(ctx: Context, args: argparse.Namespace) -> None:
    path: Path = args.file
    if not path.is_file():
        raise NotFound(f"no file {path}")
    hasher = Sha3Multihasher()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    print(multihash_to_base58(hasher.digest()))
