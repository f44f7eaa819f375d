"""`exo daemon`'s supervision rules without processes: what it runs, and when it restarts."""

from __future__ import annotations

import os

import pytest

from exocli.commands.daemon import SERVICES, CellMembership, Child, Supervisor, plan_children
from exocli.main import main as exo_main
from exocommon.config import (
    Cell,
    LocalNode,
    NodeDirectory,
    Role,
    add_node,
    create_cell_node_config,
    generate_cell_config,
    generate_node_config,
)
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


def test_the_chain_service_watches_its_cells_members(tmp_path):
    directory = NodeDirectory(tmp_path / "node")
    assert exo_main(["-d", str(directory.root), "node", "init", "--name", "n"]) == 0
    assert exo_main(["-d", str(directory.root), "cell", "init", "--name", "c", "--no-genesis"]) == 0
    local = directory.load_local_node()
    children = plan_children(local, directory.load_cells(local), str(directory.root), "info")
    assert [c.kind.name for c in children if c.watch is not None] == ["chain"]
    (cell_id,) = [c.id for c in directory.load_cell_configs()]
    watch = CellMembership(str(directory.root), cell_id)
    before = watch()
    assert before is not None and len(before) == 1  # (public key, roles) of each member

    # Rewritten the same (new mtime): same membership.
    (cfg,) = directory.load_cell_configs()
    path = directory.cell_yaml(cell_id)
    path.write_text(path.read_text())
    os.utime(path, ns=(1, 1))
    assert watch() == before
    # A node added (`exo cell node add`, or a new cell.yaml from another member): a change.
    add_node(cfg, create_cell_node_config(generate_node_config("n2"), [Role.CHAIN]))
    directory.save_cell_config(cfg)
    after = watch()
    assert after is not None and after != before and len(after) == 2
    # Unreadable (mid-write): no verdict, nothing restarted.
    path.write_text("nodes: [")
    assert watch() is None


class Membership:
    def __init__(self) -> None:
        self.value: object = ("a",)

    def __call__(self) -> object:
        return self.value


def test_a_chain_service_is_restarted_at_once_when_the_members_change():
    local = LocalNode.generate("n")
    clock = FakeClock()
    lines: list[str] = []
    members = Membership()
    child = Child(SERVICES[0], make_cell(local, [Role.CHAIN]), ["sleep", "30"], "127.0.0.1:1", watch=members)
    supervisor = Supervisor([child], out=lines.append, clock=clock)
    supervisor._start(child)
    try:
        supervisor._check_config(child)
        assert child.running and not child.reloading  # nothing changed
        members.value = ("a", "b")
        supervisor._check_config(child)
        assert child.reloading
        assert child.process is not None and child.process.wait(5) == -15  # SIGTERM: a graceful stop
        backoff = child.backoff_s
        supervisor._on_exit(child, -15)
        assert child.restart_at == clock.now and child.backoff_s == backoff  # at once, not as a crash
        assert "the cell's members changed; restarting it" in lines[-1]
        supervisor._start(child)  # with the new members
        assert child.config_seen == ("a", "b")
        # This time it cannot run (exit 2: no genesis and no peer, say)...
        assert child.process is not None
        child.process.kill()
        child.process.wait()
        supervisor._on_exit(child, 2)
    finally:
        if child.process is not None:
            child.process.kill()
            child.process.wait()
    assert child.given_up and child.restart_at is None
    # ... until the members change again: then it gets another chance.
    supervisor._check_config(child)
    assert child.given_up  # same members
    members.value = ("a", "b", "c")
    supervisor._check_config(child)
    assert not child.given_up and child.restart_at == clock.now
