"""`exo daemon`'s supervision rules without processes: what it runs, and when it restarts."""

from __future__ import annotations

import pytest

from exocli.commands.daemon import SERVICES, Child, Supervisor, plan_children
from exocommon.config import Cell, LocalNode, Role, create_cell_node_config, generate_cell_config
from exocommon.errors import FailedPrecondition


def make_cell(local: LocalNode, roles: list[Role], name: str = "c") -> Cell:
    config = generate_cell_config(name)
    config.nodes.append(create_cell_node_config(local.config, roles))
    return Cell.from_config(config, local)


def test_one_chain_service_per_cell_with_the_chain_role():
    local = LocalNode.generate("n")
    cells = [make_cell(local, [Role.CHAIN, Role.STORE]), make_cell(local, [Role.STORE], "other")]
    # The store role without the chain role runs nothing (SPEC 4.6).
    child, store, gateway = plan_children(local, cells, "/nodes/n", "debug")
    assert child.kind == SERVICES[0] and child.cell is cells[0]
    assert child.argv[1:] == ["-m", "exochain", "--dir", "/nodes/n", "--cell", str(cells[0].id), "--log", "debug"]
    assert store.kind.name == "store" and store.cell is cells[0] and store.address == local.listen_addresses.store
    assert store.argv[1:] == ["-m", "exostore", "--dir", "/nodes/n", "--cell", str(cells[0].id), "--log", "debug"]
    assert gateway.kind.name == "gateway" and gateway.cell is cells[0]
    assert gateway.address == local.listen_addresses.gateway and gateway.argv[2] == "exogateway"


def test_an_app_host_node_without_the_chain_role_runs_the_app_host_and_its_gateway():
    # SPEC 11 gap 6: the original's app host needed a store on its node; ours reaches the cell's
    # stores through the gateway, so an app-host-only node runs both, and nothing else.
    local = LocalNode.generate("n")
    cells = [make_cell(local, [Role.APP_HOST]), make_cell(local, [Role.STORE], "store-only")]
    children = plan_children(local, cells, "/nodes/n", "info")
    assert [(c.kind.name, c.cell) for c in children] == [("gateway", cells[0]), ("apphost", cells[0])]
    assert children[1].argv[1:3] == ["-m", "exoapphost"] and children[1].address == local.listen_addresses.apphost
    # A node with no role in a cell runs nothing for it.
    assert plan_children(local, [make_cell(local, [])], "/nodes/n", "info") == []


def test_two_cells_cannot_share_the_chain_address():
    local = LocalNode.generate("n")
    cells = [make_cell(local, [Role.CHAIN], "a"), make_cell(local, [Role.CHAIN], "b")]
    with pytest.raises(FailedPrecondition, match="chain role in 2 cells"):
        plan_children(local, cells, "/n", "info")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restart_backoff_doubles_to_30_s_and_resets_after_a_healthy_minute():
    local = LocalNode.generate("n")
    clock = FakeClock()
    child = Child(SERVICES[0], make_cell(local, [Role.CHAIN]), ["true"], "127.0.0.1:1")
    supervisor = Supervisor([child], out=lambda line: None, clock=clock)
    delays = []
    for _ in range(7):
        child.started_at = clock.now
        clock.now += 5  # crashes after 5 s
        supervisor._on_exit(child, 1)
        assert child.restart_at is not None
        delays.append(child.restart_at - clock.now)
    assert delays == [1, 2, 4, 8, 16, 30, 30]

    child.started_at = clock.now
    clock.now += 61  # healthy for a minute, then crashes
    supervisor._on_exit(child, 1)
    assert child.restart_at == clock.now + 1


def test_a_configuration_error_is_not_restarted():
    local = LocalNode.generate("n")
    child = Child(SERVICES[0], make_cell(local, [Role.CHAIN]), ["true"], "127.0.0.1:1")
    supervisor = Supervisor([child], out=lambda line: None, clock=FakeClock())
    supervisor._on_exit(child, 2)
    assert child.given_up and child.restart_at is None
