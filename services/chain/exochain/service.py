"""The chain service: a thin grpc.aio shell around the sans-IO engine (ARCHITECTURE.md).

Theory of operation
-------------------

* **One owner for the engine.** The engine is not thread safe; every call to it (`append`,
  `on_message`, `tick`, and the storage reads of the read RPCs) happens on the event loop thread,
  never across an `await`. Engine calls are synchronous, so two of them never interleave.
* **Input scheduling.** Appends, peer messages and ticks go through one input task
  (`_process_inputs`), one at a time: urgent ones first (ticks, and peer messages their sender
  marked urgent: block proposals and votes), then the others in arrival order. A commit takes a
  few messages between the nodes; behind a backlog of entry pushes and appends, each waited tens
  of milliseconds at every node.
* **Flow control.** An append waits while the peers' message backlogs are long (the slower peers
  for at most `append_peer_wait_max_s`) or while too many entries wait to be committed: appends
  cannot outrun replication and commits, so queues, the pending store and latencies stay bounded.
* **The driver task** calls `engine.tick(now)` every `tick_interval`. After *every* input (tick,
  append, delivered peer message) `_after_input` drains the engine: `take_outbox()` goes to the
  peer links, `take_events()` to the subscribers, once what they depend on is durable (raft's
  Ready order: persist, send, notify).
* **Group commit.** The service's LevelDB writes return once they reach the OS (a killed process
  loses none of them) without waiting for the disk; the outputs of an input are held until a
  storage sync covers its writes, and an `Append` is answered after that sync too. One sync runs at
  a time, in a worker thread, for everything written since the previous one: under load, many
  appends and messages share one disk flush, and the event loop never waits for the disk. When
  nothing waits and either inputs are sparse or the input is the only append under way, the sync
  runs on the event loop at once instead (the thread's hops would cost more than the sync). (With a
  storage whose writes are durable when they return, as in tests, outputs go out at once.)
* **Answer first.** An append is answered once its entries are durable; their push to the peers
  and the commit round they may allow (`Engine.after_append`) run right after, as an urgent input
  (2 ms later after an append alone, `ShellConfig.lone_append_push_delay_s`: appends made meanwhile
  go with the same push, and the caller reads its answer before the peers wake up to store it).
* **Peer links.** Each other chain node gets a `PeerLink`: bounded queues (the oldest message is
  dropped when one is full; pending sync and chain sync are anti-entropy protocols, so a lost
  message is repaired by a later round) and one task that signs each message in a `PeerEnvelope`
  and writes it to a `ChainPeer.DeliverStream` (acknowledged by the peer; `peer_deadline_s`
  without an acknowledgement fails the stream), `peer_in_flight_max` unacknowledged at most;
  urgent messages (the engine marks the commit manager's proposals and votes) have their own
  queue and stream, go first and do not count toward that limit. Pushes of local entries waiting in a queue
  are merged into one message (fewer calls, envelopes and inputs at the peer), and once delivered
  (in order) they are reported to the engine (`Engine.peer_received`: the proposer leaves out of its
  proposal the local entries its peers do not hold yet, which would make their votes wait). A dead
  or slow peer fills its own queues and nothing else: the engine never waits on the network.
* **Incoming envelopes** are authenticated before the engine sees them: right cell, sender a
  chain node of the cell (not us), addressed to us, Ed25519 signature of the sender's key over
  `canonical.peer_envelope_payload`, `sent_at` within `ENVELOPE_MAX_SKEW_NS` of our clock.
  Anything else is UNAUTHENTICATED.
* **Subscribers** (`ChainLog.Subscribe`) each have a bounded queue of `ChainEvent`s (pending batches
  waiting in it are merged into one event when the stream sends). The queue is
  registered *before* the replay of stored blocks and pending operations, so nothing written
  during the replay is missed; what the replay already sent is skipped when it comes out of the
  queue (blocks by offset, pending operations by id). A subscriber whose queue overflows gets a
  `StreamDiscontinuity` and its stream ends: it resubscribes from what it has.

Pending events carry entry operations only; block proposals, signatures and refusals are the
consensus' own business. A subscription that asks for `pending_batches` gets them as one
`pending_batch` event per engine event (an append, a received push) rather than one `pending` event
per operation: a stream message costs tens of microseconds of CPU on each side, more than
everything else an operation costs, so per-operation events cap a busy node's throughput. When fork
recovery removes blocks, subscribers get a `ChainTruncated` followed by the removed blocks' entries
as pending operations again (the engine emits them as new pending operations: it put them back in
the pending store).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from exochain.core.common import ChainCell, LocalChainNode, Outgoing
from exochain.core.engine import MAX_ENTRY_BYTES, ChainTruncated, Engine, EngineEvent, NewBlocks, NewPendingOperations
from exochain.model import BlockView, SignedOp, block_event_bytes, pending_batch_event_bytes, sign_payload
from exocommon import canonical
from exocommon.clock import Clock, TimeSource
from exocommon.config import Cell, Role
from exocommon.errors import InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from exocommon.grpc_util import create_channel
from exocommon.grpc_util.link import CHAIN_APPEND_METHOD as APPEND_METHOD
from exocommon.grpc_util.link import CHAIN_LOG_LINK_SERVICE, LinkHandler, link_registration, parse_request
from exocommon.ids import PeerId, consistent_clock_id
from exocore.chain.v1 import chain_pb2, chain_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

NS_PER_S = 1_000_000_000

# Envelopes whose sent_at is further than this from our clock are refused (replays, bad clocks).
ENVELOPE_MAX_SKEW_NS = 5 * 60 * NS_PER_S

# Request limits (INVALID_ARGUMENT beyond them).
APPEND_MAX_ENTRIES = 10_000
GET_OPERATIONS_MAX_IDS = 10_000
GET_BLOCKS_DEFAULT_COUNT = 100
GET_BLOCKS_MAX_COUNT = 1_000
# A GetBlocks answer stops adding blocks past this many encoded bytes (the channel limit is 16 MiB).
GET_BLOCKS_MAX_BYTES = 8 * 1024 * 1024

# A tick longer than this (or 10 tick intervals) is logged: the event loop served nothing meanwhile.
SLOW_TICK_S = 0.5
# A peer message whose handling takes longer than this is logged, with what it held.
SLOW_INPUT_S = 0.1
# Queued pending batches of a subscriber are merged into one event up to this many operations.
SUBSCRIBER_MERGE_OPERATIONS_MAX = 10_000
# Pushes queued for a peer are merged into one message up to this many bytes (see `PeerLink`).
PUSH_MERGE_BYTES_MAX = 4 * 1024 * 1024
# Inputs further apart than this count as sparse: their writes are synced on the event loop itself.
SPARSE_INPUTS_GAP_S = 0.02

# Replay reads from storage in batches of this many blocks / operations between two writes.
REPLAY_BATCH_BLOCKS = 64
REPLAY_BATCH_OPERATIONS = 512


class Durability(Protocol):
    """Storage whose writes are not durable when they return, made durable by `sync()`."""

    def has_unsynced_writes(self) -> bool: ...

    def sync(self) -> None:
        """Makes every write made before the call durable; called from a worker thread."""
        ...


@dataclass(frozen=True)
class ShellConfig:
    """Limits of the shell itself (the engine's are in `EngineConfig`)."""

    tick_interval_s: float = 0.1
    # Per peer: queued messages, calls in flight (urgent messages do not count), deadline of one call.
    peer_queue_len_max: int = 1_000
    peer_in_flight_max: int = 1
    peer_deadline_s: float = 5.0
    # Flow control: an append waits until the peers have fewer messages than this queued or in
    # flight (the slower ones for at most `append_peer_wait_max_s` once a quorum has), so that appends
    # cannot outrun replication (queues, then the pending store and the blocks, would grow without
    # bound and every latency with them).
    append_peer_backlog_max: int = 8
    append_peer_wait_max_s: float = 1.0
    # Flow control too: an append waits while this node holds this many entries not committed yet
    # (a chain that cannot keep up, or has no quorum, does not let the pending store grow without end).
    append_uncommitted_max: int = 10_000
    # After an append alone (no other under way), its push to the peers (and the commit round) wait
    # this long: on a machine the caller shares with the peers (a cell on one host, as the benchmark
    # and tests run it), the peers waking up to store the entries took the cores from the caller
    # reading its answer. A later append meanwhile rides along with the same push.
    lone_append_push_delay_s: float = 0.002
    # Per subscriber: buffered events (the original's events_stream_buffer_size); subscribers.
    subscriber_queue_len_max: int = 1_000
    subscribers_max: int = 256


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("engine input failed", exc_info=task.exception())


def _status_text(status: object) -> str:
    # EngineStatus says str, chain sync hands over its ChainSyncStatus enum: accept both.
    return status.value if isinstance(status, enum.Enum) else str(status)


def chain_cell_of(cell: Cell) -> ChainCell:
    """The cell's chain membership as the engine sees it."""
    chain_nodes = {str(node.node_id): node.public_key for node in cell.nodes_with_role(Role.CHAIN)}
    members = {str(node.node_id): node.public_key for node in cell.nodes.values()}
    return ChainCell(str(cell.id), cell.public_key, chain_nodes, members)


def peer_addresses_of(cell: Cell) -> dict[str, str]:
    """The chain address of every other chain node of the cell ("" when it has none)."""
    local = str(cell.local_node.node_id)
    return {
        str(node.node_id): node.addresses.chain
        for node in cell.nodes_with_role(Role.CHAIN)
        if str(node.node_id) != local
    }


# ---------------------------------------------------------------------------------------------
# Envelopes
# ---------------------------------------------------------------------------------------------


class EnvelopeSigner:
    """Wraps peer messages of this node in signed envelopes."""

    def __init__(self, cell_id: str, local: LocalChainNode, time_source: TimeSource) -> None:
        self.cell_id = cell_id
        self.local = local
        self._clock = Clock(consistent_clock_id(PeerId.from_str(local.node_id)), time_source)

    def seal(self, to_node_id: str, message: chain_pb2.PeerMessage, urgent: bool = False) -> chain_pb2.PeerEnvelope:
        message_bytes = message.SerializeToString()
        sent_at = self._clock.consistent_time()
        payload = canonical.peer_envelope_payload(self.cell_id, self.local.node_id, to_node_id, sent_at, message_bytes)
        return chain_pb2.PeerEnvelope(
            cell_id=self.cell_id,
            from_node_id=self.local.node_id,
            to_node_id=to_node_id,
            sent_at=sent_at,
            message_bytes=message_bytes,
            signature=sign_payload(self.local.keypair, payload),
            urgent=urgent,
        )


def open_envelope(
    envelope: chain_pb2.PeerEnvelope, cell: ChainCell, local_node_id: str, now_ns: int
) -> chain_pb2.PeerMessage:
    """The message of an envelope that passes every check; Unauthenticated (or InvalidArgument for
    an authentic but unparsable message) otherwise."""
    if envelope.cell_id != cell.cell_id:
        raise Unauthenticated(f"envelope is for cell {envelope.cell_id!r}, this is cell {cell.cell_id}")
    sender = envelope.from_node_id
    key = cell.chain_node_keys.get(sender)
    if key is None:
        raise Unauthenticated(f"sender {sender!r} is not a chain node of cell {cell.cell_id}")
    if sender == local_node_id:
        raise Unauthenticated(f"envelope claims to come from this node ({local_node_id})")
    if envelope.to_node_id != local_node_id:
        raise Unauthenticated(f"envelope is addressed to node {envelope.to_node_id!r}, this is node {local_node_id}")
    payload = canonical.peer_envelope_payload(
        envelope.cell_id, sender, envelope.to_node_id, envelope.sent_at, envelope.message_bytes
    )
    if not key.verify(payload, envelope.signature):
        raise Unauthenticated(f"envelope signature does not verify with the key of node {sender}")
    skew_ns = envelope.sent_at - now_ns
    if abs(skew_ns) > ENVELOPE_MAX_SKEW_NS:
        raise Unauthenticated(
            f"envelope sent_at is {skew_ns / NS_PER_S:+.0f} s from this node's clock "
            f"(at most {ENVELOPE_MAX_SKEW_NS // NS_PER_S} s allowed)"
        )
    try:
        return chain_pb2.PeerMessage.FromString(envelope.message_bytes)
    except DecodeError as exc:
        raise InvalidArgument(f"envelope message does not parse: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Peer links
# ---------------------------------------------------------------------------------------------

# A DeliverStream's receiver acknowledges at least every this many envelopes.
DELIVER_ACK_EVERY = 64
# A failed DeliverStream is opened again after this, doubling up to the max.
_STREAM_BACKOFF_INITIAL_S = 0.1
_STREAM_BACKOFF_MAX_S = 2.0
# Before opening a stream, wait this long at most for a connection (see `_connected`).
_PEER_CONNECT_WAIT_S = 2.0
# Reconnect quickly to a peer that comes back (grpc's default backoff grows to 120 s): at most 1 s
# after it listens (a connection attempt to a peer that is down costs next to nothing).
_PEER_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


async def _connected(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """Waits up to `timeout_s` for `channel` to be connected (it tries now).

    A stream opened on a channel that is not connected fails at once (no `wait_for_ready`), and
    what it carried is given up on: a peer that just came up is only reached at grpc's next
    reconnect attempt. Measured at a cell's start-up: a node's first messages to peers that started
    after it were lost that way, and the nodes synchronized only at their next periodic requests,
    5 s (after failures, up to 30 s) later; a node's first writes reached its peers that late."""
    if channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await channel.channel_ready()


class _PeerStreamError(Exception):
    """A DeliverStream ended or went wrong on the peer's side."""


class PeerLink:
    """Messages to one chain peer: bounded queues drained by one task (see module docstring).

    Transport: two `ChainPeer.DeliverStream` streams, one for urgent envelopes and one for the
    others; a stream message costs a fraction of a unary call's CPU on both sides (measured here:
    ~100 µs against ~430 µs per message, sender and receiver together), and entry pushes are one
    per append under light load. The peer acknowledges what it handled; an envelope counts as in
    flight until then. A stream that fails (the peer restarted, refused an envelope, or acknowledged
    nothing for `peer_deadline_s`) gives up on what it had in flight, as a failed call did (the
    anti-entropy rounds repair a lost push), and is opened again after a short backoff. A peer that
    does not know `DeliverStream` (UNIMPLEMENTED: an older version) gets one `Deliver` call per
    envelope instead."""

    def __init__(
        self,
        node_id: str,
        address: str,
        signer: EnvelopeSigner,
        config: ShellConfig,
        on_progress: Callable[[], None] | None = None,
        on_delivered: Callable[[str, int], None] | None = None,
    ) -> None:
        """`on_progress()`: a call ended; `on_delivered(node id, id)`: every push of local entries up
        to that id was delivered (or given up on), in order (see `Outgoing.own_up_to`)."""
        self.node_id = node_id
        self._on_progress = on_progress
        self._on_delivered = on_delivered
        # Bulk messages sent, in order: [highest local entry id it carries, done].
        self._sent_bulk: deque[list[int]] = deque()
        self.delivered_up_to = 0
        self._in_flight = 0
        self._bulk_in_flight = 0
        self.address = address
        self._signer = signer
        self._config = config
        self._queue: deque[tuple[chain_pb2.PeerMessage, int]] = deque()
        # Proposals and votes overtake the rest (see `Outgoing.urgent`).
        self._urgent: deque[tuple[chain_pb2.PeerMessage, int]] = deque()
        self._wakeup = {True: asyncio.Event(), False: asyncio.Event()}  # per lane: urgent, bulk
        self._reachable: bool | None = None
        # False once the peer answered DeliverStream with UNIMPLEMENTED: unary calls from then on.
        self.streams = True
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.merged = 0

    def offer(self, message: chain_pb2.PeerMessage, urgent: bool = False, own_up_to: int = 0) -> None:
        queue = self._urgent if urgent else self._queue
        if len(queue) >= self._config.peer_queue_len_max:
            queue.popleft()
            self.dropped += 1
            if self.dropped % 100 == 1:
                log.warning("queue to peer %s is full; dropping its oldest messages", self.node_id)
        queue.append((message, own_up_to))
        self._wakeup[urgent].set()

    async def run(self) -> None:
        """Sends queued messages: urgent ones at once, the others with at most `peer_in_flight_max`
        in flight (an urgent message never waits for a slot behind bulk ones)."""
        channel = create_channel(self.address, retry=False, options=_PEER_CHANNEL_OPTIONS)
        stub = chain_pb2_grpc.ChainPeerStub(channel)
        try:
            await asyncio.gather(self._lane(channel, stub, urgent=True), self._lane(channel, stub, urgent=False))
        finally:
            await channel.close()

    def _next(self, urgent: bool) -> tuple[chain_pb2.PeerEnvelope, list[int] | None] | None:
        """The next envelope of a lane, if it may be sent now, and its bulk record (None: urgent)."""
        if urgent:
            if not self._urgent:
                return None
            message, _ = self._urgent.popleft()
            sent = None
        else:
            if not self._queue or self._bulk_in_flight >= self._config.peer_in_flight_max:
                return None
            message, own_up_to = self._take_bulk()
            sent = [own_up_to, 0]
            self._sent_bulk.append(sent)
            self._bulk_in_flight += 1
        self._in_flight += 1
        return self._signer.seal(self.node_id, message, urgent=urgent), sent

    async def _wait(self, urgent: bool, timeout: float | None = None) -> None:
        event = self._wakeup[urgent]
        event.clear()
        if timeout is None:
            await event.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def _lane(self, channel: grpc.aio.Channel, stub: chain_pb2_grpc.ChainPeerStub, urgent: bool) -> None:
        backoff = _STREAM_BACKOFF_INITIAL_S
        while True:
            if not (self._urgent if urgent else self._queue):
                await self._wait(urgent)
                continue
            if not self.streams:
                await self._unary_lane(stub, urgent)
                return
            await _connected(channel, _PEER_CONNECT_WAIT_S)
            if await self._stream(stub, urgent):
                backoff = _STREAM_BACKOFF_INITIAL_S
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _STREAM_BACKOFF_MAX_S)

    async def _stream(self, stub: chain_pb2_grpc.ChainPeerStub, urgent: bool) -> bool:
        """One DeliverStream, for as long as it works; False when it ended (back off), True when the
        peer has no such method (`streams` is then False)."""
        call = stub.DeliverStream()
        # Per envelope written and not acknowledged: its bulk record (None: urgent), when written.
        in_flight: deque[tuple[list[int] | None, float]] = deque()
        acks = asyncio.create_task(self._read_acks(call, in_flight, urgent))
        acks.add_done_callback(lambda _: self._wakeup[urgent].set())
        deadline_s = self._config.peer_deadline_s
        failure: BaseException | None = None
        try:
            while not acks.done():
                item = self._next(urgent)
                if item is not None:
                    envelope, sent = item
                    in_flight.append((sent, time.monotonic()))
                    await call.write(envelope)
                    continue
                if in_flight and time.monotonic() - in_flight[0][1] > deadline_s:
                    raise TimeoutError(f"no acknowledgement for {deadline_s:g} s")
                await self._wait(urgent, deadline_s if in_flight else None)
            failure = acks.exception() or _PeerStreamError("the peer ended the stream")
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as exc:
            # A write to a stream that ended: the acknowledgement reader has the reason.
            failure = (acks.done() and not acks.cancelled() and acks.exception()) or exc
        finally:
            call.cancel()
            if not acks.done():
                acks.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acks
            if in_flight:
                self.failed += len(in_flight)
                self._done(in_flight, len(in_flight))
        if isinstance(failure, grpc.aio.AioRpcError) and failure.code() == grpc.StatusCode.UNIMPLEMENTED:
            log.info("peer %s at %s has no DeliverStream (older version): one call each", self.node_id, self.address)
            self.streams = False
            return True
        self._unreachable(failure)
        return False

    async def _read_acks(
        self, call: grpc.aio.StreamStreamCall, in_flight: deque[tuple[list[int] | None, float]], urgent: bool
    ) -> None:
        handled = 0
        async for ack in call:
            count = ack.handled - handled
            if count <= 0 or count > len(in_flight):
                raise _PeerStreamError(f"the peer acknowledged {ack.handled} envelopes after {handled}")
            handled = ack.handled
            self.sent += count
            self._done(in_flight, count)
            self._wakeup[urgent].set()
            self._reached()

    def _done(self, in_flight: deque[tuple[list[int] | None, float]], count: int) -> None:
        """The first `count` envelopes in flight are done: acknowledged or given up on."""
        bulk = False
        for _ in range(count):
            sent, _ = in_flight.popleft()
            self._in_flight -= 1
            if sent is not None:
                bulk = True
                self._bulk_in_flight -= 1
                sent[1] = 1  # done, delivered or given up on (anti-entropy repairs a lost push)
        if bulk:
            self._advance_delivered()
        if self._on_progress is not None:
            self._on_progress()

    def _reached(self) -> None:
        if self._reachable is False:
            log.info("peer %s at %s is reachable again", self.node_id, self.address)
        self._reachable = True

    def _unreachable(self, failure: BaseException) -> None:
        if self._reachable is not False:
            if isinstance(failure, grpc.aio.AioRpcError):
                detail = f"{failure.code().name} {failure.details()}"
            else:
                detail = str(failure) or type(failure).__name__
            log.warning("cannot deliver to peer %s at %s: %s", self.node_id, self.address, detail)
        self._reachable = False

    async def _unary_lane(self, stub: chain_pb2_grpc.ChainPeerStub, urgent: bool) -> None:
        """One `Deliver` call per envelope (peers without DeliverStream)."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                item = self._next(urgent)
                if item is None:
                    await self._wait(urgent)
                    continue
                envelope, sent = item
                task = asyncio.create_task(self._deliver(stub, envelope, sent, urgent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _deliver(
        self, stub: chain_pb2_grpc.ChainPeerStub, envelope: chain_pb2.PeerEnvelope, sent: list[int] | None, urgent: bool
    ) -> None:
        in_flight: deque[tuple[list[int] | None, float]] = deque([(sent, 0.0)])
        try:
            await stub.Deliver(envelope, timeout=self._config.peer_deadline_s)
        except grpc.aio.AioRpcError as exc:
            self.failed += 1
            self._unreachable(exc)
        else:
            self.sent += 1
            self._reached()
        finally:
            self._done(in_flight, 1)
            self._wakeup[urgent].set()

    def _take_bulk(self) -> tuple[chain_pb2.PeerMessage, int]:
        """The next bulk message; consecutive pushes of local entries waiting behind it (same height
        filter) are merged into it, up to `PUSH_MERGE_BYTES_MAX` bytes of ranges: one call, one
        envelope and one input at the peer for several appends (their ranges are independent, and a
        request may hold any number of them)."""
        message, own_up_to = self._queue.popleft()
        if own_up_to == 0 or not self._queue or self._queue[0][1] == 0:
            return message, own_up_to
        request = message.pending_sync
        merged: chain_pb2.PendingSyncRequest | None = None
        size = request.ByteSize()
        while self._queue and self._queue[0][1] > 0:
            following = self._queue[0][0].pending_sync
            following_size = following.ByteSize()
            if following.from_block_height != request.from_block_height or size + following_size > PUSH_MERGE_BYTES_MAX:
                break
            if merged is None:
                merged = chain_pb2.PendingSyncRequest()
                merged.CopyFrom(request)
            merged.ranges.extend(following.ranges)
            size += following_size
            own_up_to = max(own_up_to, self._queue.popleft()[1])
            self.merged += 1
        if merged is None:
            return message, own_up_to
        return chain_pb2.PeerMessage(pending_sync=merged), own_up_to

    def _advance_delivered(self) -> None:
        advanced = False
        sent_bulk = self._sent_bulk
        while sent_bulk and sent_bulk[0][1]:
            own_up_to = sent_bulk.popleft()[0]
            if own_up_to > self.delivered_up_to:
                self.delivered_up_to = own_up_to
                advanced = True
        if advanced and self._on_delivered is not None:
            self._on_delivered(self.node_id, self.delivered_up_to)

    def backlog(self) -> int:
        """Messages queued or in flight."""
        return len(self._queue) + len(self._urgent) + self._in_flight


# ---------------------------------------------------------------------------------------------
# Subscribers
# ---------------------------------------------------------------------------------------------


class Subscriber:
    """One Subscribe stream's bounded queue of live events."""

    def __init__(self, capacity: int, pending_batches: bool = False) -> None:
        self._events: deque[chain_pb2.ChainEvent] = deque()
        self._capacity = capacity
        # Pending operations as `pending_batch` events (else one `pending` event each).
        self.pending_batches = pending_batches
        self._ready = asyncio.Event()
        self.discontinued = False
        self.closed = False

    def push(self, events: Sequence[chain_pb2.ChainEvent]) -> None:
        if self.discontinued or self.closed or not events:
            return
        if len(self._events) + len(events) > self._capacity:
            self.discontinued = True
            self._events.clear()
        else:
            self._events.extend(events)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    def __len__(self) -> int:
        return len(self._events)

    async def next(self, max_events: int = 0) -> tuple[chain_pb2.ChainEvent, int] | None:
        """The next live event and how many queued events it stands for; None once discontinued or
        closed (check which). With `pending_batches`, consecutive `pending_batch` events are merged
        into one (at most `max_events` of them if non-zero, and `SUBSCRIBER_MERGE_OPERATIONS_MAX`
        operations): a stream message costs more than the operations it carries."""
        while True:
            if self.discontinued or self.closed:
                return None
            if self._events:
                return self._take(max_events)
            self._ready.clear()
            await self._ready.wait()

    def _take(self, max_events: int) -> tuple[chain_pb2.ChainEvent, int]:
        events = self._events
        event = events.popleft()
        if not self.pending_batches or not events or max_events == 1:
            return event, 1
        if event.WhichOneof("event") != "pending_batch" or events[0].WhichOneof("event") != "pending_batch":
            return event, 1
        merged = chain_pb2.ChainEvent()
        merged.CopyFrom(event)
        operations = merged.pending_batch.operations
        count = 1
        while (
            events
            and (max_events == 0 or count < max_events)
            and len(operations) < SUBSCRIBER_MERGE_OPERATIONS_MAX
            and events[0].WhichOneof("event") == "pending_batch"
        ):
            operations.extend(events.popleft().pending_batch.operations)
            count += 1
        return merged, count


def _pending_event(op: SignedOp) -> chain_pb2.ChainEvent:
    return chain_pb2.ChainEvent(pending=chain_pb2.PendingOperation(operation=op.to_proto()))


def _operation_id(signed: chain_pb2.SignedOperation) -> int:
    return chain_pb2.Operation.FromString(signed.operation_bytes).operation_id


def _block_event(block: BlockView) -> chain_pb2.ChainEvent:
    # Parsed from the block's serialisation (kept by the store): far cheaper than building it.
    return chain_pb2.ChainEvent.FromString(block_event_bytes(block))


def _pending_batch_event(ops: Iterable[SignedOp]) -> chain_pb2.ChainEvent:
    return chain_pb2.ChainEvent.FromString(pending_batch_event_bytes(ops))


def _is_entry(op: SignedOp) -> bool:
    return op.operation.WhichOneof("kind") == "entry"


def chain_events_of(events: Iterable[EngineEvent], pending_batches: bool = False) -> list[chain_pb2.ChainEvent]:
    """What subscribers see of engine events (see module docstring); `pending_batches`: pending
    operations as one `pending_batch` event per engine event rather than one `pending` event each."""
    out: list[chain_pb2.ChainEvent] = []
    for event in events:
        if isinstance(event, NewPendingOperations):
            entries = [op for op in event.ops if _is_entry(op)]
            if not pending_batches:
                out.extend(_pending_event(op) for op in entries)
            elif entries:
                out.append(_pending_batch_event(entries))
        elif isinstance(event, NewBlocks):
            out.extend(_block_event(block) for block in event.blocks)
        elif isinstance(event, ChainTruncated):
            # The removed blocks' entries follow as a NewPendingOperations event.
            out.append(chain_pb2.ChainEvent(truncated=chain_pb2.ChainTruncated(from_offset=event.from_offset)))
    return out


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------


class ChainService:
    """The engine, its driver task, the peer links and the subscribers (see module docstring)."""

    def __init__(
        self,
        engine: Engine,
        peer_addresses: Mapping[str, str],
        time_source: TimeSource,
        config: ShellConfig | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        durability: Durability | None = None,
    ) -> None:
        """`durability`: the storage, when its writes are not durable when they return (group
        commit, see the module docstring); None: they are."""
        self.engine = engine
        self.cell = engine.cell
        self.node_id = engine.local.node_id
        self.config = config or ShellConfig()
        self._time = time_source
        self._on_fatal = on_fatal
        self._signer = EnvelopeSigner(self.cell.cell_id, engine.local, time_source)
        self.peers: dict[str, PeerLink] = {}
        self._peer_progress = asyncio.Event()
        self._commit_progress = asyncio.Event()
        for node_id, address in sorted(peer_addresses.items()):
            if address:
                self.peers[node_id] = PeerLink(
                    node_id, address, self._signer, self.config, self._peer_progress.set, self._peer_delivered
                )
            else:
                log.warning("chain node %s has no chain address in the cell config; it gets no messages", node_id)
        self._subscribers: set[Subscriber] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.fatal_error: BaseException | None = None
        # Group commit: outputs waiting for the storage sync that makes their writes durable.
        self._durability = durability
        self._sync_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="chain-sync") if durability is not None else None
        )
        self._held: list[tuple[list[Outgoing], list[EngineEvent]]] = []
        self._syncing = False  # a sync is running for outputs taken from `_held`
        self._sync_running = False  # a sync is running in the worker thread
        self._sync_waiters: list[asyncio.Future[None]] = []
        self._sync_wanted = asyncio.Event()
        self.syncs = 0
        # Engine inputs waiting for the input task (see `_process_inputs`).
        self._urgent_inputs: deque[tuple[Callable[[], object], asyncio.Future[object]]] = deque()
        self._bulk_inputs: deque[tuple[Callable[[], object], asyncio.Future[object]]] = deque()
        self._inputs_ready = asyncio.Event()
        self._inputs_task: asyncio.Task[None] | None = None
        self._input_running = False
        self._after_append_pending = False
        # The lingering push of a lone append (see `_after_append_scheduled`), cancelled by `close`.
        self._push_timer: asyncio.TimerHandle | None = None
        # Appends between their call and their answer (a lone one syncs on the loop: `_idle_for_sync`).
        self._appends_under_way = 0
        self._last_input_at = 0.0
        self._inputs_sparse = True  # the last input came long after the one before (see `_idle_for_sync`)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("chain service already started")
        for link in self.peers.values():
            self._tasks.append(asyncio.create_task(link.run(), name=f"peer-{link.node_id[-6:]}"))
        self._inputs_task = asyncio.create_task(self._process_inputs(), name="chain-inputs")
        self._tasks.append(self._inputs_task)
        self._tasks.append(asyncio.create_task(self._drive(), name="chain-driver"))
        if self._durability is not None:
            self._tasks.append(asyncio.create_task(self._sync_loop(), name="chain-sync"))

    def end_streams(self) -> None:
        """Ends every Subscribe stream (UNAVAILABLE): called when shutdown begins."""
        for subscriber in list(self._subscribers):
            subscriber.close()

    async def close(self) -> None:
        """Stops the driver and the peer links (the storage is the caller's to close)."""
        self.end_streams()
        if self._push_timer is not None:
            self._push_timer.cancel()  # its entries are durable here: pending sync replicates them later
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._inputs_task = None
        for queue in (self._urgent_inputs, self._bulk_inputs):
            while queue:
                queue.popleft()[1].cancel()
        if self._sync_executor is not None:
            self._sync_executor.shutdown(wait=True)  # an fsync under way finishes before the storage closes
        for waiter in self._sync_waiters:
            waiter.cancel()

    # -- driving the engine ---------------------------------------------------------------------

    def _now_ns(self) -> int:
        return self._time.now_ns()

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.tick_interval_s
        next_tick = loop.time()
        while True:
            started = loop.time()
            try:
                await self._input(self._tick, urgent=True)
            except Exception as exc:
                # The engine's state may be half updated: stop (the daemon restarts the service
                # and it resumes from its durable storage) rather than run on corrupted state.
                log.critical("engine tick failed; stopping the chain service", exc_info=exc)
                self.fatal_error = exc
                if self._on_fatal is not None:
                    self._on_fatal(exc)
                return
            took = loop.time() - started
            if took > max(SLOW_TICK_S, 10 * interval):
                log.warning("engine tick took %.0f ms (tick interval %.0f ms)", took * 1000, interval * 1000)
            # Fixed rate; after a slow tick (a long sync), start again from now instead of bursting.
            next_tick = max(next_tick + interval, loop.time())
            await asyncio.sleep(next_tick - loop.time())

    def _tick(self) -> None:
        self.engine.tick(self._now_ns())
        self._after_input()

    def _peer_delivered(self, node_id: str, up_to: int) -> None:
        """A peer link delivered pushes of local entries up to `up_to` (see `Engine.peer_received`)."""

        def received() -> None:
            self.engine.peer_received(node_id, up_to, self._now_ns())
            self._after_input()

        task = asyncio.ensure_future(self._input(received, urgent=True))
        task.add_done_callback(_log_failure)

    # -- input scheduling -------------------------------------------------------------------------

    async def _input(self, work: Callable[[], T], urgent: bool = False) -> T:
        """Runs `work` (an engine input) in the input task, urgent ones first (at once when the task
        does not run, as in tests)."""
        now = time.monotonic()
        self._inputs_sparse = now - self._last_input_at > SPARSE_INPUTS_GAP_S
        self._last_input_at = now
        if self._inputs_task is None or not (self._urgent_inputs or self._bulk_inputs or self._input_running):
            # Nothing waiting and nothing running: no order to keep, run it here (saves two hops).
            self._input_running = True
            try:
                return work()
            finally:
                self._input_running = False
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        (self._urgent_inputs if urgent else self._bulk_inputs).append((work, waiter))
        self._inputs_ready.set()
        return await waiter

    async def _process_inputs(self) -> None:
        """Engine inputs one at a time, urgent ones (block proposals and votes from peers, ticks)
        before the others (appends, entry pushes, anti-entropy): a commit's messages do not wait
        behind the bulk work that arrived before them. After each input the loop serves the rest
        (network, new requests), so a newly arrived urgent input is next."""
        urgent, bulk = self._urgent_inputs, self._bulk_inputs
        while True:
            if urgent:
                work, waiter = urgent.popleft()
            elif bulk:
                work, waiter = bulk.popleft()
            else:
                self._inputs_ready.clear()
                await self._inputs_ready.wait()
                continue
            if waiter.cancelled():
                continue  # the caller gave up (deadline): nothing was done
            self._input_running = True
            try:
                result = work()
            except Exception as exc:
                waiter.set_exception(exc)
            else:
                waiter.set_result(result)
            finally:
                self._input_running = False
            await asyncio.sleep(0)

    def _after_input(self, lone_append: bool = False) -> None:
        """`lone_append`: the input was an append and no other append is under way (see `_idle_for_sync`)."""
        outbox = self.engine.take_outbox()
        events = self.engine.take_events()
        if any(isinstance(event, NewBlocks) for event in events):
            self._commit_progress.set()
        durability = self._durability
        if durability is None or not (self._held or self._syncing or durability.has_unsynced_writes()):
            self._release(outbox, events)
        elif outbox or events:
            # Sent and published once a sync covers the writes they depend on (and in order).
            self._held.append((outbox, events))
            if self._idle_for_sync(lone_append):
                self._sync_now()
            else:
                self._sync_wanted.set()

    def _idle_for_sync(self, lone_append: bool = False) -> bool:
        """No sync is under way, no input waits, and either inputs are sparse or this is the only
        append under way (nothing could share its sync: one client appending in sequence, or paced
        appends between ticks and peer messages, which make inputs look dense): a sync right away on
        the loop costs less than the worker thread's hops (see `durable`). Under load, a sync on the
        loop would stop everything for the disk's latency (milliseconds when the nodes all sync)."""
        if self._sync_running or self._urgent_inputs or self._bulk_inputs:
            return False
        return self._inputs_sparse or lone_append

    async def durable(self, lone_append: bool = False) -> None:
        """Returns once every write made so far is durable (at once without group commit)."""
        durability = self._durability
        if durability is None or not durability.has_unsynced_writes():
            return
        if self._idle_for_sync(lone_append):
            # Idle (nothing else to do, no sync under way): sync here, on the event loop. The worker
            # thread's hop and the loop's wake-ups would cost more than the sync itself; group
            # commit pays when inputs pile up, which is when the thread is used.
            self._sync_now()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._sync_waiters.append(waiter)
        self._sync_wanted.set()
        await waiter

    async def _sync_loop(self) -> None:
        """Group commit: one storage sync (in a worker thread, so the event loop goes on) for the
        outputs and waiters gathered meanwhile, which are released after it."""
        assert self._durability is not None and self._sync_executor is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            held, waiters = self._held, self._sync_waiters
            self._held, self._sync_waiters = [], []
            self._syncing = bool(held)
            self._sync_running = True
            try:
                await loop.run_in_executor(self._sync_executor, self._durability.sync)
            except Exception as exc:
                log.critical("storage sync failed; stopping the chain service", exc_info=exc)
                self.fatal_error = exc
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(Unavailable("the chain storage failed"))
                if self._on_fatal is not None:
                    self._on_fatal(exc)
                return
            finally:
                self._sync_running = False
            self.syncs += 1
            for outbox, events in held:
                self._release(outbox, events)
            self._syncing = False
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _sync_now(self) -> None:
        """A sync on the event loop thread, then what waited for it (see `durable`)."""
        assert self._durability is not None and not self._sync_running
        held, waiters = self._held, self._sync_waiters
        self._held, self._sync_waiters = [], []
        try:
            self._durability.sync()
        except Exception as exc:
            log.critical("storage sync failed; stopping the chain service", exc_info=exc)
            self.fatal_error = exc
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(Unavailable("the chain storage failed"))
            if self._on_fatal is not None:
                self._on_fatal(exc)
            raise Unavailable("the chain storage failed") from exc
        self.syncs += 1
        for outbox, events in held:
            self._release(outbox, events)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _release(self, outbox: list[Outgoing], events: list[EngineEvent]) -> None:
        for outgoing in outbox:
            link = self.peers.get(outgoing.to_node_id)
            if link is not None:
                link.offer(outgoing.message, outgoing.urgent, outgoing.own_up_to)
        if events and self._subscribers:
            # Built once per kind of subscription, shared by the subscribers of that kind.
            by_kind: dict[bool, list[chain_pb2.ChainEvent]] = {}
            for subscriber in list(self._subscribers):
                kind = subscriber.pending_batches
                chain_events = by_kind.get(kind)
                if chain_events is None:
                    chain_events = by_kind[kind] = chain_events_of(events, kind)
                subscriber.push(chain_events)

    # -- inputs ---------------------------------------------------------------------------------

    async def append_durably(self, entries: Sequence[bytes]) -> list[int]:
        """Appends entries (once replication has room for them); their ids are durable on this node
        when this returns."""
        appended = False
        self._appends_under_way += 1
        lone = False
        try:
            await self._replication_room()
            await self._commit_room()
            operation_ids = await self._input(lambda: self.append(entries, deferred=True))
            appended = True
            lone = self._appends_under_way == 1
            await self.durable(lone_append=lone)
        finally:
            self._appends_under_way -= 1
            if appended:
                # The push of these entries to the peers, and the proposal they may allow, are made
                # once the answer is on its way (grpc sends it in this step; this input runs after),
                # a little later still for an append alone (see `ShellConfig.lone_append_push_delay_s`).
                # Even if the caller gave up meanwhile: its outputs wait for the sync anyway.
                self._after_append_scheduled(self.config.lone_append_push_delay_s if lone else 0.0)
        return operation_ids

    def _after_append_scheduled(self, delay_s: float = 0.0) -> None:
        def after_append() -> None:
            self.engine.after_append(self._now_ns())
            self._after_input()

        if self._inputs_task is None:
            after_append()
            return
        if self._after_append_pending:
            return  # one is already waiting: it will see these entries too
        self._after_append_pending = True

        def run() -> None:
            self._after_append_pending = False  # from here on, new entries need a new round
            after_append()

        def schedule() -> None:
            task = asyncio.ensure_future(self._input(run, urgent=True))
            task.add_done_callback(_log_failure)

        if delay_s > 0:
            self._push_timer = asyncio.get_running_loop().call_later(delay_s, schedule)
        else:
            schedule()

    async def _commit_room(self) -> None:
        """Waits while too many entries wait to be committed (flow control)."""
        limit = self.config.append_uncommitted_max
        while self.engine.uncommitted_entries() >= limit:
            self._commit_progress.clear()
            try:
                await asyncio.wait_for(self._commit_progress.wait(), timeout=1.0)
            except TimeoutError:
                pass

    async def _replication_room(self) -> None:
        """Waits (flow control) until every peer has a short backlog, or at most
        `append_peer_wait_max_s` for the slower ones once enough to make a quorum with us have. Waiting
        for the slowest peer keeps it from falling ever further behind (its lag turns into large
        anti-entropy exchanges, and it proposes in its turn); the bound keeps a peer that is down or
        very slow from holding appends up (a dead peer's messages fail fast anyway)."""
        links = list(self.peers.values())
        if not links:
            return
        # Peers that make a quorum together with this node.
        quorum = next((k for k in range(len(links) + 1) if self.cell.has_quorum(k + 1)), len(links))
        limit = self.config.append_peer_backlog_max
        loop = asyncio.get_running_loop()
        give_up_at: float | None = None
        while True:
            ready = sum(1 for link in links if link.backlog() < limit)
            if ready == len(links):
                return
            if ready >= quorum:
                now = loop.time()
                if give_up_at is None:
                    give_up_at = now + self.config.append_peer_wait_max_s
                elif now >= give_up_at:
                    return
            self._peer_progress.clear()
            timeout = 1.0 if give_up_at is None else max(0.0, give_up_at - loop.time())
            try:
                await asyncio.wait_for(self._peer_progress.wait(), timeout=timeout)
            except TimeoutError:
                pass

    def append(self, entries: Sequence[bytes], deferred: bool = False) -> list[int]:
        """Appends entries; durable when this returns without group commit, else after `durable()`.
        `deferred`: the push to the peers and the commit round wait for `_after_append_scheduled`."""
        if not entries:
            raise InvalidArgument("append needs at least one entry")
        if len(entries) > APPEND_MAX_ENTRIES:
            raise InvalidArgument(f"append takes at most {APPEND_MAX_ENTRIES} entries, got {len(entries)}")
        for index, data in enumerate(entries):
            if len(data) > MAX_ENTRY_BYTES:
                raise InvalidArgument(f"entry {index} has {len(data)} bytes, over the {MAX_ENTRY_BYTES} limit")
        try:
            return self.engine.append(list(entries), self._now_ns(), deferred)
        finally:
            self._after_input(lone_append=self._appends_under_way <= 1)

    async def deliver_scheduled(self, envelope: chain_pb2.PeerEnvelope) -> None:
        """`deliver` through the input scheduler, urgent first if the sender says so (the envelope is
        authenticated right away, in the calling handler)."""
        message = open_envelope(envelope, self.cell, self.node_id, self._now_ns())
        await self._input(lambda: self._deliver(envelope, message), urgent=envelope.urgent)

    async def deliver_stream(
        self,
        envelopes: AsyncIterator[chain_pb2.PeerEnvelope],
        acknowledge: Callable[[chain_pb2.DeliverAck], Awaitable[None]],
    ) -> None:
        """`deliver_scheduled` for each envelope of a stream, in order; acknowledges what was handled
        whenever no further envelope has arrived meanwhile (one acknowledgement for a burst), and at
        least every `DELIVER_ACK_EVERY` envelopes. A refused envelope raises (and so ends the stream
        with its error)."""
        arrived: asyncio.Queue[chain_pb2.PeerEnvelope | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for envelope in envelopes:
                    arrived.put_nowait(envelope)
            finally:
                arrived.put_nowait(None)

        reader = asyncio.create_task(read())
        handled = acknowledged = 0
        try:
            while (envelope := await arrived.get()) is not None:
                await self.deliver_scheduled(envelope)
                handled += 1
                # At a lull, or every so often under a steady flow (the sender times out otherwise).
                if arrived.empty() or handled - acknowledged >= DELIVER_ACK_EVERY:
                    await acknowledge(chain_pb2.DeliverAck(handled=handled))
                    acknowledged = handled
            if handled > acknowledged:  # the sender closed its side right after the last ones
                await acknowledge(chain_pb2.DeliverAck(handled=handled))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def deliver(self, envelope: chain_pb2.PeerEnvelope) -> None:
        self._deliver(envelope, open_envelope(envelope, self.cell, self.node_id, self._now_ns()))

    def _deliver(self, envelope: chain_pb2.PeerEnvelope, message: chain_pb2.PeerMessage) -> None:
        started = time.perf_counter()
        try:
            self.engine.on_message(envelope.from_node_id, message, self._now_ns())
        finally:
            self._after_input()
            took = time.perf_counter() - started
            if took > SLOW_INPUT_S:
                kind = message.WhichOneof("kind")
                ranges = message.pending_sync.ranges if kind == "pending_sync" else ()
                log.info(
                    "peer message took %.0f ms (the event loop served nothing else meanwhile)",
                    took * 1000,
                    extra={
                        "from": envelope.from_node_id,
                        "kind": kind,
                        "bytes": len(envelope.message_bytes),
                        "ranges": len(ranges),
                        "operations": sum(len(r.operations) for r in ranges),
                        "headers": sum(len(r.operations_headers) for r in ranges),
                    },
                )

    # -- reads ----------------------------------------------------------------------------------

    def get_operations(self, operation_ids: Sequence[int]) -> list[chain_pb2.StoredOperation]:
        if len(operation_ids) > GET_OPERATIONS_MAX_IDS:
            raise InvalidArgument(f"at most {GET_OPERATIONS_MAX_IDS} operation ids per call, got {len(operation_ids)}")
        chain, pending = self.engine.chain, self.engine.pending
        # Per block read for this call: the block and its operations by id.
        blocks: dict[int, tuple[BlockView, dict[int, SignedOp]] | None] = {}
        found: list[chain_pb2.StoredOperation] = []
        for operation_id in operation_ids:
            offset = chain.block_offset_of_operation(operation_id)
            if offset is not None:
                if offset not in blocks:
                    block = chain.get_block(offset)
                    blocks[offset] = None if block is None else (block, {o.operation_id: o for o in block.operations})
                read = blocks[offset]
                if read is not None:
                    block, operations = read
                    op = operations.get(operation_id)
                    if op is None:  # a block proposal id: the proposal itself may still be pending
                        entry = pending.get(operation_id)
                        op = entry.op if entry is not None else None
                    if op is not None:
                        found.append(
                            chain_pb2.StoredOperation(
                                operation=op.to_proto(),
                                status=chain_pb2.OPERATION_STATUS_COMMITTED,
                                block_offset=block.offset,
                                block_height=block.height,
                            )
                        )
                        continue
            entry = pending.get(operation_id)
            if entry is not None:
                found.append(
                    chain_pb2.StoredOperation(operation=entry.op.to_proto(), status=chain_pb2.OPERATION_STATUS_PENDING)
                )
        return found

    def get_blocks(self, request: chain_pb2.GetBlocksRequest) -> chain_pb2.GetBlocksResponse:
        if request.to_offset and request.to_offset < request.from_offset:
            raise InvalidArgument(f"to_offset {request.to_offset} is before from_offset {request.from_offset}")
        max_count = min(request.max_count or GET_BLOCKS_DEFAULT_COUNT, GET_BLOCKS_MAX_COUNT)
        response = chain_pb2.GetBlocksResponse()
        size = 0
        if request.headers_only:
            for head in itertools.islice(self.engine.chain.headers_from(request.from_offset), max_count):
                if request.to_offset and head.offset > request.to_offset:
                    break
                response.headers.append(head.partial_header())
            return response
        for offset, data in itertools.islice(self.engine.chain.encoded_blocks_from(request.from_offset), max_count):
            if request.to_offset and offset > request.to_offset:
                break
            # Encoded size (with signatures and batch proofs), not the block's size in the chain.
            if response.blocks and size + len(data) > GET_BLOCKS_MAX_BYTES:
                break
            response.blocks.append(chain_pb2.Block.FromString(data))
            size += len(data)
        return response

    def status(self) -> chain_pb2.ChainStatus:
        status = self.engine.status()
        return chain_pb2.ChainStatus(
            node_id=status.node_id,
            cell_id=status.cell_id,
            height=status.height,
            last_offset=status.last_offset,
            next_offset=status.next_offset,
            sync_status=_status_text(status.sync_status),
            pending_operations=status.pending_operations,
            peers=[
                chain_pb2.PeerStatus(
                    node_id=peer.node_id,
                    address=self.peers[peer.node_id].address if peer.node_id in self.peers else "",
                    sync_status=_status_text(peer.status),
                    last_common_offset=peer.last_common_offset or 0,
                    last_known_height=peer.last_known_height or 0,
                )
                for peer in status.peers
            ],
        )

    # -- subscriptions ----------------------------------------------------------------------------

    def _holds_block(self, offset: int, block_hash: bytes) -> bool:
        header = self.engine.chain.get_header(offset)
        return header is not None and header.hash == block_hash

    async def subscribe(self, request: chain_pb2.SubscribeRequest) -> AsyncIterator[chain_pb2.ChainEvent]:
        """Replay, CaughtUp, then live events (see module docstring)."""
        if len(self._subscribers) >= self.config.subscribers_max:
            raise ResourceExhausted(f"too many subscribers (at most {self.config.subscribers_max})")
        subscriber = Subscriber(self.config.subscriber_queue_len_max, request.pending_batches)
        # Registered before anything is read: whatever is written from now on is queued.
        self._subscribers.add(subscriber)
        try:
            # Blocks after `horizon` were not sent yet; None = none sent, from the genesis on.
            horizon: int | None = request.from_block_offset if request.has_from_block_offset else None
            resume_hash = request.from_block_hash
            if horizon is not None and resume_hash and not self._holds_block(horizon, resume_hash):
                # The subscriber's last block is not ours (a fork since dropped): everything it
                # derived from blocks may be wrong, so it forgets it all and gets the chain again.
                log.info("a subscriber resumed after a block this node does not hold; it replays from the genesis")
                yield chain_pb2.ChainEvent(truncated=chain_pb2.ChainTruncated(from_offset=0))
                horizon = None
            while True:
                start = 0 if horizon is None else horizon + 1
                batch = list(itertools.islice(self.engine.chain.blocks_from(start), REPLAY_BATCH_BLOCKS))
                if not batch:
                    break
                for block in batch:
                    yield _block_event(block)
                    horizon = block.offset
                if subscriber.discontinued or subscriber.closed:
                    break
            replayed_pending: set[int] = set()
            last_pending = request.from_pending_operation_id
            while not (subscriber.discontinued or subscriber.closed):
                entries = list(itertools.islice(self.engine.pending.range(after=last_pending), REPLAY_BATCH_OPERATIONS))
                if not entries:
                    break
                last_pending = entries[-1].op.operation_id
                # Committed ones came (or come) with their block.
                replayed = [entry.op for entry in entries if entry.committed is None and _is_entry(entry.op)]
                replayed_pending.update(op.operation_id for op in replayed)
                if request.pending_batches:
                    if replayed:
                        yield _pending_batch_event(replayed)
                else:
                    for op in replayed:
                        yield _pending_event(op)
            # No await since the last (empty) reads: the queued events are exactly those that
            # may overlap the replay.
            overlap = len(subscriber)
            if not (subscriber.discontinued or subscriber.closed):
                yield chain_pb2.ChainEvent(
                    caught_up=chain_pb2.CaughtUp(last_block_offset=horizon or 0, last_pending_operation_id=last_pending)
                )
            while True:
                # Merged events never straddle the end of the overlap (`in_overlap` is for all of it).
                item = await subscriber.next(max_events=overlap if overlap > 0 else 0)
                if item is None:
                    break
                event, count = item
                in_overlap = overlap > 0
                overlap -= count
                if not in_overlap and replayed_pending:
                    replayed_pending.clear()
                kind = event.WhichOneof("event")
                if kind == "block":
                    offset = chain_pb2.BlockHeader.FromString(event.block.header_bytes).offset
                    if horizon is not None and offset <= horizon:
                        continue  # replayed already (or the subscriber had it)
                    horizon = offset
                elif kind == "truncated":
                    # Blocks from there on are new, whatever was sent before.
                    horizon = event.truncated.from_offset - 1 if event.truncated.from_offset else None
                elif kind == "pending" and in_overlap:
                    if _operation_id(event.pending.operation) in replayed_pending:
                        continue
                elif kind == "pending_batch" and in_overlap:
                    operations = event.pending_batch.operations
                    fresh = [signed for signed in operations if _operation_id(signed) not in replayed_pending]
                    if not fresh:
                        continue
                    if len(fresh) < len(operations):
                        event = chain_pb2.ChainEvent(pending_batch=chain_pb2.PendingOperations(operations=fresh))
                yield event
            if subscriber.discontinued:
                yield chain_pb2.ChainEvent(discontinuity=chain_pb2.StreamDiscontinuity())
                return
            raise Unavailable("the chain service is shutting down; subscribe again")
        finally:
            self._subscribers.discard(subscriber)


# ---------------------------------------------------------------------------------------------
# gRPC servicers
# ---------------------------------------------------------------------------------------------


class ChainPeerServicer(chain_pb2_grpc.ChainPeerServicer):
    def __init__(self, service: ChainService) -> None:
        self._service = service

    async def Deliver(
        self, request: chain_pb2.PeerEnvelope, context: grpc.aio.ServicerContext
    ) -> chain_pb2.DeliverResponse:
        await self._service.deliver_scheduled(request)
        return chain_pb2.DeliverResponse()

    async def DeliverStream(
        self, request_iterator: AsyncIterator[chain_pb2.PeerEnvelope], context: grpc.aio.ServicerContext
    ) -> None:
        await self._service.deliver_stream(request_iterator, context.write)


class ChainLogServicer(chain_pb2_grpc.ChainLogServicer):
    def __init__(self, service: ChainService) -> None:
        self._service = service

    async def Append(
        self, request: chain_pb2.AppendRequest, context: grpc.aio.ServicerContext
    ) -> chain_pb2.AppendResponse:
        return chain_pb2.AppendResponse(operation_ids=await self._service.append_durably(list(request.entries)))

    async def Subscribe(
        self, request: chain_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chain_pb2.ChainEvent]:
        async for event in self._service.subscribe(request):
            yield event

    async def GetOperations(
        self, request: chain_pb2.GetOperationsRequest, context: grpc.aio.ServicerContext
    ) -> chain_pb2.GetOperationsResponse:
        return chain_pb2.GetOperationsResponse(operations=self._service.get_operations(list(request.operation_ids)))

    async def GetBlocks(
        self, request: chain_pb2.GetBlocksRequest, context: grpc.aio.ServicerContext
    ) -> chain_pb2.GetBlocksResponse:
        return self._service.get_blocks(request)

    async def Status(
        self, request: chain_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> chain_pb2.ChainStatus:
        return self._service.status()


def link_handlers(service: ChainService) -> dict[str, LinkHandler]:
    """`ChainLogLink`: a store's Append calls over one stream, run exactly as `ChainLog.Append`."""

    async def append(body: bytes, time_remaining: float | None) -> bytes:
        request = parse_request(chain_pb2.AppendRequest, body)
        operation_ids = await service.append_durably(list(request.entries))
        return chain_pb2.AppendResponse(operation_ids=operation_ids).SerializeToString()

    return {APPEND_METHOD: append}


def registrations(service: ChainService) -> list[tuple[Callable[..., None], object, str]]:
    """What `ServiceServer` serves for `service`."""
    return [
        link_registration(link_handlers(service), CHAIN_LOG_LINK_SERVICE),
        (
            chain_pb2_grpc.add_ChainPeerServicer_to_server,
            ChainPeerServicer(service),
            chain_pb2.DESCRIPTOR.services_by_name["ChainPeer"].full_name,
        ),
        (
            chain_pb2_grpc.add_ChainLogServicer_to_server,
            ChainLogServicer(service),
            chain_pb2.DESCRIPTOR.services_by_name["ChainLog"].full_name,
        ),
    ]


__all__ = [
    "APPEND_METHOD",
    "CHAIN_LOG_LINK_SERVICE",
    "DELIVER_ACK_EVERY",
    "ENVELOPE_MAX_SKEW_NS",
    "ChainLogServicer",
    "ChainPeerServicer",
    "ChainService",
    "EnvelopeSigner",
    "PeerLink",
    "ShellConfig",
    "Subscriber",
    "chain_cell_of",
    "chain_events_of",
    "link_handlers",
    "open_envelope",
    "peer_addresses_of",
    "registrations",
]
