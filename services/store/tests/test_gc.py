"""Garbage collection rules (SPEC 3.9 test expectations)."""

from __future__ import annotations

from exostore.aggregator import EntityAggregator
from exostore.gc import GarbageCollector, GcConfig, collectable_operations
from exostore.types import (
    EntityTombstoneMeta,
    MutationMetadata,
    PendingDeletionMeta,
    SortKind,
    SortValue,
    TraitPutMeta,
    TraitTombstoneMeta,
)

SEC = 10**9
T0 = 1_700_000_000 * SEC


def meta(op: int, kind, block_offset: int | None = 10) -> MutationMetadata:
    return MutationMetadata(op, block_offset, "e1", kind, SortValue(SortKind.UINT, op, op))


def put(op: int, trait: str = "t1", block_offset: int | None = 10) -> MutationMetadata:
    return meta(op, TraitPutMeta(trait, "exocore.test.TestMessage", None, None, False), block_offset)


def collect(mutations, now, config):
    return collectable_operations(mutations, EntityAggregator.from_mutations(mutations), now, config)


def run_gc(mutations, now, config) -> tuple[bool, list[int]]:
    """(flagged?, deleted operation ids) of one search + one GC pass."""
    gc = GarbageCollector(config, lambda _entity: list(mutations), lambda: now)
    gc.flag(EntityAggregator.from_mutations(mutations))
    flagged = gc.queued == ["e1"]
    produced = gc.collect()
    return flagged, [op for m in produced for op in m.delete_operations.operation_ids]


def test_deleted_entity_is_collected_after_the_delay():
    config = GcConfig(deleted_entity_collection_ns=1 * SEC)
    mutations = [put(T0), meta(T0 + 1, EntityTombstoneMeta())]
    assert run_gc(mutations, T0 + SEC // 2, config) == (False, [])
    assert run_gc(mutations, T0 + 2 * SEC, config) == (True, [T0, T0 + 1])


def test_deleted_trait_is_collected_with_its_puts():
    config = GcConfig(deleted_trait_collection_ns=1 * SEC)
    mutations = [put(T0, "trt1"), put(T0 + 1, "trt2"), meta(T0 + 2, TraitTombstoneMeta("trt1"))]
    assert run_gc(mutations, T0 + 2 * SEC, config) == (True, [T0, T0 + 2])


def test_trait_versions_are_compacted_beyond_the_leeway():
    versions = [put(T0 + i) for i in range(5)]
    now = T0 + 10 * SEC
    assert run_gc(versions, now, GcConfig(trait_versions_max=3, trait_versions_leeway=6, min_operation_age_ns=0)) == (
        False,
        [],
    )
    flagged, deleted = run_gc(
        versions, now, GcConfig(trait_versions_max=3, trait_versions_leeway=4, min_operation_age_ns=0)
    )
    assert flagged and deleted == [T0, T0 + 1]
    # Versions younger than the minimum age are kept.
    assert collect(versions, now, GcConfig(trait_versions_max=3, trait_versions_leeway=4)) == []


def test_nothing_is_collected_while_pending():
    config = GcConfig(deleted_entity_collection_ns=0)
    deleted = [put(T0), meta(T0 + 1, EntityTombstoneMeta())]
    assert collect(deleted, T0 + SEC, config) == [T0, T0 + 1]
    assert run_gc([put(T0), meta(T0 + 1, EntityTombstoneMeta(), block_offset=None)], T0 + SEC, config) == (False, [])
    marker = meta(T0 + 2, PendingDeletionMeta(), block_offset=None)
    assert run_gc([*deleted, marker], T0 + SEC, config) == (False, [])


def test_queue_is_bounded_and_deduplicated():
    config = GcConfig(deleted_entity_collection_ns=0, queue_size=1)
    gc = GarbageCollector(config, lambda _e: [], lambda: T0 + SEC)
    agg = EntityAggregator.from_mutations([put(T0), meta(T0 + 1, EntityTombstoneMeta())])
    gc.flag(agg)
    gc.flag(agg)
    other = EntityAggregator.from_mutations(
        [MutationMetadata(T0, 1, "e2", EntityTombstoneMeta(), SortValue(SortKind.UINT, T0, T0))]
    )
    gc.flag(other)
    assert gc.queued == ["e1"] and gc.dropped == 1
    assert gc.collect() == [], "an entity without mutations any more produces nothing"
