"""Chain benchmark (`make bench-chain`): a 3-node cell on loopback, each node a real `python -m exochain`
process (the integration tests' `cluster.py`), driven by one asyncio gRPC client process.

Prints, per chain configuration (the original's defaults, then a tuned one):

* committed entries/s with 1 and with 16 concurrent appenders, each sending batches of
  `--batch` entries of `--entry-bytes` bytes as fast as its appends return (closed loop);
* append latency (the call returns once the entries are durable on the node) and
  append-to-committed latency (from the call until the block holding the entry reaches the node's
  `ChainLog.Subscribe` stream), p50/p99, for those runs and for two light loads of one appender
  and one entry per call: the "probe" (`--probe-rate` calls/s) and "in sequence" (each call as soon
  as the previous one returned, as etcd's one-client figure is measured); each runs twice: first
  before any subscriber exists (the append path alone), then with the subscribers (as with stores
  attached). Next to them, the floor: a trivial call's round trip (`Status`), paced and back to back;
  paced calls come at `--probe-rate` on average, each pause drawn within +-50% of the mean
  (a fixed period locks the calls to one phase of the nodes' ticks for a whole run);
* the time an empty node (chain wiped back to its genesis) takes to catch up the cell's chain (the
  entries of the runs before, topped up to `--catchup-ops` if fewer), and the operations/s;
* CPU seconds used by each node and by this client per run (2 cores are shared by all of them).

Appenders are spread round-robin over the three nodes; every node has one subscriber (as a store
would: blocks and pending operations, the latter in batches), which also gives the commit times.
The subscribers run in a process of their own (as stores do), so that the appenders' latencies are
not those of a client busy reading three streams; both use the system-wide monotonic clock.
Committed entries/s counts the entries of the blocks seen on node 1 between `--warmup` seconds
after the start and the end of the run. Appends are subject to the service's flow control (an
append waits while replication or commits lag behind), so a closed loop of appenders settles at
what the cell commits. It never asserts anything about timings: it measures and prints.

    .venv/bin/python bench/bench_chain.py [--configs default,tuned] [--duration 10] [--quick]
"""

# ruff: noqa: E402 (grpc's I/O mode is chosen before grpc is imported)
from __future__ import annotations

from exocommon.grpc_io import prefer_poller_io

# The appenders and subscribers stand for stores, which run so (see exocommon.grpc_io); the nodes
# would choose it themselves.
prefer_poller_io()

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from benchlib import cpu_seconds
from cluster import Cluster

from exocore.chain.v1 import chain_pb2, chain_pb2_grpc

# node.yaml `chain:` settings of each configuration ({}: every default, i.e. the original's
# 3 s commit interval, 7 s proposal timeout, 10 waiting entries to propose, 100 ms ticks, 5 s syncs).
# Tuned: a block is proposed as soon as one entry waits (not 10, or the 3 s interval), for a low
# append-to-committed latency at a low rate; under load blocks are as big as they were anyway. The
# commit interval stays at 3 s: it is also the length of a proposer's turn, and shorter turns make
# two nodes propose for the same block more often. Blocks follow each other 20 ms apart at least
# (commit_min_interval_ms): without it one writer appending in sequence got a block for every entry
# or two, and each block's messages (proposal, votes, commit: about eight envelopes, each verified,
# stored and synced) kept the two cores busy, so appends waited behind them (~2.9 ms in sequence
# against ~1.6 ms by default); with it, ~10 entries a block, as by default.
CONFIGS: dict[str, dict[str, int]] = {
    "default": {},
    "tuned": {
        "commit_max_pending_operations": 1,
        "tick_interval_ms": 20,
        "commit_min_interval_ms": 20,
    },
}

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class RunResult:
    name: str
    appended: int = 0
    committed_in_window: int = 0
    window_s: float = 0.0
    append_ms: list[float] = field(default_factory=list)
    commit_ms: list[float] = field(default_factory=list)
    uncommitted: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    blocks: int = 0
    discontinuities: int = 0
    run_s: float = 0.0
    # False: no subscriber watched the commits (append latency and CPU only).
    observed: bool = True

    def print(self) -> None:
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in self.cpu_s.items())
        if not self.observed:
            print(f"  {self.name}: {self.appended:,} appended")
            print(
                f"    append latency p50 {percentile(self.append_ms, 50):.2f} ms, "
                f"p99 {percentile(self.append_ms, 99):.2f} ms ({len(self.append_ms)} calls)"
            )
            print(f"    CPU seconds over the {self.run_s:.1f} s run: {cpu}")
            return
        rate = self.committed_in_window / self.window_s if self.window_s else 0.0
        entries_per_block = self.committed_in_window / self.blocks if self.blocks else 0.0
        print(
            f"  {self.name}: {rate:,.0f} committed entries/s "
            f"({self.appended:,} appended, {self.blocks} blocks in window, ~{entries_per_block:,.0f} entries/block)"
        )
        print(
            f"    append latency p50 {percentile(self.append_ms, 50):.2f} ms, "
            f"p99 {percentile(self.append_ms, 99):.2f} ms ({len(self.append_ms)} calls)"
        )
        print(
            f"    append-to-committed p50 {percentile(self.commit_ms, 50):.1f} ms, "
            f"p99 {percentile(self.commit_ms, 99):.1f} ms ({len(self.commit_ms)} entries"
            + (f", {self.uncommitted} not committed within the drain time" if self.uncommitted else "")
            + ")"
        )
        if self.discontinuities:
            print(f"    subscriber streams discontinued {self.discontinuities} time(s) (queue overflow; resubscribed)")
        print(f"    CPU seconds over the {self.run_s:.1f} s run: {cpu}")


@dataclass
class WatchReport:
    """What the subscriber process saw since the previous report."""

    # (monotonic time, entries) of each block seen on node 1.
    blocks: list[tuple[float, int]]
    # Per node: operation id -> monotonic time its block reached that node's subscriber.
    committed: list[dict[int, float]]
    discontinuities: int


async def _watch_node(stub: chain_pb2_grpc.ChainLogStub, index: int, report: WatchReport) -> None:
    """Records the blocks of one node's `Subscribe` stream; resubscribes after a discontinuity (its
    queue overflowed: the blocks missed meanwhile come in the replay, late)."""
    from_offset = (await stub.Status(chain_pb2.StatusRequest(), timeout=10)).last_offset
    from_pending = 2**64 - 1  # no replay of what is pending now: live events only
    while True:
        request = chain_pb2.SubscribeRequest(
            has_from_block_offset=True,
            from_block_offset=from_offset,
            from_pending_operation_id=from_pending,
            pending_batches=True,
        )
        try:
            async for event in stub.Subscribe(request):
                kind = event.WhichOneof("event")
                if kind == "discontinuity":
                    report.discontinuities += 1
                    break
                if kind != "block":
                    continue
                now = time.monotonic()
                header = chain_pb2.BlockHeader.FromString(event.block.header_bytes)
                from_offset = header.offset
                if index == 0:
                    report.blocks.append((now, len(header.operations_header)))
                committed = report.committed[index]
                for op in header.operations_header:
                    committed[op.operation_id] = now
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)


def watch_main(addresses: list[str], conn: multiprocessing.connection.Connection) -> None:
    """The subscriber process: one subscription per node; answers "report" (and forgets what it
    reported), "cancel <index>" and "stop" on `conn`."""

    async def run() -> None:
        channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for address in addresses]
        report = WatchReport([], [{} for _ in addresses], 0)
        tasks = [
            asyncio.create_task(_watch_node(chain_pb2_grpc.ChainLogStub(c), i, report)) for i, c in enumerate(channels)
        ]
        stopped = asyncio.Event()

        def on_command() -> None:
            command = conn.recv()
            if command == "report":
                # Plain values: this module is `__mp_main__` here, its classes unknown to the parent.
                conn.send((report.blocks, report.committed, report.discontinuities))
                report.blocks, report.committed, report.discontinuities = [], [{} for _ in addresses], 0
            elif command.startswith("cancel "):
                tasks[int(command.split()[1])].cancel()
                conn.send(None)
            else:
                stopped.set()

        asyncio.get_running_loop().add_reader(conn.fileno(), on_command)
        await stopped.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()

    asyncio.run(run())


class Bench:
    def __init__(self, cluster: Cluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.channels = [grpc.aio.insecure_channel(n.address, options=CHANNEL_OPTIONS) for n in cluster.nodes]
        self.stubs = [chain_pb2_grpc.ChainLogStub(c) for c in self.channels]
        # Per node: op id -> monotonic time of the call that appended it (until seen committed there).
        self.outstanding: list[dict[int, float]] = [{} for _ in cluster.nodes]
        # Per node: op id -> monotonic time it was seen committed there, not yet matched to a call.
        self.committed: list[dict[int, float]] = [{} for _ in cluster.nodes]
        self.commit_ms: list[float] = []
        # (monotonic time, entries) of each block seen on node 1.
        self.blocks_seen: list[tuple[float, int]] = []
        self.watcher: multiprocessing.process.BaseProcess | None = None
        self.watcher_conn: multiprocessing.connection.Connection | None = None
        self.payload = os.urandom(args.entry_bytes)
        self.discontinuities = 0
        # Entries of the blocks seen on node 1 since its subscription started.
        self.entries_seen = 0
        self._gaps = random.Random(args.seed)

    def probe_gap(self, mean_s: float) -> float:
        """The pause before a paced call: uniform within +-50% of the mean. At a fixed period the
        calls kept one phase against the nodes' ticks (20 or 100 ms) for a whole run, and a call's
        latency depends on that phase (measured on one cell: p50 from 0.9 to 2.0 ms per phase),
        so a run's p50 was that of one phase drawn at random; jittered, a run samples them all."""
        return mean_s * self._gaps.uniform(0.5, 1.5)

    async def close(self) -> None:
        if self.watcher is not None and self.watcher_conn is not None:
            self.watcher_conn.send("stop")
            await asyncio.to_thread(self.watcher.join, 10)
            if self.watcher.is_alive():
                self.watcher.kill()
        for channel in self.channels:
            await channel.close()

    async def status(self, index: int) -> chain_pb2.ChainStatus:
        return await self.stubs[index].Status(chain_pb2.StatusRequest(), timeout=10)

    async def print_floor(self, calls: int = 300) -> None:
        """What any call to a node costs on this machine: `Status` round trips to node 1 (no disk, no
        peers), paced like the probe and back to back. On this VM an idle process's wake-up is slow
        (its vCPUs halt without polling), so a paced call pays it and a call in sequence mostly not."""
        paced: list[float] = []
        sequence: list[float] = []
        for latencies, pause in ((paced, 1 / self.args.probe_rate), (sequence, 0.0)):
            for _ in range(calls if pause == 0 else max(20, int(self.args.duration * self.args.probe_rate))):
                if pause:
                    await asyncio.sleep(self.probe_gap(pause))
                started = time.monotonic()
                await self.status(0)
                latencies.append((time.monotonic() - started) * 1000)
        print(
            f"  floor: ChainLog.Status round trip to node 1, p50 {percentile(paced, 50):.2f} ms paced at "
            f"{self.args.probe_rate:g} calls/s, {percentile(sequence, 50):.2f} ms back to back"
        )

    async def wait_synchronized(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            statuses = []
            for index, node in enumerate(self.cluster.nodes):
                if node.running:
                    try:
                        statuses.append(await self.status(index))
                    except grpc.aio.AioRpcError:
                        statuses.append(None)
            if all(s is not None and s.sync_status == "synchronized" for s in statuses):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cell not synchronized after {timeout} s: {statuses}")
            await asyncio.sleep(0.1)

    def subscribe_all(self) -> None:
        """Starts the subscriber process (one subscription per node)."""
        parent, child = multiprocessing.get_context("spawn").Pipe()
        self.watcher = multiprocessing.get_context("spawn").Process(
            target=watch_main, args=([n.address for n in self.cluster.nodes], child), daemon=True
        )
        self.watcher.start()
        self.watcher_conn = parent

    async def _ask(self, command: str) -> object:
        conn = self.watcher_conn
        if conn is None:
            return ([], [{} for _ in self.cluster.nodes], 0)  # no subscriber process (yet)
        conn.send(command)
        return await asyncio.to_thread(conn.recv)

    async def collect(self) -> None:
        """Takes what the subscriber process saw; matches commits with the appends waiting for them."""
        report = WatchReport(*await self._ask("report"))  # type: ignore[misc]
        self.blocks_seen.extend(report.blocks)
        self.entries_seen += sum(n for _, n in report.blocks)
        self.discontinuities += report.discontinuities
        for outstanding, committed, fresh in zip(self.outstanding, self.committed, report.committed, strict=True):
            committed.update(fresh)
            for operation_id in [op for op in outstanding if op in committed]:
                self.commit_ms.append((committed.pop(operation_id) - outstanding.pop(operation_id)) * 1000)

    async def _append(self, node: int, entries: list[bytes], result: RunResult) -> None:
        started = time.monotonic()
        response = await self.stubs[node].Append(chain_pb2.AppendRequest(entries=entries), timeout=30)
        result.append_ms.append((time.monotonic() - started) * 1000)
        if result.observed:
            outstanding = self.outstanding[node]
            for operation_id in response.operation_ids:
                outstanding[operation_id] = started
        result.appended += len(entries)

    def _entries(self, count: int, sequence: int) -> list[bytes]:
        prefix = sequence.to_bytes(8, "big")
        return [prefix + i.to_bytes(4, "big") + self.payload[12:] for i in range(count)]

    async def run(self, name: str, appenders: int, batch: int, duration: float, rate: float | None = None) -> RunResult:
        """`appenders` closed-loop appenders (or one paced at `rate` calls/s) for `duration` seconds;
        commits are observed once the subscriber process runs."""
        result = RunResult(name, observed=self.watcher is not None)
        await self.collect()
        self.commit_ms = []
        self.blocks_seen = []
        for outstanding, committed in zip(self.outstanding, self.committed, strict=True):
            outstanding.clear()
            committed.clear()
        pids = {f"node{i + 1}": n.process.pid for i, n in enumerate(self.cluster.nodes) if n.process is not None}
        pids["client"] = os.getpid()
        if self.watcher is not None and self.watcher.pid is not None:
            pids["subscribers"] = self.watcher.pid
        cpu_before = {k: cpu_seconds(p, missing=0.0) for k, p in pids.items()}
        discontinuities = self.discontinuities
        start = time.monotonic()
        stop_at = start + duration

        async def appender(number: int) -> None:
            node = number % len(self.cluster.nodes)
            sequence = number << 32
            next_call = time.monotonic()
            while time.monotonic() < stop_at:
                sequence += 1
                await self._append(node, self._entries(batch, sequence), result)
                if rate:
                    next_call += self.probe_gap(1 / rate)
                    await asyncio.sleep(max(0.0, next_call - time.monotonic()))

        await asyncio.gather(*(appender(i) for i in range(appenders)))
        end = time.monotonic()
        cpu_after = {k: cpu_seconds(p, missing=0.0) for k, p in pids.items()}
        # Drain: give what was appended time to be committed (for the latency figures).
        drain_deadline = time.monotonic() + self.args.drain
        await self.collect()
        while any(self.outstanding) and time.monotonic() < drain_deadline:
            await asyncio.sleep(0.05)
            await self.collect()
        window_start = start + min(self.args.warmup, duration / 2)
        in_window = [(t, n) for t, n in self.blocks_seen if window_start <= t <= end]
        result.committed_in_window = sum(n for _, n in in_window)
        result.blocks = len(in_window)
        result.window_s = end - window_start
        result.run_s = end - start
        result.commit_ms = list(self.commit_ms)
        result.uncommitted = sum(len(o) for o in self.outstanding)
        result.cpu_s = {k: cpu_after[k] - cpu_before[k] for k in pids}
        result.discontinuities = self.discontinuities - discontinuities
        return result

    async def committed_operations(self, index: int) -> tuple[int, int]:
        """(entries, blocks) in the chain of node `index`, read through GetBlocks."""
        entries = blocks = 0
        from_offset = 0
        while True:
            response = await self.stubs[index].GetBlocks(
                chain_pb2.GetBlocksRequest(from_offset=from_offset, max_count=1000), timeout=60
            )
            if not response.blocks:
                return entries, blocks
            for block in response.blocks:
                header = chain_pb2.BlockHeader.FromString(block.header_bytes)
                entries += len(header.operations_header)
                blocks += 1
                from_offset = header.offset + len(block.header_bytes) + header.operations_size

    async def fill_chain(self, operations: int, timeout: float = 1800) -> None:
        """Appends (16 appenders) until node 1's chain holds at least `operations` entries."""
        base, _ = await self.committed_operations(0)
        await self.collect()
        seen_at_base = self.entries_seen
        missing = operations - base
        if missing > 0:
            per_appender = missing // (16 * self.args.batch) + 1
            sequence = 0

            async def appender(number: int) -> None:
                nonlocal sequence
                for _ in range(per_appender):
                    sequence += 1
                    entries = self._entries(self.args.batch, (1 << 40) + sequence)
                    await self.stubs[number % 3].Append(chain_pb2.AppendRequest(entries=entries), timeout=60)

            await asyncio.gather(*(appender(i) for i in range(16)))
        deadline = time.monotonic() + timeout
        while base + self.entries_seen - seen_at_base < operations:
            if time.monotonic() > deadline:
                raise AssertionError(f"the chain did not reach {operations} entries in {timeout} s")
            await asyncio.sleep(0.2)
            await self.collect()

    async def wait_same_height(self, timeout: float) -> chain_pb2.ChainStatus:
        deadline = time.monotonic() + timeout
        while True:
            statuses = [await self.status(i) for i in range(3)]
            if len({(s.last_offset, s.height) for s in statuses}) == 1:
                return statuses[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"nodes did not converge: {[(s.height, s.last_offset) for s in statuses]}")
            await asyncio.sleep(0.2)

    async def catch_up(self, operations: int) -> None:
        await self.fill_chain(operations)
        target = await self.wait_same_height(600)
        entries, blocks = await self.committed_operations(0)
        node = self.cluster.nodes[2]
        # Its subscription ends with the process.
        await self._ask("cancel 2")
        node.terminate()
        node.wipe_chain(self.cluster.cell_keypair)
        spawned = time.monotonic()
        node.start(wait=False)
        await asyncio.to_thread(node.wait_serving, 60)
        serving = time.monotonic()
        while True:
            try:
                status = await self.status(2)
                if status.last_offset >= target.last_offset:
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() - spawned > 1800:
                raise AssertionError("the wiped node did not catch up in 30 minutes")
            await asyncio.sleep(0.02)
        done = time.monotonic()
        took = done - serving
        print(
            f"  catch-up of an empty node: {entries:,} operations in {blocks:,} blocks "
            f"({target.last_offset / 1e6:.1f} MB of chain): {took:.2f} s after it served "
            f"({done - spawned:.2f} s after its process started) = {entries / took:,.0f} operations/s, "
            f"i.e. 100,000 operations in {100_000 / (entries / took):.2f} s"
        )


async def bench_config(name: str, settings: dict[str, int], args: argparse.Namespace) -> None:
    shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "all defaults"
    print(f"\n== configuration '{name}': node.yaml chain settings: {shown}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        cluster = Cluster.create(Path(tmp), size=3, chain_settings=settings)
        bench: Bench | None = None
        try:
            cluster.start()
            bench = Bench(cluster, args)
            await bench.wait_synchronized()
            await bench.run("warm-up", 1, 1, 0.2)
            if args.runs & {"probe", "seq"}:
                await bench.print_floor()
            # The append path alone: no subscriber streams competing for the 2 cores.
            if "probe" in args.runs:
                title = "probe without subscribers: 1 appender, 1 entry/call"
                (await bench.run(title, 1, 1, args.duration, args.probe_rate)).print()
            if "seq" in args.runs:
                title = "in sequence without subscribers: 1 appender, 1 entry/call, back to back"
                (await bench.run(title, 1, 1, args.duration)).print()
            bench.subscribe_all()
            await asyncio.sleep(0.5)
            # Warm up: one commit through the whole path.
            await bench.run("warm-up", 1, 1, 0.2)
            runs = {
                "probe": ("probe with a subscriber per node: 1 appender, 1 entry/call", 1, 1, args.probe_rate),
                "seq": ("in sequence with a subscriber per node: 1 appender, 1 entry/call, back to back", 1, 1, None),
                "1": (f"1 appender, {args.batch} entries/call", 1, args.batch, None),
                "16": (f"16 appenders, {args.batch} entries/call", 16, args.batch, None),
            }
            for key, (title, appenders, batch, rate) in runs.items():
                if key not in args.runs:
                    continue
                result = await bench.run(title, appenders, batch, args.duration, rate)
                result.print()
                sys.stdout.flush()
            if args.catchup_ops and "catchup" in args.runs:
                await bench.catch_up(args.catchup_ops)
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            if bench is not None:
                await bench.close()
            cluster.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="default,tuned", help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of each run not counted in entries/s")
    parser.add_argument("--drain", type=float, default=15.0, help="seconds to wait for the last commits of a run")
    parser.add_argument("--batch", type=int, default=100, help="entries per append call")
    parser.add_argument("--entry-bytes", type=int, default=200)
    parser.add_argument("--probe-rate", type=float, default=20.0, help="calls/s of the latency probe")
    parser.add_argument("--seed", type=int, default=1, help="of the probe's jittered pauses")
    parser.add_argument("--catchup-ops", type=int, default=100_000, help="0: skip the catch-up measure")
    parser.add_argument("--runs", default="probe,seq,1,16,catchup", help="which measures, of probe,seq,1,16,catchup")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 20,000-operation catch-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.catchup_ops = 3.0, 1.0, min(args.catchup_ops, 20_000)
    args.runs = {r.strip() for r in args.runs.split(",")}
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {sorted(CONFIGS)}")
    print(
        f"chain benchmark: 3 chain nodes on loopback (real processes), {os.cpu_count()} CPUs; "
        f"entries of {args.entry_bytes} bytes; runs of {args.duration:g} s (first {args.warmup:g} s not counted)"
    )
    for name in names:
        asyncio.run(bench_config(name, CONFIGS[name], args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
