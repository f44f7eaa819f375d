"""Garbage collection of indexed mutations (SPEC 3.9).

Searches flag entities that may have something to collect (`GarbageCollector.flag`, the searcher's
`gc_flagger`); a timer of the store calls `collect()` every `run_interval_secs` (when the chain
index holds at least one block), which re-reads each queued entity's mutations and returns the
`DeleteOperations` mutations to write. They go through the store's normal mutation path (sealed,
appended to the chain), so every replica, and every future replica replaying the chain, prunes
identically.

Rules for one entity (nothing while any of its mutations is in the pending index, or a pending
deletion marker exists):

* deleted for at least `deleted_entity_collection` -> all its operations;
* otherwise, per trait: deleted for at least `deleted_trait_collection` -> all the trait's puts and
  tombstones; else, with more than `trait_versions_leeway` mutations, among its operations older than
  `min_operation_age`, all but the newest `trait_versions_max` (never an active one).

An operation id is a consistent timestamp: it doubles as the operation's time in ns.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from exocore.store import mutation_pb2
from exostore.aggregator import EntityAggregator
from exostore.types import MutationMetadata, TraitPutMeta, TraitTombstoneMeta

log = logging.getLogger(__name__)

NS_PER_DAY = 86_400 * 1_000_000_000


@dataclass(frozen=True)
class GcConfig:
    """SPEC 3.10: only `queue_size` and `run_interval_secs` come from YAML; the rest are fixed."""

    run_interval_secs: float = 13
    queue_size: int = 500
    deleted_entity_collection_ns: int = 14 * NS_PER_DAY
    deleted_trait_collection_ns: int = 14 * NS_PER_DAY
    trait_versions_max: int = 5
    trait_versions_leeway: int = 7
    min_operation_age_ns: int = 7 * NS_PER_DAY


def _trait_id(mutation: MutationMetadata) -> str | None:
    kind = mutation.mutation_type
    if isinstance(kind, TraitPutMeta | TraitTombstoneMeta):
        return kind.trait_id
    return None


def may_collect(agg: EntityAggregator, now_ns: int, config: GcConfig) -> bool:
    """Cheap check on an aggregation: could `collectable_operations` find anything?"""
    if agg.in_pending or agg.pending_deletion:
        return False
    if agg.deletion_date is not None and now_ns - agg.deletion_date >= config.deleted_entity_collection_ns:
        return True
    for trait in agg.traits.values():
        if trait.deletion_date is not None and now_ns - trait.deletion_date >= config.deleted_trait_collection_ns:
            return True
        if trait.mutation_count > config.trait_versions_leeway:
            return True
    return False


def collectable_operations(
    mutations: Sequence[MutationMetadata], agg: EntityAggregator, now_ns: int, config: GcConfig
) -> list[int]:
    """Operation ids of the entity's mutations to delete (sorted; empty: nothing to do)."""
    if not mutations or agg.in_pending or agg.pending_deletion:
        return []
    all_ops = sorted({m.operation_id for m in mutations})
    if agg.deletion_date is not None and now_ns - agg.deletion_date >= config.deleted_entity_collection_ns:
        return all_ops
    by_trait: dict[str, list[int]] = {}
    for mutation in mutations:
        trait_id = _trait_id(mutation)
        if trait_id is not None:
            by_trait.setdefault(trait_id, []).append(mutation.operation_id)
    collect: set[int] = set()
    for trait_id, ops in by_trait.items():
        ops = sorted(set(ops))
        trait = agg.traits.get(trait_id)
        if trait is None:
            continue
        if trait.deletion_date is not None and now_ns - trait.deletion_date >= config.deleted_trait_collection_ns:
            collect.update(ops)
            continue
        if len(ops) > config.trait_versions_leeway:
            old = [op for op in ops if now_ns - op >= config.min_operation_age_ns]
            if len(old) > config.trait_versions_max:
                for op in old[: len(old) - config.trait_versions_max]:
                    if op in agg.active_operations:  # cannot happen: the newest version is kept
                        log.error("GC would delete active operation %d of entity %s; skipping it", op, agg.entity_id)
                        continue
                    collect.add(op)
    return sorted(collect)


class GarbageCollector:
    """The queue of flagged entities and the collection pass (see module docstring). Thread-safe."""

    def __init__(
        self,
        config: GcConfig,
        fetch_mutations: Callable[[str], list[MutationMetadata]],
        now_ns: Callable[[], int],
    ) -> None:
        self.config = config
        self._fetch = fetch_mutations
        self._now_ns = now_ns
        self._queue: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.dropped = 0

    def flag(self, agg: EntityAggregator) -> None:
        """Queues the entity if it has something to collect now (extra flags beyond the queue size are
        dropped: a later search flags them again)."""
        if not may_collect(agg, self._now_ns(), self.config):
            return
        with self._lock:
            if agg.entity_id in self._queue:
                return
            if len(self._queue) >= self.config.queue_size:
                self.dropped += 1
                return
            self._queue[agg.entity_id] = None

    @property
    def queued(self) -> list[str]:
        with self._lock:
            return list(self._queue)

    def collect(self) -> list[mutation_pb2.EntityMutation]:
        """Empties the queue; the DeleteOperations mutations to write."""
        with self._lock:
            entity_ids = list(self._queue)
            self._queue.clear()
        now = self._now_ns()
        out: list[mutation_pb2.EntityMutation] = []
        for entity_id in entity_ids:
            mutations = self._fetch(entity_id)
            if not mutations:
                continue
            agg = EntityAggregator.from_mutations(mutations)
            ops = collectable_operations(mutations, agg, now, self.config)
            if ops:
                out.append(
                    mutation_pb2.EntityMutation(
                        entity_id=entity_id,
                        delete_operations=mutation_pb2.DeleteOperationsMutation(operation_ids=ops),
                    )
                )
        return out


__all__ = ["GarbageCollector", "GcConfig", "collectable_operations", "may_collect"]
