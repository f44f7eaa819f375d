import datetime as dt
import threading
import time

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from exocommon.clock import (
    NS_PER_MS,
    Clock,
    MockTimeSource,
    SystemTimeSource,
    make_consistent_timestamp,
    now_ns,
    ns_to_datetime,
    proto_to_ns,
    timestamp_to_proto,
)
from exocommon.errors import InvalidArgument
from exocommon.ids import PeerId
from exocommon.keys import PublicKey

T0 = 1_700_000_000_123_000_000  # ms-aligned
CLOCK_ID = 17245  # -> node digits 245


def _parts(ts: int) -> tuple[int, int, int]:
    """(ms since epoch, node digits, counter)."""
    return ts // NS_PER_MS, (ts // 1000) % 1000, ts % 1000


def test_appendix_b_example():
    assert make_consistent_timestamp(T0 + 456_789, 17245, 7) == 1_700_000_000_123_245_007
    assert make_consistent_timestamp(T0, 17245, 7) == 1_700_000_000_123_245_007


@pytest.mark.parametrize(("ns", "cid", "counter"), [(-1, 1, 0), (T0, -1, 0), (T0, 1, -1), (T0, 1, 1000)])
def test_formula_rejects_out_of_range(ns, cid, counter):
    with pytest.raises(InvalidArgument):
        make_consistent_timestamp(ns, cid, counter)


def test_frozen_clock_consecutive_ids_differ_by_one():
    clock = Clock(CLOCK_ID, MockTimeSource(T0))
    a, b = clock.consistent_time(), clock.consistent_time()
    assert a == make_consistent_timestamp(T0, CLOCK_ID, 0)
    assert b - a == 1


def test_advancing_moves_ids_with_time():
    src = MockTimeSource(T0)
    clock = Clock(CLOCK_ID, src)
    first = clock.consistent_time()
    for _ in range(5):  # burn some counter values in the first millisecond
        clock.consistent_time()
    # A whole number of ms: the counter restarts, so the id moves by exactly the elapsed time.
    src.advance_ms(7)
    assert clock.consistent_time() - first == 7 * NS_PER_MS
    # Arbitrary durations: the id lands in the current millisecond, so it moved by at least the
    # elapsed time minus the sub-millisecond part that the format truncates.
    elapsed = 7 * NS_PER_MS
    prev = clock.consistent_time()
    for d in (1, 999_999, 1_000_000, 1_000_001, 2_500_123, 1_000_000_000):
        src.advance(d)
        elapsed += d
        ts = clock.consistent_time()
        assert ts > prev
        ms = (T0 + elapsed) // NS_PER_MS
        # Counter restarts in a new millisecond and continues within the same one.
        counter = _parts(prev)[2] + 1 if ms == _parts(prev)[0] else 0
        assert _parts(ts) == (ms, 245, counter)
        assert ts - first >= elapsed - (NS_PER_MS - 1)
        assert ts - first <= elapsed + 999
        prev = ts


def test_frozen_clock_10000_calls_strictly_increasing_and_well_formed():
    clock = Clock(CLOCK_ID, MockTimeSource(T0))
    ids = [clock.consistent_time() for _ in range(10_000)]
    assert all(b > a for a, b in zip(ids, ids[1:], strict=False))
    for i, ts in enumerate(ids):
        # 1000 counter slots per ms, then the next ms (running ahead of the frozen clock).
        assert _parts(ts) == (T0 // NS_PER_MS + i // 1000, 245, i % 1000)


def test_clock_going_backwards_never_repeats():
    src = MockTimeSource(T0)
    clock = Clock(CLOCK_ID, src)
    a = clock.consistent_time()
    src.set(T0 - 5 * NS_PER_MS)
    b = clock.consistent_time()
    assert b == a + 1
    src.set(T0 + 3 * NS_PER_MS)
    c = clock.consistent_time()
    assert _parts(c) == (T0 // NS_PER_MS + 3, 245, 0)


def test_issued_after_resumes_after_restart():
    src = MockTimeSource(T0)
    last = Clock(CLOCK_ID, src).consistent_time()
    resumed = Clock(CLOCK_ID, src, issued_after=last)
    assert resumed.consistent_time() == last + 1
    # An arbitrary floor (e.g. another node's id) still yields a well-formed id above it.
    floor = make_consistent_timestamp(T0, 999, 999)
    ts = Clock(CLOCK_ID, src, issued_after=floor).consistent_time()
    assert ts > floor and _parts(ts) == (T0 // NS_PER_MS + 1, 245, 0)
    floor = make_consistent_timestamp(T0, 100, 3)
    ts = Clock(CLOCK_ID, src, issued_after=floor).consistent_time()
    assert _parts(ts) == (T0 // NS_PER_MS, 245, 0)


def test_threads_get_distinct_increasing_ids():
    clock = Clock(CLOCK_ID, MockTimeSource(T0))
    results: list[list[int]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def worker(out: list[int]) -> None:
        start.wait()
        for _ in range(5_000):
            out.append(clock.consistent_time())

    threads = [threading.Thread(target=worker, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert len(r) == 5_000
        assert all(b > a for a, b in zip(r, r[1:], strict=False))
    all_ids = [ts for r in results for ts in r]
    assert len(set(all_ids)) == 20_000
    # No gaps either: on a frozen clock the 20,000 ids are exactly the first 20,000 slots.
    assert max(all_ids) == make_consistent_timestamp(T0 + 19 * NS_PER_MS, CLOCK_ID, 999)


def test_system_clock_is_close_to_now():
    clock = Clock(CLOCK_ID)
    before = time.time_ns()
    ts = clock.consistent_time()
    after = time.time_ns()
    assert before // NS_PER_MS * NS_PER_MS <= ts <= after + NS_PER_MS
    assert (ts // 1000) % 1000 == 245
    assert isinstance(clock.time_source, SystemTimeSource)
    assert abs(now_ns() - time.time_ns()) < 1_000_000_000


def test_for_node_uses_consistent_clock_id():
    pid = PeerId.from_public_key(PublicKey.decode_base58("peHozo7MdJBzjF11nYXnbojD1QLsCRv2w33jDW3fXrmgtc"))
    clock = Clock.for_node(pid, MockTimeSource(T0))
    assert clock.clock_id == 17245
    assert clock.consistent_time() == make_consistent_timestamp(T0, 17245, 0)


def test_mock_time_source():
    src = MockTimeSource(T0)
    assert src.now_ns() == T0 and src.monotonic_ns() == 0
    src.advance(5)
    assert src.now_ns() == T0 + 5 and src.monotonic_ns() == 5
    src.set(T0 - 10)
    assert src.now_ns() == T0 - 10 and src.monotonic_ns() == 5
    with pytest.raises(ValueError):
        src.advance(-1)


def test_proto_conversions():
    ts = 1_700_000_000_123_245_007
    p = timestamp_to_proto(ts)
    assert (p.seconds, p.nanos) == (1_700_000_000, 123_245_007)
    assert proto_to_ns(p) == ts
    assert proto_to_ns(timestamp_to_proto(0)) == 0
    # Pre-epoch times keep nanos in range (as the protobuf spec requires).
    p = timestamp_to_proto(-1)
    assert (p.seconds, p.nanos) == (-1, 999_999_999)
    assert proto_to_ns(p) == -1
    with pytest.raises(InvalidArgument):
        proto_to_ns(Timestamp(seconds=1, nanos=-5))


def test_ns_to_datetime():
    d = ns_to_datetime(1_700_000_000_123_245_007)
    assert d == dt.datetime(2023, 11, 14, 22, 13, 20, 123245, tzinfo=dt.UTC)
