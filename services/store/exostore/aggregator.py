"""Entity aggregation (SPEC 3.5): fold every indexed mutation of one entity into its current state.

The mutations of an entity come from both mutation indices (pending and chain). They are merged in
the order they got committed: by block offset (pending mutations, which have none, come last), then by
operation id; an operation found in both indices is kept once (its chain copy, which sorts first).

Folding rules, in that order:

* every mutation (including the ones discarded below) feeds its operation id, as 8 little-endian bytes,
  into a CRC-64/ECMA-182 digest: the **entity hash**, which changes whenever a mutation of the entity is
  added or removed; and counts in `mutation_count`;
* ``TraitPut``: discarded if the trait already has a greater last operation id (an older write that got
  committed later loses). Otherwise the trait's previous operation leaves the active set and this one
  enters it; trait creation = min(existing, explicit creation date or op time); trait modification =
  max(existing, explicit modification date, else op time if the trait already existed); trait deletion
  cleared; entity creation = min(…, trait creation); entity modification = max(…, trait modification or
  creation); entity deletion cleared;
* ``TraitTombstone``: discarded if older than the trait's last operation; else it replaces the trait's
  active operation, resets the trait's dates and sets its deletion date to the op time; entity
  modification = max(…, op time); when every known trait is deleted, the entity is deleted (creation and
  modification cleared, deletion = op time);
* ``EntityTombstone``: discarded if older than the entity's last operation; else every known trait is
  deleted, the active set becomes {this op} and the entity is deleted;
* ``PendingDeletion``: only sets `pending_deletion`.

Non-discarded mutations update `last_operation_id` (max), `last_block_offset` and `in_pending` (as the
original, a discarded mutation does not). At the end, a modification date equal to the creation date
is dropped. An operation id is a consistent timestamp: it doubles as the operation time in ns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from exocommon.hashing import CRC64_ECMA_182_POLY
from exostore.types import (
    EntityTombstoneMeta,
    MutationMetadata,
    PendingDeletionMeta,
    TraitPutMeta,
    TraitTombstoneMeta,
)

GC_INACTIVE_OPS_THRESHOLD = 10
"""`should_collect` when more than this many mutations of an entity are no longer active."""

_PENDING_OFFSET = float("inf")
_MASK64 = (1 << 64) - 1


def _crc64_tables() -> tuple[tuple[int, ...], ...]:
    """Slicing-by-8 tables of CRC-64/ECMA-182 (MSB first): ``tables[j][b]`` is the register after byte `b`
    then `j` zero bytes, from 0."""
    first = []
    for byte in range(256):
        crc = byte << 56
        for _ in range(8):
            crc = ((crc << 1) ^ CRC64_ECMA_182_POLY) & _MASK64 if crc >> 63 else (crc << 1) & _MASK64
        first.append(crc)
    tables = [tuple(first)]
    for _ in range(7):
        previous = tables[-1]
        tables.append(tuple(first[value >> 56] ^ ((value << 8) & _MASK64) for value in previous))
    return tuple(tables)


_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _crc64_tables()


def crc64_of_u64s(values: Iterable[int]) -> int:
    """`exocommon.hashing.crc64_of_u64s` (CRC-64/ECMA-182 over each value as 8 little-endian bytes) a word at
    a time: every entity aggregated and every page hashes this way, and the byte-wise loop cost ~2.5 us a
    value. The 8 bytes shift the whole register out, so the new register is the tables' sum over the bytes
    of (register XOR the bytes read as a big-endian word)."""
    crc = 0
    for value in values:
        if not 0 <= value <= _MASK64:
            raise ValueError(f"value {value} does not fit in a u64")
        v = crc ^ int.from_bytes(value.to_bytes(8, "little"), "big")
        crc = (
            _T7[v >> 56]
            ^ _T6[(v >> 48) & 0xFF]
            ^ _T5[(v >> 40) & 0xFF]
            ^ _T4[(v >> 32) & 0xFF]
            ^ _T3[(v >> 24) & 0xFF]
            ^ _T2[(v >> 16) & 0xFF]
            ^ _T1[(v >> 8) & 0xFF]
            ^ _T0[v & 0xFF]
        )
    return crc


def _commit_order_key(mutation: MutationMetadata) -> tuple[float, int]:
    offset: float = _PENDING_OFFSET if mutation.block_offset is None else mutation.block_offset
    return (offset, mutation.operation_id)


def sort_mutations_commit_order(mutations: Iterable[MutationMetadata]) -> list[MutationMetadata]:
    """Mutations in commit order (block offset, pending last, then op id), each operation id once.

    When an operation is in both indices (briefly, while a block moves to the chain index), the copy with a
    block offset is kept.
    """
    ordered = sorted(mutations, key=_commit_order_key)
    seen: set[int] = set()
    result: list[MutationMetadata] = []
    for mutation in ordered:
        if mutation.operation_id in seen:
            continue
        seen.add(mutation.operation_id)
        result.append(mutation)
    return result


def _newer(current: int | None, new: int | None) -> int | None:
    """`current` replaced by `new` if `new` is later (an absent date is older than any date)."""
    if current is None or (new is not None and new > current):
        return new
    return current


def _older(current: int | None, new: int | None) -> int | None:
    """`current` replaced by `new` if `new` is earlier. As the original (Rust `Option` ordering), an absent
    `new` counts as earlier than any date; callers never pass one after a put."""
    if current is None or new is None or new < current:
        return new
    return current


@dataclass(slots=True)
class TraitAggregator:
    """Aggregated state of one trait of an entity."""

    trait_id: str
    put_mutations: list[MutationMetadata] = field(default_factory=list)
    last_operation_id: int | None = None
    creation_date: int | None = None
    modification_date: int | None = None
    deletion_date: int | None = None
    mutation_count: int = 0
    has_reference: bool = False

    @property
    def deleted(self) -> bool:
        return self.deletion_date is not None

    @property
    def last_put(self) -> MutationMetadata | None:
        """The last applied put of the trait (still the pre-deletion version when the trait is deleted)."""
        return self.put_mutations[-1] if self.put_mutations else None

    @property
    def last_put_meta(self) -> TraitPutMeta | None:
        last = self.last_put
        if last is None or not isinstance(last.mutation_type, TraitPutMeta):
            return None
        return last.mutation_type

    @property
    def trait_type(self) -> str | None:
        meta = self.last_put_meta
        return meta.trait_type if meta is not None else None

    def _push_put(self, mutation: MutationMetadata, put: TraitPutMeta) -> None:
        op_time = mutation.operation_id
        if put.modification_date is not None:
            modification: int | None = put.modification_date
        elif self.creation_date is not None:
            modification = op_time
        else:
            modification = None
        self.modification_date = _newer(self.modification_date, modification)
        creation = put.creation_date if put.creation_date is not None else op_time
        self.creation_date = _older(self.creation_date, creation)
        self.deletion_date = None
        self.has_reference = put.has_reference
        self.put_mutations.append(mutation)
        self.last_operation_id = mutation.operation_id
        self.mutation_count += 1

    def _push_delete(self, operation_id: int) -> None:
        self.creation_date = None
        self.modification_date = None
        self.deletion_date = operation_id
        self.last_operation_id = operation_id
        self.mutation_count += 1


@dataclass(slots=True)
class EntityAggregator:
    """Aggregated state of one entity, from all its indexed mutations (SPEC 3.5)."""

    entity_id: str
    traits: dict[str, TraitAggregator]
    active_operations: set[int]
    mutation_count: int
    hash: int
    creation_date: int | None
    modification_date: int | None
    deletion_date: int | None
    last_operation_id: int
    last_block_offset: int | None
    in_pending: bool
    pending_deletion: bool
    has_reference: bool

    @property
    def deleted(self) -> bool:
        return self.deletion_date is not None

    @property
    def should_collect(self) -> bool:
        """More than `GC_INACTIVE_OPS_THRESHOLD` mutations are overridden or deleted."""
        return self.mutation_count - len(self.active_operations) > GC_INACTIVE_OPS_THRESHOLD

    @classmethod
    def from_mutations(cls, mutations: list[MutationMetadata]) -> EntityAggregator:
        """Fold the mutations of one entity (any order, any index; duplicates allowed).

        Raises ValueError if the mutations belong to more than one entity.
        """
        if len(mutations) == 1 and isinstance(mutations[0].mutation_type, TraitPutMeta):
            return cls._single_put(mutations[0], mutations[0].mutation_type)
        return cls._fold(mutations)

    @classmethod
    def _single_put(cls, mutation: MutationMetadata, put: TraitPutMeta) -> EntityAggregator:
        """`_fold` of one put, the most common entity (a search aggregates a dozen per page), directly."""
        op_id = mutation.operation_id
        creation = put.creation_date if put.creation_date is not None else op_id
        modification = put.modification_date  # a new trait: only an explicit one
        trait = TraitAggregator(put.trait_id, [mutation], op_id, creation, modification, None, 1, put.has_reference)
        entity_modification = modification if modification is not None else creation
        return cls(
            entity_id=mutation.entity_id,
            traits={put.trait_id: trait},
            active_operations={op_id},
            mutation_count=1,
            hash=crc64_of_u64s((op_id,)),
            creation_date=creation,
            modification_date=None if entity_modification == creation else entity_modification,
            deletion_date=None,
            last_operation_id=op_id,
            last_block_offset=mutation.block_offset,
            in_pending=mutation.block_offset is None,
            pending_deletion=False,
            has_reference=put.has_reference,
        )

    @classmethod
    def _fold(cls, mutations: list[MutationMetadata]) -> EntityAggregator:
        entity_ids = {m.entity_id for m in mutations}
        if len(entity_ids) > 1:
            raise ValueError(f"mutations of several entities cannot be aggregated together: {sorted(entity_ids)}")
        entity_id = next(iter(entity_ids), "")

        ordered = sort_mutations_commit_order(mutations)
        traits: dict[str, TraitAggregator] = {}
        active: set[int] = set()
        creation: int | None = None
        modification: int | None = None
        deletion: int | None = None
        last_operation_id: int | None = None
        last_block_offset: int | None = None
        in_pending = False
        pending_deletion = False
        mutation_count = 0

        for mutation in ordered:
            mutation_count += 1
            op_id = mutation.operation_id
            kind = mutation.mutation_type

            if isinstance(kind, TraitPutMeta):
                agg = traits.get(kind.trait_id) or traits.setdefault(kind.trait_id, TraitAggregator(kind.trait_id))
                if agg.last_operation_id is not None:
                    if op_id < agg.last_operation_id:
                        continue  # older write committed later: discarded
                    active.discard(agg.last_operation_id)
                agg._push_put(mutation, kind)
                active.add(op_id)
                creation = _older(creation, agg.creation_date)
                modification = _newer(
                    modification, agg.modification_date if agg.modification_date is not None else agg.creation_date
                )
                deletion = None
            elif isinstance(kind, TraitTombstoneMeta):
                agg = traits.get(kind.trait_id) or traits.setdefault(kind.trait_id, TraitAggregator(kind.trait_id))
                if agg.last_operation_id is not None:
                    if op_id < agg.last_operation_id:
                        continue
                    active.discard(agg.last_operation_id)
                active.add(op_id)
                agg._push_delete(op_id)
                modification = _newer(modification, op_id)
                if all(t.deleted for t in traits.values()):
                    creation = None
                    modification = None
                    deletion = op_id
            elif isinstance(kind, EntityTombstoneMeta):
                if last_operation_id is not None and op_id < last_operation_id:
                    continue
                for agg in traits.values():
                    agg._push_delete(op_id)
                active.clear()
                active.add(op_id)
                creation = None
                modification = None
                deletion = op_id
            elif isinstance(kind, PendingDeletionMeta):
                pending_deletion = True
            else:  # pragma: no cover - MutationType is a closed union
                raise TypeError(f"unknown mutation type {kind!r}")

            if last_operation_id is None or op_id > last_operation_id:
                last_operation_id = op_id
            if mutation.block_offset is not None:
                last_block_offset = mutation.block_offset  # sorted by offset: always the latest
            else:
                in_pending = True

        if modification == creation:
            modification = None

        return cls(
            entity_id=entity_id,
            traits=traits,
            active_operations=active,
            mutation_count=mutation_count,
            hash=crc64_of_u64s(m.operation_id for m in ordered),
            creation_date=creation,
            modification_date=modification,
            deletion_date=deletion,
            last_operation_id=last_operation_id or 0,
            last_block_offset=last_block_offset,
            in_pending=in_pending,
            pending_deletion=pending_deletion,
            has_reference=any(not t.deleted and t.has_reference for t in traits.values()),
        )


__all__ = [
    "GC_INACTIVE_OPS_THRESHOLD",
    "crc64_of_u64s",
    "EntityAggregator",
    "TraitAggregator",
    "sort_mutations_commit_order",
]
