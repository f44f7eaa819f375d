"""`exo version`: what is installed."""

from __future__ import annotations

import argparse
import platform
from importlib import metadata

from exocli.context import Context


def register(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("version", help="print version information").set_defaults(handler=print_version)


def print_version(ctx: Context, args: argparse.Namespace) -> None:
    print(f"exo {metadata.version('exocore-py')}")
    print(f"python {platform.python_version()} ({platform.python_implementation()})")
    for dependency in ("grpcio", "protobuf", "tantivy", "wasmtime", "plyvel", "pynacl"):
        try:
            print(f"{dependency} {metadata.version(dependency)}")
        except metadata.PackageNotFoundError:
            print(f"{dependency} missing")
