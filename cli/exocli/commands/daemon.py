"""`exo daemon`: run this node's services, one child process each, and keep them running (SPEC 4.6).

For each cell of the node and each service whose role the node has in that cell, the daemon starts
``python -m <module> --dir NODE_DIR --cell CELL_ID --log LEVEL`` and supervises it:

* a child that exits is restarted after a backoff: 1 s, doubled after each crash up to 30 s, and
  back to 1 s once a child ran 60 s before crashing;
* a child exiting with status 2 (its configuration does not allow it to run) is not restarted
  (unless the cell's members change, below); the daemon exits 1 when no child is left;
* a chain service reads its cell's membership (chain nodes and their keys) when it starts: when
  cell.yaml changes it (`exo cell node add`, a new cell.yaml from another member; checked every
  `CONFIG_CHECK_INTERVAL_S`), the daemon restarts it at once, gracefully, so the new member is
  accepted (or a removed one refused) without restarting the daemon (SPEC 11 gap 4, part). The
  gateway and the app host follow cell.yaml themselves; a store does not depend on membership;
* SIGINT / SIGTERM are forwarded (as SIGTERM) to every child, the daemon waits for them to stop
  gracefully (SIGKILL after `STOP_TIMEOUT_S`) and exits 0. A second signal kills them at once.

Children run in their own process group (a Ctrl-C in the terminal reaches the daemon only, which
stops them in order) and get SIGTERM if the daemon dies (Linux parent-death signal).

Adding a service (store, apphost, gateway) is one `ServiceKind` line in `SERVICES`.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from exocli.context import Context
from exocommon.config import Cell, LocalNode, NodeDirectory, Role
from exocommon.errors import ExocoreError, FailedPrecondition
from exocommon.process import EXIT_CONFIG

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.2
CONFIG_CHECK_INTERVAL_S = 2.0


@dataclass(frozen=True)
class ServiceKind:
    """A service the daemon runs for each cell where the node has `role`."""

    name: str
    # None: every cell where the node runs anything (the gateway serves the node, whatever its roles).
    role: Role | None
    module: str
    # The `addresses` field of node.yaml it listens on.
    address_field: str
    # Runs only where the node also has the chain role (a store tails its own node's chain service).
    needs_chain: bool = True


SERVICES: tuple[ServiceKind, ...] = (
    ServiceKind("chain", Role.CHAIN, "exochain", "chain"),
    ServiceKind("store", Role.STORE, "exostore", "store"),
    # The gateway and the app host reach the cell's stores over gRPC, from any node (SPEC 11 gap 6:
    # the original's app host needed a store on its node).
    ServiceKind("gateway", None, "exogateway", "gateway", needs_chain=False),
    ServiceKind("apphost", Role.APP_HOST, "exoapphost", "apphost", needs_chain=False),
)


def register(commands: argparse._SubParsersAction) -> None:
    daemon = commands.add_parser("daemon", help="run the node's services (one process each) until stopped")
    daemon.set_defaults(handler=run_daemon)


@dataclass
class Child:
    """One supervised service process."""

    kind: ServiceKind
    cell: Cell
    argv: list[str]
    address: str
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_INITIAL_S
    restart_at: float | None = None
    given_up: bool = False
    restarts: int = 0
    # The configuration the service depends on (None: nothing watched); a change restarts it.
    watch: Callable[[], object] | None = None
    config_seen: object = None
    reloading: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind.name} of cell {self.cell.name}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class CellMembership:
    """The cell's members and their roles as its config files say now (None when they cannot be
    read: mid-write, say). The files are parsed again only when node.yaml or cell.yaml changed."""

    def __init__(self, node_dir: str, cell_id: str) -> None:
        self.directory = NodeDirectory(node_dir)
        self.cell_id = cell_id
        self._stamp: object = None
        self._value: object = None

    def _files_stamp(self) -> object:
        stamps = []
        for path in (self.directory.node_yaml, self.directory.cell_yaml(self.cell_id)):
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def __call__(self) -> object:
        stamp = self._files_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self._value = self._read()
        return self._value

    def _read(self) -> object:
        try:
            local = self.directory.load_local_node()
            cells = [c for c in self.directory.load_cells(local) if str(c.id) == self.cell_id]
        except (ExocoreError, OSError):
            return None
        if not cells:
            return None
        return tuple(sorted((n.node.public_key, tuple(sorted(n.roles))) for n in cells[0].config.nodes))


def plan_children(local: LocalNode, cells: Sequence[Cell], node_dir: str, log_level: str) -> list[Child]:
    """The services to run: one per (cell, service kind) where the node has the role. The chain and
    the store run only where the node has the chain role (SPEC 4.6: a store tails its own node's
    chain); the app host runs on the app-host node whatever its other roles, and the gateway in every
    cell where something else runs (the app host sends its store requests through it)."""
    children: list[Child] = []

    def runs(kind: ServiceKind, cell: Cell) -> bool:
        roles = cell.local_roles()
        if kind.needs_chain and Role.CHAIN not in roles:
            return False
        if kind.role is not None:
            return kind.role in roles
        return any(other.role is not None and runs(other, cell) for other in SERVICES)

    for kind in SERVICES:
        cells_with_role = [cell for cell in cells if runs(kind, cell)]
        if len(cells_with_role) > 1:
            # One address per service in node.yaml: two cells' services cannot both listen on it.
            names = ", ".join(cell.name for cell in cells_with_role)
            raise FailedPrecondition(
                f"this node has the {kind.name} role in {len(cells_with_role)} cells ({names}) but one "
                f"{kind.name} address; running several cells on one node is not supported yet"
            )
        for cell in cells_with_role:
            address = getattr(local.listen_addresses, kind.address_field)
            argv = [sys.executable, "-m", kind.module, "--dir", node_dir, "--cell", str(cell.id), "--log", log_level]
            watch = CellMembership(node_dir, str(cell.id)) if kind.name == "chain" else None
            children.append(Child(kind, cell, argv, address, watch=watch))
    return children


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the daemon dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class Supervisor:
    """Starts, watches, restarts and stops the children (see module docstring)."""

    def __init__(
        self,
        children: list[Child],
        out: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = children
        self._out = out
        self._clock = clock
        self._stop_requested = 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested += 1
        if self._stop_requested > 1:
            self._out("second signal: killing the services now")
            for child in self.children:
                if child.running and child.process is not None:
                    child.process.kill()

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(
            child.argv,
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        child.started_at = self._clock()
        child.restart_at = None
        child.reloading = False
        if child.watch is not None:
            child.config_seen = child.watch()
        what = "restarted" if child.restarts else "started"
        self._out(f"{child.label} ({child.cell.id}) {what}: listening on {child.address}, pid {child.process.pid}")

    def _check_config(self, child: Child) -> None:
        """Restart a child whose watched configuration changed (see module docstring), also one
        that could not run with the previous configuration."""
        if child.watch is None or child.reloading:
            return
        seen = child.watch()
        if seen is None or seen == child.config_seen:
            return
        if child.given_up:
            self._out(f"{child.label}: the cell's members changed; starting it again")
            child.given_up = False
            child.config_seen = seen
            child.restart_at = self._clock()
            return
        if not child.running:
            return  # waiting to restart: it will read the new configuration
        assert child.process is not None
        self._out(f"{child.label}: the cell's members changed; restarting it")
        child.reloading = True
        child.process.send_signal(signal.SIGTERM)

    def _on_exit(self, child: Child, code: int) -> None:
        child.process = None
        now = self._clock()
        if child.reloading:
            # Stopped for a configuration change: back at once, no crash backoff.
            child.reloading = False
            child.restart_at = now
            child.restarts += 1
            return
        if code == EXIT_CONFIG:
            child.given_up = True
            self._out(f"{child.label} cannot run with this configuration (exit {code}); not restarting it")
            return
        if now - child.started_at >= HEALTHY_AFTER_S:
            child.backoff_s = BACKOFF_INITIAL_S
        delay = child.backoff_s
        child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
        child.restart_at = now + delay
        child.restarts += 1
        self._out(f"{child.label} exited with status {code}; restarting in {delay:g} s")

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                self._start(child)
            next_config_check = self._clock() + CONFIG_CHECK_INTERVAL_S
            while not self._stop_requested:
                if self._clock() >= next_config_check:
                    next_config_check = self._clock() + CONFIG_CHECK_INTERVAL_S
                    for child in self.children:
                        self._check_config(child)
                for child in self.children:
                    if child.process is not None:
                        code = child.process.poll()
                        if code is not None:
                            self._on_exit(child, code)
                    elif child.restart_at is not None and self._clock() >= child.restart_at:
                        self._start(child)
                if all(child.given_up for child in self.children):
                    self._out("no service left to run")
                    return 1
                time.sleep(POLL_INTERVAL_S)
            self._stop_all()
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_all(self) -> None:
        running = [child for child in self.children if child.running]
        self._out(f"stopping {len(running)} service(s)")
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = self._clock() + STOP_TIMEOUT_S
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(timeout=max(0.0, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                self._out(f"{child.label} did not stop in {STOP_TIMEOUT_S:g} s; killing it")
                child.process.kill()
                child.process.wait()
            self._out(f"{child.label} stopped (status {child.process.returncode})")


def run_daemon(ctx: Context, args: argparse.Namespace) -> int:
    directory = ctx.existing_directory()
    local = directory.load_local_node()
    cells = directory.load_cells(local)
    children = plan_children(local, cells, str(ctx.node_dir), args.log)
    if not children:
        roles = ", ".join(kind.name for kind in SERVICES)
        raise FailedPrecondition(
            f"nothing to run: node {local.name} has no role with a service ({roles}) in any cell; "
            f"create a cell with `exo -d {ctx.node_dir} cell init` or join one"
        )
    print(f"node {local.name} ({local.node_id}): running {len(children)} service(s); Ctrl-C to stop", flush=True)
    return Supervisor(children, out=lambda line: print(line, flush=True)).run()
