"""`exo app generate|package` (an app's source folder) and `exo cell app install|list` (a cell's apps)."""

from __future__ import annotations

import argparse
from pathlib import Path

from exocli.context import Context
from exocli.output import check, print_table
from exocommon.apps import install_package, installed_apps, package_app


def register(commands: argparse._SubParsersAction) -> None:
    app = commands.add_parser("app", help="create and package WebAssembly apps")
    sub = app.add_subparsers(dest="app_command", required=True, metavar="COMMAND")
    generate = sub.add_parser("generate", help="create a new app folder (manifest, keys, C source, Makefile)")
    generate.add_argument("name", help="the app's name")
    generate.add_argument("--dir", dest="app_dir", type=Path, help="folder to create (default: ./<name>)")
    generate.set_defaults(handler=generate_app)
    package = sub.add_parser("package", help="build the app's package zip (fills the module multihash)")
    package.add_argument("app_dir", nargs="?", default=".", type=Path, help="app folder (default: .)")
    package.add_argument("-o", "--output", type=Path, help="zip to write (default: <app dir>/<name>.zip)")
    package.set_defaults(handler=package_command)


def register_cell_app(cell_commands: argparse._SubParsersAction) -> None:
    """`exo cell app ...` (called by the `cell` command's register)."""
    app = cell_commands.add_parser("app", help="the cell's apps")
    sub = app.add_subparsers(dest="cell_app_command", required=True, metavar="COMMAND")
    install = sub.add_parser("install", help="install an app package (file path, file:// or http(s):// URL)")
    install.add_argument("url", help="package zip: a path, file://... or http(s)://...")
    install.add_argument("--overwrite", action="store_true", help="replace the same version if installed")
    install.set_defaults(handler=install_command)
    sub.add_parser("list", help="list the cell's apps").set_defaults(handler=list_command)


def generate_app(ctx: Context, args: argparse.Namespace) -> None:
    from exoapphost.scaffold import generate_app as generate

    app = generate(args.name, args.app_dir)
    print(f"App {app.name} created in {app.directory}")
    print(f"  id:         {app.app_id}")
    print(f"  public key: {app.public_key}")
    print(f"  keypair:    {app.keypair.encode_base58()}")
    print("Save the keypair somewhere safe: it is the app's identity and is not written anywhere.")
    print(f"Build and package it with `make -C {app.directory} package`, then install the zip with")
    print("`exo cell app install <zip>`.")


def package_command(ctx: Context, args: argparse.Namespace) -> None:
    out = package_app(args.app_dir, args.output)
    print(f"package written to {out}")


def install_command(ctx: Context, args: argparse.Namespace) -> None:
    from exocli.commands.cell import select_cell
    from exocommon.ids import PeerId
    from exocommon.keys import PublicKey

    directory = ctx.existing_directory()
    cell = select_cell(directory, args)
    cell_id = cell.id or str(PeerId.from_public_key(PublicKey.decode_base58(cell.public_key)))
    app, _entry = install_package(directory, cell_id, args.url, overwrite=args.overwrite)
    print(f"app {app.name} {app.version} ({app.app_id}) installed in {app.directory}")


def list_command(ctx: Context, args: argparse.Namespace) -> None:
    from exocli.commands.cell import select_cell

    directory = ctx.existing_directory()
    cell = select_cell(directory, args)
    rows = [[a.name, a.version, a.public_key, check(a.loaded)] for a in installed_apps(directory, cell)]
    print_table(["Name", "Version", "Public key", "Installed"], rows)
