"""`make bench-gateway`: what the gateway costs, on one node over loopback (a benchmark, not a test).

Starts a one-node cell in a temporary folder (`exo node init`, `exo cell init`, then `python -m
exochain`, `exostore` and `exogateway` as separate processes, as `exo daemon` runs them), loads a few
hundred entities, then measures, for 1 and 32 concurrent clients, single-mutation `Mutate` calls and
`Query` calls, directly against the store and through the gateway (with an auth token), side by side:
calls/s, p50 and p99 latency.

The load generator is one asyncio process sending pre-encoded requests (no protobuf work per call), so
it costs both paths the same. Everything shares the machine's cores: on a 2-core machine the client,
gateway, store and chain compete for CPU, and the figures say as much about that as about the gateway.
Each measurement runs in two halves per path, in the order direct, gateway, gateway, direct, so that
both paths see the same background work (index merges after writes, other jobs on the machine): run
one after the other, the second would pay for the first's writes. The table also gives the CPU time
each process spent per call (load generator, gateway, store,
chain; warm-up included): calls/s move with whatever else runs on the machine, CPU per call much less,
and their sum bounds what the cores can serve.

    .venv/bin/python bench/gateway_bench.py [--duration-s 5] [--clients 1,32] [--calls Query,Mutate] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from benchlib import cpu_seconds
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exocommon.client import MutationBuilder, QueryBuilder, node_endpoint_and_token
from exocommon.config import NodeDirectory
from exocore.test import test_pb2

STORE_SERVICE = "exocore.store.v1.EntityStore"
MUTATE = f"/{STORE_SERVICE}/Mutate"
QUERY = f"/{STORE_SERVICE}/Query"
PRELOADED_ENTITIES = 300
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
QUERY_DESCRIPTION = 'match "alpha" (30 of 300 entities match), first page of 10'


@dataclass
class Figures:
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    # Calls made, warm-up included.
    total_calls: int = 0
    # CPU time per call of each process during the run (warm-up included): client, gateway, store, chain.
    cpu_us: dict[str, float] = field(default_factory=dict)
    # Latencies measured after the warm-up, sorted (seconds).
    latencies_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def exo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "exocli", *args], check=True, capture_output=True, timeout=60)


async def wait_serving(address: str, service: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{address} did not serve {service or 'health'} within {timeout:g} s")


async def measured_load(
    pids: dict[str, int],
    address: str,
    method: str,
    requests: list[bytes],
    metadata: tuple,
    clients: int,
    duration_s: float,
) -> Figures:
    """`run_load` with the CPU time per call of this process ("client") and of each of `pids`."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    figures = await run_load(address, method, requests, metadata, clients, duration_s)
    calls = max(1, figures.total_calls + figures.errors)
    figures.cpu_us["client"] = (time.process_time() - client_before) / calls * 1e6
    for name, pid in pids.items():
        figures.cpu_us[name] = (cpu_seconds(pid) - before[name]) / calls * 1e6
    return figures


def combine(parts: Sequence[Figures]) -> Figures:
    """One `Figures` for runs of the same load (their latencies together, CPU per call weighted by calls)."""
    latencies = sorted(x for part in parts for x in part.latencies_s)
    weights = [max(1, part.total_calls + part.errors) for part in parts]
    cpu_us = {
        name: sum(part.cpu_us[name] * weight for part, weight in zip(parts, weights, strict=True)) / sum(weights)
        for name in parts[0].cpu_us
    }
    return Figures(
        len(latencies),
        sum(part.seconds for part in parts),
        percentile(latencies, 0.5) * 1000,
        percentile(latencies, 0.99) * 1000,
        sum(part.errors for part in parts),
        total_calls=sum(part.total_calls for part in parts),
        cpu_us=cpu_us,
        latencies_s=latencies,
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def run_load(
    address: str, method: str, requests: list[bytes], metadata: tuple, clients: int, duration_s: float
) -> Figures:
    """`clients` concurrent loops of calls over one channel for `duration_s` (after a short warm-up)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out
        latencies: list[float] = []
        errors = 0
        counter = 0
        completed = 0
        warmup_end = time.perf_counter() + min(1.0, duration_s / 5)
        end = warmup_end + duration_s

        async def client() -> None:
            nonlocal errors, counter, completed
            while True:
                request = requests[counter % len(requests)]
                counter += 1
                start = time.perf_counter()
                if start >= end:
                    return
                try:
                    await call(request, metadata=metadata, timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                done = time.perf_counter()
                completed += 1
                if start >= warmup_end:
                    latencies.append(done - start)

        await asyncio.gather(*(client() for _ in range(clients)))
    latencies.sort()
    return Figures(
        len(latencies),
        duration_s,
        percentile(latencies, 0.5) * 1000,
        percentile(latencies, 0.99) * 1000,
        errors,
        total_calls=completed,
        latencies_s=latencies,
    )


def start(name: str, argv: list[str], log_dir: Path) -> subprocess.Popen[bytes]:
    log = open(log_dir / f"{name}.log", "wb")  # closed when the process exits
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def bench(args: argparse.Namespace, root: Path) -> int:
    node_dir = root / "node"
    exo("-d", str(node_dir), "node", "init", "--name", "bench")
    exo("-d", str(node_dir), "cell", "init", "--name", "bench")
    directory = NodeDirectory(node_dir)
    config = directory.load_node_config()
    cell_id = config.cells[0].id
    store_address, gateway_address = config.addresses.store, config.addresses.gateway
    common = ["--dir", str(node_dir), "--cell", cell_id, "--log", "warn"]
    processes = [
        start("chain", [sys.executable, "-m", "exochain", *common], root),
        start("store", [sys.executable, "-m", "exostore", *common], root),
        start("gateway", [sys.executable, "-m", "exogateway", *common, "--calls-per-token-max", "1024"], root),
    ]
    try:
        await wait_serving(store_address, STORE_SERVICE)
        await wait_serving(gateway_address, STORE_SERVICE)
        _, token = node_endpoint_and_token(node_dir)
        auth = (("authorization", f"Bearer {token}"),)

        preload = MutationBuilder()
        for index in range(PRELOADED_ENTITIES):
            text = f"{WORDS[index % len(WORDS)]} entity number {index}"
            preload.put_trait("", test_pb2.TestMessage(string1=text))
        await run_load(store_address, MUTATE, [preload.wait_indexed().build().SerializeToString()], (), 1, 0.0)
        query = QueryBuilder.match("alpha").count(10).build().SerializeToString()
        mutations = [
            MutationBuilder()
            .put_trait("", test_pb2.TestMessage(string1=f"bench write {i}"))
            .build()
            .SerializeToString()
            for i in range(1000)
        ]

        pids = {"gateway": processes[2].pid, "store": processes[1].pid, "chain": processes[0].pid}
        rows: list[tuple[str, int, Figures, Figures]] = []
        loads = (("Query", QUERY, [query]), ("Mutate", MUTATE, mutations))
        for label, method, requests in (load for load in loads if load[0] in args.calls):
            for clients in args.clients:
                halves: dict[str, list[Figures]] = {"direct": [], "gateway": []}
                for path in ("direct", "gateway", "gateway", "direct"):  # see the module docstring
                    address, metadata = (store_address, ()) if path == "direct" else (gateway_address, auth)
                    halves[path].append(
                        await measured_load(pids, address, method, requests, metadata, clients, args.duration_s / 2)
                    )
                direct, through = combine(halves["direct"]), combine(halves["gateway"])
                rows.append((label, clients, direct, through))
                print(
                    f"  {label:6} {clients:2} client(s): store {direct.rate:7.0f}/s p50 {direct.p50_ms:6.2f} ms, "
                    f"gateway {through.rate:7.0f}/s p50 {through.p50_ms:6.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        report(rows, args)
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


def report(rows: list[tuple[str, int, Figures, Figures]], args: argparse.Namespace) -> None:
    print()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"Gateway benchmark: one node on loopback, {os.cpu_count()} CPU(s), load average {load}, "
        f"{args.duration_s:g} s per measurement"
    )
    print(f"Query: {QUERY_DESCRIPTION}; Mutate: one put-trait mutation per call (new entity, no wait_indexed)")
    print()
    header = (
        f"{'call':6} {'clients':>7} | {'store calls/s':>13} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'gateway calls/s':>15} {'p50 ms':>7} {'p99 ms':>7} | {'added p50 ms':>12} | {'gateway CPU/call':>16}"
    )
    print(header)
    print("-" * len(header))
    for label, clients, direct, through in rows:
        errors = f"  ({direct.errors + through.errors} errors)" if direct.errors or through.errors else ""
        print(
            f"{label:6} {clients:7} | {direct.rate:13.0f} {direct.p50_ms:7.2f} {direct.p99_ms:7.2f} | "
            f"{through.rate:15.0f} {through.p50_ms:7.2f} {through.p99_ms:7.2f} | "
            f"{through.p50_ms - direct.p50_ms:+12.2f} | {through.cpu_us['gateway']:13.0f} us{errors}"
        )
    print()
    print("CPU time per call (us) of each process, direct to the store -> through the gateway:")
    names = ("client", "gateway", "store", "chain")
    header = f"{'call':6} {'clients':>7} | " + " | ".join(f"{name:>15}" for name in names) + f" | {'sum':>15}"
    print(header)
    print("-" * len(header))
    for label, clients, direct, through in rows:
        cells = [f"{direct.cpu_us[name]:6.0f} -> {through.cpu_us[name]:5.0f}" for name in names]
        total = f"{sum(direct.cpu_us.values()):6.0f} -> {sum(through.cpu_us.values()):5.0f}"
        print(f"{label:6} {clients:7} | " + " | ".join(cells) + f" | {total}")
    print()
    single = [through.p50_ms - direct.p50_ms for _, clients, direct, through in rows if clients == 1]
    by_key = {(label, clients): through for label, clients, _, through in rows}
    mutate32, query32 = by_key.get(("Mutate", 32)), by_key.get(("Query", 32))
    print("Targets:")
    if single:
        added = max(single)
        print(f"  gateway adds <= 1 ms p50 (1 client):   {added:+.2f} ms  {'met' if added <= 1.0 else 'NOT met'}")
    if mutate32 is not None:
        verdict = "met" if mutate32.rate >= 1500 else "NOT met"
        print(f"  >= 1,500 Mutate/s through the gateway: {mutate32.rate:,.0f}/s  {verdict}")
    if query32 is not None:
        verdict = "met" if query32.rate >= 3000 else "NOT met"
        print(f"  >= 3,000 Query/s through the gateway:  {query32.rate:,.0f}/s  {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway_bench.py", description="Gateway overhead and throughput.")
    parser.add_argument("--duration-s", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument(
        "--clients", type=lambda text: [int(x) for x in text.split(",")], default=[1, 32], help="e.g. 1,32"
    )
    parser.add_argument(
        "--calls", type=lambda text: text.split(","), default=["Query", "Mutate"], help="e.g. Mutate (default both)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary node folder and logs")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    try:
        return asyncio.run(bench(args, root))
    finally:
        if args.keep:
            print(f"node folder and logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
