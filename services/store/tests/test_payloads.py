"""The store's local payload copy and indexing progress (LevelDB)."""

from __future__ import annotations

import plyvel
import pytest

from exocore.store import mutation_pb2
from exostore.payloads import BlockRef, PayloadStore, PayloadStoreInUse, Progress


def mutation(entity_id: str) -> mutation_pb2.EntityMutation:
    return mutation_pb2.EntityMutation(entity_id=entity_id, delete_entity=mutation_pb2.DeleteEntityMutation())


def test_payloads_survive_reopening_and_are_ordered_by_operation_id(tmp_path):
    store = PayloadStore(tmp_path / "payloads")
    store.put_many([(300, mutation("c").SerializeToString()), (2, mutation("a").SerializeToString())])
    store.put_many([(2**63 + 5, mutation("z").SerializeToString())], sync=True)
    store.close()

    store = PayloadStore(tmp_path / "payloads")
    assert store.operation_ids() == [2, 300, 2**63 + 5]
    assert store.get_mutation(300) == mutation("c")
    assert store.contains(2) and not store.contains(3)
    assert store.get(3) is None and store.get_mutation(3) is None
    store.delete_many([2, 3])
    assert store.operation_ids() == [300, 2**63 + 5]
    store.close()


def test_payloads_written_compressed_by_an_earlier_version_stay_readable(tmp_path):
    # Earlier versions let LevelDB compress tables (Snappy); this one writes them uncompressed.
    payload = mutation("a" * 2000).SerializeToString()  # compressible: Snappy really applies
    db = plyvel.DB(str(tmp_path / "payloads"), create_if_missing=True, compression="snappy")
    for operation_id in range(1, 2001):
        db.put(b"p" + operation_id.to_bytes(8, "big"), payload)
    db.compact_range()  # into tables, compressed
    db.close()

    store = PayloadStore(tmp_path / "payloads")
    assert store.get_mutation(1234) == mutation("a" * 2000)
    store.put_many([(5000, mutation("b").SerializeToString())], sync=True)
    assert len(store.operation_ids()) == 2001 and store.get_mutation(5000) == mutation("b")
    store.close()


def test_progress_round_trips_and_defaults_to_nothing(tmp_path):
    store = PayloadStore(tmp_path)
    assert store.progress() == Progress()
    progress = Progress("id1", BlockRef(10, 2, "aa"), BlockRef(40, 5, "bb"), 1234)
    store.save_progress(progress)
    store.close()
    store = PayloadStore(tmp_path)
    assert store.progress() == progress
    store.clear()
    assert store.progress() == Progress() and store.operation_ids() == []
    store.close()


def test_an_unreadable_progress_record_means_starting_over(tmp_path):
    store = PayloadStore(tmp_path)
    store._db.put(b"mprogress", b"{not json")
    assert store.progress() == Progress()
    store.close()


def test_a_stored_payload_that_does_not_parse_is_ignored(tmp_path):
    store = PayloadStore(tmp_path)
    store.put_many([(7, b"\xff\xff\xff")])
    assert store.get(7) == b"\xff\xff\xff"
    assert store.get_mutation(7) is None
    store.close()


def test_one_opener_at_a_time(tmp_path):
    store = PayloadStore(tmp_path)
    with pytest.raises(PayloadStoreInUse, match="in use"):
        PayloadStore(tmp_path)
    store.close()
    assert store.closed
    PayloadStore(tmp_path).close()
