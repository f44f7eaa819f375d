"""`exo daemon` and `python -m exochain` as a user runs them: a one-node cell made by the CLI."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cluster import ChainClient, exo, wait_until

from exocommon.config import NodeDirectory, Role, add_node, create_cell_node_config, generate_node_config

pytestmark = pytest.mark.timeout(60)


def one_node(tmp_path: Path, *cell_flags: str) -> NodeDirectory:
    directory = NodeDirectory(tmp_path / "node")
    exo("-d", str(directory.root), "node", "init", "--name", "solo")
    config = directory.load_node_config()
    config.chain.commit_interval_ms.value = 100
    config.chain.tick_interval_ms.value = 20
    directory.save_node_config(config)
    exo("-d", str(directory.root), "cell", "init", "--name", "solo", *cell_flags)
    return directory


class Lines(threading.Thread):
    """A process's output lines, readable with a timeout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.start()

    def run(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.seen)) from None
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match


def test_daemon_runs_restarts_and_stops_the_chain_service(tmp_path: Path):
    directory = one_node(tmp_path)
    address = directory.load_node_config().addresses.chain
    daemon = subprocess.Popen(
        [sys.executable, "-m", "exocli", "-d", str(directory.root), "daemon"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Lines(daemon)
    try:
        started = output.wait_for(r"chain of cell solo .* started: listening on (\S+), pid (\d+)")
        assert started.group(1) == address
        client = ChainClient(address)
        wait_until(client.serving, 20, "the chain service to serve")

        # The daemon holds the LevelDB folder: `chain check` goes through the service.
        (operation_id,) = client.append([b"hello"])
        wait_until(lambda: client.operations([operation_id])[operation_id].status == 2, 20, "the entry committed")
        checked = exo("-d", str(directory.root), "cell", "chain", "check")
        assert re.fullmatch(r"chain valid: 2 blocks, height 2, last offset \d+\n", checked)

        # A crashed service is restarted, and finds its data again.
        os.kill(int(started.group(2)), signal.SIGKILL)
        output.wait_for(r"chain of cell solo exited with status -9; restarting in 1 s")
        output.wait_for(r"chain of cell solo .* restarted: listening on")
        client.close()
        client = ChainClient(address)
        wait_until(client.serving, 20, "the restarted chain service to serve")
        assert client.operations([operation_id])[operation_id].status == 2
        client.close()

        # A new member in cell.yaml (`exo cell node add`): the chain service is restarted to know it.
        (cell_config,) = directory.load_cell_configs()
        add_node(cell_config, create_cell_node_config(generate_node_config("n2"), [Role.STORE]))
        directory.save_cell_config(cell_config)
        output.wait_for(r"chain of cell solo: the cell's members changed; restarting it")
        output.wait_for(r"chain of cell solo .* restarted: listening on")
        client = ChainClient(address)
        wait_until(client.serving, 20, "the chain service to serve with the new members")
        assert client.operations([operation_id])[operation_id].status == 2
        client.close()

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        output.join(5)
        output.wait_for(r"chain of cell solo stopped \(status 0\)", timeout=5)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    # Stopped: the command opens the folder itself.
    assert exo("-d", str(directory.root), "cell", "chain", "check").startswith("chain valid: 2 blocks, height 2")


def run_chain_service(directory: NodeDirectory) -> subprocess.CompletedProcess[str]:
    (cell,) = directory.load_cell_configs()
    return subprocess.run(
        [sys.executable, "-m", "exochain", "--dir", str(directory.root), "--cell", cell.id],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_chain_service_refuses_a_node_without_the_chain_role(tmp_path: Path):
    result = run_chain_service(one_node(tmp_path, "--no-chain"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "does not have the chain role" in result.stderr


def test_chain_service_refuses_a_chain_without_genesis_nor_peer(tmp_path: Path):
    directory = one_node(tmp_path, "--no-genesis")
    result = run_chain_service(directory)
    assert result.returncode == 2
    assert "no genesis block and no peer" in result.stderr and result.stderr.count("\n") == 1

    assert exo("-d", str(directory.root), "cell", "chain", "init").startswith("genesis block of cell solo written")
    again = subprocess.run(
        [sys.executable, "-m", "exocli", "-d", str(directory.root), "cell", "chain", "init"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1 and "already has 1 block(s)" in again.stderr


def test_chain_check_reports_the_first_invalid_block(tmp_path: Path):
    from exochain.model import BlockView, build_block_header
    from exochain.storage.leveldb import LevelDbStorage

    directory = one_node(tmp_path)
    (cell,) = directory.load_cell_configs()
    with LevelDbStorage(directory.chain_dir(cell.id)) as storage:
        genesis = storage.chain.get_block(0)
        assert genesis is not None
        unsigned = BlockView(build_block_header(cell.id, genesis.head, 1, "nobody", []), ())
        storage.chain.write_block(unsigned)
    result = subprocess.run(
        [sys.executable, "-m", "exocli", "-d", str(directory.root), "cell", "chain", "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.startswith(f"chain invalid: block at offset {genesis.next_offset} (height 2):")
    assert "not a quorum" in result.stdout


def test_daemon_with_nothing_to_run_says_so(tmp_path: Path):
    # Only the store role, which needs the chain role on the same node (an app-host node without
    # it still runs the app host and its gateway).
    directory = one_node(tmp_path, "--no-chain", "--no-app-host")
    result = subprocess.run(
        [sys.executable, "-m", "exocli", "-d", str(directory.root), "daemon"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1 and "nothing to run" in result.stderr
