"""`make bench-store`: the store on a generated data set, through the real path (a benchmark, not a test).

Starts a one-node cell in a temporary folder (`exo node init`, `exo cell init`, then `python -m exochain`
and `python -m exostore` as separate processes on loopback, default settings), writes a seeded data set
of notes through `EntityStore.Mutate` and measures:

* **indexing**: mutations/s from the first `Mutate` (which appends to the chain) until the last
  mutation is queryable (`--concurrency` requests of `--batch` mutations in flight, each answered once
  its mutations are durable in the chain; then the store is asked until it counts them all); then how
  long the store keeps working after the load (deferred chain indexing, tantivy merges) and its memory.
  `--wait-indexed` sets `wait_indexed` on every request instead: a closed loop where the requests in
  flight bound how much the store indexes per commit of its pending index (4 x 500 gave ~700-document
  commits, whose fixed cost is most of tantivy's work), i.e. a measure of the client's pipelining as
  much as of the store;
* **queries**: p50/p99 latency of `--queries` sequential `EntityStore.Query` calls per kind, through
  gRPC to the store (one blocking client, pre-encoded requests, first page of 10):
  single-term match, two-term match, trait + field equality (`string3 == folderN`), trait sorted by
  field (`date3`, descending), ids (one id), query string (`+w1 w2 -w3`);
* **watches**: with 10, 100 and 1,000 open `WatchQuery` streams, the time from sending a write to its
  watch's stream delivering it (each watch is `trait TestMessage, string3 == <its own tag>`, i.e.
  1,000 idle watches of the same trait type as the write);
* **the floor**, in the same run: the same queries on a bare tantivy index of the same data, in this
  process (plain tantivy-py: one document per note, same analyzers, no exostore code), with fuzzy
  terms (what the store's match and query string do) and with exact terms only; and a gRPC echo round
  trip (a trivial `grpc.aio` server in another process, the same blocking client).

The data set: `--entities` notes (`exocore.test.TestMessage`): a 6-word title (`string1`, text) and a
~60-word body (`struct1.string1`, text) drawn from a 5,000-word vocabulary with a Zipf (s=1)
distribution, a date increasing with the note's number (`date3`, indexed + sorted), a reference to an
earlier note (`ref1`) and one of 100 folder tags (`string3`, indexed exact). Query words are drawn
uniformly from the vocabulary (from very common to rare words).

Everything shares the machine's cores (client, chain, store and the bare index). It never asserts:
it measures, prints, and says which targets are met.

    .venv/bin/python bench/bench_store.py [--entities 100000] [--queries 1000] [--watches 10,100,1000]
        [--node-dir DIR]   # keep the node folder there; an existing one is reused (no load)
        [--py-spy FILE]    # record a py-spy profile of the store during the query phase
        [--index-setting chain_index_deferred_write_secs=0]   # a node.yaml store.index setting
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from benchlib import cpu_seconds, memory_mb
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exocommon.config import NodeDirectory
from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exocore.test import test_pb2

STORE_SERVICE = "exocore.store.v1.EntityStore"
MUTATE = f"/{STORE_SERVICE}/Mutate"
QUERY = f"/{STORE_SERVICE}/Query"
WATCH = f"/{STORE_SERVICE}/WatchQuery"
ECHO = "/bench.Echo/Echo"
TRAIT = "exocore.test.TestMessage"
TYPE_URL = f"type.googleapis.com/{TRAIT}"
VOCABULARY = 5_000
FOLDERS = 100
BASE_DATE_S = 1_700_000_000
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
QUERY_KINDS = (
    "single-term match",
    "two-term match",
    "trait + field equality",
    "trait sorted by field",
    "ids",
    "query string",
)


# --- the data set ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Note:
    entity_id: str
    trait_id: str
    title: str
    body: str
    date_s: int
    folder: str
    ref: tuple[str, str] | None


def vocabulary(rng: random.Random, size: int = VOCABULARY) -> list[str]:
    """`size` distinct pronounceable words of 3 to 12 letters (rank 0 = the most frequent)."""
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        syllables = rng.choice((2, 2, 3, 3, 3, 4, 5))
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        word = word[: rng.choice((len(word), len(word), len(word) - 1))]
        if len(word) >= 3 and word not in seen:
            seen.add(word)
            words.append(word)
    return words


class Zipf:
    def __init__(self, words: list[str], s: float = 1.0) -> None:
        self.words = words
        self.cum = list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(len(words))))

    def sample(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cum, k=k)


def make_notes(count: int, seed: int) -> tuple[list[Note], list[str]]:
    rng = random.Random(seed)
    words = vocabulary(rng)
    zipf = Zipf(words)
    notes: list[Note] = []
    for i in range(count):
        entity_id = f"et{rng.getrandbits(128):032x}"
        trait_id = f"trt{rng.getrandbits(64):016x}"
        title = " ".join(zipf.sample(rng, 6))
        body = " ".join(zipf.sample(rng, rng.randint(50, 70)))
        ref = None
        if notes:
            target = notes[rng.randrange(len(notes))]
            ref = (target.entity_id, target.trait_id)
        notes.append(
            Note(entity_id, trait_id, title, body, BASE_DATE_S + i * 60, f"folder{rng.randrange(FOLDERS)}", ref)
        )
    return notes, words


def note_message(note: Note) -> test_pb2.TestMessage:
    message = test_pb2.TestMessage(string1=note.title, string3=note.folder)
    message.struct1.string1 = note.body
    message.date3.seconds = note.date_s
    if note.ref is not None:
        message.ref1.entity_id, message.ref1.trait_id = note.ref
    return message


def put_mutation(note: Note) -> mutation_pb2.EntityMutation:
    packed = any_pb2.Any(type_url=TYPE_URL, value=note_message(note).SerializeToString())
    return mutation_pb2.EntityMutation(
        entity_id=note.entity_id,
        put_trait=mutation_pb2.PutTraitMutation(trait=entity_pb2.Trait(id=note.trait_id, message=packed)),
    )


# --- queries ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class QuerySpec:
    """One query, for the store (request bytes) and for the bare index (its parameters)."""

    kind: str
    request: bytes
    words: tuple[str, ...] = ()
    folder: str = ""
    entity_id: str = ""
    query_string: str = ""


def make_queries(kind: str, count: int, notes: list[Note], words: list[str], rng: random.Random) -> list[QuerySpec]:
    specs = []
    for _ in range(count):
        if kind == "single-term match":
            w = rng.choice(words)
            q = query_pb2.EntityQuery(match=query_pb2.MatchPredicate(query=w))
            specs.append(QuerySpec(kind, q.SerializeToString(), words=(w,)))
        elif kind == "two-term match":
            w = (rng.choice(words), rng.choice(words))
            q = query_pb2.EntityQuery(match=query_pb2.MatchPredicate(query=" ".join(w)))
            specs.append(QuerySpec(kind, q.SerializeToString(), words=w))
        elif kind == "trait + field equality":
            folder = f"folder{rng.randrange(FOLDERS)}"
            q = query_pb2.EntityQuery(
                trait=query_pb2.TraitPredicate(
                    trait_name=TRAIT,
                    query=query_pb2.TraitQuery(field=query_pb2.TraitFieldPredicate(field="string3", string=folder)),
                )
            )
            specs.append(QuerySpec(kind, q.SerializeToString(), folder=folder))
        elif kind == "trait sorted by field":
            q = query_pb2.EntityQuery(
                trait=query_pb2.TraitPredicate(trait_name=TRAIT), ordering=query_pb2.Ordering(field="date3")
            )
            specs.append(QuerySpec(kind, q.SerializeToString()))
        elif kind == "ids":
            note = notes[rng.randrange(len(notes))]
            q = query_pb2.EntityQuery(ids=query_pb2.IdsPredicate(ids=[note.entity_id]))
            specs.append(QuerySpec(kind, q.SerializeToString(), entity_id=note.entity_id))
        elif kind == "query string":
            w1, w2, w3 = rng.choice(words), rng.choice(words), rng.choice(words)
            text = f"+{w1} {w2} -{w3}"
            q = query_pb2.EntityQuery(query_string=query_pb2.QueryStringPredicate(query=text))
            specs.append(QuerySpec(kind, q.SerializeToString(), words=(w1, w2, w3), query_string=text))
        else:
            raise ValueError(kind)
    return specs


# --- figures --------------------------------------------------------------------------------------------------


@dataclass
class Latency:
    values: list[float] = field(default_factory=list)  # seconds
    errors: int = 0

    def pct(self, fraction: float) -> float:
        if not self.values:
            return float("nan")
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000

    @property
    def p50(self) -> float:
        return self.pct(0.5)

    @property
    def p99(self) -> float:
        return self.pct(0.99)


def measure(calls: Sequence[Callable[[], object]], warmup: int) -> Latency:
    result = Latency()
    for i, call in enumerate(calls):
        start = time.perf_counter()
        try:
            call()
        except grpc.RpcError:
            result.errors += 1
            continue
        elapsed = time.perf_counter() - start
        if i >= warmup:
            result.values.append(elapsed)
    return result


# --- processes -------------------------------------------------------------------------------------------------


def exo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "exocli", *args], check=True, capture_output=True, timeout=60)


def start(name: str, argv: list[str], log_dir: Path) -> subprocess.Popen[bytes]:
    log = open(log_dir / f"{name}.log", "ab")  # closed when the process exits
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_serving(address: str, service: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{address} did not serve {service or 'health'} within {timeout:g} s")


def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- echo server (another process) ------------------------------------------------------------------------------


async def echo_server() -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


# --- phases ------------------------------------------------------------------------------------------------------


def load(
    store_address: str,
    notes: list[Note],
    batch: int,
    concurrency: int,
    store_pid: int,
    chain_pid: int,
    wait_indexed: bool = False,
) -> dict:
    """Writes every note, `concurrency` requests in flight, then waits until the store counts every note
    (with `wait_indexed`, a request whose wait timed out was still written: it is not re-sent)."""
    requests = [
        mutation_pb2.MutationRequest(
            mutations=[put_mutation(n) for n in notes[i : i + batch]], wait_indexed=wait_indexed
        ).SerializeToString()
        for i in range(0, len(notes), batch)
    ]
    count_query = query_pb2.EntityQuery(
        trait=query_pb2.TraitPredicate(trait_name=TRAIT), paging=query_pb2.Paging(count=1), programmatic=True
    )

    async def run() -> tuple[float, float, Latency, int]:
        latency = Latency()
        async with grpc.aio.insecure_channel(store_address, options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_unary(MUTATE)
            query = channel.unary_unary(
                QUERY,
                request_serializer=query_pb2.EntityQuery.SerializeToString,
                response_deserializer=query_pb2.EntityResults.FromString,
            )
            queue = list(reversed(requests))
            progress = {"done": 0}

            async def worker() -> None:
                while queue:
                    request = queue.pop()
                    t0 = time.perf_counter()
                    try:
                        await call(request, timeout=120)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                            raise
                        latency.errors += 1  # written, not indexed within the store's wait: counted below
                    latency.values.append(time.perf_counter() - t0)
                    progress["done"] += 1
                    if progress["done"] % max(1, len(requests) // 10) == 0:
                        print(f"  sent {min(len(notes), progress['done'] * batch):,} notes", file=sys.stderr)

            start_t = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            appended_t = time.perf_counter() - start_t
            while True:
                counted = (await query(count_query, timeout=30)).estimated_count
                if counted >= len(notes):
                    break
                await asyncio.sleep(0.02)
            return time.perf_counter() - start_t, appended_t, latency, counted

    cpu_before = cpu_seconds(store_pid), cpu_seconds(chain_pid), time.process_time()
    elapsed, appended, latency, counted = asyncio.run(run())
    return {
        "seconds": elapsed,
        "append_seconds": appended,  # the last Mutate answered (then: waiting until every note is queryable)
        "rate": len(notes) / elapsed,
        "latency": latency,
        "counted": counted,
        "store_cpu": cpu_seconds(store_pid) - cpu_before[0],
        "store_rss_mb": memory_mb(store_pid),
        "chain_cpu": cpu_seconds(chain_pid) - cpu_before[1],
        "client_cpu": time.process_time() - cpu_before[2],
    }


def store_queries(store_address: str, specs_by_kind: dict[str, list[QuerySpec]], warmup: int) -> tuple[dict, dict]:
    figures: dict[str, Latency] = {}
    sources: dict[str, tuple[int, int]] = {}
    with grpc.insecure_channel(store_address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(QUERY)
        for kind, specs in specs_by_kind.items():
            requests = [s.request for s in specs]
            calls = [lambda r=r: call(r, timeout=30) for r in requests[:warmup] + requests]
            figures[kind] = measure(calls, warmup)
            # where the results came from (not timed)
            pending = chain = 0
            for request in requests[:50]:
                results = query_pb2.EntityResults.FromString(call(request, timeout=30))
                for r in results.entities:
                    if r.source == query_pb2.PENDING:
                        pending += 1
                    else:
                        chain += 1
            sources[kind] = (pending, chain)
            print(
                f"  store {kind:24} p50 {figures[kind].p50:7.2f} ms  p99 {figures[kind].p99:7.2f} ms", file=sys.stderr
            )
    return figures, sources


def echo_latency(count: int, warmup: int, payload: bytes) -> Latency:
    process = subprocess.Popen(
        [sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_unary(ECHO)
            return measure([lambda: call(payload, timeout=30)] * (count + warmup), warmup)
    finally:
        process.terminate()
        process.wait(10)


async def _watches(store_address: str, count: int, writes: int, rng: random.Random, words: list[str]) -> Latency:
    latency = Latency()
    async with grpc.aio.insecure_channel(store_address, options=CHANNEL_OPTIONS) as channel:
        watch_call = channel.unary_stream(
            WATCH,
            request_serializer=query_pb2.EntityQuery.SerializeToString,
            response_deserializer=query_pb2.EntityResults.FromString,
        )
        mutate = channel.unary_unary(MUTATE)
        tag = f"w{count}x{rng.getrandbits(32):08x}"
        waiting: dict[int, tuple[str, asyncio.Future[float]]] = {}
        first: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()

        async def follow(i: int, ready: asyncio.Future[None]) -> None:
            query = query_pb2.EntityQuery(
                trait=query_pb2.TraitPredicate(
                    trait_name=TRAIT,
                    query=query_pb2.TraitQuery(
                        field=query_pb2.TraitFieldPredicate(field="string3", string=f"{tag}-{i}")
                    ),
                )
            )
            stream = watch_call(query)
            async for results in stream:
                now = time.perf_counter()
                if not ready.done():
                    ready.set_result(None)
                wanted = waiting.get(i)
                if wanted is not None and any(r.entity.id == wanted[0] for r in results.entities):
                    if not wanted[1].done():
                        wanted[1].set_result(now)

        tasks = []
        for i in range(count):
            ready: asyncio.Future[None] = loop.create_future()
            first.append(ready)
            tasks.append(asyncio.create_task(follow(i, ready)))
        await asyncio.wait_for(asyncio.gather(*first), 120)
        await asyncio.sleep(0.5)
        try:
            for _ in range(writes):
                i = rng.randrange(count)
                entity_id = f"etwatch{rng.getrandbits(64):016x}"
                note = Note(
                    entity_id,
                    "trt1",
                    " ".join(rng.sample(words, 6)),
                    " ".join(rng.sample(words, 60)),
                    BASE_DATE_S,
                    f"{tag}-{i}",
                    None,
                )
                done: asyncio.Future[float] = loop.create_future()
                waiting[i] = (entity_id, done)
                request = mutation_pb2.MutationRequest(mutations=[put_mutation(note)]).SerializeToString()
                t0 = time.perf_counter()
                await mutate(request, timeout=30)
                try:
                    latency.values.append(await asyncio.wait_for(done, 30) - t0)
                except TimeoutError:
                    latency.errors += 1
                waiting.pop(i, None)
                await asyncio.sleep(0.05 + rng.random() * 0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return latency


def watch_latency(store_address: str, count: int, writes: int, seed: int, words: list[str]) -> Latency:
    return asyncio.run(_watches(store_address, count, writes, random.Random(seed), words))


# --- the bare tantivy floor ---------------------------------------------------------------------------------------


class BareIndex:
    """The same notes in a plain tantivy index (one document per note), in this process."""

    def __init__(self, notes: list[Note], path: Path) -> None:
        import tantivy

        self.t = tantivy
        sb = tantivy.SchemaBuilder()
        sb.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
        sb.add_text_field("type", tokenizer_name="raw", index_option="basic")
        sb.add_text_field("title", stored=True)
        sb.add_text_field("body", stored=True)
        sb.add_text_field("all")
        sb.add_text_field("folder", stored=True, tokenizer_name="raw", index_option="basic")
        sb.add_text_field("ref", stored=True, tokenizer_name="raw", index_option="basic")
        sb.add_unsigned_field("date", stored=True, indexed=True, fast=True)
        sb.add_unsigned_field("seq", stored=True, indexed=True, fast=True)
        self.schema = sb.build()
        path.mkdir(parents=True, exist_ok=True)
        self.index = tantivy.Index(self.schema, path=str(path))
        writer = self.index.writer(200_000_000, 2)
        start_t = time.perf_counter()
        for seq, note in enumerate(notes):
            doc = tantivy.Document()
            doc.add_text("id", note.entity_id)
            doc.add_text("type", TRAIT)
            doc.add_text("title", note.title)
            doc.add_text("body", note.body)
            doc.add_text("all", note.title)
            doc.add_text("all", note.body)
            doc.add_text("folder", note.folder)
            if note.ref:
                doc.add_text("ref", f"{note.ref[0]} {note.ref[1]}")
            doc.add_unsigned("date", note.date_s * 1_000_000_000)
            doc.add_unsigned("seq", seq)
            writer.add_document(doc)
        writer.commit()
        writer.wait_merging_threads()
        self.index_seconds = time.perf_counter() - start_t
        self.index.reload()
        self.searcher = self.index.searcher()

    def _fuzzy(self, words: Sequence[str]) -> object:
        t = self.t
        clauses = []
        for w in words:
            clauses.append((t.Occur.Should, t.Query.term_query(self.schema, "all", w)))
            size = len(w.encode())
            if size > 3:
                clauses.append(
                    (t.Occur.Should, t.Query.fuzzy_term_query(self.schema, "all", w, 1 if size <= 6 else 2, True))
                )
        return t.Query.boolean_query(clauses)

    def _exact(self, words: Sequence[str]) -> object:
        t = self.t
        if len(words) == 1:
            return t.Query.term_query(self.schema, "all", words[0])
        return t.Query.boolean_query([(t.Occur.Should, t.Query.term_query(self.schema, "all", w)) for w in words])

    def run(self, spec: QuerySpec, fuzzy: bool) -> list[object]:
        """The top 10 documents of `spec` (as the store returns them: stored fields loaded)."""
        t, s, searcher = self.t, self.schema, self.searcher
        order: dict[str, object] = {}
        if spec.kind in ("single-term match", "two-term match"):
            query = self._fuzzy(spec.words) if fuzzy else self._exact(spec.words)
        elif spec.kind == "query string":
            w1, w2, w3 = spec.words
            positive = self._fuzzy([w2]) if fuzzy else t.Query.term_query(s, "all", w2)
            query = t.Query.boolean_query(
                [
                    (t.Occur.Must, t.Query.term_query(s, "all", w1)),
                    (t.Occur.Should, positive),
                    (t.Occur.MustNot, t.Query.term_query(s, "all", w3)),
                ]
            )
        elif spec.kind == "trait + field equality":
            query = t.Query.boolean_query(
                [
                    (t.Occur.Must, t.Query.term_query(s, "type", TRAIT)),
                    (t.Occur.Must, t.Query.term_query(s, "folder", spec.folder)),
                ]
            )
            order = {"order_by_field": "seq", "order": t.Order.Desc}
        elif spec.kind == "trait sorted by field":
            query = t.Query.term_query(s, "type", TRAIT)
            order = {"order_by_field": "date", "order": t.Order.Desc}
        elif spec.kind == "ids":
            query = t.Query.term_query(s, "id", spec.entity_id)
        else:
            raise ValueError(spec.kind)
        hits = searcher.search(query, 10, count=False, **order).hits
        return [searcher.doc(addr) for _, addr in hits]


def bare_queries(bare: BareIndex, specs_by_kind: dict[str, list[QuerySpec]], warmup: int) -> dict:
    figures: dict[tuple[str, bool], Latency] = {}
    for kind, specs in specs_by_kind.items():
        for fuzzy in (True, False):
            if not fuzzy and kind not in ("single-term match", "two-term match", "query string"):
                continue
            calls = [lambda s=s, f=fuzzy: bare.run(s, f) for s in specs[:warmup] + specs]
            figures[(kind, fuzzy)] = measure(calls, warmup)
    return figures


# --- main -----------------------------------------------------------------------------------------------------------


def after_load(store_pid: int, timeout_s: float = 300.0) -> dict:
    """The store's work after the load: deferred chain indexing (its timer ticks every 5 s, and by default
    it waits until writes have stopped for 2 s, so most of a burst is chain-indexed after it) and tantivy
    merges. Waits until the store has been idle (under 5% of a core) for 6 s after working (longer than
    the timer's period: a shorter quiet spell may be the wait for the next tick), or 15 s without work."""
    cpu0 = last_cpu = cpu_seconds(store_pid)
    t0 = last_busy = time.perf_counter()
    worked = False
    while True:
        time.sleep(0.5)
        now, cpu = time.perf_counter(), cpu_seconds(store_pid)
        if cpu - last_cpu > 0.025:
            last_busy, worked = now, worked or cpu - cpu0 > 0.5
        last_cpu = cpu
        if now - last_busy >= (6.0 if worked else 15.0) or now - t0 > timeout_s:
            return {
                "seconds": last_busy - t0,
                "store_cpu": cpu - cpu0,
                "store_rss_mb": memory_mb(store_pid),
                "store_peak_mb": memory_mb(store_pid, "VmHWM"),
            }


def node_setup(node_dir: Path, index_settings: Sequence[str] = ()) -> tuple[str, str, str, bool]:
    """(cell id, chain address, store address, fresh); `index_settings`: `KEY=N` for node.yaml's
    `store.index` (a fresh node only)."""
    fresh = not (node_dir / "node.yaml").exists()
    if fresh:
        exo("-d", str(node_dir), "node", "init", "--name", "bench")
        exo("-d", str(node_dir), "cell", "init", "--name", "bench")
        if index_settings:
            directory = NodeDirectory(node_dir)
            node_config = directory.load_node_config()
            for setting in index_settings:
                key, _, value = setting.partition("=")
                getattr(node_config.store.index, key).value = int(value)
            directory.save_node_config(node_config)
    config = NodeDirectory(node_dir).load_node_config()
    return config.cells[0].id, config.addresses.chain, config.addresses.store, fresh


def profiler(args: argparse.Namespace, pid: int, phase: str) -> subprocess.Popen[bytes] | None:
    """py-spy recording the store during `phase` when asked (`--py-spy FILE --py-spy-phase PHASE`)."""
    if not args.py_spy or args.py_spy_phase != phase:
        return None
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--threads",
            "--output",
            args.py_spy,
            "--format",
            args.py_spy_format,
            "--rate",
            "200",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    return spy


def stop_profiler(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def bench(args: argparse.Namespace, root: Path) -> int:
    node_dir = root / "node"
    cell_id, chain_address, store_address, fresh = node_setup(node_dir, args.index_setting)
    print(f"generating {args.entities:,} notes (seed {args.seed})", file=sys.stderr)
    notes, words = make_notes(args.entities, args.seed)
    rng = random.Random(args.seed + 1)
    specs_by_kind = {k: make_queries(k, args.queries + args.warmup, notes, words, rng) for k in QUERY_KINDS}

    common = ["--dir", str(node_dir), "--cell", cell_id, "--log", args.service_log]
    chain = start("chain", [sys.executable, "-m", "exochain", *common], root)
    store = start("store", [sys.executable, "-m", "exostore", *common], root)
    processes = [chain, store]
    out: dict[str, object] = {"fresh": fresh}
    try:
        t0 = time.perf_counter()
        wait_serving(store_address, STORE_SERVICE, timeout=1800)
        out["startup_s"] = time.perf_counter() - t0
        if fresh:
            load_spy = profiler(args, store.pid, "load")
            print(
                f"loading through the store ({args.concurrency} x {args.batch} mutations in flight"
                f"{', wait_indexed' if args.wait_indexed else ''})",
                file=sys.stderr,
            )
            out["load"] = load(
                store_address, notes, args.batch, args.concurrency, store.pid, chain.pid, args.wait_indexed
            )
            stop_profiler(load_spy)
            print("  waiting for the store to be idle (deferred chain indexing, merges)", file=sys.stderr)
            out["after_load"] = after_load(store.pid)

        spy = profiler(args, store.pid, "queries")
        print("queries through gRPC to the store", file=sys.stderr)
        cpu0 = cpu_seconds(store.pid)
        out["store"], out["sources"] = store_queries(store_address, specs_by_kind, args.warmup)
        out["store_query_cpu"] = cpu_seconds(store.pid) - cpu0
        stop_profiler(spy)

        print("gRPC echo round trip", file=sys.stderr)
        out["echo"] = echo_latency(args.queries, args.warmup, specs_by_kind["two-term match"][0].request)

        watches: dict[int, Latency] = {}
        spy = profiler(args, store.pid, "watches")
        for count in args.watches:
            print(f"watches: {count} open", file=sys.stderr)
            watches[count] = watch_latency(store_address, count, args.watch_writes, args.seed + count, words)
            print(f"  notification p50 {watches[count].p50:7.2f} ms  p99 {watches[count].p99:7.2f} ms", file=sys.stderr)
        out["watches"] = watches
        stop_profiler(spy)
    finally:
        stop(processes)

    print("bare tantivy index of the same notes (in this process)", file=sys.stderr)
    bare = BareIndex(notes, root / "bare")
    out["bare_index_s"] = bare.index_seconds
    out["bare"] = bare_queries(bare, specs_by_kind, args.warmup)
    report(args, out)
    return 0


def report(args: argparse.Namespace, out: dict) -> None:
    print()
    print(
        f"Store benchmark: {args.entities:,} notes, one node on loopback, {os.cpu_count()} CPU(s); "
        f"{args.queries:,} queries per kind (after {args.warmup} warm-up), first page of 10"
    )
    load_figures = out.get("load")
    if load_figures:
        lat = load_figures["latency"]
        print(
            f"Indexing: {load_figures['rate']:,.0f} mutations/s, Append to queryable ({args.entities:,} in "
            f"{load_figures['seconds']:.1f} s, the last Mutate answered at {load_figures['append_seconds']:.1f} s; "
            f"{args.concurrency} x {args.batch}-mutation requests in flight"
            f"{' with wait_indexed' if args.wait_indexed else ''}, request p50 {lat.p50:.0f} ms p99 {lat.p99:.0f} ms"
            f"{f', {lat.errors} not indexed within the store wait' if args.wait_indexed else ''}; "
            f"CPU: store {load_figures['store_cpu']:.1f} s, chain {load_figures['chain_cpu']:.1f} s, "
            f"this client {load_figures['client_cpu']:.1f} s; "
            f"store memory {load_figures['store_rss_mb']:,.0f} MB)"
        )
        after = out["after_load"]
        print(
            f"After the load: the store worked {after['seconds']:.1f} s more (CPU {after['store_cpu']:.1f} s: "
            f"deferred chain indexing, merges); load and that together: "
            f"{args.entities / (load_figures['seconds'] + after['seconds']):,.0f} mutations/s; store memory then "
            f"{after['store_rss_mb']:,.0f} MB, peak {after['store_peak_mb']:,.0f} MB"
        )
    else:
        print(f"Indexing: not measured (reused node folder; store start-up {out['startup_s']:.1f} s)")
    print(f"Bare tantivy-py bulk indexing: {args.entities / out['bare_index_s']:,.0f} documents/s")
    echo: Latency = out["echo"]
    print()
    header = (
        f"{'query':24} | {'store p50':>9} {'p99':>7} | {'bare p50':>8} {'p99':>7} | {'exact p50':>9} | "
        f"{'store - echo':>12} | {'results pending/chain':>21} | targets (p50 <= echo + 1 ms, p99 <= 10 ms)"
    )
    print(header)
    print("-" * len(header))
    store: dict[str, Latency] = out["store"]
    bare: dict[tuple[str, bool], Latency] = out["bare"]
    for kind in QUERY_KINDS:
        s, b = store[kind], bare[(kind, True)]
        exact = bare.get((kind, False))
        exact_text = f"{exact.p50:9.3f}" if exact else f"{'':>9}"
        met = s.p50 <= echo.p50 + 1.0 and s.p99 <= 10.0
        pending, chain = out["sources"][kind]
        errors = f" ({s.errors} errors)" if s.errors else ""
        print(
            f"{kind:24} | {s.p50:9.2f} {s.p99:7.2f} | {b.p50:8.3f} {b.p99:7.3f} | {exact_text} | "
            f"{s.p50 - echo.p50:+12.2f} | {pending:>10}/{chain:<10} | {'met' if met else 'NOT met'}{errors}"
        )
    print(f"{'gRPC echo (floor)':24} | {echo.p50:9.2f} {echo.p99:7.2f} |")
    print("(ms; bare = same query on plain tantivy incl. fuzzy terms where the store has them; exact = no fuzzy)")
    print()
    watches: dict[int, Latency] = out["watches"]
    for count, lat in watches.items():
        verdict = ""
        if count == 1000:
            verdict = "  target p50 <= 20 ms: " + ("met" if lat.p50 <= 20 else "NOT met")
        errors = f" ({lat.errors} missed)" if lat.errors else ""
        print(
            f"Watch notification, {count:5} open watches: p50 {lat.p50:7.2f} ms  p99 {lat.p99:7.2f} ms "
            f"({len(lat.values)} writes){errors}{verdict}"
        )
    if load_figures:
        verdict = "met" if load_figures["rate"] >= 10_000 else "NOT met"
        print(f"Indexing target >= 10,000 mutations/s: {load_figures['rate']:,.0f}/s  {verdict}")
    print(f"Store CPU during the query phase: {out['store_query_cpu']:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_store.py", description="Store indexing, query and watch figures.")
    parser.add_argument("--entities", type=int, default=100_000, help="notes in the data set (default 100000)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per kind (default 1000)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed queries first, per kind (default 50)")
    parser.add_argument("--watches", type=lambda t: [int(x) for x in t.split(",") if x], default=[10, 100, 1000])
    parser.add_argument("--watch-writes", type=int, default=50, help="writes measured per watch count (default 50)")
    parser.add_argument("--batch", type=int, default=500, help="mutations per Mutate while loading (default 500)")
    parser.add_argument("--concurrency", type=int, default=4, help="Mutate requests in flight while loading")
    parser.add_argument(
        "--wait-indexed", action="store_true", help="loading requests wait until indexed (a closed loop)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--service-log", default="warn", help="log level of the chain and store (logs: --keep)")
    parser.add_argument(
        "--index-setting",
        action="append",
        default=[],
        metavar="KEY=N",
        help="a store.index setting of node.yaml, e.g. chain_index_deferred_write_secs=0 (repeatable)",
    )
    parser.add_argument("--node-dir", help="node folder to keep (reused, without loading, if it exists)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--py-spy", help="record a py-spy profile of the store during the queries to this file")
    parser.add_argument("--py-spy-phase", default="queries", help="load, queries or watches (default queries)")
    parser.add_argument("--py-spy-format", default="raw", help="py-spy output format (raw, flamegraph, speedscope)")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        asyncio.run(echo_server())
        return 0
    if args.node_dir:
        root = Path(args.node_dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "bare", ignore_errors=True)
        return bench(args, root)
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        return bench(args, root)
    finally:
        if args.keep:
            print(f"folder kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
