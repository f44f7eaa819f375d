"""A deterministic simulator of N chain nodes (in the spirit of FoundationDB's simulation and
TigerBeetle's VOPR): the real engine code, in-memory storage that survives simulated crashes, a
fake clock per node (with skew), and an in-memory network that loses, duplicates, delays
(reorders) and partitions messages. One seed fixes every choice, so a failing run replays exactly:

    python -m exochain.simulation --seed 1234 -v

A run has a fault phase (random appends, faults, crashes) and then a liveness phase (network
healed, every node up, no loss) that must reach convergence within a time budget. The checker
then asserts the invariants:

* every node holds the same chain, and that chain validates (hash chain, operation hashes,
  quorum signatures, genesis signed by the cell key);
* no block once held by a quorum of nodes is lost or changed;
* every acknowledged entry is committed exactly once.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import logging
import random
import sys
from collections import Counter
from dataclasses import dataclass, field

from exochain.core.common import (
    NS_PER_MS,
    NS_PER_S,
    ChainCell,
    ChainSyncConfig,
    CommitManagerConfig,
    EngineConfig,
    LocalChainNode,
    PendingSyncConfig,
)
from exochain.core.engine import Engine
from exochain.model import BlockView, build_genesis, validate_block, validate_genesis
from exochain.storage.memory import MemoryChainStore, MemoryMetaStore, MemoryPendingStore
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    """The fault mix of a run, drawn from its seed."""

    loss: float = 0.0
    duplication: float = 0.0
    delay_ms_max: int = 5
    partitions: bool = False
    crashes: bool = False
    clock_skew_ms_max: int = 0

    @classmethod
    def draw(cls, rng: random.Random) -> Faults:
        return cls(
            loss=rng.choice([0.0, 0.0, 0.05, 0.2]),
            duplication=rng.choice([0.0, 0.05, 0.1]),
            delay_ms_max=rng.choice([1, 5, 50, 200]),
            partitions=rng.random() < 0.5,
            crashes=rng.random() < 0.5,
            clock_skew_ms_max=rng.choice([0, 0, 50, 400]),
        )


@dataclass(frozen=True)
class SimulationConfig:
    nodes: int = 3
    fault_phase_ms: int = 8_000
    liveness_budget_ms: int = 30_000
    append_every_ms: int = 40
    tick_ms: int = 50
    # After every step, assert that each node's incremental commit index equals a full rescan (slow).
    check_commit_index: bool = False
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(
            tick_interval_ns=50 * NS_PER_MS,
            pending_sync=PendingSyncConfig(
                request_min_interval_ns=300 * NS_PER_MS, request_max_interval_ns=2 * NS_PER_S
            ),
            commit_manager=CommitManagerConfig(
                commit_maximum_interval_ns=300 * NS_PER_MS, block_proposal_timeout_ns=1500 * NS_PER_MS
            ),
            chain_sync=ChainSyncConfig(request_min_interval_ns=300 * NS_PER_MS, request_max_interval_ns=2 * NS_PER_S),
        )
    )


class _NodeClock:
    """A node's view of the simulated time (global time + its skew)."""

    def __init__(self, sim: Simulation, skew_ns: int) -> None:
        self._sim = sim
        self.skew_ns = skew_ns

    def now_ns(self) -> int:
        return self._sim.now_ns + self.skew_ns

    def monotonic_ns(self) -> int:
        return self._sim.now_ns


@dataclass
class SimNode:
    local: LocalChainNode
    chain: MemoryChainStore
    pending: MemoryPendingStore
    meta: MemoryMetaStore
    clock: _NodeClock
    engine: Engine | None = None

    @property
    def up(self) -> bool:
        return self.engine is not None


class InvariantViolation(AssertionError):
    pass


class Simulation:
    START_NS = 1_700_000_000 * NS_PER_S

    def __init__(self, seed: int, config: SimulationConfig | None = None, faults: Faults | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or SimulationConfig()
        self.faults = faults if faults is not None else Faults.draw(self.rng)
        self.now_ns = self.START_NS
        self._queue: list[tuple[int, int, str, str, bytes]] = []
        self._sequence = 0
        self.cut: set[frozenset[str]] = set()
        self.acknowledged: set[int] = set()
        self.quorum_blocks: dict[int, bytes] = {}
        self.stats: Counter[str] = Counter()

        cell_keypair = Keypair.from_seed(self.rng.randbytes(32))
        cell_id = str(PeerId.from_public_key(cell_keypair.public_key))
        keypairs = [Keypair.from_seed(self.rng.randbytes(32)) for _ in range(self.config.nodes)]
        keys = {str(PeerId.from_public_key(k.public_key)): k.public_key for k in keypairs}
        self.cell = ChainCell(cell_id, cell_keypair.public_key, keys, keys)
        genesis = build_genesis(cell_id, cell_keypair)
        self.nodes: dict[str, SimNode] = {}
        for keypair in keypairs:
            node_id = str(PeerId.from_public_key(keypair.public_key))
            skew = self.rng.randint(-self.faults.clock_skew_ms_max, self.faults.clock_skew_ms_max) * NS_PER_MS
            node = SimNode(
                LocalChainNode(node_id, keypair),
                MemoryChainStore(),
                MemoryPendingStore(),
                MemoryMetaStore(),
                _NodeClock(self, skew),
            )
            node.chain.write_block(genesis)
            self.nodes[node_id] = node
            self._start(node)

    # -- nodes --------------------------------------------------------------------------------

    def _start(self, node: SimNode) -> None:
        node.engine = Engine(self.config.engine, node.local, self.cell, node.chain, node.pending, node.meta, node.clock)

    def crash(self, node_id: str) -> None:
        """The process dies: its engine state is gone, its storage (all writes synced) stays."""
        self.nodes[node_id].engine = None
        self.stats["crashes"] += 1

    def restart(self, node_id: str) -> None:
        self._start(self.nodes[node_id])

    # -- network ------------------------------------------------------------------------------

    def _send(self, from_id: str, to_id: str, message: chain_pb2.PeerMessage, reliable: bool) -> None:
        self.stats["sent"] += 1
        if not reliable and self.rng.random() < self.faults.loss:
            self.stats["lost"] += 1
            return
        copies = 2 if not reliable and self.rng.random() < self.faults.duplication else 1
        data = message.SerializeToString()
        for _ in range(copies):
            delay = self.rng.randint(0, self.faults.delay_ms_max) * NS_PER_MS
            self._sequence += 1
            heapq.heappush(self._queue, (self.now_ns + delay, self._sequence, from_id, to_id, data))

    def _deliver_due(self) -> None:
        while self._queue and self._queue[0][0] <= self.now_ns:
            _, _, from_id, to_id, data = heapq.heappop(self._queue)
            node = self.nodes[to_id]
            if node.engine is None or frozenset((from_id, to_id)) in self.cut:
                self.stats["dropped"] += 1
                continue
            node.engine.on_message(from_id, chain_pb2.PeerMessage.FromString(data), node.clock.now_ns())
            self._flush(node, reliable=False)

    def _flush(self, node: SimNode, reliable: bool) -> None:
        assert node.engine is not None
        for out in node.engine.take_outbox():
            self._send(node.local.node_id, out.to_node_id, out.message, reliable)
        node.engine.take_events()

    # -- workload and faults ------------------------------------------------------------------

    def _append(self) -> None:
        live = [n for n in self.nodes.values() if n.up]
        if not live:
            return
        node = self.rng.choice(live)
        assert node.engine is not None
        count = self.rng.randint(1, 5)
        entries = [self.rng.randbytes(self.rng.randint(1, 64)) for _ in range(count)]
        ids = node.engine.append(entries, node.clock.now_ns())
        self.acknowledged.update(ids)
        self.stats["appended"] += count
        self._flush(node, reliable=False)

    def _maybe_fault(self) -> None:
        ids = list(self.nodes)
        if self.faults.partitions and self.rng.random() < 0.01:
            if self.cut:
                self.cut.clear()
            else:
                isolated = self.rng.choice(ids)
                self.cut = {frozenset((isolated, other)) for other in ids if other != isolated}
                self.stats["partitions"] += 1
        if self.faults.crashes and self.rng.random() < 0.005:
            node_id = self.rng.choice(ids)
            if self.nodes[node_id].up:
                # Never crash a majority at once: liveness needs a quorum of live nodes.
                up = sum(1 for n in self.nodes.values() if n.up)
                if self.cell.has_quorum(up - 1):
                    self.crash(node_id)
            else:
                self.restart(node_id)

    # -- running ------------------------------------------------------------------------------

    def _step(self, faulty: bool) -> None:
        tick_ns = self.config.tick_ms * NS_PER_MS
        self.now_ns += tick_ns
        self._deliver_due()
        for node in self.nodes.values():
            if node.engine is not None:
                node.engine.tick(node.clock.now_ns())
                self._flush(node, reliable=not faulty)
        self._deliver_due()
        self._record_quorum_blocks()
        if self.config.check_commit_index:
            for node in self.nodes.values():
                if node.engine is not None:
                    node.engine.commit_manager.index.refresh()
                    node.engine.commit_manager.index.check()

    def run(self) -> None:
        # Far fewer cyclic garbage collections (the run allocates millions of short-lived objects and
        # frees them by reference counting; a full collection walks every live one): as the service.
        thresholds = gc.get_threshold()
        gc.set_threshold(50_000, 20, 20)
        try:
            self._run()
        finally:
            gc.set_threshold(*thresholds)

    def _run(self) -> None:
        steps_per_append = max(1, self.config.append_every_ms // self.config.tick_ms)
        fault_steps = self.config.fault_phase_ms // self.config.tick_ms
        for step in range(fault_steps):
            if step % steps_per_append == 0:
                self._append()
            self._maybe_fault()
            self._step(faulty=True)
        # Liveness: heal everything, restart everyone, stop losing messages.
        self.cut.clear()
        self.faults = Faults(delay_ms_max=self.faults.delay_ms_max)
        for node_id, node in self.nodes.items():
            if not node.up:
                self.restart(node_id)
        for _ in range(self.config.liveness_budget_ms // self.config.tick_ms):
            self._step(faulty=False)
            if self.converged():
                break
        self.check()

    # -- invariants ---------------------------------------------------------------------------

    def _chain_hashes(self, node: SimNode) -> list[bytes]:
        return [h.hash for h in node.chain.headers_from(0)]

    def _record_quorum_blocks(self) -> None:
        held: Counter[tuple[int, bytes]] = Counter()
        for node in self.nodes.values():
            for header in node.chain.headers_from(0):
                held[(header.offset, header.hash)] += 1
        for (offset, block_hash), count in held.items():
            if self.cell.has_quorum(count):
                previous = self.quorum_blocks.setdefault(offset, block_hash)
                if previous != block_hash:
                    raise InvariantViolation(f"seed {self.seed}: two blocks held by a quorum at offset {offset}")

    def committed_operation_ids(self, node: SimNode) -> list[int]:
        return [i for header in node.chain.headers_from(0) for i in header.operation_ids]

    def converged(self) -> bool:
        chains = {tuple(self._chain_hashes(n)) for n in self.nodes.values()}
        if len(chains) != 1:
            return False
        committed = set(self.committed_operation_ids(next(iter(self.nodes.values()))))
        return self.acknowledged <= committed

    def check(self) -> None:
        where = f"seed {self.seed} ({self.faults})"
        nodes = list(self.nodes.values())
        chains = {tuple(self._chain_hashes(n)) for n in nodes}
        if len(chains) != 1:
            heights = [n.chain.block_count() for n in nodes]
            raise InvariantViolation(f"{where}: nodes did not converge to one chain (block counts {heights})")
        final = dict(zip((h.offset for h in nodes[0].chain.headers_from(0)), chains.pop(), strict=True))
        for offset, block_hash in self.quorum_blocks.items():
            if final.get(offset) != block_hash:
                raise InvariantViolation(f"{where}: block at offset {offset} held by a quorum was lost or changed")
        ids = self.committed_operation_ids(nodes[0])
        duplicates = [i for i, c in Counter(ids).items() if c > 1]
        if duplicates:
            raise InvariantViolation(f"{where}: operations committed twice: {duplicates[:5]}")
        missing = self.acknowledged - set(ids)
        if missing:
            raise InvariantViolation(f"{where}: {len(missing)} acknowledged entries never committed")
        self._validate_chain(nodes[0])

    def _validate_chain(self, node: SimNode) -> None:
        blocks: list[BlockView] = list(node.chain.blocks_from(0))
        validate_genesis(blocks[0], self.cell.cell_id, self.cell.cell_public_key)
        for previous, block in zip(blocks, blocks[1:], strict=False):
            validate_block(block, previous.head, self.cell.chain_node_keys, self.cell.has_quorum)
            for op in block.operations:
                if not node.engine or not node.engine.checker.verify(op):
                    raise InvariantViolation(f"seed {self.seed}: operation {op.operation_id} signature invalid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the chain simulator for one or more seeds.")
    parser.add_argument("--seed", type=int, default=None, help="run this seed only")
    parser.add_argument("--seeds", type=int, default=20, help="number of seeds from --first")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--check-index", action="store_true", help="check the commit index after every step")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR)
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    failures = 0
    for seed in seeds:
        sim = Simulation(seed, SimulationConfig(nodes=args.nodes, check_commit_index=args.check_index))
        try:
            sim.run()
            height = next(iter(sim.nodes.values())).chain.block_count()
            print(f"seed {seed}: ok, {height} blocks, {len(sim.acknowledged)} entries, {dict(sim.stats)}")
        except InvariantViolation as exc:
            failures += 1
            print(f"seed {seed}: FAILED: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
