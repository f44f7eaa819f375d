"""Joining a cell through a real `exo discovery daemon`, the file variants, auth tokens and
`exo dev cluster`: every `exo` is a real process, as a user runs it."""

from __future__ import annotations

import base64
import json
import os
import pty
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from exocommon.auth_token import AuthToken, TokenExpired
from exocommon.clock import now_ns
from exocommon.config import NodeDirectory, cell_node_config_to_yaml, create_cell_node_config
from exocommon.discovery import DiscoveryClient, PayloadNotFound
from exocommon.ids import PeerId
from exocommon.keys import Keypair, PublicKey
from exocommon.sealed import SealedPayloadError, open_sealed_box

CHAIN, STORE, APP_HOST = 1, 2, 3


def exo(*args: str | Path, check: bool = True, stdin_text: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "exocli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        input=stdin_text,
        stdin=None if stdin_text is not None else subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exo {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr}")
    return result


class LineReader:
    """Lines of a process's stdout, read by a thread (so a wait can time out)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} after {timeout} s; got {self.seen}") from None
            if line is None:
                raise AssertionError(f"process ended without a line matching {pattern!r}; got {self.seen}")
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def discovery(tmp_path: Path) -> Iterator[str]:
    """A real `exo discovery daemon` on a free port; its REST URL."""
    log = (tmp_path / "discovery.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "exocli", "discovery", "daemon", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = LineReader(process).wait_for(r"discovery REST API: (http://\S+)").group(1)
        yield url
    finally:
        _stop(process)
        log.close()
    assert process.returncode == 0, "the discovery daemon did not stop gracefully on SIGTERM"


def _member_and_joiner(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "A", tmp_path / "B"
    exo("-d", a, "node", "init", "--name", "a")
    exo("-d", a, "cell", "init", "--name", "c1")
    exo("-d", b, "node", "init", "--name", "b")
    return a, b


def _cell_yaml(node: Path) -> dict:
    (cell_dir,) = (node / "cells").iterdir()
    return yaml.safe_load((cell_dir / "cell.yaml").read_text())


def _roles_of(cell: dict, public_key: str) -> list[int]:
    (entry,) = [n for n in cell["nodes"] if n["node"]["public_key"] == public_key]
    return entry.get("roles", [])


def _public_key(node: Path) -> str:
    return yaml.safe_load((node / "node.yaml").read_text())["public_key"]


def test_join_through_the_discovery_daemon(tmp_path, discovery):
    a, b = _member_and_joiner(tmp_path)
    joiner = subprocess.Popen(
        [sys.executable, "-m", "exocli", "--discovery-service", discovery, "-d", str(b), "cell", "join"]
        + ["--chain", "--store", "--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        reader = LineReader(joiner)
        pin = reader.wait_for(r"PIN: (\d{3} \d{3} \d{3})").group(1)
        added = exo("--discovery-service", discovery, "-d", a, "cell", "node", "add", "--pin", pin, "--yes")
        assert _public_key(b) in added.stdout and "chain, store" in added.stdout
        assert joiner.wait(20) == 0, joiner.stderr.read() if joiner.stderr else ""
        reader.wait_for(r"Joined cell c1 \(12D3KooW\w+\) with roles: chain, store")
    finally:
        _stop(joiner)

    cell_a, cell_b = _cell_yaml(a), _cell_yaml(b)
    assert cell_b == cell_a
    assert cell_b["keypair"].startswith("ae")
    assert _roles_of(cell_b, _public_key(b)) == [CHAIN, STORE]
    assert _roles_of(cell_b, _public_key(a)) == [CHAIN, STORE, APP_HOST]
    node_b = yaml.safe_load((b / "node.yaml").read_text())
    assert node_b["cells"] == [{"id": cell_a["id"]}]
    assert "valid, 2 node(s)" in exo("-d", b, "config", "validate").stdout


def test_the_mailbox_never_sees_the_cell_keypair(tmp_path, discovery):
    """The test plays the joining node with the client library, so it can read the raw reply."""
    a, b = _member_and_joiner(tmp_path)
    b_dir = NodeDirectory(b)
    b_keypair = b_dir.load_local_node().keypair
    client = DiscoveryClient(discovery)
    request = create_cell_node_config(b_dir.load_node_config(), [CHAIN, STORE])
    created = client.create(cell_node_config_to_yaml(request).encode(), expect_reply=True)

    exo("--discovery-service", discovery, "-d", a, "cell", "node", "add", "--pin", str(created.pin), "--yes")

    with urllib.request.urlopen(f"{discovery}/{created.reply_pin}", timeout=10) as response:
        raw = response.read()
    cell_keypair_text = _cell_yaml(a)["keypair"]
    cell_keypair = Keypair.decode_base58(cell_keypair_text)
    data = base64.b64decode(json.loads(raw)["data"])
    for secret in (cell_keypair_text.encode(), cell_keypair.seed, cell_keypair_text[2:].encode()):
        assert secret not in raw and secret not in data
    assert data[0] == 0x02  # a public-key sealed box
    with pytest.raises(SealedPayloadError):
        open_sealed_box(Keypair.generate(), data)
    opened = yaml.safe_load(open_sealed_box(b_keypair, data))
    assert opened == _cell_yaml(a) and opened["keypair"] == cell_keypair_text


def test_join_refuses_a_reply_not_sealed_to_it(tmp_path, discovery):
    a, b = _member_and_joiner(tmp_path)
    joiner = subprocess.Popen(
        [sys.executable, "-m", "exocli", "--discovery-service", discovery, "-d", str(b), "cell", "join"]
        + ["--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        pin = LineReader(joiner).wait_for(r"PIN: (\d{3} \d{3} \d{3})").group(1)
        client = DiscoveryClient(discovery)
        asked = client.get(pin)
        client.reply(asked.reply_pin, asked.reply_token, exo("-d", a, "cell", "print").stdout.encode())
        assert joiner.wait(20) == 1
        assert "not a cell config sealed to this node's key" in joiner.stderr.read()
    finally:
        _stop(joiner)
    assert not (b / "cells").exists()


def test_join_times_out_when_nobody_answers(tmp_path, discovery):
    _, b = _member_and_joiner(tmp_path)
    started = time.monotonic()
    result = exo("--discovery-service", discovery, "-d", b, "cell", "join", "--timeout", "1.5", check=False)
    assert result.returncode == 1 and "no member added this node within 1.5 s" in result.stderr
    assert time.monotonic() - started < 10


def test_node_add_without_a_terminal_needs_yes_and_keeps_the_payload(tmp_path, discovery):
    a, b = _member_and_joiner(tmp_path)
    client = DiscoveryClient(discovery)
    request = create_cell_node_config(NodeDirectory(b).load_node_config(), [STORE])
    created = client.create(cell_node_config_to_yaml(request).encode(), expect_reply=True)
    add = ("--discovery-service", discovery, "-d", a, "cell", "node", "add")
    refused = exo(*add, "--pin", str(created.pin), check=False)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert refused.stderr.count("\n") == 1
    no_pin = exo("--discovery-service", discovery, "-d", a, "cell", "node", "add", "--yes", check=False)
    assert no_pin.returncode == 1 and "--pin" in no_pin.stderr
    wrong = exo(
        "--discovery-service", discovery, "-d", a, "cell", "node", "add", "--pin", "100 000 000", "--yes", check=False
    )
    assert wrong.returncode == 1 and "no joining node under PIN 100 000 000" in wrong.stderr
    # nothing was read: the joining node's payload is still there
    assert client.get(created.pin).data == cell_node_config_to_yaml(request).encode()
    with pytest.raises(PayloadNotFound):
        client.get(created.reply_pin)


def test_node_add_refuses_a_second_app_host(tmp_path, discovery):
    a, b = _member_and_joiner(tmp_path)
    client = DiscoveryClient(discovery)
    request = create_cell_node_config(NodeDirectory(b).load_node_config(), [APP_HOST])
    created = client.create(cell_node_config_to_yaml(request).encode(), expect_reply=True)
    before = _cell_yaml(a)
    result = exo(
        "--discovery-service",
        discovery,
        "-d",
        a,
        "cell",
        "node",
        "add",
        "--pin",
        str(created.pin),
        "--yes",
        check=False,
    )
    assert result.returncode == 1 and "APP_HOST_ROLE" in result.stderr
    assert _cell_yaml(a) == before
    # role flags replace what the node asked for
    created = client.create(cell_node_config_to_yaml(request).encode(), expect_reply=True)
    exo("--discovery-service", discovery, "-d", a, "cell", "node", "add", "--pin", str(created.pin), "--yes", "--chain")
    assert _roles_of(_cell_yaml(a), _public_key(b)) == [CHAIN]


def test_file_variants(tmp_path):
    a, b = _member_and_joiner(tmp_path)
    node_file, cell_file = tmp_path / "n.yaml", tmp_path / "c.yaml"
    node_file.write_text(exo("-d", b, "config", "print", "--cell").stdout)
    added = exo("-d", a, "cell", "node", "add", "--from-file", node_file, "--chain", "--store")
    assert "cell join --from-file" in added.stdout
    cell_file.write_text(exo("-d", a, "cell", "print").stdout)

    # a node the file does not list cannot join with it
    c = tmp_path / "C"
    exo("-d", c, "node", "init", "--name", "c")
    refused = exo("-d", c, "cell", "join", "--from-file", cell_file, check=False)
    assert refused.returncode == 1 and "does not list this node" in refused.stderr
    assert not (c / "cells").exists()

    joined = exo("-d", b, "cell", "join", "--from-file", cell_file)
    assert "Joined cell c1" in joined.stdout
    assert _cell_yaml(b) == _cell_yaml(a)
    assert _roles_of(_cell_yaml(b), _public_key(b)) == [CHAIN, STORE]
    assert "valid, 2 node(s)" in exo("-d", b, "config", "validate").stdout
    listing = exo("-d", b, "cell", "node", "list").stdout
    assert "a " in listing and "b " in listing

    # stdin works too; joining again just rewrites the same cell
    exo("-d", b, "cell", "join", "--from-file", "-", stdin_text=cell_file.read_text())
    assert yaml.safe_load((b / "node.yaml").read_text())["cells"] == [{"id": _cell_yaml(a)["id"]}]

    # a second app host is refused; a CellNodeConfig file keeps its roles
    refused = exo("-d", a, "cell", "node", "add", "--from-file", node_file, "--app-host", check=False)
    assert refused.returncode == 1 and "APP_HOST_ROLE" in refused.stderr
    entry = {"node": yaml.safe_load(node_file.read_text()), "roles": [STORE]}
    (tmp_path / "entry.yaml").write_text(yaml.safe_dump(entry))
    exo("-d", a, "cell", "node", "add", "--from-file", tmp_path / "entry.yaml")
    assert _roles_of(_cell_yaml(a), _public_key(b)) == [STORE]


def test_generate_auth_token(tmp_path):
    a = tmp_path / "A"
    exo("-d", a, "node", "init", "--name", "a")
    exo("-d", a, "cell", "init", "--name", "c1", "--no-genesis")
    out = yaml.safe_load(exo("-d", a, "cell", "generate-auth-token").stdout)
    cell = _cell_yaml(a)
    members = {
        str(PeerId.from_public_key(PublicKey.decode_base58(n["node"]["public_key"]))): PublicKey.decode_base58(
            n["node"]["public_key"]
        )
        for n in cell["nodes"]
    }
    token = AuthToken.decode_base58(out["token"])
    token.validate(cell["id"], members, now_ns())
    assert token.expiration_date_ns is not None
    days = (token.expiration_date_ns - now_ns()) / 86_400e9
    assert 29.9 < days <= 30
    assert str(out["expiration"]).startswith(time.strftime("%Y", time.gmtime(token.expiration_date_ns / 1e9)))
    with pytest.raises(TokenExpired):
        token.validate(cell["id"], members, token.expiration_date_ns)

    forever = exo("-d", a, "cell", "generate-auth-token", "--expiration-days", "0", "--quiet").stdout.strip()
    assert AuthToken.decode_base58(forever).expiration_date_ns is None
    AuthToken.decode_base58(forever).validate(cell["id"], members, now_ns() + 10**18)

    negative = exo("-d", a, "cell", "generate-auth-token", "--expiration-days", "-1", check=False)
    assert negative.returncode == 1 and "--expiration-days" in negative.stderr


def test_dev_cluster(tmp_path):
    from exochain.storage.leveldb import LevelDbStorage

    d = tmp_path / "D"
    out = exo("dev", "cluster", "--nodes", "3", "--dir", d, "--name", "devcell").stdout
    for i in (1, 2, 3):
        assert f"exo -d {d / f'node{i}'} daemon" in out
        assert "valid, 3 node(s)" in exo("-d", d / f"node{i}", "config", "validate").stdout

    cells = [_cell_yaml(d / f"node{i}") for i in (1, 2, 3)]
    assert cells[0] == cells[1] == cells[2]
    assert cells[0]["name"] == "devcell" and cells[0]["keypair"].startswith("ae")
    roles = [n.get("roles", []) for n in cells[0]["nodes"]]
    assert roles == [[CHAIN, STORE, APP_HOST], [CHAIN, STORE], [CHAIN, STORE]]

    ports: list[str] = []
    for i in (1, 2, 3):
        addresses = yaml.safe_load((d / f"node{i}" / "node.yaml").read_text())["addresses"]
        ports += [addresses[s].rsplit(":", 1)[1] for s in ("chain", "store", "gateway", "apphost")]
        ports += [addresses["http"][0].rsplit(":", 1)[1]]
    assert len(set(ports)) == 15

    hashes = []
    for i in (1, 2, 3):
        with LevelDbStorage(NodeDirectory(d / f"node{i}").chain_dir(cells[0]["id"])) as storage:
            assert storage.chain.block_count() == 1
            hashes.append(storage.chain.last_block().hash)
        assert "chain valid: 1 blocks" in exo("-d", d / f"node{i}", "cell", "chain", "check").stdout
    assert hashes[0] == hashes[1] == hashes[2]

    again = exo("dev", "cluster", "--nodes", "3", "--dir", d, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr


def _on_terminal(args: list[str], typed: str) -> subprocess.CompletedProcess[str]:
    """`exo ARGS` with a pseudo-terminal as stdin on which `typed` was typed."""
    master, slave = pty.openpty()
    try:
        os.write(master, typed.encode())
        return subprocess.run(
            [sys.executable, "-m", "exocli", *args], stdin=slave, capture_output=True, text=True, timeout=30
        )
    finally:
        os.close(slave)
        os.close(master)


def test_node_add_asks_on_a_terminal(tmp_path, discovery):
    a, b = _member_and_joiner(tmp_path)
    client = DiscoveryClient(discovery)
    request = create_cell_node_config(NodeDirectory(b).load_node_config(), [CHAIN])
    before = _cell_yaml(a)

    created = client.create(cell_node_config_to_yaml(request).encode(), expect_reply=True)
    add = ["--discovery-service", discovery, "-d", str(a), "cell", "node", "add"]
    declined = _on_terminal(add, f"{created.pin}\nn\n")
    assert declined.returncode == 0 and "Not added" in declined.stdout
    assert "Add this node to cell c1? [y/N]" in declined.stderr and _public_key(b) in declined.stdout
    assert _cell_yaml(a) == before
    with pytest.raises(PayloadNotFound):
        client.get(created.reply_pin)

    created = client.create(cell_node_config_to_yaml(request).encode(), expect_reply=True)
    accepted = _on_terminal([*add, "--pin", str(created.pin)], "y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert _roles_of(_cell_yaml(a), _public_key(b)) == [CHAIN]
    reply = client.get(created.reply_pin)
    keypair = NodeDirectory(b).load_local_node().keypair
    assert yaml.safe_load(open_sealed_box(keypair, reply.data)) == _cell_yaml(a)
