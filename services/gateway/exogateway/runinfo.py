"""`python -m exogateway.runinfo --dir NODE_DIR`: how to talk to a running local cell (printed by `make run`).

Waits until the node's gateway answers a query (its daemon is starting in the background), then prints
the gateway address, the HTTP endpoints, an auth token for the cell signed with the node's key, and
example commands that work as printed from the repository root:

    .venv/bin/exo -d .exo/node store mutate --json '{...}'
    .venv/bin/exo -d .exo/node store query --query-string hello
    tools/node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer TOKEN" \\
        -d '{"queryString":{"query":"hello"}}' http://GATEWAY/exocore.store.v1.EntityStore/Query

Exit status 1 if the gateway does not answer within `--wait-s`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from exocommon.auth_token import AuthToken, expiration_after_days
from exocommon.client import QueryBuilder, SyncClient
from exocommon.clock import now_ns
from exocommon.config import NodeDirectory
from exocommon.errors import ExocoreError

TOKEN_DAYS = 30
EXAMPLE_TRAIT = {"@type": "type.googleapis.com/exocore.test.TestMessage", "string1": "hello world"}
EXAMPLE_MUTATION = {"mutations": [{"putTrait": {"trait": {"message": EXAMPLE_TRAIT}}}], "waitIndexed": True}
EXAMPLE_QUERY = {"queryString": {"query": "hello"}}


def wait_for_gateway(endpoint: str, token: str, wait_s: float) -> str | None:
    """None once a query through the gateway succeeds; else the last error after `wait_s`."""
    deadline = time.monotonic() + wait_s
    last_error = "no answer"
    with SyncClient(endpoint, token) as client:
        while time.monotonic() < deadline:
            try:
                client.query(QueryBuilder.all().count(1), timeout=2)
                return None
            except ExocoreError as exc:
                last_error = str(exc)
            time.sleep(0.5)
    return last_error


def banner(node_dir: str, exo: str, buf: str, gateway: str, http: str | None, token: str, cell: str) -> str:
    mutation = json.dumps(EXAMPLE_MUTATION, separators=(",", ":"))
    query = json.dumps(EXAMPLE_QUERY, separators=(",", ":"))
    lines = [
        "",
        f"Local cell {cell} is up (node folder {node_dir}).",
        f"  gateway (gRPC, reflection):  {gateway}",
    ]
    if http:
        lines.append(f"  HTTP thin-client endpoints:  {http}/store/query  {http}/store/mutate  (?token=TOKEN)")
    lines += [
        f"  auth token ({TOKEN_DAYS} days):        {token}",
        "",
        "Try, from this folder in another terminal:",
        f"  {exo} -d {node_dir} store mutate --json {shlex.quote(mutation)}",
        f"  {exo} -d {node_dir} store query --query-string hello",
        f"  {buf} curl --protocol grpc --http2-prior-knowledge -H {shlex.quote('authorization: Bearer ' + token)} "
        f"-d {shlex.quote(query)} http://{gateway}/exocore.store.v1.EntityStore/Query",
        "Ctrl-C stops the cell; `make clean-run` deletes it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exogateway.runinfo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="node directory")
    parser.add_argument("--exo", default=".venv/bin/exo", help="the exo command to show")
    parser.add_argument("--buf", default="tools/node_modules/.bin/buf", help="the buf command to show")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the gateway")
    args = parser.parse_args(argv)
    try:
        directory = NodeDirectory(Path(args.dir))
        local = directory.load_local_node()
        cells = directory.load_cells(local)
        if not cells:
            print(f"error: node {local.name} has no cell", file=sys.stderr)
            return 1
        cell = cells[0]
        now = now_ns()
        token = AuthToken.create(str(cell.id), local.keypair, now, expiration_after_days(now, TOKEN_DAYS))
    except ExocoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = token.encode_base58()
    gateway = local.addresses.gateway
    error = wait_for_gateway(gateway, text, args.wait_s)
    if error is not None:
        print(f"error: the gateway at {gateway} did not answer within {args.wait_s:g} s: {error}", file=sys.stderr)
        return 1
    http = local.addresses.http[0].rstrip("/") if local.addresses.http else None
    print(banner(args.dir, args.exo, args.buf, gateway, http, text, f"{cell.name} ({cell.id})"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
