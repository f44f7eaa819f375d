"""node.yaml `apphost:` settings, the service's startup checks and its place in `exo daemon`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exoapphost.__main__ import load_setup, store_address_of
from exoapphost.settings import AppHostSettings, AppLimits, RestartPolicy
from exocli.commands.daemon import plan_children
from exocli.main import main as exo_main
from exocommon.config import ConfigError, NodeDirectory, node_config_from_yaml, node_config_to_yaml

pytestmark = pytest.mark.timeout(60)


def test_defaults_and_configured_values():
    node = node_config_from_yaml(node_config_to_yaml(_node()))
    assert AppHostSettings.from_node_config(node) == AppHostSettings()
    node.apphost.fuel_per_call.value = 5000
    node.apphost.call_timeout_ms.value = 250
    node.apphost.memory_max_bytes.value = 1 << 20
    node.apphost.store_requests_in_flight_max.value = 2
    node.apphost.restart_backoff_initial_ms.value = 10
    node.apphost.store_address = "127.0.0.1:9"
    settings = AppHostSettings.from_node_config(node_config_from_yaml(node_config_to_yaml(node)))
    assert settings.limits == AppLimits(
        fuel_per_call=5000, call_timeout_ms=250, memory_max_bytes=1 << 20, store_requests_in_flight_max=2
    )
    assert settings.restart == RestartPolicy(backoff_initial_ms=10)
    assert settings.store_address == "127.0.0.1:9"
    assert settings.limits.epoch_ticks() == 25


def test_invalid_values_are_refused_with_their_path():
    node = _node()
    node.apphost.call_timeout_ms.value = 0
    with pytest.raises(ConfigError, match="apphost.call_timeout_ms: must be at least 1"):
        node_config_from_yaml(node_config_to_yaml(node))
    node = _node()
    node.apphost.store_address = "nowhere"
    with pytest.raises(ConfigError, match="apphost.store_address: expected a gRPC address"):
        node_config_from_yaml(node_config_to_yaml(node))
    node = _node()
    node.apphost.restart_backoff_initial_ms.value = 100
    node.apphost.restart_backoff_max_ms.value = 10
    with pytest.raises(ConfigError, match="restart_backoff_max_ms"):
        AppHostSettings.from_node_config(node)


def _node():
    from exocommon.config import generate_node_config

    return generate_node_config("n")


def make_node(tmp_path: Path, *cell_flags: str) -> NodeDirectory:
    directory = NodeDirectory(tmp_path / "node")
    assert exo_main(["-d", str(directory.root), "node", "init", "--name", "n"]) == 0
    assert exo_main(["-d", str(directory.root), "cell", "init", "--no-genesis", *cell_flags]) == 0
    return directory


def test_the_daemon_runs_the_apphost_on_the_app_host_node(tmp_path: Path):
    directory = make_node(tmp_path)
    local = directory.load_local_node()
    children = plan_children(local, directory.load_cells(local), str(directory.root), "info")
    (apphost,) = [c for c in children if c.kind.name == "apphost"]
    assert apphost.argv[1:3] == ["-m", "exoapphost"] and apphost.address == local.listen_addresses.apphost


def test_setup_targets_the_gateway_then_the_store(tmp_path: Path):
    directory = make_node(tmp_path)
    (cell_id,) = [c.id for c in directory.load_cell_configs()]
    setup = load_setup(directory.root, cell_id)
    local = directory.load_local_node()
    assert setup.store_address == local.addresses.gateway
    assert setup.bind == local.listen_addresses.apphost
    assert store_address_of(setup.cell, AppHostSettings(store_address="10.0.0.1:5")) == "10.0.0.1:5"


def test_an_app_host_node_needs_neither_the_store_nor_the_chain_role(tmp_path: Path):
    # SPEC 11 gap 6: the app host talks to the cell's stores through the node's gateway.
    directory = make_node(tmp_path, "--no-store", "--no-chain")
    (cell_id,) = [c.id for c in directory.load_cell_configs()]
    setup = load_setup(directory.root, cell_id)
    local = directory.load_local_node()
    assert setup.store_address == local.addresses.gateway
    children = plan_children(local, directory.load_cells(local), str(directory.root), "info")
    assert sorted(c.kind.name for c in children) == ["apphost", "gateway"]


def test_a_node_without_the_app_host_role_exits_2(tmp_path: Path):
    directory = make_node(tmp_path, "--no-app-host")
    (cell_id,) = [c.id for c in directory.load_cell_configs()]
    result = subprocess.run(
        [sys.executable, "-m", "exoapphost", "--dir", str(directory.root), "--cell", cell_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not have the app-host role" in result.stderr
