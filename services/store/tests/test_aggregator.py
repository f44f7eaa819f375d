"""SPEC 3.5: entity aggregation, every worked example plus hash / flags / GC threshold."""

from __future__ import annotations

import random

import pytest

from exocommon.hashing import crc64_of_u64s
from exostore import aggregator
from exostore.aggregator import EntityAggregator, TraitAggregator, sort_mutations_commit_order
from exostore.types import (
    EntityTombstoneMeta,
    MutationMetadata,
    PendingDeletionMeta,
    SortKind,
    SortValue,
    TraitPutMeta,
    TraitTombstoneMeta,
)

TYPE1 = "exocore.test.TestMessage"
ENTITY = "et1"


def _meta(op: int, block: int | None, kind) -> MutationMetadata:
    return MutationMetadata(op, block, ENTITY, kind, SortValue(SortKind.UINT, op, op))


def put(trait_id, block, op, created=None, modified=None, has_reference=False) -> MutationMetadata:
    return _meta(op, block, TraitPutMeta(trait_id, TYPE1, created, modified, has_reference))


def delete_trait(trait_id, block, op) -> MutationMetadata:
    return _meta(op, block, TraitTombstoneMeta(trait_id))


def delete_entity(block, op) -> MutationMetadata:
    return _meta(op, block, EntityTombstoneMeta())


def pending_deletion(op) -> MutationMetadata:
    return _meta(op, None, PendingDeletionMeta())


def agg(*mutations: MutationMetadata) -> EntityAggregator:
    return EntityAggregator.from_mutations(list(mutations))


def trait_dates(t: TraitAggregator):
    return (t.creation_date, t.modification_date, t.deletion_date)


def entity_dates(e: EntityAggregator):
    return (e.creation_date, e.modification_date, e.deletion_date)


# --- ordering and conflicts --------------------------------------------------------------------------------


def test_mutations_ordering():
    em = agg(
        put("t1", 2, 3),
        put("t3", 1, 0),
        put("t1", 1, 2),
        put("t2", 3, 5),
        put("t3", None, 6),
        put("t2", 1, 1),
        put("t2", 2, 4),
    )
    assert em.traits["t1"].last_operation_id == 3
    assert em.traits["t2"].last_operation_id == 5
    assert em.traits["t3"].last_operation_id == 6
    assert em.active_operations == {3, 5, 6}
    assert em.in_pending
    assert em.last_block_offset == 3
    assert em.last_operation_id == 6


def test_commit_order_puts_pending_last_and_dedups_by_operation_id():
    ordered = sort_mutations_commit_order(
        [put("t1", None, 1), put("t1", 5, 9), put("t1", 2, 7), put("t1", 2, 3), put("t1", 2, 7)]
    )
    assert [(m.block_offset, m.operation_id) for m in ordered] == [(2, 3), (2, 7), (5, 9), (None, 1)]
    # the same operation in both indices: the chain copy is kept, counted and hashed once
    both = sort_mutations_commit_order([put("t1", None, 4), put("t1", 8, 4)])
    assert [(m.block_offset, m.operation_id) for m in both] == [(8, 4)]
    em = agg(put("t1", None, 4), put("t1", 8, 4))
    assert em.mutation_count == 1
    assert not em.in_pending
    assert em.hash == crc64_of_u64s([4])


def test_put_trait_conflict_older_committed_later_is_discarded():
    em = agg(put("t1", 1, 2), put("t1", 2, 1))
    assert em.traits["t1"].last_operation_id == 2
    assert em.active_operations == {2}
    assert em.traits["t1"].last_put.operation_id == 2  # type: ignore[union-attr]
    # a discarded mutation still counts and is hashed, but does not move last_* markers
    assert em.mutation_count == 2
    assert em.hash == crc64_of_u64s([2, 1])
    assert em.last_block_offset == 1


def test_delete_trait():
    em = agg(put("t1", 1, 1), delete_trait("t1", 2, 2))
    assert em.deleted
    assert em.traits["t1"].deleted
    assert 2 in em.active_operations
    assert em.active_operations == {2}


def test_delete_trait_conflict():
    em = agg(put("t1", 1, 2), delete_trait("t1", 2, 1))
    assert em.traits["t1"].last_operation_id == 2
    assert em.active_operations == {2}
    assert not em.deleted
    assert not em.traits["t1"].deleted


def test_delete_entity():
    em = agg(put("t1", 1, 1), delete_entity(2, 2))
    assert em.deleted
    assert em.traits["t1"].deleted
    assert em.active_operations == {2}


def test_delete_entity_then_older_put_committed_later_applies():
    # the put is compared with the trait's last op (none), not with the entity tombstone
    em = agg(delete_entity(1, 2), put("t1", 2, 1))
    assert em.traits["t1"].last_operation_id == 1
    assert 1 in em.active_operations
    assert not em.deleted


def test_entity_tombstone_older_than_last_operation_is_discarded():
    em = agg(put("t1", 1, 5), delete_entity(2, 3))
    assert not em.deleted
    assert em.active_operations == {5}


def test_put_after_entity_tombstone_older_than_it_is_discarded():
    em = agg(put("t1", 1, 1), delete_entity(2, 5), put("t1", 3, 4))
    assert em.deleted
    assert em.active_operations == {5}


# --- dates ---------------------------------------------------------------------------------------------------


def test_trait_dates():
    assert trait_dates(agg(put("t1", 1, 1)).traits["t1"]) == (1, None, None)
    assert trait_dates(agg(put("t1", 1, 1), put("t1", 2, 2)).traits["t1"]) == (1, 2, None)
    # oldest explicit creation date wins
    assert trait_dates(agg(put("t1", 1, 5), put("t1", 2, 6, created=1)).traits["t1"]) == (1, 6, None)
    # the last operation overrides an older explicit modification date
    assert trait_dates(agg(put("t1", 1, 5, modified=2), put("t1", 2, 6), put("t1", 2, 7)).traits["t1"]) == (
        5,
        7,
        None,
    )
    # deleting the trait resets its dates
    assert trait_dates(agg(put("t1", 1, 5, modified=2), delete_trait("t1", 2, 6)).traits["t1"]) == (None, None, 6)
    # deleting the entity too
    assert trait_dates(agg(put("t1", 1, 5, modified=2), delete_entity(2, 6)).traits["t1"]) == (None, None, 6)


def test_entity_dates():
    assert entity_dates(agg(put("t1", 2, 10))) == (10, None, None)
    assert entity_dates(agg(put("t1", 2, 10, created=1, modified=2))) == (1, 2, None)
    assert entity_dates(agg(put("t1", 2, 10), put("t1", 3, 11))) == (10, 11, None)
    # a trait deletion counts as a modification
    em = agg(put("t1", 2, 10), put("t2", 2, 11), delete_trait("t1", 3, 12))
    assert entity_dates(em) == (10, 12, None)
    assert not em.deleted
    # deleting the last trait deletes the entity
    assert entity_dates(agg(put("t1", 2, 10), delete_trait("t1", 3, 11))) == (None, None, 11)
    # deleting the entity
    assert entity_dates(agg(put("t1", 2, 10), delete_entity(2, 11))) == (None, None, 11)
    # an entity deletion resets dates; a later put revives the entity
    em = agg(put("t1", 2, 1, created=10, modified=11), delete_entity(2, 2), put("t1", 3, 3, created=20, modified=21))
    assert entity_dates(em) == (20, 21, None)
    assert not em.deleted


def test_modification_equal_to_creation_is_dropped():
    em = agg(put("t1", 1, 10, created=5, modified=5))
    assert entity_dates(em) == (5, None, None)


# --- flags and hash --------------------------------------------------------------------------------------------


def test_hash_covers_every_operation_in_commit_order():
    mutations = [put("t1", 2, 30), put("t1", 1, 20), put("t2", None, 10), put("t1", 3, 25)]  # op 25 discarded
    em = agg(*mutations)
    assert em.hash == crc64_of_u64s([20, 30, 25, 10])
    assert em.hash == agg(*reversed(mutations)).hash  # independent of input order
    assert agg(*mutations[:3]).hash != em.hash  # any removed mutation changes it
    assert agg(*mutations, put("t3", None, 40)).hash != em.hash  # any added one too


def test_pending_deletion_and_in_pending():
    em = agg(put("t1", 1, 1), pending_deletion(2))
    assert em.pending_deletion
    assert em.in_pending
    assert em.last_operation_id == 2
    assert em.last_block_offset == 1
    assert em.active_operations == {1}
    em = agg(put("t1", 1, 1))
    assert not em.pending_deletion
    assert not em.in_pending


def test_has_reference_only_from_live_traits():
    assert agg(put("t1", 1, 1, has_reference=True)).has_reference
    assert not agg(put("t1", 1, 1)).has_reference
    # the last put decides
    assert not agg(put("t1", 1, 1, has_reference=True), put("t1", 1, 2)).has_reference
    # a deleted trait's reference does not count
    em = agg(put("t1", 1, 1, has_reference=True), put("t2", 1, 2), delete_trait("t1", 1, 3))
    assert not em.has_reference


def test_should_collect_threshold():
    # 11 puts of one trait: 10 inactive -> not yet
    em = agg(*(put("t1", 1, op) for op in range(1, 12)))
    assert em.mutation_count == 11
    assert em.active_operations == {11}
    assert not em.should_collect
    em = agg(*(put("t1", 1, op) for op in range(1, 13)))
    assert em.should_collect


def test_last_put_survives_deletion_and_trait_type():
    em = agg(put("t1", 1, 1), put("t1", 1, 2), delete_trait("t1", 1, 3))
    t1 = em.traits["t1"]
    assert t1.last_put is not None and t1.last_put.operation_id == 2
    assert t1.trait_type == TYPE1
    assert t1.last_operation_id == 3
    assert t1.mutation_count == 3


def test_tombstone_only_trait_has_no_put():
    em = agg(delete_trait("t9", 1, 1))
    assert em.traits["t9"].last_put is None
    assert em.traits["t9"].trait_type is None
    assert em.deleted


def test_empty_and_mixed_entities():
    em = agg()
    assert em.entity_id == "" and em.mutation_count == 0 and em.hash == 0 and em.last_operation_id == 0
    other = MutationMetadata(1, 1, "et2", TraitTombstoneMeta("t1"), SortValue(SortKind.UINT, 1, 1))
    with pytest.raises(ValueError):
        agg(put("t1", 1, 1), other)


def test_word_wise_crc_is_the_byte_wise_one():
    rng = random.Random(7)
    values = [0, 1, 255, 256, (1 << 63), (1 << 64) - 1, *(rng.getrandbits(64) for _ in range(200))]
    for count in (0, 1, 2, 5, len(values)):
        assert aggregator.crc64_of_u64s(values[:count]) == crc64_of_u64s(values[:count])
    with pytest.raises(ValueError):
        aggregator.crc64_of_u64s([1 << 64])


@pytest.mark.parametrize("block", [None, 0, 7])
@pytest.mark.parametrize("created", [None, 1, 10, 50])
@pytest.mark.parametrize("modified", [None, 1, 10, 50])
@pytest.mark.parametrize("has_reference", [False, True])
def test_a_single_put_aggregates_as_the_general_fold(block, created, modified, has_reference):
    mutation = put("t1", block, 10, created=created, modified=modified, has_reference=has_reference)
    assert EntityAggregator.from_mutations([mutation]) == EntityAggregator._fold([mutation])
