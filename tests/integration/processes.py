"""Service processes for integration tests: `python -m exochain|exostore|exogateway` with logs and health waits.

    node = one_node_cell(tmp_path / "node")                 # `exo node init` + `exo cell init`, fast chain
    chain = ServiceProcess.chain(node); chain.start()       # waits until health says SERVING
    store = ServiceProcess.store(node, "--listen", addr, "--data-dir", d); store.start()
    gateway = ServiceProcess.gateway(node, "--store", addr); gateway.start()
    store.kill()                                            # SIGKILL
    print(gateway.log_tail())

Every process writes to `<log dir>/<name>.log`; `stop_all(processes)` kills whatever still runs.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cluster import exo, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exocommon.config import NodeDirectory

STORE_SERVICE = "exocore.store.v1.EntityStore"


def one_node_cell(root: Path, name: str = "solo") -> NodeDirectory:
    """A node with a one-node cell (chain, store and app-host roles, genesis written), fast chain settings."""
    directory = NodeDirectory(root)
    exo("-d", str(directory.root), "node", "init", "--name", name)
    config = directory.load_node_config()
    config.chain.commit_interval_ms.value = 100
    config.chain.tick_interval_ms.value = 20
    directory.save_node_config(config)
    exo("-d", str(directory.root), "cell", "init", "--name", name)
    return directory


def cell_id_of(directory: NodeDirectory) -> str:
    return directory.load_node_config().cells[0].id


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    health_address: str
    health_service: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def for_node(
        cls, module: str, name: str, directory: NodeDirectory, address: str, service: str, *extra: str
    ) -> ServiceProcess:
        argv = [sys.executable, "-m", module, "--dir", str(directory.root), "--cell", cell_id_of(directory), *extra]
        return cls(name, argv, address, service, directory.root / f"{name}.log")

    @classmethod
    def chain(cls, directory: NodeDirectory) -> ServiceProcess:
        address = directory.load_node_config().addresses.chain
        return cls.for_node("exochain", "chain", directory, address, "")

    @classmethod
    def store(cls, directory: NodeDirectory, *extra: str, name: str = "store", address: str = "") -> ServiceProcess:
        address = address or directory.load_node_config().addresses.store
        return cls.for_node("exostore", name, directory, address, STORE_SERVICE, *extra)

    @classmethod
    def gateway(
        cls, directory: NodeDirectory, *extra: str, name: str = "gateway", address: str = ""
    ) -> ServiceProcess:
        address = address or directory.load_node_config().addresses.gateway
        return cls.for_node("exogateway", name, directory, address, STORE_SERVICE, *extra)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, wait: bool = True, timeout: float = 30.0) -> ServiceProcess:
        assert not self.running, f"{self.name} already runs"
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_serving(timeout)
        return self

    def serving(self) -> bool:
        with grpc.insecure_channel(self.health_address) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=self.health_service), timeout=1
                )
            except grpc.RpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, timeout: float = 30.0) -> None:
        def serving() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}")
            return self.serving()

        wait_until(serving, timeout, f"{self.name} to serve", interval=0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def stop_all(processes: Iterable[ServiceProcess]) -> str:
    """Kills every process; returns their log tails (for a failing test's output)."""
    logs = []
    for process in processes:
        with contextlib.suppress(Exception):
            process.kill()
        logs.append(f"==== {process.name} ({process.log_path})\n{process.log_tail(60)}")
    return "\n".join(logs)
