"""Operation ids issued by the engine, and the clocks they come from.

* Unique per node of the cell (SPEC 11 gap 16): an operation id is a consistent timestamp whose 3
  sub-millisecond digits above the counter are the node's clock slot. The original took
  `clock_id % 1000` and two nodes sharing it issued the same ids in the same millisecond;
  `ChainCell.clock_slot` gives every node of the cell its own slot.
* Clock disagreement is reported (SPEC 11 gap 18): ids follow their author's wall clock, so a node
  receiving operations dated after its own clock logs it.

And, with the same two-node setup, a deferred append (the shell answers before it pushes).
"""

from __future__ import annotations

import logging

import pytest

from exochain.core.common import NS_PER_S, ChainCell, ChainSyncStatus, EngineConfig, LocalChainNode
from exochain.core.engine import CLOCK_WARN_INTERVAL_NS, Engine
from exochain.model import BlockView, build_genesis
from exochain.storage.memory import MemoryChainStore, MemoryMetaStore, MemoryPendingStore
from exocommon.clock import MockTimeSource
from exocommon.ids import PeerId, consistent_clock_id
from exocommon.keys import Keypair

START_NS = 1_699_999_998 * NS_PER_S
# Two seeds whose node ids share `consistent_clock_id % 1000` (65).
COLLIDING_SEEDS = (35, 62)


def keypair(seed: int) -> Keypair:
    return Keypair.from_seed(seed.to_bytes(2, "big") * 16)


def node_id(kp: Keypair) -> str:
    return str(PeerId.from_public_key(kp.public_key))


def natural_slot(kp: Keypair) -> int:
    return consistent_clock_id(PeerId.from_public_key(kp.public_key)) % 1000


def node_digits(operation_id: int) -> int:
    return (operation_id // 1000) % 1000


def make_cell(keypairs: list[Keypair]) -> tuple[ChainCell, Keypair]:
    cell_keypair = keypair(999)
    keys = {node_id(kp): kp.public_key for kp in keypairs}
    return ChainCell(node_id(cell_keypair), cell_keypair.public_key, keys, keys), cell_keypair


def engine_of(kp: Keypair, cell: ChainCell, genesis: BlockView, time: MockTimeSource) -> Engine:
    """An engine of node `kp` in `cell`, its chain holding `genesis`, in memory, on `time`."""
    chain = MemoryChainStore()
    chain.write_block(genesis)
    return Engine(
        EngineConfig(), LocalChainNode(node_id(kp), kp), cell, chain, MemoryPendingStore(), MemoryMetaStore(), time
    )


def test_colliding_clock_ids_get_distinct_slots_the_same_on_every_node():
    a, b = (keypair(s) for s in COLLIDING_SEEDS)
    assert natural_slot(a) == natural_slot(b)
    others = [keypair(s) for s in range(100, 110)]
    cell, _ = make_cell([a, b, *others])
    slots = {nid: cell.clock_slot(nid) for nid in cell.chain_node_ids}
    assert len(set(slots.values())) == len(slots)
    # The first by id keeps its natural slot; the other takes the next free one.
    first, second = sorted([a, b], key=node_id)
    assert slots[node_id(first)] == natural_slot(first)
    assert slots[node_id(second)] != natural_slot(second)
    # A node's own view of the table is the same as any other node's (membership order does not matter).
    reordered, _ = make_cell([*reversed(others), b, a])
    assert {nid: reordered.clock_slot(nid) for nid in reordered.chain_node_ids} == slots


def test_two_engines_with_colliding_clock_ids_never_issue_the_same_operation_id():
    keypairs = [keypair(s) for s in COLLIDING_SEEDS]
    cell, cell_keypair = make_cell(keypairs)
    genesis = build_genesis(cell.cell_id, cell_keypair)
    time = MockTimeSource(START_NS)  # both nodes at the very same instant
    engines = [engine_of(kp, cell, genesis, time) for kp in keypairs]
    ids = [engine.append([b"entry %d" % i for i in range(5)], time.now_ns()) for engine in engines]
    assert not set(ids[0]) & set(ids[1])
    assert {node_digits(i) for i in ids[0]} != {node_digits(i) for i in ids[1]}
    for engine, issued in zip(engines, ids, strict=True):
        assert {node_digits(i) for i in issued} == {cell.clock_slot(engine.local.node_id)}


class TwoNodes:
    """Two engines on their own mock clocks, `offset_ns` apart, exchanging messages directly."""

    def __init__(self, offset_ns: int) -> None:
        keypairs = [keypair(1), keypair(2)]
        cell, cell_keypair = make_cell(keypairs)
        genesis = build_genesis(cell.cell_id, cell_keypair)
        self.times = [MockTimeSource(START_NS), MockTimeSource(START_NS + offset_ns)]
        self.engines = [engine_of(kp, cell, genesis, time) for kp, time in zip(keypairs, self.times, strict=True)]
        self.run(20)
        assert [e.chain_sync.status for e in self.engines] == [ChainSyncStatus.SYNCHRONIZED] * 2

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            for engine, time in zip(self.engines, self.times, strict=True):
                time.advance_ms(100)
                engine.tick(time.now_ns())
            for _ in range(5):
                for engine in self.engines:
                    for out in engine.take_outbox():
                        index = next(i for i, e in enumerate(self.engines) if e.local.node_id == out.to_node_id)
                        self.engines[index].on_message(engine.local.node_id, out.message, self.times[index].now_ns())

    def append(self, index: int) -> int:
        [operation_id] = self.engines[index].append([b"entry"], self.times[index].now_ns())
        self.run(1)
        assert self.engines[1 - index].pending.get(operation_id) is not None
        return operation_id


def clock_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "the two clocks disagree" in r.getMessage()]


def test_operations_dated_after_our_clock_are_reported_once_a_minute(caplog: pytest.LogCaptureFixture):
    nodes = TwoNodes(offset_ns=10 * NS_PER_S)  # node 1's clock is 10 s ahead of node 0's
    with caplog.at_level(logging.WARNING, logger="exochain.core.engine"):
        nodes.append(1)
        nodes.append(1)
    [warning] = clock_warnings(caplog)
    assert f"operations of node {nodes.engines[1].local.node_id} are dated 9." in warning
    # Node 1 receives operations from its past: nothing to say.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exochain.core.engine"):
        nodes.append(0)
    assert clock_warnings(caplog) == []
    # A minute later, still ahead: said again.
    for time in nodes.times:
        time.advance(CLOCK_WARN_INTERVAL_NS)
    with caplog.at_level(logging.WARNING, logger="exochain.core.engine"):
        nodes.append(1)
    assert len(clock_warnings(caplog)) == 1


def test_clocks_a_few_hundred_ms_apart_say_nothing(caplog: pytest.LogCaptureFixture):
    nodes = TwoNodes(offset_ns=400 * 1_000_000)
    with caplog.at_level(logging.WARNING, logger="exochain.core.engine"):
        nodes.append(1)
        nodes.append(0)
    assert clock_warnings(caplog) == []


def test_a_deferred_append_is_pushed_by_after_append_one_push_per_append():
    nodes = TwoNodes(offset_ns=0)
    engine, peer = nodes.engines
    now = nodes.times[0].now_ns()
    first = engine.append([b"a"], now, deferred=True)
    assert engine.take_outbox() == []  # stored (and reported) but not sent yet
    assert [type(e).__name__ for e in engine.take_events()] == ["NewPendingOperations"]
    second = engine.append([b"b", b"c"], now, deferred=True)
    assert engine.take_outbox() == []
    engine.after_append(now)
    pushes = [out for out in engine.take_outbox() if out.message.WhichOneof("kind") == "pending_sync"]
    assert [out.own_up_to for out in pushes] == [first[-1], second[-1]]
    for out in pushes:
        peer.on_message(engine.local.node_id, out.message, nodes.times[1].now_ns())
    assert all(peer.pending.get(i) is not None for i in first + second)
    engine.after_append(now)  # nothing left to push
    assert not [out for out in engine.take_outbox() if out.message.WhichOneof("kind") == "pending_sync"]
