"""Drive the compose cells of deploy/compose with podman-compose: `make compose-up` / `compose-down`.

    python deploy/compose/composectl.py up   [--nodes 3|1] [--timeout S]  generate if missing, up, wait healthy, info
    python deploy/compose/composectl.py wait [--nodes 3|1] [--timeout S]   wait until every container is healthy
    python deploy/compose/composectl.py info [--nodes 3|1]                 published ports, a token, an example
    python deploy/compose/composectl.py down [--nodes 3|1] [--keep-data]   remove containers, network (and volumes)

podman 4.3 (Debian 12) runs no healthcheck timers without systemd and podman-compose only honours
`condition: service_healthy` from podman 4.6 on, so `wait` runs each container's healthcheck itself
(`podman healthcheck run`), which also records the health status. Run it with the venv's python (it
calls `python -m exocli` for the configs and the token) from anywhere; CONTAINERS_CONF defaults to
deploy/containers.conf and podman-compose to the venv's. tests/deploy imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONTAINER_GID = 10001
GATEWAY_PORT = 3330
HTTP_PORT = 8080


@dataclass(frozen=True)
class ComposeCell:
    """A compose cell: `root`/{one,three}-node.yaml and its configs in `root`/generated/<variant>.

    `root` is deploy/compose; tests use a copy of the compose file elsewhere with its own project."""

    nodes: int
    root: Path = HERE
    project_name: str | None = None

    @property
    def variant(self) -> str:
        return {1: "one-node", 3: "three-node"}[self.nodes]

    @property
    def project(self) -> str:
        return self.project_name or os.environ.get("EXO_COMPOSE_PROJECT") or f"exocore{self.nodes}"

    @property
    def compose_file(self) -> Path:
        return self.root / f"{self.variant}.yaml"

    @property
    def generated(self) -> Path:
        return self.root / "generated" / self.variant

    def node_dir(self, number: int) -> Path:
        return self.generated / f"node{number}"


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(REPO / "deploy" / "containers.conf"))
    return env


def podman_compose_command() -> list[str]:
    explicit = os.environ.get("PODMAN_COMPOSE")
    if explicit:
        return explicit.split()
    beside = Path(sys.executable).parent / "podman-compose"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("podman-compose")
    if found:
        return [found]
    raise SystemExit("error: podman-compose is missing (it is a dev dependency: make setup)")


def run(
    command: list[str], check: bool = True, capture: bool = False, quiet: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        check=check,
        text=True,
        env=environment(),
        stdout=subprocess.PIPE if capture or quiet else None,
        stderr=subprocess.PIPE if capture or quiet else None,
    )


def compose(cell: ComposeCell, *args: str, quiet: bool = True) -> subprocess.CompletedProcess[str]:
    command = [*podman_compose_command(), "-p", cell.project, "-f", str(cell.compose_file), *args]
    result = run(command, check=False, quiet=quiet)
    if result.returncode != 0:
        output = ((result.stdout or "") + (result.stderr or "")).strip()
        raise RuntimeError(f"{' '.join(command[-len(args) - 4 :])} failed ({result.returncode}): {output[-2000:]}")
    return result


def generate(cell: ComposeCell) -> bool:
    """Creates the cell's node folders (`exo deploy compose`) unless they exist; True if created."""
    if (cell.node_dir(1) / "node.yaml").is_file():
        return False
    run(
        [sys.executable, "-m", "exocli", "deploy", "compose", "--nodes", str(cell.nodes), "--dir", str(cell.generated)],
        quiet=True,
    )
    if os.geteuid() != 0:
        # Rootless podman: the containers' group is a subordinate gid of this user.
        run(["podman", "unshare", "chgrp", "-R", str(CONTAINER_GID), str(cell.generated)])
        run(["podman", "unshare", "chmod", "-R", "g+rX", str(cell.generated)])
    return True


@dataclass(frozen=True)
class Container:
    name: str
    service: str
    state: str


def containers(cell: ComposeCell, service: str | None = None) -> list[Container]:
    result = run(
        ["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={cell.project}", "--format", "json"],
        capture=True,
    )
    found = []
    for entry in json.loads(result.stdout or "[]"):
        labels = entry.get("Labels") or {}
        name = entry["Names"][0] if isinstance(entry.get("Names"), list) else entry.get("Names")
        svc = labels.get("com.docker.compose.service", "")
        if service is None or svc == service:
            found.append(Container(name, svc, entry.get("State", "")))
    return sorted(found, key=lambda c: c.name)


def healthy(container: str) -> bool:
    return run(["podman", "healthcheck", "run", container], check=False, quiet=True).returncode == 0


def wait_healthy(
    cell: ComposeCell, timeout_s: float = 240, services: set[str] | None = None, report_every_s: float = 10
) -> float:
    """Waits until every (selected) container runs and its healthcheck passes; returns the seconds waited.
    Every `report_every_s` it says on stderr which containers it still waits for (a cell is usually
    healthy within 10 s, but podman's DNS server here sometimes answers nothing for a minute)."""
    started = time.monotonic()
    next_report = started + report_every_s
    pending: list[str] = []
    while time.monotonic() - started < timeout_s:
        current = [c for c in containers(cell) if services is None or c.service in services]
        pending = [c.name for c in current if c.state != "running" or not healthy(c.name)]
        if current and not pending:
            return time.monotonic() - started
        now = time.monotonic()
        if now >= next_report:
            waiting = ", ".join(pending) or "the containers to exist"
            print(f"waited {now - started:.0f}s for health: {waiting}", file=sys.stderr, flush=True)
            next_report = now + report_every_s
        time.sleep(1)
    raise TimeoutError(f"not healthy after {timeout_s:.0f}s: {', '.join(pending) or 'no container'}")


def published(container: str, port: int) -> str:
    """`127.0.0.1:PORT` published for the container's `port`."""
    result = run(["podman", "port", container, f"{port}/tcp"], capture=True)
    return result.stdout.strip().splitlines()[0].replace("0.0.0.0", "127.0.0.1")


def token(cell: ComposeCell, node: int = 1) -> str:
    result = run(
        [sys.executable, "-m", "exocli", "-d", str(cell.node_dir(node)), "cell", "generate-auth-token", "-q"],
        capture=True,
    )
    return result.stdout.strip()


def info(cell: ComposeCell) -> str:
    lines = [f"Exocore {cell.variant} cell up (project {cell.project}, configs in {os.path.relpath(cell.generated)})"]
    gateways = []
    for container in containers(cell):
        if container.service.endswith("-gateway") and container.state == "running":
            address = published(container.name, GATEWAY_PORT)
            gateways.append(address)
            lines.append(f"  {container.service:<15} gRPC {address}   HTTP {published(container.name, HTTP_PORT)}")
    for container in containers(cell, "discovery"):
        if container.state == "running":
            lines.append(f"  {'discovery':<15} REST http://{published(container.name, 8085)}")
    if gateways:
        auth = token(cell)
        exo = os.path.relpath(Path(sys.executable).parent / "exo", Path.cwd())
        lines += [
            f"Token (30 days, signed by node1): {auth}",
            "Try:",
            f"  export EXO_ENDPOINT={gateways[0]} EXO_TOKEN={auth}",
            f'  {exo} store mutate --json \'{{"mutations": [{{"entityId": "e1", "putTrait": {{"trait": {{"id": "t1", '
            '"message": {"@type": "type.googleapis.com/exocore.test.TestMessage", "string1": "hello"}}}}], '
            '"waitIndexed": true}\'',
            f"  {exo} store query --match hello",
            f"make compose-down{'' if cell.nodes == 3 else f' NODES={cell.nodes}'} removes the cell "
            "(containers, network, data volumes).",
        ]
    return "\n".join(lines)


def up(cell: ComposeCell, timeout_s: float = 240) -> float:
    """Generates the configs if missing, starts the cell, waits until healthy; returns the seconds it took."""
    if generate(cell):
        print(f"generated the cell's configs in {cell.generated}", flush=True)
    started = time.monotonic()
    compose(cell, "up", "-d")
    wait_healthy(cell, timeout_s)
    return time.monotonic() - started


def down(cell: ComposeCell, keep_data: bool = False) -> None:
    """`podman-compose down`, then whatever it leaves: containers added by `--scale` (it only knows the
    replicas of its own invocation) and what depends on them, the volumes and the network."""
    label = f"label=io.podman.compose.project={cell.project}"
    if cell.compose_file.is_file():
        try:
            compose(cell, "--profile", "replicas", "down", *([] if keep_data else ["-v"]), "-t", "20")
        except RuntimeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
    leftovers = [c.name for c in containers(cell)]
    if leftovers:
        run(["podman", "rm", "-f", "--depend", "-t", "20", *leftovers], quiet=True)
    if not keep_data:
        volumes = run(["podman", "volume", "ls", "-q", "--filter", label], capture=True).stdout.split()
        if volumes:
            run(["podman", "volume", "rm", "-f", *volumes], quiet=True)
    networks = run(["podman", "network", "ls", "-q", "--filter", label], capture=True).stdout.split()
    if networks:
        run(["podman", "network", "rm", "-f", *networks], check=False, quiet=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "wait", "info"])
    parser.add_argument("--nodes", type=int, choices=[1, 3], default=3)
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for health (default 240)")
    parser.add_argument("--keep-data", action="store_true", help="down: keep the named volumes")
    args = parser.parse_args(argv)
    cell = ComposeCell(args.nodes)
    try:
        if args.command == "up":
            elapsed = up(cell, args.timeout)
            print(f"all {len(containers(cell))} containers healthy after {elapsed:.1f}s")
            print(info(cell))
        elif args.command == "wait":
            print(f"healthy after {wait_healthy(cell, args.timeout):.1f}s")
        elif args.command == "info":
            print(info(cell))
        else:
            down(cell, args.keep_data)
            print(
                f"removed the {cell.variant} cell (project {cell.project})"
                + (" (volumes kept)" if args.keep_data else "")
            )
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
