"""Time: consistent timestamps (SPEC 1.9), time sources and conversions.

A consistent timestamp is a u64 readable as nanoseconds since the Unix epoch with millisecond
precision, whose sub-millisecond digits carry the node and a counter::

    ts = unix_secs*1e9 + unix_millis*1e6 + (clock_id % 1000)*1000 + counter      (counter 0..999)

Difference from the original: the original shares a counter that sleeps ~1 ms when it reaches 999
and can repeat ids on a frozen clock. Here a `Clock` remembers the last id it issued; if the id
computed from the current time is not greater, it takes the next free slot after the last one
(the next counter in the same millisecond, or counter 0 of the next millisecond). Ids from one
`Clock` are therefore ALWAYS strictly increasing, never sleep, and survive a frozen or backwards
wall clock; under sustained bursts (>1000 ids/ms) or a clock going back, ids run slightly ahead
of wall time until real time catches up.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
from typing import TYPE_CHECKING, Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from exocommon.errors import InvalidArgument

if TYPE_CHECKING:
    from exocommon.ids import PeerId

NS_PER_MS = 1_000_000
NS_PER_SEC = 1_000_000_000
_COUNTER_SLOTS = 1000  # counter lives in the last 3 decimal digits
_NODE_SLOTS = 1000  # clock_id % 1000 lives in the 3 digits above them


def now_ns() -> int:
    """Wall clock, nanoseconds since the Unix epoch."""
    return time.time_ns()


def monotonic_ns() -> int:
    """Monotonic clock for timeouts and durations (not comparable across processes)."""
    return time.monotonic_ns()


class TimeSource(Protocol):
    def now_ns(self) -> int: ...

    def monotonic_ns(self) -> int: ...


class SystemTimeSource:
    """The real clocks."""

    def now_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


class MockTimeSource:
    """A frozen, manually moved clock for tests (the original's "fixed instant + add duration")."""

    def __init__(self, unix_ns: int = 1_700_000_000 * NS_PER_SEC) -> None:
        self._lock = threading.Lock()
        self._wall = unix_ns
        self._mono = 0

    def now_ns(self) -> int:
        with self._lock:
            return self._wall

    def monotonic_ns(self) -> int:
        with self._lock:
            return self._mono

    def advance(self, ns: int) -> None:
        """Move both clocks forward by `ns` nanoseconds."""
        if ns < 0:
            raise ValueError("cannot advance by a negative duration; use set() to move wall time back")
        with self._lock:
            self._wall += ns
            self._mono += ns

    def advance_ms(self, ms: int) -> None:
        self.advance(ms * NS_PER_MS)

    def set(self, unix_ns: int) -> None:
        """Set wall time (may go backwards, to test that); monotonic time is left alone."""
        with self._lock:
            self._wall = unix_ns


def make_consistent_timestamp(unix_ns: int, clock_id: int, counter: int) -> int:
    """Pure formula of SPEC 1.9; `unix_ns` is truncated to the millisecond."""
    if unix_ns < 0:
        raise InvalidArgument(f"unix time must not be negative, got {unix_ns}")
    if clock_id < 0:
        raise InvalidArgument(f"clock id must not be negative, got {clock_id}")
    if not 0 <= counter < _COUNTER_SLOTS:
        raise InvalidArgument(f"counter must be in 0..{_COUNTER_SLOTS - 1}, got {counter}")
    return (unix_ns // NS_PER_MS) * NS_PER_MS + (clock_id % _NODE_SLOTS) * _COUNTER_SLOTS + counter


class Clock:
    """Issues strictly increasing consistent timestamps for one node; thread-safe."""

    def __init__(
        self, clock_id: int, time_source: TimeSource | None = None, *, issued_after: int = 0
    ) -> None:
        """`issued_after`: all ids issued will be greater (e.g. the last id persisted before a restart)."""
        if clock_id < 0:
            raise InvalidArgument(f"clock id must not be negative, got {clock_id}")
        self._clock_id = clock_id
        self._node_part = (clock_id % _NODE_SLOTS) * _COUNTER_SLOTS
        self._source: TimeSource = time_source if time_source is not None else SystemTimeSource()
        self._lock = threading.Lock()
        self._last = issued_after

    @classmethod
    def for_node(cls, node_id: PeerId, time_source: TimeSource | None = None) -> Clock:
        from exocommon.ids import consistent_clock_id  # local: ids does not need the clock

        return cls(consistent_clock_id(node_id), time_source)

    @property
    def clock_id(self) -> int:
        return self._clock_id

    @property
    def time_source(self) -> TimeSource:
        return self._source

    def now_ns(self) -> int:
        return self._source.now_ns()

    def monotonic_ns(self) -> int:
        return self._source.monotonic_ns()

    def consistent_time(self) -> int:
        """A new id, greater than every id this clock issued before."""
        with self._lock:
            from_now = (self._source.now_ns() // NS_PER_MS) * NS_PER_MS + self._node_part
            ts = max(from_now, self._next_slot_after(self._last))
            self._last = ts
            return ts

    def _next_slot_after(self, last: int) -> int:
        # Smallest ms*1e6 + node_part + counter (counter 0..999) strictly greater than `last`.
        base = (last // NS_PER_MS) * NS_PER_MS + self._node_part
        if last < base:
            return base
        if last - base + 1 < _COUNTER_SLOTS:
            return last + 1
        return base + NS_PER_MS


def timestamp_to_proto(ns: int) -> Timestamp:
    seconds, nanos = divmod(ns, NS_PER_SEC)
    return Timestamp(seconds=seconds, nanos=nanos)


def proto_to_ns(ts: Timestamp) -> int:
    if not 0 <= ts.nanos < NS_PER_SEC:
        raise InvalidArgument(f"timestamp nanos must be in 0..999999999, got {ts.nanos}")
    return ts.seconds * NS_PER_SEC + ts.nanos


def ns_to_datetime(ns: int) -> _dt.datetime:
    """Aware UTC datetime (microsecond precision: the sub-microsecond digits are dropped)."""
    return _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(microseconds=ns // 1000)


__all__ = [
    "NS_PER_MS",
    "NS_PER_SEC",
    "Clock",
    "MockTimeSource",
    "SystemTimeSource",
    "TimeSource",
    "make_consistent_timestamp",
    "monotonic_ns",
    "now_ns",
    "ns_to_datetime",
    "proto_to_ns",
    "timestamp_to_proto",
]
