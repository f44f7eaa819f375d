"""Values that cross the store's modules: what is indexed per mutation, and what a search of one
mutation index returns (SPEC 3.3-3.4). Plain frozen dataclasses, no tantivy types."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from exocore.store import entity_pb2, mutation_pb2


class DocumentType(enum.IntEnum):
    """`document_type` field of an index document (numbers as the original)."""

    TRAIT_TOMBSTONE = 0
    TRAIT_PUT = 1
    ENTITY_TOMBSTONE = 2
    PENDING_DELETION = 3


@dataclass(frozen=True, slots=True)
class PutTraitOperation:
    """Index a trait put: the trait message is kept to index its fields (not stored in the index)."""

    operation_id: int
    block_offset: int | None
    entity_id: str
    trait: entity_pb2.Trait


@dataclass(frozen=True, slots=True)
class TraitTombstoneOperation:
    operation_id: int
    block_offset: int | None
    entity_id: str
    trait_id: str


@dataclass(frozen=True, slots=True)
class EntityTombstoneOperation:
    operation_id: int
    block_offset: int | None
    entity_id: str


@dataclass(frozen=True, slots=True)
class PendingDeletionOperation:
    """Pending index only: a DeleteOperations mutation is waiting for the chain index."""

    operation_id: int
    entity_id: str


@dataclass(frozen=True, slots=True)
class DeleteOperationsOperation:
    """Remove every document whose operation id is listed."""

    operation_ids: tuple[int, ...]


IndexOperation = (
    PutTraitOperation
    | TraitTombstoneOperation
    | EntityTombstoneOperation
    | PendingDeletionOperation
    | DeleteOperationsOperation
)


def index_operations_for(
    operation_id: int, block_offset: int | None, mutation: mutation_pb2.EntityMutation, pending: bool
) -> list[IndexOperation]:
    """SPEC 3.3 table: what one EntityMutation becomes in the pending (`pending=True`) or chain index."""
    kind = mutation.WhichOneof("mutation")
    offset = None if pending else block_offset
    if kind == "put_trait":
        return [PutTraitOperation(operation_id, offset, mutation.entity_id, mutation.put_trait.trait)]
    if kind == "delete_trait":
        return [TraitTombstoneOperation(operation_id, offset, mutation.entity_id, mutation.delete_trait.trait_id)]
    if kind == "delete_entity":
        return [EntityTombstoneOperation(operation_id, offset, mutation.entity_id)]
    if kind == "delete_operations":
        if pending:
            return [PendingDeletionOperation(operation_id, mutation.entity_id)]
        return [DeleteOperationsOperation(tuple(mutation.delete_operations.operation_ids))]
    return []


@dataclass(frozen=True, slots=True)
class TraitPutMeta:
    trait_id: str
    trait_type: str
    creation_date: int | None  # explicit trait date in ns, None if the trait had none
    modification_date: int | None
    has_reference: bool


@dataclass(frozen=True, slots=True)
class TraitTombstoneMeta:
    trait_id: str


@dataclass(frozen=True, slots=True)
class EntityTombstoneMeta:
    pass


@dataclass(frozen=True, slots=True)
class PendingDeletionMeta:
    pass


MutationType = TraitPutMeta | TraitTombstoneMeta | EntityTombstoneMeta | PendingDeletionMeta


class SortKind(enum.Enum):
    SCORE = "score"  # float, higher is better in descending order
    UINT = "uint"  # operation id, dates (ns), unsigned fields
    INT = "int"  # signed sorted fields


@dataclass(frozen=True, slots=True)
class SortValue:
    """The value a mutation was ordered by in its index (a score or a fast field value)."""

    kind: SortKind
    value: float | int
    operation_id: int


@dataclass(frozen=True, slots=True)
class MutationMetadata:
    """One matching document of a mutation index (SPEC 3.4)."""

    operation_id: int
    block_offset: int | None  # None: the pending index
    entity_id: str
    mutation_type: MutationType
    sort_value: SortValue


@dataclass(frozen=True, slots=True)
class MutationResults:
    mutations: Sequence[MutationMetadata]  # a list, or a page built as it is read (`MutationIndex.search`)
    total: int  # matching documents in the index (estimated_count adds both indices)
