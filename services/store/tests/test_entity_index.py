"""The entity index fed by a fake chain event feed: SPEC 3.3 lifecycle, depth and leeway rules,
deferred indexing, truncation, resume after a restart, and the chain event conversion."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from google.protobuf import any_pb2

import exostore.entity_index as entity_index_module
from exochain.model import build_genesis, sign_operations
from exochain.model import new_entry as new_entry_op
from exocommon.config import EntityIndexSettings
from exocommon.keys import Keypair
from exocommon.sealed import seal
from exocore.chain.v1 import chain_pb2
from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exocore.test import test_pb2
from exostore.entity_index import (
    BlockEvent,
    CaughtUpEvent,
    ChainEntry,
    EntityIndex,
    FullReindexNeeded,
    IndexChange,
    PendingEvent,
    TruncatedEvent,
    events_from_proto,
)
from exostore.payloads import BlockRef, PayloadStore
from exostore.registry import TraitRegistry

KEY = bytes(range(32))
OTHER_KEY = bytes(32)
BASE = 1_800_000_000 * 10**9


def op(i: int) -> int:
    return BASE + i * 1_000_000


def put(entity: str, trait: str, text: str) -> mutation_pb2.EntityMutation:
    message = any_pb2.Any()
    message.Pack(test_pb2.TestMessage(string1=text))
    return mutation_pb2.EntityMutation(
        entity_id=entity, put_trait=mutation_pb2.PutTraitMutation(trait=entity_pb2.Trait(id=trait, message=message))
    )


def delete_ops(entity: str, *ids: int) -> mutation_pb2.EntityMutation:
    return mutation_pb2.EntityMutation(
        entity_id=entity, delete_operations=mutation_pb2.DeleteOperationsMutation(operation_ids=list(ids))
    )


def entry(i: int, mutation: mutation_pb2.EntityMutation, key: bytes = KEY) -> ChainEntry:
    return ChainEntry(op(i), seal(key, mutation.SerializeToString()))


def block(height: int, *entries: ChainEntry, tag: str = "") -> BlockEvent:
    # Hashes are hex, as the chain's (the store sends its last one back when it resumes).
    return BlockEvent(BlockRef(height * 100, height, f"hash{height}{tag}".encode().hex()), tuple(entries))


def pending(entry_: ChainEntry) -> PendingEvent:
    return PendingEvent(entry_)


GENESIS = block(1)


def caught_up(height: int, last_pending: int = 0) -> CaughtUpEvent:
    return CaughtUpEvent(height * 100, last_pending)


class Store:
    """An EntityIndex with its payload store, reopenable like a restarted process."""

    def __init__(self, root: Path, settings: EntityIndexSettings, key: bytes = KEY) -> None:
        self.root = root
        self.settings = settings
        self.clock = [1000.0]
        self.payloads = PayloadStore(root / "payloads")
        self.index = EntityIndex(root, TraitRegistry(), settings, self.payloads, key, monotonic=lambda: self.clock[0])

    def close(self) -> None:
        self.index.close()
        self.payloads.close()

    def reopen(self, key: bytes = KEY) -> Store:
        self.close()
        return Store(self.root, self.settings, key)

    def chain_ops(self) -> set[int]:
        return {m.operation_id for m in self._all(self.index.chain)}

    def pending_ops(self) -> set[int]:
        return {m.operation_id for m in self._all(self.index.pending)}

    @staticmethod
    def _all(index):  # every document, through an `all` query
        return index.search(query_pb2.EntityQuery(all=query_pb2.AllPredicate()), 10_000, 0).mutations

    def entities(self, text: str | None = None) -> list[tuple[str, list[str]]]:
        query = query_pb2.EntityQuery(paging=query_pb2.Paging(count=100))
        if text is None:
            query.all.SetInParent()
        else:
            query.match.query = text
        results = self.index.search(query)
        return sorted(
            (r.entity.id, sorted(test_pb2.TestMessage.FromString(t.message.value).string1 for t in r.entity.traits))
            for r in results.entities
        )


def settings(min_depth: int = 2, leeway: int = 4, deferred: int | None = None, **more: int) -> EntityIndexSettings:
    return EntityIndexSettings(
        chain_index_min_depth=min_depth,
        chain_index_depth_leeway=leeway,
        chain_index_deferred_interval_secs=deferred,
        **more,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path, settings())
    yield s
    s.close()


def start(s: Store, *events) -> None:
    request = s.index.start_replay()
    assert request.from_pending_operation_id == 0
    s.index.apply_events([*events])


# --- lifecycle and depth rules ---------------------------------------------------------------


def test_first_subscription_is_from_the_genesis_and_nothing_is_searchable_before_caught_up(store):
    request = store.index.start_replay()
    assert not request.has_from_block_offset
    update = store.index.apply_events([GENESIS, block(2, entry(1, put("e1", "t1", "hello")))])
    assert update.indexed == [] and not update.changed, "the replay's pending index is not visible yet"
    assert update.committed == [op(1)]
    assert store.entities() == [] and store.index.replaying

    update = store.index.apply_events([pending(entry(2, put("e2", "t1", "world"))), caught_up(2, op(2))])
    assert update.caught_up and update.reset
    assert sorted(update.indexed) == [op(1), op(2)]
    assert store.entities() == [("e1", ["hello"]), ("e2", ["world"])]
    assert not store.index.replaying and store.index.caught_up


def test_chain_index_takes_blocks_min_depth_deep_in_leeway_sized_batches(store):
    # min depth 2, leeway 4
    start(store, GENESIS, caught_up(1))
    assert store.index.chain_indexed is None
    store.index.apply_events([block(2, entry(2, put("e2", "t", "two")))])
    assert store.index.chain_indexed is None  # genesis is 1 deep
    store.index.apply_events([block(3, entry(3, put("e3", "t", "three")))])
    # No block indexed yet: every block >= 2 deep goes (the genesis).
    assert store.index.chain_indexed == GENESIS.ref
    assert store.chain_ops() == set() and store.pending_ops() == {op(2), op(3)}

    for height in (4, 5):  # H - h = 3, then 4 >= leeway: blocks 2 and 3 (>= 2 deep) go
        store.index.apply_events([block(height, entry(height, put(f"e{height}", "t", f"n{height}")))])
        if height == 4:
            assert store.index.chain_indexed == GENESIS.ref
    assert store.index.chain_indexed.height == 3
    assert store.chain_ops() == {op(2), op(3)}
    assert store.pending_ops() == {op(4), op(5)}, "chain-indexed operations leave the pending index"
    assert store.index.retained_offsets == [400, 500]

    results = store.index.search(query_pb2.EntityQuery(all=query_pb2.AllPredicate()))
    sources = {r.entity.id: r.source for r in results.entities}
    assert sources == {"e2": query_pb2.CHAIN, "e3": query_pb2.CHAIN, "e4": query_pb2.PENDING, "e5": query_pb2.PENDING}
    docs = store.index.chain.fetch_entity_mutations("e2")
    assert [(d.operation_id, d.block_offset) for d in docs] == [(op(2), 200)]


def test_min_depth_zero_and_leeway_zero_index_every_block_at_once(tmp_path):
    s = Store(tmp_path, settings(min_depth=0, leeway=0))
    start(s, GENESIS, caught_up(1))
    assert s.index.chain_indexed == GENESIS.ref
    s.index.apply_events([block(2, entry(1, put("e", "t", "x")))])
    assert s.chain_ops() == {op(1)} and s.pending_ops() == set()
    s.close()


def test_a_pending_operation_then_its_block_is_indexed_once(store):
    start(store, GENESIS, caught_up(1))
    e = entry(1, put("e1", "t1", "once"))
    first = store.index.apply_events([pending(e)])
    assert first.indexed == [op(1)] and first.changes == [IndexChange(op(1), "e1", "exocore.test.TestMessage")]
    again = store.index.apply_events([pending(e), block(2, e)])
    assert again.indexed == [] and again.committed == [op(1)]
    assert store.index.pending.count() == 1
    assert store.entities("once") == [("e1", ["once"])]


def test_a_pending_operation_and_its_block_in_one_batch_are_indexed_once(store):
    start(store, GENESIS, caught_up(1))
    e = entry(1, put("e1", "t1", "once"))
    update = store.index.apply_events([pending(e), block(2, e)])
    assert update.indexed == [op(1)] and update.committed == [op(1)]
    assert store.index.pending.count() == 1 and store.pending_ops() == {op(1)}
    assert store.entities("once") == [("e1", ["once"])]


def test_a_block_entry_already_pending_is_not_read_back(store, monkeypatch):
    start(store, GENESIS, caught_up(1))
    e1, e2 = entry(1, put("e1", "t1", "one")), entry(2, put("e2", "t1", "two"))
    store.index.apply_events([pending(e1)])
    read: list[int] = []
    get = store.payloads.get
    monkeypatch.setattr(store.payloads, "get", lambda op_id: read.append(op_id) or get(op_id))
    update = store.index.apply_events([block(2, e1, e2)])
    assert read == [op(2)], "only the entry new to the pending index is decoded"
    assert update.indexed == [op(2)] and update.committed == [op(1), op(2)]


def test_own_appended_mutations_are_indexed_without_decrypting(store, monkeypatch):
    start(store, GENESIS, caught_up(1))
    mine, theirs = put("e1", "t1", "mine"), put("e2", "t2", "theirs")
    appended = entry(1, mine)
    store.index.remember_appended([appended.data], [mine.SerializeToString()], [mine])
    opened: list[bytes] = []
    real_open = entity_index_module.open_sealed

    def open_sealed(key: bytes, data: bytes) -> bytes:
        opened.append(real_open(key, data))
        return opened[-1]

    monkeypatch.setattr(entity_index_module, "open_sealed", open_sealed)
    update = store.index.apply_events([pending(appended), pending(entry(2, theirs))])
    assert sorted(update.indexed) == [op(1), op(2)]
    assert opened == [theirs.SerializeToString()], "only the other node's entry is decrypted"
    assert store.entities() == [("e1", ["mine"]), ("e2", ["theirs"])]
    assert store.payloads.get(op(1)) == mine.SerializeToString(), "the payload is kept as any other"
    assert store.index._appended == {}, "used once"


def test_remembered_appends_are_bounded(store, monkeypatch):
    monkeypatch.setattr(entity_index_module, "APPENDED_CACHE_SIZE", 2)
    mutations = [put(f"e{i}", "t", "x") for i in range(3)]
    entries = [b"sealed 0", b"sealed 1", b"sealed 2"]
    store.index.remember_appended(entries, [m.SerializeToString() for m in mutations], mutations)
    assert list(store.index._appended) == entries[1:], "the oldest is forgotten"


def test_undecodable_entries_are_logged_and_skipped(store, caplog):
    caplog.set_level(logging.WARNING)
    start(store, GENESIS, caught_up(1))
    update = store.index.apply_events(
        [
            pending(entry(1, put("e1", "t", "wrong key"), key=OTHER_KEY)),
            pending(ChainEntry(op(2), seal(KEY, b"\xff\xff not a protobuf"))),
            pending(ChainEntry(op(3), b"\x01garbage")),
            pending(entry(4, put("e4", "t", "fine"))),
        ]
    )
    assert update.indexed == [op(4)]
    assert store.entities() == [("e4", ["fine"])]
    text = caplog.text
    assert f"skipping chain entry {op(1)}" in text and "does not decrypt" in text
    assert f"skipping chain entry {op(2)}" in text and "not an EntityMutation" in text
    assert f"skipping chain entry {op(3)}" in text


# --- deferred indexing --------------------------------------------------------------------------


def test_deferred_indexing_leaves_live_blocks_to_the_timer(tmp_path):
    # the original's rules: no wait for writes (ours, by default 2 s, is the next test's)
    s = Store(tmp_path, settings(min_depth=1, leeway=1, deferred=5, chain_index_deferred_write_secs=0))
    start(s, GENESIS, block(2, entry(2, put("e", "t", "a"))), caught_up(2))
    # While replaying, blocks are indexed anyway (SPEC "Started").
    assert s.index.chain_indexed.height == 1
    s.index.apply_events([block(3, entry(3, put("e3", "t", "b"))), block(4)])
    assert s.index.chain_indexed.height == 1, "live blocks wait for the deferred timer"

    s.clock[0] += 1
    s.index.note_query(programmatic=True)
    assert s.index.deferred_indexing_due(), "programmatic queries do not delay indexing"
    s.index.note_query(programmatic=False)
    s.clock[0] += 10
    assert not s.index.deferred_indexing_due(), "a user query less than 15 s ago delays indexing"
    s.clock[0] += 6
    assert s.index.deferred_indexing_due()
    update = s.index.index_chain_blocks()
    assert s.index.chain_indexed.height == 3 and sorted(update.indexed) == [op(2), op(3)]

    s.index.note_query(programmatic=False)
    s.clock[0] += 299
    s.index.note_query(programmatic=False)
    assert not s.index.deferred_indexing_due()
    s.clock[0] += 2  # the last attempt is now more than 300 s old
    assert s.index.deferred_indexing_due()
    s.close()


def test_deferred_indexing_waits_while_writes_come_up_to_a_bound(tmp_path):
    s = Store(
        tmp_path,
        settings(
            min_depth=1, leeway=1, deferred=5, chain_index_deferred_write_secs=2, chain_index_deferred_max_pending=3
        ),
    )
    start(s, GENESIS, caught_up(1))
    s.clock[0] += 10
    assert s.index.deferred_indexing_due(), "no write yet"
    s.index.apply_events([pending(entry(2, put("e2", "t", "a"))), block(2, entry(2, put("e2", "t", "a")))])
    s.clock[0] += 1
    assert not s.index.deferred_indexing_due(), "a write less than 2 s ago delays indexing"
    s.clock[0] += 1
    assert s.index.deferred_indexing_due(), "writes stopped 2 s ago"
    s.index.apply_events([block(3)])
    s.clock[0] += 1
    assert s.index.deferred_indexing_due(), "a block whose entries were pending already is no write"
    s.index.apply_events([pending(entry(n, put(f"e{n}", "t", "b"))) for n in (4, 5)])
    assert s.index.deferred_indexing_due(), "3 pending operations: the bound holds whatever comes"
    s.index.index_chain_blocks()
    assert s.pending_ops() == {op(4), op(5)}
    s.index.apply_events([pending(entry(6, put("e6", "t", "c")))])
    s.index.note_query(programmatic=False)
    assert s.index.deferred_indexing_due(), "the bound holds over user queries too"
    s.close()


def test_deferred_rounds_take_a_bounded_number_of_operations(tmp_path, monkeypatch):
    monkeypatch.setattr(entity_index_module, "CHAIN_ROUND_MAX_OPERATIONS", 3)
    s = Store(tmp_path, settings(min_depth=1, leeway=1, deferred=5))
    start(s, GENESIS, caught_up(1))
    s.index.apply_events(
        [block(n, *(entry(10 * n + i, put(f"e{n}{i}", "t", "a")) for i in range(2))) for n in (2, 3, 4, 5)]
        + [block(6)]
    )
    assert s.index.chain_backlog
    rounds = []
    while s.index.chain_backlog:
        future = s.index.start_chain_indexing()
        assert future is not None
        future.result(timeout=30)
        rounds.append(sorted(s.index.finish_chain_indexing().indexed))
    # whole blocks, until the bound is reached: blocks 2 and 3 (4 operations), then 4 and 5
    assert rounds == [[op(20), op(21), op(30), op(31)], [op(40), op(41), op(50), op(51)]]
    assert s.index.chain_indexed.height == 5 and s.pending_ops() == set()
    s.close()


def test_deferred_indexing_without_write_wait(tmp_path):
    s = Store(tmp_path, settings(min_depth=1, leeway=1, deferred=5, chain_index_deferred_write_secs=0))
    start(s, GENESIS, caught_up(1))
    s.index.apply_events([pending(entry(2, put("e2", "t", "a")))])
    assert s.index.deferred_indexing_due()
    s.close()


def test_deferred_round_commits_on_its_own_thread_while_events_go_on(tmp_path):
    s = Store(tmp_path, settings(min_depth=1, leeway=1, deferred=5))
    start(s, GENESIS, block(2, entry(2, put("e", "t", "a"))), caught_up(2))
    s.index.apply_events([pending(entry(3, put("e3", "t", "b"))), block(3, entry(3, put("e3", "t", "b"))), block(4)])
    future = s.index.start_chain_indexing()
    assert future is not None and s.index.start_chain_indexing() is future, "one round at a time"
    # Pending operations and newer blocks are indexed meanwhile; the round's blocks are not reported yet.
    update = s.index.apply_events([pending(entry(5, put("e5", "t", "c"))), block(5, entry(5, put("e5", "t", "c")))])
    assert op(5) in update.indexed and op(5) in s.pending_ops()
    future.result(timeout=30)
    update = s.index.finish_chain_indexing()
    assert s.index.chain_indexed.height == 3 and sorted(update.indexed) == [op(2), op(3)]
    assert {c.operation_id for c in update.changes} == {op(2), op(3)}
    assert s.chain_ops() == {op(2), op(3)} and s.pending_ops() == {op(5)}
    assert s.index.finish_chain_indexing().indexed == [], "nothing left to finish"
    s = s.reopen()  # the progress names the round's blocks
    assert s.index.chain_indexed.height == 3
    s.close()


def test_deferred_round_ends_before_a_truncation_and_reports_once(tmp_path):
    s = Store(tmp_path, settings(min_depth=1, leeway=1, deferred=5))
    start(s, GENESIS, block(2, entry(2, put("e", "t", "a"))), block(3), caught_up(3))
    s.index.apply_events([block(4, entry(4, put("e4", "t", "b"))), block(5)])
    assert s.index.chain_indexed.height == 2
    assert s.index.start_chain_indexing() is not None  # blocks 3 and 4
    # A truncation after the round's blocks: the round ends first, its update comes with this batch.
    update = s.index.apply_events([TruncatedEvent(500)])
    assert s.index.chain_indexed.height == 4 and update.indexed == [op(4)]
    assert s.index.retained_offsets == []
    assert s.index.finish_chain_indexing().indexed == []
    s.close()


def test_deferred_indexing_disabled_with_zero(tmp_path):
    s = Store(tmp_path, settings(min_depth=1, leeway=1, deferred=None))
    start(s, GENESIS, caught_up(1))
    assert not s.index.deferred_indexing_due()
    s.index.apply_events([block(2, entry(2, put("e", "t", "a"))), block(3)])
    assert s.index.chain_indexed.height == 2
    s.close()


# --- truncation -----------------------------------------------------------------------------------


def test_truncation_forgets_retained_blocks_and_keeps_their_entries_pending(store):
    start(store, GENESIS, block(2), block(3), caught_up(3))
    assert store.index.chain_indexed == GENESIS.ref
    a, b = entry(4, put("ea", "t", "a")), entry(5, put("eb", "t", "b"))
    store.index.apply_events([block(4, a, b)])
    assert store.index.retained_offsets == [200, 300, 400]
    update = store.index.apply_events([TruncatedEvent(400), pending(a), pending(b)])
    assert not update.changed, "the pending index has no block offsets: nothing changes"
    assert store.index.retained_offsets == [200, 300]
    assert store.entities() == [("ea", ["a"]), ("eb", ["b"])]

    # The other fork's block at the same height holds only `b`; `a` stays pending.
    store.index.apply_events([block(4, b, tag="'")])
    assert store.index.last_block.hash == block(4, tag="'").ref.hash
    assert store.pending_ops() == {op(4), op(5)}


def test_a_different_block_at_a_retained_offset_is_a_truncation(store):
    start(store, GENESIS, block(2), block(3), block(4), caught_up(4))
    assert store.index.chain_indexed.height == 2
    store.index.apply_events([block(3, tag="x")])
    assert store.index.retained_offsets == [300]
    assert store.index.last_block.hash == block(3, tag="x").ref.hash


def test_a_truncation_into_the_chain_index_needs_a_full_reindex(store):
    start(store, GENESIS, block(2, entry(2, put("e", "t", "deep"))), block(3), block(4), caught_up(4))
    assert store.index.chain_indexed.height == 2
    with pytest.raises(FullReindexNeeded, match="deeper than chain_index_min_depth"):
        store.index.apply_events([TruncatedEvent(200)])
    store.index.reset_chain_index()
    assert store.index.chain_indexed is None and store.chain_ops() == set()
    request = store.index.start_replay()
    assert not request.has_from_block_offset
    store.index.apply_events([GENESIS, block(2, entry(2, put("e", "t", "deep"))), caught_up(2)])
    assert store.entities() == [("e", ["deep"])]


# --- delete operations ---------------------------------------------------------------------------


def test_delete_operations_marks_pending_then_removes_documents_and_payloads(tmp_path):
    s = Store(tmp_path, settings(min_depth=0, leeway=0))
    start(s, GENESIS, block(2, entry(1, put("e", "t1", "v1")), entry(2, put("e", "t1", "v2"))), caught_up(2))
    assert s.chain_ops() == {op(1), op(2)}
    marker = entry(3, delete_ops("e", op(1)))
    s.index.apply_events([pending(marker)])
    mutations = s.index.entity_mutations("e")
    assert {m.operation_id for m in mutations} == {op(1), op(2), op(3)}
    update = s.index.apply_events([block(3, marker)])
    assert s.chain_ops() == {op(2)} and s.pending_ops() == set()
    assert IndexChange(op(3), "e", None) in update.changes
    assert not s.payloads.contains(op(1)) and s.payloads.contains(op(2))
    assert s.entities() == [("e", ["v2"])]
    s.close()


# --- restart and resume ---------------------------------------------------------------------------


def feed_history(s: Store) -> None:
    start(
        s,
        GENESIS,
        block(2, entry(2, put("e2", "t", "two"))),
        block(3, entry(3, put("e3", "t", "three"))),
        block(4, entry(4, put("e4", "t", "four"))),
        block(5, entry(5, put("e2", "t", "two again"))),
        block(6, entry(6, put("e6", "t", "six"))),
        pending(entry(7, put("e7", "t", "seven"))),
        caught_up(6, op(7)),
    )


def test_a_restart_resumes_from_the_chain_indexed_block_without_decrypting_again(tmp_path):
    s = Store(tmp_path, settings())
    feed_history(s)
    indexed = s.index.chain_indexed
    assert indexed.height == 4
    before = s.entities()
    s = s.reopen(key=OTHER_KEY)  # the payloads are local: the key is not even needed to resume
    assert s.index.chain_indexed == indexed
    # Before the replay: what the chain index holds (blocks up to height 4) answers queries.
    assert s.entities() == [("e2", ["two"]), ("e3", ["three"]), ("e4", ["four"])]
    request = s.index.start_replay()
    assert request.has_from_block_offset and request.from_block_offset == indexed.offset
    assert request.from_block_hash.hex() == indexed.hash  # a chain without that block makes us reindex
    s.index.apply_events(
        [
            block(5, entry(5, put("e2", "t", "two again"))),
            block(6, entry(6, put("e6", "t", "six"))),
            pending(entry(7, put("e7", "t", "seven"))),
            caught_up(6, op(7)),
        ]
    )
    assert s.entities() == before
    assert s.index.progress.last_pending_operation_id == op(7)
    s.close()


def test_a_wiped_store_folder_rebuilds_from_the_chain(tmp_path):
    s = Store(tmp_path, settings())
    feed_history(s)
    before = s.entities()
    s.close()
    shutil.rmtree(tmp_path)
    s = Store(tmp_path, settings())
    assert s.index.chain_indexed is None
    feed_history(s)
    assert s.entities() == before
    s.close()


def test_a_chain_index_that_does_not_match_the_progress_is_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    s = Store(tmp_path, settings())
    feed_history(s)
    s.close()
    shutil.rmtree(tmp_path / "chain")
    s = Store(tmp_path, settings())
    assert "does not match the stored progress" in caplog.text
    assert s.index.chain_indexed is None
    assert not s.index.start_replay().has_from_block_offset
    s.close()


def test_an_interrupted_chain_index_commit_is_replayed_without_duplicates(tmp_path):
    s = Store(tmp_path, settings())
    feed_history(s)
    stale = s.index.progress
    s.index.apply_events([block(7), block(8)])  # blocks 5 and 6 go to the chain index
    assert s.index.chain_indexed.height == 6
    s.payloads.save_progress(stale)  # as if killed between the chain commit and the progress write
    s = s.reopen()
    assert s.index.chain_indexed.height == 4
    feed = [
        block(5, entry(5, put("e2", "t", "two again"))),
        block(6, entry(6, put("e6", "t", "six"))),
        block(7),
        block(8),
        caught_up(8),
    ]
    s.index.start_replay()
    s.index.apply_events(feed)
    assert s.index.chain_indexed.height == 6
    assert s.index.chain.count() == 5, "each operation once in the chain index"
    s.close()


def test_a_replay_builds_a_new_pending_index_while_the_old_one_answers(store):
    feed_history(store)
    before = store.entities()
    store.index.start_replay()  # e.g. after a StreamDiscontinuity
    store.index.apply_events([block(5, entry(5, put("e2", "t", "two again")))])
    assert store.entities() == before, "queries still see the complete old pending index"
    update = store.index.apply_events(
        [
            block(6, entry(6, put("e6", "t", "six"))),
            pending(entry(7, put("e7", "t", "seven"))),
            pending(entry(8, put("e8", "t", "eight"))),
            caught_up(6, op(8)),
        ]
    )
    assert update.reset and op(8) in update.indexed
    assert store.entities() == sorted([*before, ("e8", ["eight"])])


# --- chain events -----------------------------------------------------------------------------


def test_chain_events_convert_to_index_events():
    cell_key = Keypair.generate()
    node_key = Keypair.generate()
    genesis = build_genesis("cell", cell_key)
    ops = sign_operations([new_entry_op(op(1), "node", b"sealed")], node_key)
    events = [
        chain_pb2.ChainEvent(block=genesis.to_proto()),
        chain_pb2.ChainEvent(pending=chain_pb2.PendingOperation(operation=ops[0].to_proto())),
        chain_pb2.ChainEvent(pending=chain_pb2.PendingOperation(operation=chain_pb2.SignedOperation())),
        chain_pb2.ChainEvent(caught_up=chain_pb2.CaughtUp(last_block_offset=0, last_pending_operation_id=op(1))),
        chain_pb2.ChainEvent(truncated=chain_pb2.ChainTruncated(from_offset=5)),
        chain_pb2.ChainEvent(discontinuity=chain_pb2.StreamDiscontinuity()),
    ]
    converted = events_from_proto(events)
    block_event = converted[0]
    assert isinstance(block_event, BlockEvent) and block_event.ref == BlockRef(0, 1, genesis.hash.hex())
    assert block_event.split(set()) == ((), [])
    assert converted[1:] == [
        PendingEvent(ChainEntry(op(1), b"sealed")),
        CaughtUpEvent(0, op(1)),
        TruncatedEvent(5),
    ]


def _block_of(operations: list[chain_pb2.SignedOperation], header_ids: list[int]) -> BlockEvent:
    """The BlockEvent `events_from_proto` makes of a block whose header lists `header_ids`."""
    header = chain_pb2.BlockHeader(
        offset=100, height=2, operations_header=[chain_pb2.BlockOperationHeader(operation_id=i) for i in header_ids]
    )
    block = chain_pb2.Block(header_bytes=header.SerializeToString(), operations=operations)
    [event] = events_from_proto([chain_pb2.ChainEvent(block=block)])
    assert isinstance(event, BlockEvent)
    return event


def _signed_entries() -> list[chain_pb2.SignedOperation]:
    """Entry operations op(1), op(2), op(3) with data b"e1", b"e2", b"e3"."""
    operations = [new_entry_op(op(i), "node", b"e%d" % i) for i in (1, 2, 3)]
    return [o.to_proto() for o in sign_operations(operations, Keypair.generate())]


def test_a_block_parses_only_the_operations_not_known_yet():
    signed = _signed_entries()
    event = _block_of(signed, [op(1), op(2), op(3)])
    assert event.split(set()) == ((op(1), op(2), op(3)), [ChainEntry(op(i), b"e%d" % i) for i in (1, 2, 3)])
    assert event.split({op(2)}) == ((op(1), op(2), op(3)), [ChainEntry(op(1), b"e1"), ChainEntry(op(3), b"e3")])
    # A known id is not parsed at all: its operation could be anything.
    garbage = chain_pb2.SignedOperation(operation_bytes=b"not an operation")
    event = _block_of([signed[0], garbage, signed[2]], [op(1), op(2), op(3)])
    assert event.split({op(2)}) == ((op(1), op(2), op(3)), [ChainEntry(op(1), b"e1"), ChainEntry(op(3), b"e3")])
    # Nor is one that a pending event of the same batch brings.
    assert event.split(set(), {op(2)}) == ((op(1), op(2), op(3)), [ChainEntry(op(1), b"e1"), ChainEntry(op(3), b"e3")])
    # An operation that is not an entry is left out, as before.
    assert event.split(set()) == ((op(1), op(3)), [ChainEntry(op(1), b"e1"), ChainEntry(op(3), b"e3")])


def test_a_block_whose_header_disagrees_with_its_operations_is_parsed_whole():
    signed = _signed_entries()
    swapped = _block_of(signed, [op(1), op(3), op(2)])
    assert swapped.split({op(3)}) == ((op(1), op(2), op(3)), [ChainEntry(op(1), b"e1"), ChainEntry(op(2), b"e2")])
    short = _block_of(signed, [op(1), op(2)])
    assert short.split({op(1)}) == ((op(1), op(2), op(3)), [ChainEntry(op(2), b"e2"), ChainEntry(op(3), b"e3")])


def test_given_block_entries_split_as_parsed_ones():
    event = BlockEvent(BlockRef(100, 2, "aa"), (ChainEntry(op(1), b"e1"), ChainEntry(op(2), b"e2")))
    assert event.split({op(1)}) == ((op(1), op(2)), [ChainEntry(op(2), b"e2")])


def test_a_pending_event_for_a_chain_indexed_operation_is_ignored(tmp_path):
    s = Store(tmp_path, settings(min_depth=0, leeway=0))
    old = entry(1, put("e", "t", "old"))
    start(s, GENESIS, block(2, old), caught_up(2))
    assert s.chain_ops() == {op(1)}
    update = s.index.apply_events([pending(old), pending(entry(2, put("e2", "t", "new")))])
    assert update.indexed == [op(2)]
    assert s.pending_ops() == {op(2)}
    s.close()


def test_pending_batches_are_asked_for_and_converted(store):
    assert store.index.start_replay().pending_batches
    node_key = Keypair.generate()
    ops = sign_operations([new_entry_op(op(i), "node", f"sealed {i}".encode()) for i in (1, 2, 3)], node_key)
    batch = chain_pb2.PendingOperations(operations=[o.to_proto() for o in ops] + [chain_pb2.SignedOperation()])
    converted = events_from_proto([chain_pb2.ChainEvent(pending_batch=batch)])
    assert converted == [PendingEvent(ChainEntry(op(i), f"sealed {i}".encode())) for i in (1, 2, 3)]


def test_type_fingerprints_are_deterministic_and_per_type():
    from exostore.schema import IndexSchema

    first, again = IndexSchema(TraitRegistry()), IndexSchema(TraitRegistry())
    prints = first.type_fingerprints()
    assert prints == again.type_fingerprints()
    assert "exocore.test.TestMessage" in prints
    assert len(set(prints.values())) > 1  # a digest of each type's own mapping
    assert IndexSchema(TraitRegistry(builtins=False)).type_fingerprints() == {}


def test_a_chain_index_is_rebuilt_when_a_type_it_holds_is_mapped_otherwise(tmp_path, caplog, monkeypatch):
    from exostore.schema import IndexSchema

    caplog.set_level(logging.INFO)
    real = IndexSchema.type_fingerprints
    s = Store(tmp_path, settings())
    feed_history(s)
    assert s.index.chain_indexed is not None
    s = s.reopen()
    assert s.index.chain_indexed is not None  # same mappings: resumed
    s.close()

    # A new type (an app installed): no other type's documents change, the index is kept.
    monkeypatch.setattr(IndexSchema, "type_fingerprints", lambda self: {**real(self), "app.Note": "n1"})
    s = Store(tmp_path, settings())
    assert s.index.chain_indexed is not None
    s.close()

    # A type's indexed fields changed (a new version of that app's schema): its documents on disk were
    # indexed with other pool slots.
    monkeypatch.setattr(IndexSchema, "type_fingerprints", lambda self: {**real(self), "app.Note": "n2"})
    s = Store(tmp_path, settings())
    assert "the indexed fields of app.Note changed" in caplog.text
    assert s.index.chain_indexed is None
    assert not s.index.start_replay().has_from_block_offset  # everything again, from the genesis
    s.close()


def test_a_chain_index_built_with_another_tantivy_schema_is_rebuilt(tmp_path, caplog):
    import shutil

    import tantivy

    caplog.set_level(logging.INFO)
    s = Store(tmp_path, settings())
    feed_history(s)
    assert s.index.chain_indexed is not None
    chain_path = s.index._chain_path
    s.close()
    # what an older store version might have left: an index whose fields differ from this schema's
    shutil.rmtree(chain_path)
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("entity_id", stored=True)
    chain_path.mkdir()
    tantivy.Index(builder.build(), path=str(chain_path), reuse=True)
    s = Store(tmp_path, settings())
    assert "was built with another tantivy schema; rebuilding it from the chain" in caplog.text
    assert s.index.chain_indexed is None
    assert not s.index.start_replay().has_from_block_offset  # everything again, from the genesis
    s.close()


def test_a_chain_index_without_recorded_mappings_is_rebuilt(tmp_path, caplog):
    from exostore.entity_index import MAPPINGS_FILE

    caplog.set_level(logging.INFO)
    s = Store(tmp_path, settings())
    feed_history(s)
    s.close()
    (tmp_path / MAPPINGS_FILE).unlink()  # a store from before mappings were recorded
    s = Store(tmp_path, settings())
    assert "does not record the trait mappings" in caplog.text
    assert s.index.chain_indexed is None
    s.close()
