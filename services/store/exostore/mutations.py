"""Mutation requests (SPEC 3.2): whole-request validation and id assignment, and the tracker that
`wait_indexed` / `wait_committed` wait on.

`prepare_mutations(request, registry)` checks **every** mutation before anything is written (the
original wrote the mutations before an invalid one): a mutation kind this store does not know or
none, the test mutation, `delete_operations` (the garbage collector's, not a client's), a put without
trait or trait message, a malformed `Any` (type url without ``/``, or a registered type whose bytes do
not parse), a delete without trait or entity id, a mutation too big for one chain entry. The error is
an `InvalidArgument` naming the mutation's index. Then, as SPEC 3.2: an empty entity id reuses the
previous mutation's when `common_entity_id` is set, else gets ``et<uuid>``; an empty trait id of a put
gets ``trt<uuid>``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable

from google.protobuf.message import DecodeError

from exocommon.errors import InvalidArgument
from exocommon.ids import generate_entity_id, generate_trait_id
from exocore.store import mutation_pb2
from exostore.registry import TraitRegistry, type_name_from_url

# One mutation becomes one chain entry, sealed: 1 format byte + 24-byte nonce + 16-byte MAC.
SEAL_OVERHEAD = 1 + 24 + 16
MAX_ENTRY_BYTES = 4 * 1024 * 1024  # the chain's limit per entry (exochain.core.engine.MAX_ENTRY_BYTES)
MAX_MUTATION_BYTES = MAX_ENTRY_BYTES - SEAL_OVERHEAD
MAX_MUTATIONS = 10_000  # the chain's limit per Append
# The sealed entries of one request travel in one Append (the chain accepts messages up to 16 MiB).
MAX_REQUEST_ENTRY_BYTES = 16 * 1024 * 1024 - 64 * 1024


def _check_mutation(index: int, mutation: mutation_pb2.EntityMutation, registry: TraitRegistry) -> None:
    where = f"mutation {index}"
    kind = mutation.WhichOneof("mutation")
    if kind is None:
        unknown = sorted({number for number, _, _ in _unknown_fields(mutation)})
        if unknown:
            raise InvalidArgument(f"{where} has an unknown mutation kind (field number(s) {unknown})")
        raise InvalidArgument(f"{where} has no mutation set (put_trait, delete_trait or delete_entity)")
    if kind == "test":
        raise InvalidArgument(f"{where} is a test mutation, which the store refuses")
    if kind == "delete_operations":
        raise InvalidArgument(f"{where}: delete_operations is reserved to the store's garbage collector")
    if kind == "delete_trait" and not mutation.delete_trait.trait_id:
        raise InvalidArgument(f"{where}: delete_trait needs a trait_id")
    if kind != "put_trait":
        return
    put = mutation.put_trait
    if not put.HasField("trait"):
        raise InvalidArgument(f"{where}: put_trait has no trait")
    trait = put.trait
    if not trait.HasField("message"):
        raise InvalidArgument(f"{where}: the trait has no message")
    type_url = trait.message.type_url
    if "/" not in type_url or not type_name_from_url(type_url):
        raise InvalidArgument(
            f"{where}: malformed trait message: type_url {type_url!r} is not 'type.googleapis.com/<message name>'"
        )
    type_name = type_name_from_url(type_url)
    message_class = registry.message_class(type_name)
    if message_class is not None:
        try:
            message_class.FromString(trait.message.value)
        except DecodeError as exc:
            raise InvalidArgument(f"{where}: the trait message does not parse as {type_name}: {exc}") from None


def _unknown_fields(message: mutation_pb2.EntityMutation) -> list[tuple[int, int, object]]:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet

        return [(f.field_number, f.wire_type, f.data) for f in UnknownFieldSet(message)]
    except (ImportError, TypeError):  # pragma: no cover - older protobuf runtimes
        return []


def prepare_mutations(
    request: mutation_pb2.MutationRequest, registry: TraitRegistry
) -> list[mutation_pb2.EntityMutation]:
    """The request's mutations, validated whole and with their ids (see module docstring)."""
    if len(request.mutations) > MAX_MUTATIONS:
        raise InvalidArgument(f"a request holds at most {MAX_MUTATIONS} mutations, got {len(request.mutations)}")
    for index, mutation in enumerate(request.mutations):
        _check_mutation(index, mutation, registry)

    prepared: list[mutation_pb2.EntityMutation] = []
    previous_entity: str | None = None
    total = 0
    for index, original in enumerate(request.mutations):
        mutation = mutation_pb2.EntityMutation()
        mutation.CopyFrom(original)
        kind = mutation.WhichOneof("mutation")
        if not mutation.entity_id:
            if request.common_entity_id and previous_entity is not None:
                mutation.entity_id = previous_entity
            elif kind in ("delete_trait", "delete_entity"):
                raise InvalidArgument(f"mutation {index}: {kind} needs an entity_id")
            else:
                mutation.entity_id = generate_entity_id()
        if kind == "put_trait" and not mutation.put_trait.trait.id:
            mutation.put_trait.trait.id = generate_trait_id()
        previous_entity = mutation.entity_id
        size = mutation.ByteSize()
        if size > MAX_MUTATION_BYTES:
            raise InvalidArgument(
                f"mutation {index} is {size} bytes encoded; at most {MAX_MUTATION_BYTES} bytes fit in one "
                f"chain entry ({MAX_ENTRY_BYTES} bytes sealed)"
            )
        total += size + SEAL_OVERHEAD
        prepared.append(mutation)
    if total > MAX_REQUEST_ENTRY_BYTES:
        raise InvalidArgument(
            f"the request's mutations are {total} bytes sealed; at most {MAX_REQUEST_ENTRY_BYTES} per request"
        )
    return prepared


class _Waiter:
    __slots__ = ("event", "remaining")

    def __init__(self, remaining: set[int]) -> None:
        self.remaining = remaining
        self.event = asyncio.Event()


class OperationTracker:
    """Which operation ids became indexed / committed, and waiters on them (event loop only).

    Remembers the last `memory` ids of each kind, so that a waiter registered just after the event
    (the chain's stream can be faster than the Append answer) is resolved at once.
    """

    def __init__(self, memory: int = 200_000) -> None:
        self._memory = memory
        self._seen: dict[str, OrderedDict[int, None]] = {"indexed": OrderedDict(), "committed": OrderedDict()}
        self._waiters: dict[str, dict[int, list[_Waiter]]] = {"indexed": {}, "committed": {}}

    def mark_indexed(self, operation_ids: Iterable[int]) -> None:
        self._mark("indexed", operation_ids)

    def mark_committed(self, operation_ids: Iterable[int]) -> None:
        self._mark("committed", operation_ids)

    def _mark(self, kind: str, operation_ids: Iterable[int]) -> None:
        seen, waiters = self._seen[kind], self._waiters[kind]
        for op in operation_ids:
            seen[op] = None
            seen.move_to_end(op)
            for waiter in waiters.pop(op, ()):
                waiter.remaining.discard(op)
                if not waiter.remaining:
                    waiter.event.set()
        while len(seen) > self._memory:
            seen.popitem(last=False)

    def is_indexed(self, operation_id: int) -> bool:
        return operation_id in self._seen["indexed"]

    def is_committed(self, operation_id: int) -> bool:
        return operation_id in self._seen["committed"]

    async def wait_indexed(self, operation_ids: Iterable[int], timeout: float) -> set[int]:
        """Waits until every id is indexed; the ids still missing after `timeout` (empty: all)."""
        return await self._wait("indexed", operation_ids, timeout)

    async def wait_committed(self, operation_ids: Iterable[int], timeout: float) -> set[int]:
        return await self._wait("committed", operation_ids, timeout)

    async def _wait(self, kind: str, operation_ids: Iterable[int], timeout: float) -> set[int]:
        seen = self._seen[kind]
        remaining = {op for op in operation_ids if op not in seen}
        if not remaining:
            return set()
        waiter = _Waiter(remaining)
        waiters = self._waiters[kind]
        for op in remaining:
            waiters.setdefault(op, []).append(waiter)
        try:
            await asyncio.wait_for(waiter.event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            for op in list(waiter.remaining):
                lst = waiters.get(op)
                if lst is not None:
                    if waiter in lst:
                        lst.remove(waiter)
                    if not lst:
                        del waiters[op]
        return set(waiter.remaining)


__all__ = [
    "MAX_MUTATIONS",
    "MAX_MUTATION_BYTES",
    "OperationTracker",
    "prepare_mutations",
]
