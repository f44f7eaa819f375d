"""The gRPC shell without gRPC: settings, envelope checks, and the Subscribe replay/live hand-off
(no duplicates, nothing missed, bounded queues) on a one-node cell in memory."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from exochain.core.common import NS_PER_MS, ChainCell, EngineConfig, LocalChainNode
from exochain.core.engine import Engine
from exochain.model import build_genesis
from exochain.service import (
    ENVELOPE_MAX_SKEW_NS,
    ChainService,
    EnvelopeSigner,
    ShellConfig,
    open_envelope,
)
from exochain.settings import DEFAULT_TICK_INTERVAL_MS, engine_config_from_node
from exochain.storage.memory import MemoryChainStore, MemoryMetaStore, MemoryPendingStore
from exocommon.clock import MockTimeSource
from exocommon.config import ConfigError, LocalNodeConfig
from exocommon.errors import InvalidArgument, Unauthenticated, Unavailable
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2


def node_id_of(keypair: Keypair) -> str:
    return str(PeerId.from_public_key(keypair.public_key))


# -- settings -----------------------------------------------------------------------------------


def test_settings_default_to_the_original_except_the_tick():
    config = engine_config_from_node(LocalNodeConfig())
    defaults = EngineConfig()
    assert config.tick_interval_ns == DEFAULT_TICK_INTERVAL_MS * NS_PER_MS
    assert config.commit_manager == defaults.commit_manager
    assert config.pending_sync == defaults.pending_sync
    assert config.chain_sync == defaults.chain_sync


def test_settings_read_every_chain_key_of_node_yaml():
    cfg = LocalNodeConfig()
    for key, value in {
        "commit_interval_ms": 100,
        "block_proposal_timeout_ms": 900,
        "cleanup_after_block_depth": 3,
        "commit_max_pending_operations": 50,
        "tick_interval_ms": 20,
        "sync_interval_ms": 200,
        "commit_min_interval_ms": 15,
    }.items():
        getattr(cfg.chain, key).value = value
    config = engine_config_from_node(cfg)
    assert config.tick_interval_ns == 20 * NS_PER_MS
    assert config.commit_manager.commit_maximum_interval_ns == 100 * NS_PER_MS
    assert config.commit_manager.block_proposal_timeout_ns == 900 * NS_PER_MS
    assert config.commit_manager.operations_cleanup_after_block_depth == 3
    assert config.commit_manager.commit_maximum_pending_store_count == 50
    assert config.commit_manager.commit_minimum_interval_ns == 15 * NS_PER_MS
    for sync in (config.pending_sync, config.chain_sync):
        assert sync.request_min_interval_ns == 200 * NS_PER_MS
        assert sync.request_max_interval_ns == 6 * 200 * NS_PER_MS


def test_settings_refuse_zero_naming_the_key():
    cfg = LocalNodeConfig()
    cfg.chain.tick_interval_ms.value = 0
    with pytest.raises(ConfigError, match="chain.tick_interval_ms"):
        engine_config_from_node(cfg)


# -- envelopes ----------------------------------------------------------------------------------


def test_envelope_checks_each_field():
    cell_key, a_key, b_key, c_key, other = (Keypair.generate() for _ in range(5))
    a, b, c = node_id_of(a_key), node_id_of(b_key), node_id_of(c_key)
    cell_id = node_id_of(cell_key)
    keys = {a: a_key.public_key, b: b_key.public_key, c: c_key.public_key}
    cell = ChainCell(cell_id, cell_key.public_key, keys, {})
    time_source = MockTimeSource()
    message = chain_pb2.PeerMessage(chain_sync_request=chain_pb2.ChainSyncRequest(from_offset=5))
    envelope = EnvelopeSigner(cell_id, LocalChainNode(a, a_key), time_source).seal(b, message)
    now = time_source.now_ns()

    assert open_envelope(envelope, cell, b, now) == message
    with pytest.raises(Unauthenticated, match="addressed to"):
        open_envelope(envelope, cell, c, now)
    with pytest.raises(Unauthenticated, match="come from this node"):
        open_envelope(envelope, cell, a, now)
    with pytest.raises(Unauthenticated, match="sent_at"):
        open_envelope(envelope, cell, b, now + ENVELOPE_MAX_SKEW_NS + 10**9)
    forged = EnvelopeSigner(cell_id, LocalChainNode(a, other), time_source).seal(b, message)
    with pytest.raises(Unauthenticated, match="does not verify"):
        open_envelope(forged, cell, b, now)
    stranger = EnvelopeSigner(cell_id, LocalChainNode(node_id_of(other), other), time_source).seal(b, message)
    with pytest.raises(Unauthenticated, match="not a chain node"):
        open_envelope(stranger, cell, b, now)
    wrong_cell = EnvelopeSigner(a, LocalChainNode(a, a_key), time_source).seal(b, message)
    with pytest.raises(Unauthenticated, match="is for cell"):
        open_envelope(wrong_cell, cell, b, now)


# -- subscriptions ------------------------------------------------------------------------------


def one_node_service(queue_len: int = 1000, push_delay_s: float = 0.0) -> ChainService:
    cell_key, node_key = Keypair.generate(), Keypair.generate()
    node_id, cell_id = node_id_of(node_key), node_id_of(cell_key)
    cell = ChainCell(cell_id, cell_key.public_key, {node_id: node_key.public_key}, {})
    chain = MemoryChainStore()
    chain.write_block(build_genesis(cell_id, cell_key))
    # Wall time, since the engine compares it with the consistent timestamps of operations.
    time_source = MockTimeSource(time.time_ns())
    engine = Engine(
        EngineConfig(),
        LocalChainNode(node_id, node_key),
        cell,
        chain,
        MemoryPendingStore(),
        MemoryMetaStore(),
        time_source,
    )
    config = ShellConfig(subscriber_queue_len_max=queue_len, lone_append_push_delay_s=push_delay_s)
    return ChainService(engine, {}, time_source, config)


def kind(event: chain_pb2.ChainEvent) -> str:
    return event.WhichOneof("event")


def pending_id(event: chain_pb2.ChainEvent) -> int:
    return chain_pb2.Operation.FromString(event.pending.operation.operation_bytes).operation_id


async def test_appends_during_the_replay_are_sent_once():
    service = one_node_service()
    first = service.append([b"a", b"b", b"c"])
    stream = service.subscribe(chain_pb2.SubscribeRequest())
    events = [await anext(stream)]  # the genesis block: the replay is under way
    assert kind(events[0]) == "block"
    during = service.append([b"d", b"e"])  # in the pending store *and* queued as live events
    while kind(events[-1]) != "caught_up":
        events.append(await anext(stream))
    after = service.append([b"f"])
    events.append(await anext(stream))
    await stream.aclose()

    ids = [pending_id(e) for e in events if kind(e) == "pending"]
    assert ids == first + during + after
    caught_up = next(e.caught_up for e in events if kind(e) == "caught_up")
    assert caught_up.last_pending_operation_id == during[-1] and caught_up.last_block_offset == 0


async def test_resume_skips_what_the_subscriber_has():
    service = one_node_service()
    first = service.append([b"a", b"b"])
    later = service.append([b"c"])
    stream = service.subscribe(
        chain_pb2.SubscribeRequest(has_from_block_offset=True, from_block_offset=0, from_pending_operation_id=first[-1])
    )
    events = [await anext(stream), await anext(stream)]
    await stream.aclose()
    assert [kind(e) for e in events] == ["pending", "caught_up"]
    assert pending_id(events[0]) == later[0]


async def test_a_subscriber_resuming_after_a_block_this_node_does_not_hold_replays_everything():
    service = one_node_service()
    genesis = service.engine.chain.get_header(0)
    assert genesis is not None
    ids = service.append([b"a"])

    async def events_of(block_hash: bytes) -> list[chain_pb2.ChainEvent]:
        stream = service.subscribe(
            chain_pb2.SubscribeRequest(has_from_block_offset=True, from_block_offset=0, from_block_hash=block_hash)
        )
        events = [await anext(stream)]
        while kind(events[-1]) != "caught_up":
            events.append(await anext(stream))
        await stream.aclose()
        return events

    # Our genesis: nothing to replay but the pending entry.
    assert [kind(e) for e in await events_of(genesis.hash)] == ["pending", "caught_up"]
    # Another chain's block at offset 0: forget everything, here is the whole chain.
    events = await events_of(b"\x12\x20" + bytes(32))
    assert [kind(e) for e in events] == ["truncated", "block", "pending", "caught_up"]
    assert events[0].truncated.from_offset == 0
    assert chain_pb2.BlockHeader.FromString(events[1].block.header_bytes).offset == 0
    assert pending_id(events[2]) == ids[0]


async def test_a_subscriber_that_falls_behind_gets_a_discontinuity_and_the_stream_ends():
    service = one_node_service(queue_len=3)
    stream = service.subscribe(chain_pb2.SubscribeRequest())
    while kind(await anext(stream)) != "caught_up":
        pass
    for i in range(4):
        service.append([f"x{i}".encode()])
    assert kind(await anext(stream)) == "discontinuity"
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_shutdown_ends_streams_with_unavailable():
    service = one_node_service()
    stream = service.subscribe(chain_pb2.SubscribeRequest())
    while kind(await anext(stream)) != "caught_up":
        pass
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    service.end_streams()
    with pytest.raises(Unavailable):
        await waiting


async def test_blocks_committed_by_ticks_reach_subscribers_and_get_operations():
    service = one_node_service()
    stream = service.subscribe(chain_pb2.SubscribeRequest())
    while kind(await anext(stream)) != "caught_up":
        pass
    ids = service.append([f"e{i}".encode() for i in range(12)])  # over the 10 that trigger a proposal
    for _ in range(20):
        service._time.advance(100 * NS_PER_MS)  # type: ignore[attr-defined]
        service.engine.tick(service._time.now_ns())  # type: ignore[attr-defined]
        service._after_input()
    blocks = []
    while True:
        event = await asyncio.wait_for(anext(stream), 1)
        if kind(event) == "block":
            blocks.append(event.block)
            break
    await stream.aclose()
    stored = service.get_operations(ids)
    assert [s.status for s in stored] == [chain_pb2.OPERATION_STATUS_COMMITTED] * len(ids)
    assert all(s.block_height == 2 for s in stored)
    with pytest.raises(InvalidArgument):
        service.append([])


def batch_ids(event: chain_pb2.ChainEvent) -> list[int]:
    return [chain_pb2.Operation.FromString(op.operation_bytes).operation_id for op in event.pending_batch.operations]


async def test_pending_batches_carry_each_operation_once_across_the_replay():
    service = one_node_service()
    first = service.append([b"a", b"b", b"c"])
    stream = service.subscribe(chain_pb2.SubscribeRequest(pending_batches=True))
    events = [await anext(stream)]  # the genesis block: the replay is under way
    during = service.append([b"d", b"e"])  # in the pending store *and* queued as a live batch
    while kind(events[-1]) != "caught_up":
        events.append(await anext(stream))
    after = service.append([b"f", b"g"])
    events.append(await anext(stream))
    await stream.aclose()

    assert "pending" not in [kind(e) for e in events]
    batches = [batch_ids(e) for e in events if kind(e) == "pending_batch"]
    assert [i for batch in batches for i in batch] == first + during + after
    assert batches[-1] == after  # one live event for one append


class FakeDurability:
    """Writes are durable only after `sync()`, which waits for `proceed` (set by the test)."""

    def __init__(self) -> None:
        self.unsynced = False
        self.syncs = 0
        self.proceed = threading.Event()
        self.proceed.set()
        self.threads: list[str] = []  # the thread of each sync

    def has_unsynced_writes(self) -> bool:
        return self.unsynced

    def sync(self) -> None:
        assert self.proceed.wait(5)
        self.syncs += 1
        self.unsynced = False
        self.threads.append(threading.current_thread().name)


async def test_group_commit_answers_appends_and_publishes_only_after_a_sync():
    service = one_node_service()
    durability = FakeDurability()
    service._durability = durability  # type: ignore[attr-defined]
    service._sync_executor = concurrent.futures.ThreadPoolExecutor(1)  # type: ignore[attr-defined]
    stream = service.subscribe(chain_pb2.SubscribeRequest(pending_batches=True))
    while kind(await anext(stream)) != "caught_up":
        pass
    sync_task = asyncio.create_task(service._sync_loop())  # type: ignore[attr-defined]
    try:
        # Busy (an input waiting): the sync runs in the worker thread, and everything waits for it.
        service._bulk_inputs.append((lambda: None, asyncio.get_running_loop().create_future()))  # type: ignore[attr-defined]
        durability.unsynced = True  # as if the append's writes were still in the OS only
        durability.proceed.clear()
        ids = service.append([b"x"])
        waiting = asyncio.ensure_future(service.durable())
        next_event = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not waiting.done() and not next_event.done()  # held until the sync
        durability.proceed.set()
        await asyncio.sleep(0.05)
        assert durability.syncs >= 1 and waiting.done() and next_event.done()
        assert batch_ids(next_event.result()) == ids
        # Idle: the sync runs at once, on the loop, before the append returns.
        service._bulk_inputs.clear()  # type: ignore[attr-defined]
        durability.unsynced = True
        syncs = durability.syncs
        more = service.append([b"y"])
        assert durability.syncs == syncs + 1 and not durability.unsynced
        assert batch_ids(await anext(stream)) == more
        # Without unsynced writes, outputs go out at once and nothing waits.
        await service.durable()
        assert durability.syncs == syncs + 1
    finally:
        sync_task.cancel()
        await stream.aclose()


class UnsyncedOnAppend(FakeDurability):
    """Every append leaves an unsynced write (as LevelDB without sync does)."""

    def __init__(self, service: ChainService) -> None:
        super().__init__()
        put = service.engine.pending.put

        def put_unsynced(ops):  # type: ignore[no-untyped-def]
            self.unsynced = True
            return put(ops)

        service.engine.pending.put = put_unsynced  # type: ignore[method-assign]


async def test_a_lone_append_syncs_on_the_loop_even_among_dense_inputs_and_concurrent_ones_share_the_thread():
    service = one_node_service()
    durability = UnsyncedOnAppend(service)
    service._durability = durability  # type: ignore[attr-defined]
    service._sync_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sync")  # type: ignore[attr-defined]
    sync_task = asyncio.create_task(service._sync_loop())  # type: ignore[attr-defined]
    try:
        main = threading.current_thread().name

        async def dense_input(work, urgent=False):  # type: ignore[no-untyped-def]
            # Inputs look dense (as with ticks and peer messages between paced appends); the loop
            # serves other tasks before each.
            await asyncio.sleep(0)
            service._inputs_sparse = False  # type: ignore[attr-defined]
            return work()

        service._input = dense_input  # type: ignore[method-assign]
        ids = await service.append_durably([b"x"])
        assert durability.threads == [main] and service.engine.pending.get(ids[0]) is not None
        # Two appends under way at once: the sync goes to the worker thread.
        durability.threads.clear()
        await asyncio.gather(service.append_durably([b"y"]), service.append_durably([b"z"]))
        assert durability.threads and durability.threads[0].startswith("sync")
        assert not durability.unsynced
    finally:
        sync_task.cancel()


async def _loop_steps(count: int = 10) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_the_push_of_a_lone_append_lingers_and_that_of_concurrent_ones_does_not():
    # One node: its after-append round proposes, signs and commits a block of what was appended
    # (the genesis is older than the commit interval), which shows when that round ran.
    for delay_s, lingers in ((3600.0, True), (0.0, False)):
        service = one_node_service(push_delay_s=delay_s)
        service._tick()  # type: ignore[attr-defined]  # synchronized (no peers), nothing to propose
        service._inputs_task = asyncio.create_task(service._process_inputs())  # type: ignore[attr-defined]
        try:
            ids = await service.append_durably([b"alone"])
            await _loop_steps()
            assert service.engine.chain.block_count() == (1 if lingers else 2)
            assert (service.engine.chain.block_offset_of_operation(ids[0]) is None) is lingers
        finally:
            service._inputs_task.cancel()  # type: ignore[attr-defined]

    service = one_node_service(push_delay_s=3600.0)
    service._tick()  # type: ignore[attr-defined]
    service._inputs_task = asyncio.create_task(service._process_inputs())  # type: ignore[attr-defined]
    try:
        run_input = service._input

        async def input_after_a_step(work, urgent=False):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0)  # both appends are under way before either is stored
            return await run_input(work, urgent)

        service._input = input_after_a_step  # type: ignore[method-assign]
        first, second = await asyncio.gather(service.append_durably([b"one"]), service.append_durably([b"two"]))
        await _loop_steps()
        assert service.engine.chain.block_count() == 2
        assert service.engine.chain.last_block().head.operation_ids == first + second  # type: ignore[union-attr]
    finally:
        service._inputs_task.cancel()  # type: ignore[attr-defined]


async def test_close_cancels_a_lingering_push():
    service = one_node_service(push_delay_s=0.01)
    service._tick()  # type: ignore[attr-defined]
    inputs = asyncio.create_task(service._process_inputs())  # type: ignore[attr-defined]
    service._inputs_task = inputs  # type: ignore[attr-defined]
    try:
        await service.append_durably([b"alone"])
        await service.close()
        await asyncio.sleep(0.05)  # past the linger: its round would have committed a block
        assert service.engine.chain.block_count() == 1
    finally:
        inputs.cancel()


async def test_queued_pending_batches_go_out_as_one_event():
    service = one_node_service()
    stream = service.subscribe(chain_pb2.SubscribeRequest(pending_batches=True))
    while kind(await anext(stream)) != "caught_up":
        pass
    first = service.append([b"a"])
    second = service.append([b"b", b"c"])  # queued while the stream was not reading
    event = await anext(stream)
    await stream.aclose()
    assert batch_ids(event) == first + second


def test_peer_link_merges_queued_pushes_of_local_entries():
    from exochain.service import PeerLink

    def push(first: int, count: int) -> chain_pb2.PeerMessage:
        ranges = [chain_pb2.PendingSyncRange(from_operation=first, to_operation=first + count, operations_count=count)]
        return chain_pb2.PeerMessage(pending_sync=chain_pb2.PendingSyncRequest(ranges=ranges, from_block_height=3))

    link = PeerLink("peer", "127.0.0.1:1", None, ShellConfig())  # type: ignore[arg-type]
    link.offer(push(10, 2), own_up_to=11)
    link.offer(push(20, 2), own_up_to=21)
    reply = chain_pb2.PeerMessage(pending_sync=chain_pb2.PendingSyncRequest(from_block_height=3))
    link.offer(reply)  # not a push: sent on its own
    link.offer(push(30, 2), own_up_to=31)
    merged, up_to = link._take_bulk()
    assert up_to == 21 and [r.from_operation for r in merged.pending_sync.ranges] == [10, 20]
    assert link._take_bulk() == (reply, 0)
    single, up_to = link._take_bulk()
    assert up_to == 31 and [r.from_operation for r in single.pending_sync.ranges] == [30]
