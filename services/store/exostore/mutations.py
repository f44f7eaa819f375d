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

`AppendBatcher` is the group commit of the Mutate path: the sealed entries of concurrent requests go
to the chain in one `ChainLog.Append` (one RPC, one input and one disk sync on the chain for the
lot), each request getting back its own operation ids.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence

from google.protobuf.message import DecodeError

from exocommon.errors import Internal, InvalidArgument
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
# `AppendBatcher`'s `gather_s` applies from this many appends waiting or in flight.
GATHER_MIN_CALLERS = 8


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
    """The request's mutations, validated whole and with their ids (see module docstring). The ids are
    set on the request's own messages (no copies: the request is the caller's, parsed for this call)."""
    if len(request.mutations) > MAX_MUTATIONS:
        raise InvalidArgument(f"a request holds at most {MAX_MUTATIONS} mutations, got {len(request.mutations)}")
    for index, mutation in enumerate(request.mutations):
        _check_mutation(index, mutation, registry)

    prepared: list[mutation_pb2.EntityMutation] = []
    previous_entity: str | None = None
    total = 0
    for index, mutation in enumerate(request.mutations):
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


class _PendingAppend:
    __slots__ = ("entries", "size", "future")

    def __init__(self, entries: list[bytes], future: asyncio.Future[list[int]]) -> None:
        self.entries = entries
        self.size = sum(len(entry) for entry in entries)
        self.future = future


class AppendBatcher:
    """Group commit: gathers the entries of concurrent appends into one chain `Append` (event loop only).

    With nothing in flight an append is sent at once (no added latency when alone); while
    `max_in_flight` Appends are in flight, new appends wait and then leave together in the next one,
    in arrival order, up to `max_entries` entries and `max_bytes` bytes (one append alone always goes,
    whatever its size). Each caller gets the ids of its own entries, or the batch's error. One append's
    entries are never split over two Appends, so a request stays all or nothing.

    With `gather_s`, while at least `gather_min_callers` appends are waiting (or in flight), a batch
    waits `gather_s` for more appends before it leaves: under load an Append then carries more
    entries (the chain's cost per Append is mostly fixed); a caller alone never waits.

    `send(entries)` performs one Append and returns one id per entry (or raises an `ExocoreError`).
    If a batch of several appends fails with `InvalidArgument` (which writes nothing), each append is
    sent again alone, so that only the one at fault gets the error. A caller cancelled while waiting
    is left out of the batch; one cancelled once its batch is sent does not stop the batch.
    """

    def __init__(
        self,
        send: Callable[[list[bytes]], Awaitable[list[int]]],
        *,
        max_in_flight: int = 1,
        max_entries: int = MAX_MUTATIONS,
        max_bytes: int = MAX_REQUEST_ENTRY_BYTES,
        gather_s: float = 0.0,
        gather_min_callers: int = GATHER_MIN_CALLERS,
    ) -> None:
        if max_in_flight < 1 or max_entries < 1 or max_bytes < 1:
            raise ValueError("max_in_flight, max_entries and max_bytes must be at least 1")
        self._send = send
        self.gather_s = gather_s
        self.gather_min_callers = gather_min_callers
        self._callers = 0  # appends not answered yet
        self.max_in_flight = max_in_flight
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._waiting: deque[_PendingAppend] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.appends_sent = 0  # Append calls made (for tests and statistics)

    async def append(self, entries: Sequence[bytes]) -> list[int]:
        """The operation ids of `entries` (in order), once the chain has them durably."""
        if not entries:
            raise InvalidArgument("append needs at least one entry")
        pending = _PendingAppend(list(entries), asyncio.get_running_loop().create_future())
        self._waiting.append(pending)
        self._callers += 1
        try:
            self._start_batches()
            return await pending.future
        finally:
            self._callers -= 1

    def _start_batches(self) -> None:
        while self._in_flight < self.max_in_flight and self._waiting:
            gather = self.gather_s > 0 and self._callers >= self.gather_min_callers
            batch = None if gather else self._next_batch()  # None: taken once gathered
            if batch is not None and not batch:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch), name="chain-append")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if gather:
                return  # the gathering batch takes what waits; more start when it is sent

    def _next_batch(self) -> list[_PendingAppend]:
        batch: list[_PendingAppend] = []
        count = size = 0
        while self._waiting:
            pending = self._waiting[0]
            if pending.future.done():  # its caller was cancelled
                self._waiting.popleft()
                continue
            if batch and (count + len(pending.entries) > self.max_entries or size + pending.size > self.max_bytes):
                break
            self._waiting.popleft()
            batch.append(pending)
            count += len(pending.entries)
            size += pending.size
        return batch

    async def _run(self, batch: list[_PendingAppend] | None) -> None:
        try:
            if batch is None:
                await asyncio.sleep(self.gather_s)
                batch = self._next_batch()
                if not batch:
                    return
            await self._send_batch(batch)
        finally:
            self._in_flight -= 1
            self._start_batches()

    async def _send_batch(self, batch: list[_PendingAppend]) -> None:
        entries = batch[0].entries if len(batch) == 1 else [e for pending in batch for e in pending.entries]
        try:
            self.appends_sent += 1
            ids = await self._send(entries)
            if len(ids) != len(entries):
                raise Internal(f"the chain answered {len(ids)} operation ids for {len(entries)} entries")
        except InvalidArgument as exc:
            if len(batch) == 1:
                _settle(batch[0].future, error=exc)
                return
            # Nothing was written: find the append at fault by sending each alone.
            await asyncio.gather(*(self._send_batch([pending]) for pending in batch))
            return
        except BaseException as exc:  # every caller of the batch gets the failure
            for pending in batch:
                _settle(pending.future, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for pending in batch:
            end = start + len(pending.entries)
            _settle(pending.future, result=ids[start:end])
            start = end


def _settle(
    future: asyncio.Future[list[int]], result: list[int] | None = None, error: BaseException | None = None
) -> None:
    if future.done():  # the caller was cancelled: nobody waits for this
        return
    if error is not None:
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


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
    "AppendBatcher",
    "MAX_MUTATIONS",
    "MAX_MUTATION_BYTES",
    "OperationTracker",
    "prepare_mutations",
]
