"""A cell of N chain nodes, each a real `python -m exochain` process on loopback, for integration tests.

    cluster = Cluster.create(tmp_path, size=3)      # `exo node init` x N, one cell, same genesis
    cluster.start()                                 # every node, waits for health SERVING
    ids = cluster.nodes[0].client().append([b"x"])
    cluster.wait_committed(ids)                     # COMMITTED on every running node
    cluster.nodes[1].kill(); cluster.nodes[1].start()
    cluster.close()                                 # SIGKILL whatever still runs (fixture teardown)

Node folders are made by the real CLI (`exo node init`); the cell config is built here with every
node in the chain role, and every node gets the same genesis block (Ed25519 signatures are
deterministic, so building it with the cell key on each node gives identical bytes). node.yaml gets
fast engine settings so a commit takes a fraction of a second. Each node's output goes to
`<node dir>/service.log`, printed by `Cluster.logs()` when a test fails.

Stores: `Cluster.create(..., roles=STORE_ROLES, store_settings={...})` gives every node the chain and
store roles (the cell config holds the cell keypair) and store settings in node.yaml;
`node.start_store()` runs `python -m exostore` and waits until its EntityStore is SERVING (caught up
with the chain), `node.kill_store()`, `node.wipe_store()`, `node.store()` (a blocking EntityStore
client). A store logs to `<node dir>/store.log`; `Cluster.close()` kills stores too.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exochain.model import BlockView
from exochain.storage.leveldb import LevelDbStorage
from exochain.tools import write_genesis
from exocommon.config import NodeDirectory, Role, create_cell_node_config, generate_cell_config
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2, chain_pb2_grpc
from exocore.core import config_pb2
from exocore.store import mutation_pb2, query_pb2
from exocore.store.v1 import entity_store_pb2_grpc

T = TypeVar("T")

FAST_CHAIN_SETTINGS = {
    "commit_interval_ms": 100,
    "tick_interval_ms": 20,
    "sync_interval_ms": 200,
}

# Reconnect quickly to a node that was restarted (grpc's default backoff grows to 120 s).
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]

COMMITTED = chain_pb2.OPERATION_STATUS_COMMITTED

STORE_ROLES = (Role.CHAIN, Role.STORE)
STORE_SERVICE = "exocore.store.v1.EntityStore"


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Polls `condition` until it returns something truthy (returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except grpc.RpcError as exc:  # a node restarting: try again
            last_error = exc
        if time.monotonic() > deadline:
            suffix = f" (last error: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{suffix}")
        time.sleep(interval)


class ChainClient:
    """A blocking ChainLog / ChainPeer client of one node."""

    def __init__(self, address: str, deadline_s: float = 5.0) -> None:
        self.address = address
        self.deadline_s = deadline_s
        self.channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.log = chain_pb2_grpc.ChainLogStub(self.channel)
        self.peer = chain_pb2_grpc.ChainPeerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def append(self, entries: Sequence[bytes], timeout: float | None = None) -> list[int]:
        response = self.log.Append(chain_pb2.AppendRequest(entries=entries), timeout=timeout or self.deadline_s)
        return list(response.operation_ids)

    def operations(self, operation_ids: Iterable[int]) -> dict[int, chain_pb2.StoredOperation]:
        request = chain_pb2.GetOperationsRequest(operation_ids=list(operation_ids))
        response = self.log.GetOperations(request, timeout=self.deadline_s)
        return {
            chain_pb2.Operation.FromString(op.operation.operation_bytes).operation_id: op
            for op in response.operations
        }

    def blocks(self, from_offset: int = 0) -> list[BlockView]:
        """The whole chain from `from_offset`, page by page."""
        blocks: list[BlockView] = []
        while True:
            request = chain_pb2.GetBlocksRequest(from_offset=from_offset, max_count=500)
            page = self.log.GetBlocks(request, timeout=self.deadline_s).blocks
            if not page:
                return blocks
            blocks.extend(BlockView.from_proto(b) for b in page)
            from_offset = blocks[-1].next_offset

    def status(self) -> chain_pb2.ChainStatus:
        return self.log.Status(chain_pb2.StatusRequest(), timeout=self.deadline_s)

    def subscribe(self, request: chain_pb2.SubscribeRequest) -> Iterator[chain_pb2.ChainEvent]:
        """A live stream (cancel it with `.cancel()`)."""
        return self.log.Subscribe(request, timeout=60)

    def deliver(self, envelope: chain_pb2.PeerEnvelope) -> None:
        self.peer.Deliver(envelope, timeout=self.deadline_s)

    def serving(self) -> bool:
        try:
            response = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


class StoreClient:
    """A blocking EntityStore client of one store."""

    def __init__(self, address: str, deadline_s: float = 10.0) -> None:
        self.address = address
        self.deadline_s = deadline_s
        self.channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = entity_store_pb2_grpc.EntityStoreStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def mutate(
        self, request: mutation_pb2.MutationRequest, timeout: float | None = None
    ) -> mutation_pb2.MutationResult:
        return self.stub.Mutate(request, timeout=timeout or self.deadline_s)

    def query(self, query: query_pb2.EntityQuery) -> query_pb2.EntityResults:
        return self.stub.Query(query, timeout=self.deadline_s)

    def watch(self, query: query_pb2.EntityQuery) -> Iterator[query_pb2.EntityResults]:
        """A live stream (cancel it with `.cancel()`)."""
        return self.stub.WatchQuery(query, timeout=60)

    def serving(self) -> bool:
        try:
            response = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=STORE_SERVICE), timeout=1
            )
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class ClusterNode:
    index: int
    directory: NodeDirectory
    cell_id: str
    config: config_pb2.LocalNodeConfig
    process: subprocess.Popen[bytes] | None = None
    _client: ChainClient | None = field(default=None, repr=False)
    store_process: subprocess.Popen[bytes] | None = None
    _store_client: StoreClient | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def node_id(self) -> str:
        return self.config.id

    @property
    def keypair(self) -> Keypair:
        return Keypair.decode_base58(self.config.keypair)

    @property
    def address(self) -> str:
        return self.config.addresses.chain

    @property
    def chain_dir(self) -> Path:
        return self.directory.chain_dir(self.cell_id)

    @property
    def log_path(self) -> Path:
        return self.directory.root / "service.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> ChainClient:
        if self._client is None:
            self._client = ChainClient(self.address)
        return self._client

    def start(self, wait: bool = True, timeout: float = 20.0) -> None:
        assert not self.running, f"{self.name} already runs"
        argv = [sys.executable, "-m", "exochain", "--dir", str(self.directory.root), "--cell", self.cell_id]
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 20.0) -> None:
        def serving() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}")
            return self.client().serving()

        wait_until(serving, timeout, f"{self.name} to serve")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None
        self._reset_client()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        self._reset_client()
        return code

    def _reset_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def wipe_chain(self, cell_keypair: Keypair) -> None:
        """Deletes the chain folder and writes back only the genesis block (node must be stopped)."""
        assert not self.running
        shutil.rmtree(self.chain_dir)
        write_node_genesis(self.chain_dir, self.cell_id, cell_keypair)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        if self.process is not None and self.process.poll() is not None:
            tail.append(f"---- exited with status {self.process.returncode}")
        return "\n".join(tail)

    # -- the store service -------------------------------------------------------------------------

    @property
    def store_address(self) -> str:
        return self.config.addresses.store

    @property
    def store_dir(self) -> Path:
        return self.directory.store_dir(self.cell_id)

    @property
    def store_log_path(self) -> Path:
        return self.directory.root / "store.log"

    @property
    def store_running(self) -> bool:
        return self.store_process is not None and self.store_process.poll() is None

    def store(self) -> StoreClient:
        if self._store_client is None:
            self._store_client = StoreClient(self.store_address)
        return self._store_client

    def start_store(self, wait: bool = True, timeout: float = 30.0) -> None:
        assert not self.store_running, f"the store of {self.name} already runs"
        argv = [sys.executable, "-m", "exostore", "--dir", str(self.directory.root), "--cell", self.cell_id]
        with open(self.store_log_path, "ab") as log:
            log.write(f"---- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.store_process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if wait:
            self.wait_store_serving(timeout)

    def wait_store_serving(self, timeout: float = 30.0) -> None:
        """Until its EntityStore is SERVING, which it becomes once caught up with the chain."""

        def serving() -> bool:
            if self.store_process is not None and self.store_process.poll() is not None:
                raise AssertionError(
                    f"the store of {self.name} exited with status {self.store_process.returncode}:\n"
                    f"{self.store_log_tail()}"
                )
            return self.store().serving()

        wait_until(serving, timeout, f"the store of {self.name} to serve")

    def kill_store(self) -> None:
        """SIGKILL the store."""
        if self.store_process is not None:
            if self.store_process.poll() is None:
                self.store_process.send_signal(signal.SIGKILL)
            self.store_process.wait()
        self.store_process = None
        if self._store_client is not None:
            self._store_client.close()
            self._store_client = None

    def wipe_store(self) -> None:
        """Deletes the store's data folder (the store must be stopped)."""
        assert not self.store_running
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def store_log_tail(self, lines: int = 40) -> str:
        if not self.store_log_path.exists():
            return ""
        tail = self.store_log_path.read_text(errors="replace").splitlines()[-lines:]
        if self.store_process is not None and self.store_process.poll() is not None:
            tail.append(f"---- exited with status {self.store_process.returncode}")
        return "\n".join(tail)


def write_node_genesis(chain_dir: Path, cell_id: str, cell_keypair: Keypair) -> None:
    with LevelDbStorage(chain_dir) as storage:
        write_genesis(storage.chain, cell_id, cell_keypair)


def exo(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "exocli", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"exo {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


@dataclass
class Cluster:
    root: Path
    cell: config_pb2.CellConfig
    nodes: list[ClusterNode]

    @property
    def cell_id(self) -> str:
        return self.cell.id

    @property
    def cell_keypair(self) -> Keypair:
        return Keypair.decode_base58(self.cell.keypair)

    @classmethod
    def create(
        cls,
        root: Path,
        size: int = 3,
        chain_settings: dict[str, int] | None = None,
        roles: Sequence[Role] = (Role.CHAIN,),
        store_settings: dict[str, int] | None = None,
    ) -> Cluster:
        """`store_settings`: `store.index.*` keys of node.yaml (e.g. chain_index_min_depth)."""
        settings = FAST_CHAIN_SETTINGS if chain_settings is None else chain_settings
        directories: list[NodeDirectory] = []
        configs: list[config_pb2.LocalNodeConfig] = []
        for index in range(size):
            directory = NodeDirectory(root / f"node{index + 1}")
            exo("-d", str(directory.root), "node", "init", "--name", f"node{index + 1}")
            config = directory.load_node_config()
            for key, value in settings.items():
                getattr(config.chain, key).value = value
            for key, value in (store_settings or {}).items():
                getattr(config.store.index, key).value = value
            directory.save_node_config(config)
            directories.append(directory)
            configs.append(config)
        ports = [c.addresses.chain for c in configs]
        assert len(set(ports)) == len(ports), f"two nodes got the same chain address: {ports}"

        cell = generate_cell_config("integration")
        cell.nodes.extend(create_cell_node_config(config, list(roles)) for config in configs)
        nodes: list[ClusterNode] = []
        for index, directory in enumerate(directories):
            directory.save_cell_config(cell)
            write_node_genesis(directory.chain_dir(cell.id), cell.id, Keypair.decode_base58(cell.keypair))
            nodes.append(ClusterNode(index, directory, cell.id, directory.load_node_config()))
        return cls(root, cell, nodes)

    def start(self, timeout: float = 20.0) -> None:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_serving(timeout)

    def running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.running]

    def close(self) -> None:
        """Kills every node still running."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill_store()
            with contextlib.suppress(Exception):
                node.kill()

    def wait_committed(self, operation_ids: Sequence[int], timeout: float = 20.0) -> dict[int, int]:
        """Waits until every id is COMMITTED on every running node, at the same block offset on all;
        returns id -> block offset."""
        wanted = list(operation_ids)

        def committed_everywhere() -> dict[int, int] | None:
            offsets: dict[int, int] | None = None
            for node in self.running():
                found: dict[int, chain_pb2.StoredOperation] = {}
                for start in range(0, len(wanted), 1000):
                    found.update(node.client().operations(wanted[start : start + 1000]))
                if len(found) != len(wanted) or any(op.status != COMMITTED for op in found.values()):
                    return None
                here = {operation_id: op.block_offset for operation_id, op in found.items()}
                if offsets is not None and here != offsets:
                    raise AssertionError(f"nodes committed operations at different offsets: {offsets} vs {here}")
                offsets = here
            return offsets

        return wait_until(committed_everywhere, timeout, f"{len(wanted)} operation(s) committed on every node")

    def wait_same_chain(self, timeout: float = 20.0) -> list[BlockView]:
        """Waits until every running node has the same chain (same block hashes); returns it."""

        def same() -> list[BlockView] | None:
            chains = [node.client().blocks() for node in self.running()]
            hashes = [[b.hash for b in chain] for chain in chains]
            return chains[0] if all(h == hashes[0] for h in hashes) else None

        return wait_until(same, timeout, "every node to have the same chain")

    def logs(self) -> str:
        parts = []
        for node in self.nodes:
            parts.append(f"==== {node.name} ({node.log_path})\n{node.log_tail(60)}")
            if node.store_log_path.exists():
                parts.append(f"==== store of {node.name} ({node.store_log_path})\n{node.store_log_tail(60)}")
        return "\n".join(parts)


def entry_ids(blocks: Iterable[BlockView]) -> list[int]:
    """Every operation id in the blocks, in chain order (duplicates kept)."""
    return [op.operation_id for block in blocks for op in block.operations]


__all__ = [
    "COMMITTED",
    "STORE_ROLES",
    "ChainClient",
    "Cluster",
    "ClusterNode",
    "StoreClient",
    "entry_ids",
    "exo",
    "wait_until",
    "write_node_genesis",
]
