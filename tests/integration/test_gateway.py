"""The gateway as real processes: a one-node cell with its chain, two store replicas and a gateway.

Bad tokens refused on gRPC and HTTP; the gateway keeps serving (unary calls and watches) when one of
the two store replicas is SIGKILLed; external clients this project did not write (`buf curl`, a Node
`@grpc/grpc-js` script) use the gateway through reflection and the .proto files.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import wait_until
from processes import ServiceProcess, cell_id_of, one_node_cell, stop_all

from exocommon.auth_token import AuthToken
from exocommon.client import Client, MutationBuilder, QueryBuilder, SyncClient, node_endpoint_and_token
from exocommon.clock import now_ns
from exocommon.config import NodeDirectory
from exocommon.errors import Unauthenticated
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocommon.net import free_ports
from exocore.test import test_pb2

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"
NODE_CLIENT = Path(__file__).with_name("node_client.js")
NS = 1_000_000_000


class Cell:
    def __init__(self, root: Path) -> None:
        self.directory = one_node_cell(root / "node")
        self.cell_id = cell_id_of(self.directory)
        config = self.directory.load_node_config()
        self.extra_store = f"127.0.0.1:{free_ports(1)[0]}"
        self.chain = ServiceProcess.chain(self.directory)
        self.store_a = ServiceProcess.store(self.directory, name="store-a")
        self.store_b = ServiceProcess.store(
            self.directory,
            "--listen",
            self.extra_store,
            "--data-dir",
            str(root / "store-b"),
            name="store-b",
            address=self.extra_store,
        )
        self.gateway = ServiceProcess.gateway(self.directory, "--store", self.extra_store)
        self.gateway_address = config.addresses.gateway
        self.http = config.addresses.http[0]
        self.endpoint, self.token = node_endpoint_and_token(self.directory.root)
        self.processes = [self.chain, self.store_a, self.store_b, self.gateway]

    def start(self) -> None:
        self.chain.start()
        self.store_a.start(wait=False)
        self.store_b.start(wait=False)
        self.store_a.wait_serving()
        self.store_b.wait_serving()
        self.gateway.start()


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cell]:
    cell = Cell(tmp_path_factory.mktemp("gateway"))
    try:
        cell.start()
        yield cell
    finally:
        print(stop_all(cell.processes))


@pytest.fixture
def fresh_cell(tmp_path: Path) -> Iterator[Cell]:
    cell = Cell(tmp_path)
    try:
        cell.start()
        yield cell
    finally:
        print(stop_all(cell.processes))


def bad_tokens(cell: Cell) -> dict[str, str | None]:
    node = Keypair.decode_base58(cell.directory.load_node_config().keypair)
    now = now_ns()
    good = AuthToken.create(cell.cell_id, node, now)
    return {
        "missing": None,
        "malformed": "not-a-token",
        "expired": AuthToken.create(cell.cell_id, node, now - 10 * NS, now - NS).encode_base58(),
        "foreign cell": AuthToken.create(
            str(PeerId.from_public_key(Keypair.generate().public_key)), node, now
        ).encode_base58(),
        "unknown node": AuthToken.create(cell.cell_id, Keypair.generate(), now).encode_base58(),
        "bad signature": AuthToken(good.cell_id, good.node_id, now, None, good.data, bytes(64)).encode_base58(),
    }


def wait_visible_on_every_replica(cell: Cell, text: str, count: int = 1) -> None:
    """Each store replica tails the chain on its own: a write acknowledged by one (even `wait_indexed`)
    reaches the other a moment later. Waits until both replicas return `count` matches for `text`."""
    addresses = [cell.directory.load_node_config().addresses.store, cell.extra_store]

    def visible() -> bool:
        for address in addresses:
            with SyncClient(address) as client:
                if len(client.query(QueryBuilder.match(text).count(100)).entities) != count:
                    return False
        return True

    wait_until(visible, 20, f"{count} match(es) for {text!r} on both store replicas", interval=0.1)


def http_status(url: str, body: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_bad_tokens_are_refused_on_grpc_and_http(cell: Cell):
    expected_http = {"foreign cell": 404, "unknown node": 404}
    body = QueryBuilder.all().build().SerializeToString()
    for kind, token in bad_tokens(cell).items():
        with SyncClient(cell.gateway_address, token) as client, pytest.raises(Unauthenticated):
            client.query(QueryBuilder.all())
        url = f"{cell.http}/store/query" + (f"?token={token}" if token is not None else "")
        assert http_status(url, body) == expected_http.get(kind, 401), kind
    assert http_status(f"{cell.http}/store/query?token={cell.token}", body) == 200


def test_writes_and_queries_through_the_gateway_with_the_node_token(cell: Cell):
    with SyncClient.for_node(cell.directory.root) as client:
        result = client.mutate(
            MutationBuilder().put_trait("", test_pb2.TestMessage(string1="gateway integration")).return_entities()
        )
        entity_id = result.entities[0].id
        wait_visible_on_every_replica(cell, "integration")
        for _ in range(2):  # one query per replica (round robin)
            results = client.query(QueryBuilder.match("integration"))
            assert entity_id in [r.entity.id for r in results.entities]


async def test_the_gateway_keeps_serving_when_a_store_replica_is_killed(fresh_cell: Cell):
    cell = fresh_cell
    async with Client(cell.gateway_address, cell.token, resubscribe_backoff_initial_s=0.1) as client:
        await client.mutate(MutationBuilder().put_trait("", test_pb2.TestMessage(string1="before kill")).wait_indexed())
        await asyncio.to_thread(wait_visible_on_every_replica, cell, "kill")
        # Two watches opened one after the other land on the two replicas (round robin).
        watches = [client.watch(QueryBuilder.match("kill").count(100)) for _ in range(2)]
        for watch in watches:
            first = await asyncio.wait_for(watch.__anext__(), 10)
            assert len(first.entities) == 1
        cell.store_a.kill()
        for index in range(10):
            text = f"after kill {index}"
            await client.mutate(MutationBuilder().put_trait("", test_pb2.TestMessage(string1=text)).wait_indexed())
            results = await client.query(QueryBuilder.match("kill").count(100))
            assert text in [
                test_pb2.TestMessage.FromString(r.entity.traits[0].message.value).string1 for r in results.entities
            ]
        # Both watches end up with the latest results; the one whose replica died re-subscribed.
        for watch in watches:
            while watch.latest is None or len(watch.latest.entities) < 11:
                await asyncio.wait_for(watch.__anext__(), 10)
        assert sorted(w.resubscriptions for w in watches) == [0, 1]
        for watch in watches:
            await watch.aclose()


def test_buf_curl_lists_services_and_calls_mutate_and_query(cell: Cell):
    assert BUF.exists(), "run `make tools`"
    base = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    url = f"http://{cell.gateway_address}"
    listed = subprocess.run([*base, "--list-services", url], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "exocore.store.v1.EntityStore" in listed.stdout.split()
    auth = ["-H", f"authorization: Bearer {cell.token}"]
    mutation = {
        "mutations": [
            {
                "putTrait": {
                    "trait": {
                        "message": {"@type": "type.googleapis.com/exocore.test.TestMessage", "string1": "via buf"}
                    }
                }
            }
        ],
        "waitIndexed": True,
    }
    mutated = subprocess.run(
        [*base, *auth, "-d", json.dumps(mutation), f"{url}/exocore.store.v1.EntityStore/Mutate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert mutated.returncode == 0, mutated.stderr
    operation_id = json.loads(mutated.stdout)["operationIds"][0]
    wait_visible_on_every_replica(cell, "buf")
    queried = subprocess.run(
        [*base, *auth, "-d", '{"match": {"query": "buf"}}', f"{url}/exocore.store.v1.EntityStore/Query"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert queried.returncode == 0, queried.stderr
    (result,) = json.loads(queried.stdout)["entities"]
    assert result["entity"]["lastOperationId"] == operation_id
    assert result["entity"]["traits"][0]["message"]["string1"] == "via buf"
    refused = subprocess.run(
        [*base, "-d", "{}", f"{url}/exocore.store.v1.EntityStore/Query"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "unauthenticated" in (refused.stdout + refused.stderr).lower()


def test_node_grpc_js_client_queries_and_receives_a_watch_update(cell: Cell):
    node = shutil.which("node")
    assert node is not None, "node is needed for the external client test"
    assert (ROOT / "tools" / "node_modules" / "@grpc" / "grpc-js").exists(), "run `make tools`"
    with SyncClient(cell.gateway_address, cell.token) as client:
        client.mutate(MutationBuilder().put_trait("", test_pb2.TestMessage(string1="nodejs first")).wait_indexed())
        wait_visible_on_every_replica(cell, "nodejs")
        process = subprocess.Popen(
            [node, str(NODE_CLIENT), cell.gateway_address, cell.token, str(ROOT / "protos"), "nodejs"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "NODE_PATH": str(ROOT / "tools" / "node_modules")},
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line.strip()) for line in process.stdout], daemon=True).start()
        try:
            assert lines.get(timeout=30) == "QUERY 1 type.googleapis.com/exocore.test.TestMessage"
            assert lines.get(timeout=30) == "WATCH 1"
            client.mutate(MutationBuilder().put_trait("", test_pb2.TestMessage(string1="nodejs second")))
            assert lines.get(timeout=30) == "WATCH 2"
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_the_gateway_follows_cell_changes_without_restart(cell: Cell):
    """A node added to cell.yaml can use its tokens once the gateway reloads the file (~2 s)."""
    newcomer = Keypair.generate()
    token = AuthToken.create(cell.cell_id, newcomer, now_ns()).encode_base58()
    with SyncClient(cell.gateway_address, token) as client, pytest.raises(Unauthenticated):
        client.query(QueryBuilder.all())
    directory: NodeDirectory = cell.directory
    config = directory.load_cell_configs()[0]
    entry = config.nodes.add()
    entry.node.public_key = newcomer.public_key.encode_base58()
    directory.save_cell_config(config)

    def accepted() -> bool:
        with SyncClient(cell.gateway_address, token) as client:
            try:
                client.query(QueryBuilder.all())
            except Unauthenticated:
                return False
        return True

    wait_until(accepted, 15, "the gateway to accept the new node's token", interval=0.5)
