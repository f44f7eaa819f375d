"""The `exo` command as a user runs it: a real process per call."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

VECTORS = [
    ("peHozo7MdJBzjF11nYXnbojD1QLsCRv2w33jDW3fXrmgtc", "12D3KooWSdMxrVD1NtzjQuHyAPM9W16EqCF4wj1X1KaXRegkfdcY"),
    ("pe2N17w6mbsfhZs8TUAGc1DtxaiX6kTottJc6eLcf3hx85", "12D3KooWBBNHgEMK4Zy4H1xtnsMLzh3RCr9PVVyNGCTfibowbtr1"),
    ("pe8Fij7YgKsgoBmp9JBVd196XH1SgWMZVddhmKqBFwBVS6", "12D3KooWH55trgG34b4gBheip6NLutc7Vmj9PFa7bJ8MDAQq5SA2"),
]


def exo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "exocli", *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"exo {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.mark.parametrize(("public_key", "node_id"), VECTORS)
def test_parse_public_key_vectors(public_key, node_id):
    assert exo("sec", "parse-public-key", public_key).stdout.strip() == node_id


def test_parse_bad_public_key_is_one_line_error():
    result = exo("sec", "parse-public-key", "peb", check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1


def test_generate_key_prints_consistent_key_and_id():
    fields = yaml.safe_load(exo("sec", "generate-key").stdout)
    assert fields["keypair"].startswith("ae") and fields["public_key"].startswith("pe")
    assert fields["id"].startswith("12D3KooW")
    assert exo("sec", "parse-public-key", fields["public_key"]).stdout.strip() == fields["id"]


def test_multihash_file(tmp_path: Path):
    import hashlib

    from exocommon.base58 import b58encode

    data = b"exocore" * 1000
    (tmp_path / "f.bin").write_bytes(data)
    expected = b58encode(b"\x16\x20" + hashlib.sha3_256(data).digest())
    assert exo("sec", "multihash-file", str(tmp_path / "f.bin")).stdout.strip() == expected
    missing = exo("sec", "multihash-file", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 1 and "no file" in missing.stderr


def test_node_and_cell_init_validate_and_list(tmp_path: Path):
    node_dir = str(tmp_path / "D")
    exo("-d", node_dir, "node", "init", "--name", "n1")
    node_yaml = yaml.safe_load((tmp_path / "D" / "node.yaml").read_text())
    assert node_yaml["name"] == "n1"
    ports = {node_yaml["addresses"][s].rsplit(":", 1)[1] for s in ("chain", "store", "gateway", "apphost")}
    assert len(ports) == 4

    out = exo("-d", node_dir, "cell", "init", "--name", "c1").stdout
    assert "c1" in out
    assert "valid" in exo("-d", node_dir, "config", "validate").stdout

    listing = exo("-d", node_dir, "cell", "node", "list").stdout.splitlines()
    assert listing[0].split() == ["Name", "Public", "key", "Chain", "Store", "AppHost"]
    (row,) = [line for line in listing[2:] if line.startswith("n1 ")]
    assert row.split()[1] == node_yaml["public_key"]
    assert row.count("✓") == 3

    cells = exo("-d", node_dir, "cell", "list").stdout
    assert "c1" in cells and "12D3KooW" in cells
    cell_yaml = yaml.safe_load(exo("-d", node_dir, "cell", "print").stdout)
    assert cell_yaml["name"] == "c1" and cell_yaml["keypair"].startswith("ae")
    assert cell_yaml["nodes"][0]["roles"] == [1, 2, 3]

    member = yaml.safe_load(exo("-d", node_dir, "config", "print", "--cell").stdout)
    assert member["public_key"] == node_yaml["public_key"] and member["name"] == "n1"
    inline = yaml.safe_load(exo("-d", node_dir, "config", "print", "--inline").stdout)
    assert inline["cells"][0]["inline"]["name"] == "c1"


def test_cell_roles_can_be_left_out(tmp_path: Path):
    node_dir = str(tmp_path / "D")
    exo("-d", node_dir, "node", "init", "--name", "n1")
    exo("-d", node_dir, "cell", "init", "--name", "c2", "--no-app-host", "--no-store")
    cell_yaml = yaml.safe_load(exo("-d", node_dir, "cell", "print").stdout)
    assert cell_yaml["nodes"][0]["roles"] == [1]


def test_node_init_twice_fails_and_keeps_keys(tmp_path: Path):
    node_dir = str(tmp_path / "D")
    exo("-d", node_dir, "node", "init")
    before = (tmp_path / "D" / "node.yaml").read_text()
    again = exo("-d", node_dir, "node", "init", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert (tmp_path / "D" / "node.yaml").read_text() == before


def test_commands_without_a_node_say_how_to_create_one(tmp_path: Path):
    result = exo("-d", str(tmp_path / "none"), "cell", "list", check=False)
    assert result.returncode == 1 and "node init" in result.stderr


def test_validate_names_the_bad_field(tmp_path: Path):
    node_dir = tmp_path / "D"
    exo("-d", str(node_dir), "node", "init")
    text = (node_dir / "node.yaml").read_text()
    (node_dir / "node.yaml").write_text(text + "store:\n  index:\n    chain_index_min_depth: abc\n")
    result = exo("-d", str(node_dir), "config", "validate", check=False)
    assert result.returncode == 1
    assert "chain_index_min_depth" in result.stderr


def test_two_cells_need_a_selection(tmp_path: Path):
    node_dir = str(tmp_path / "D")
    exo("-d", node_dir, "node", "init", "--name", "n1")
    exo("-d", node_dir, "cell", "init", "--name", "a")
    exo("-d", node_dir, "cell", "init", "--name", "b")
    ambiguous = exo("-d", node_dir, "cell", "print", check=False)
    assert ambiguous.returncode == 1 and "-n" in ambiguous.stderr
    assert yaml.safe_load(exo("-d", node_dir, "cell", "-n", "b", "print").stdout)["name"] == "b"
    unknown = exo("-d", node_dir, "cell", "-n", "zzz", "print", check=False)
    assert unknown.returncode == 1 and "zzz" in unknown.stderr


def test_version():
    out = exo("version").stdout
    assert out.startswith("exo 0.1.0") and "grpcio 1.85" in out


def test_every_command_the_cli_tells_the_user_to_run_exists():
    # SPEC 11 item 13: the original's `exo cell join --manual` told the user to run `exo cell print
    # --inline`, which does not exist. Every `exo ...` quoted in the CLI's messages and help must
    # name an existing command and flags (arguments it leaves out are fine: prose may skip them).
    import contextlib
    import io
    import re
    import shlex

    from exocli.main import build_parser

    def refusal(command: str) -> str:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                build_parser().parse_args(shlex.split(command))
        except SystemExit:
            return err.getvalue()
        return ""

    quoted = set()
    for source in (Path(__file__).parents[1] / "exocli").rglob("*.py"):
        for match in re.finditer(r"`exo ([^`]*)`", source.read_text()):
            command = match.group(1)
            if re.search(r"[{<|\[]|\.\.\.|[A-Z]{2,}", command):
                continue  # placeholders
            quoted.add(command.split(">")[0].strip())
    assert {"config print --cell", "cell print", "cell join --from-file c.yaml"} <= quoted
    for command in sorted(quoted):
        error = refusal(command)
        assert "invalid choice" not in error and "unrecognized arguments" not in error, (command, error)
    assert "unrecognized arguments: --inline" in refusal("cell print --inline")
    assert refusal("config print --inline") == ""


def test_the_discovery_server_and_client_share_one_default_port():
    # SPEC 11 item 13: the original's library defaulted to 8005 and its CLI to 8085.
    import inspect

    from exocli.main import build_parser
    from exocommon.discovery import DEFAULT_PORT
    from exogateway.discovery import DiscoveryServer

    assert DEFAULT_PORT == 8085
    assert build_parser().parse_args(["discovery", "daemon"]).port == DEFAULT_PORT
    assert inspect.signature(DiscoveryServer).parameters["http_port"].default == DEFAULT_PORT
