"""The `exo` command: manage a node folder, its cells and keys (SPEC.md 6).

Every command is non-interactive by default. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from exocli.commands import app, cell, config, daemon, deploy, dev, discovery, node, sec, store, version
from exocli.context import Context
from exocommon.errors import ExocoreError

DEFAULT_DIR = "~/.exocore"
DEFAULT_DISCOVERY = "https://disco.exocore.io"
LOG_LEVELS = ("off", "error", "warn", "info", "debug", "trace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo", description="Exocore: your private, self-hosted cloud.")
    parser.add_argument(
        "-d",
        "--dir",
        default=os.environ.get("EXO_DIR", DEFAULT_DIR),
        help="node directory (env EXO_DIR, default %(default)s)",
    )
    parser.add_argument(
        "-l",
        "--log",
        default=os.environ.get("EXO_LOG", "info"),
        choices=LOG_LEVELS,
        help="log level (env EXO_LOG, default %(default)s)",
    )
    parser.add_argument(
        "--discovery-service",
        default=os.environ.get("EXO_DISCOVERY", DEFAULT_DISCOVERY),
        help="discovery mailbox URL used by `cell join` / `cell node add` (env EXO_DISCOVERY, default %(default)s; "
        "`exo discovery daemon` serves one on http://127.0.0.1:8085)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (node, config, cell, app, daemon, store, discovery, dev, deploy, sec, version):
        module.register(commands)
    return parser


def _configure_logging(level: str) -> None:
    if level == "off":
        logging.disable(logging.CRITICAL)
        return
    names = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
    logging.basicConfig(
        level=names.get(level, logging.DEBUG),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log)
    ctx = Context(node_dir=Path(args.dir).expanduser(), discovery_url=args.discovery_service)
    try:
        return int(args.handler(ctx, args) or 0)
    except ExocoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
