"""Store services tailing a 2-node chain, as real processes: replication of writes between stores,
SIGKILL and restart under writes, a wiped replica rebuilding, watched queries, and the CLI."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cluster import COMMITTED, STORE_ROLES, Cluster, ClusterNode, StoreClient, exo, wait_until
from google.protobuf import any_pb2

from exocore.store import entity_pb2, mutation_pb2, query_pb2
from exocore.test import test_pb2

pytestmark = pytest.mark.timeout(60)

# The chain index takes blocks 1 deep, every 2 blocks, without deferral: both indices get exercised.
STORE_SETTINGS = {
    "chain_index_min_depth": 1,
    "chain_index_depth_leeway": 2,
    "chain_index_deferred_interval_secs": 0,
}


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster.create(tmp_path, size=2, roles=STORE_ROLES, store_settings=STORE_SETTINGS)
    try:
        cluster.start()
        for node in cluster.nodes:
            node.start_store(wait=False)
        for node in cluster.nodes:
            node.wait_store_serving()
        yield cluster
    finally:
        print(cluster.logs())
        cluster.close()


def put(text: str, message_type=test_pb2.TestMessage) -> mutation_pb2.EntityMutation:
    message = any_pb2.Any()
    message.Pack(message_type(string1=text))
    return mutation_pb2.EntityMutation(
        put_trait=mutation_pb2.PutTraitMutation(trait=entity_pb2.Trait(message=message))
    )


def texts(entity: entity_pb2.Entity) -> list[str]:
    return sorted(test_pb2.TestMessage.FromString(t.message.value).string1 for t in entity.traits)


ALL = query_pb2.EntityQuery(all=query_pb2.AllPredicate(), paging=query_pb2.Paging(count=1000))


def snapshot(store: StoreClient, query: query_pb2.EntityQuery = ALL) -> tuple[int, list[tuple[str, int, list[str]]]]:
    """What a query returns, without what legitimately differs between replicas (sources, scores)."""
    results = store.query(query)
    return results.hash, [(r.entity.id, r.hash, texts(r.entity)) for r in results.entities]


def converged(a: ClusterNode, b: ClusterNode, entities: int | range) -> tuple | None:
    """Both stores' snapshot when equal and holding `entities` entities (a count or a range)."""
    first, second = snapshot(a.store()), snapshot(b.store())
    wanted = range(entities, entities + 1) if isinstance(entities, int) else entities
    if first == second and len(first[1]) in wanted:
        return first
    return None


def test_writes_on_one_node_are_queryable_on_the_other(stores: Cluster):
    a, b = stores.nodes
    result = a.store().mutate(
        mutation_pb2.MutationRequest(
            mutations=[put("hello from node one"), put("second trait")], common_entity_id=True, return_entities=True
        )
    )
    (entity,) = result.entities
    assert texts(entity) == ["hello from node one", "second trait"]

    def found_on_b():
        results = b.store().query(query_pb2.EntityQuery(match=query_pb2.MatchPredicate(query="hello")))
        # (Two operations: they may reach the other node one after the other.)
        return results.entities[0].entity if results.entities and len(results.entities[0].entity.traits) == 2 else None

    replicated = wait_until(found_on_b, 20, "the entity on node two's store")
    assert replicated.id == entity.id and texts(replicated) == texts(entity)

    # wait_committed: acknowledged once in a block of the store's own chain node.
    committed = b.store().mutate(mutation_pb2.MutationRequest(mutations=[put("committed")], wait_committed=True))
    (operation_id,) = committed.operation_ids
    assert b.client().operations([operation_id])[operation_id].status == COMMITTED
    stores.wait_committed([operation_id])


class Writer(threading.Thread):
    """Writes through one store as fast as it answers: 3 traits of one new entity per request."""

    def __init__(self, node: ClusterNode) -> None:
        super().__init__(daemon=True)
        self.store = StoreClient(node.store_address)
        self.acknowledged = 0
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        sequence = 0
        while not self.stopping.is_set():
            mutations = [put(f"write {sequence} part {i}") for i in range(3)]
            sequence += 1
            try:
                self.store.mutate(mutation_pb2.MutationRequest(mutations=mutations, common_entity_id=True), timeout=5)
                self.acknowledged += 1
            except grpc.RpcError:
                self.failures += 1
                time.sleep(0.05)
            time.sleep(0.005)
        self.store.close()


def test_a_sigkilled_store_resumes_and_matches_a_replica_that_never_died(stores: Cluster):
    a, b = stores.nodes
    # One writer per store; b's store is killed under its writer and while it indexes a's writes.
    writers = [Writer(a), Writer(b)]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: all(w.acknowledged >= 15 for w in writers), 20, "writes to be acknowledged")
        # Killed only once its chain index holds something, so the restart has progress to resume from
        # (on a loaded machine the first chain-index batch can come late).
        wait_until(lambda: "chain-indexed" in b.store_log_path.read_text(), 30, "b's store to chain-index a block")
        b.kill_store()
        killed_at = writers[0].acknowledged
        wait_until(lambda: writers[0].acknowledged >= killed_at + 20, 20, "writes while the store is down")
        b.start_store()
        resumed_at = writers[1].acknowledged
        wait_until(lambda: writers[1].acknowledged >= resumed_at + 20, 20, "writes to the restarted store")
    finally:
        for writer in writers:
            writer.stopping.set()
        for writer in writers:
            writer.join(10)
    assert writers[0].failures == 0 and writers[1].failures >= 1
    acknowledged = sum(w.acknowledged for w in writers)
    # A request cut by the kill may or may not have reached the chain: it is one entity or none.
    possible = range(acknowledged, acknowledged + writers[1].failures + 1)

    final = wait_until(lambda: converged(a, b, possible), 30, "both stores to return the same results")
    assert all(len(entity_texts) == 3 for _, _, entity_texts in final[1]), "all of a request or nothing"
    match = query_pb2.EntityQuery(
        match=query_pb2.MatchPredicate(query="write part"), paging=query_pb2.Paging(count=1000)
    )
    # Scores depend on which index (pending, boosted, or chain) holds a mutation on each replica and on
    # each index's term statistics, so the two replicas may rank equally good matches differently: the
    # same entities must match, in any order.
    assert sorted(snapshot(a.store(), match)[1]) == sorted(snapshot(b.store(), match)[1])
    # The restarted store resumed from its chain index instead of rebuilding it.
    starts = re.findall(r"listening on .* chain_indexed=(\S+)", b.store_log_path.read_text())
    assert len(starts) == 2 and starts[0] == "None" and starts[1] != "None", starts


def test_a_wiped_replica_rebuilds_from_the_chain(stores: Cluster):
    a, b = stores.nodes
    ids = []
    for i in range(12):
        request = mutation_pb2.MutationRequest(mutations=[put(f"entity {i}")], wait_indexed=True)
        ids += a.store().mutate(request).operation_ids
    stores.wait_committed(ids)
    before = wait_until(lambda: converged(a, b, 12), 20, "both stores to have every entity")

    b.kill_store()
    b.wipe_store()
    assert not b.store_dir.exists()
    b.start_store()
    assert wait_until(lambda: converged(a, b, 12), 20, "the wiped store to rebuild") == before
    assert (b.store_dir / "chain").is_dir() and (b.store_dir / "payloads").is_dir()


class WatchReader(threading.Thread):
    def __init__(self, store: StoreClient, query: query_pb2.EntityQuery) -> None:
        super().__init__(daemon=True)
        self.stream = store.watch(query)
        self.results: queue.Queue = queue.Queue()
        self.start()

    def run(self) -> None:
        try:
            for results in self.stream:
                self.results.put(results)
        except grpc.RpcError as exc:
            self.results.put(exc)

    def next(self, timeout: float) -> query_pb2.EntityResults:
        item = self.results.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item


def test_a_watch_sees_a_matching_write_and_not_a_non_matching_one(stores: Cluster):
    a, b = stores.nodes
    watch = WatchReader(b.store(), query_pb2.EntityQuery(trait=query_pb2.TraitPredicate(trait_name="test")))
    try:
        assert list(watch.next(10).entities) == []
        a.store().mutate(mutation_pb2.MutationRequest(mutations=[put("other type", test_pb2.TestMessage2)]))
        with pytest.raises(queue.Empty):
            watch.next(1.5)
        a.store().mutate(mutation_pb2.MutationRequest(mutations=[put("watched type")]))
        update = watch.next(15)
        assert [texts(r.entity) for r in update.entities] == [["watched type"]]
    finally:
        watch.stream.cancel()
        watch.join(5)

    failing = WatchReader(b.store(), query_pb2.EntityQuery(test=query_pb2.TestPredicate()))
    with pytest.raises(grpc.RpcError) as raised:
        failing.next(10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_mutate_then_query_string_returns_the_entity(stores: Cluster):
    a, b = stores.nodes
    request = {
        "mutations": [
            {
                "putTrait": {
                    "trait": {
                        "message": {
                            "@type": "type.googleapis.com/exocore.test.TestMessage",
                            "string1": "quick brown fox",
                        }
                    }
                }
            }
        ],
        "waitIndexed": True,
    }
    # `exo store` talks to the node's gateway by default; `--endpoint` reaches the store itself (same API).
    a_store = ("-d", str(a.directory.root), "store", "--endpoint", a.store_address)
    written = json.loads(exo(*a_store, "mutate", "--json", json.dumps(request)))
    assert len(written["operationIds"]) == 1

    def queried():
        b_store = ("-d", str(b.directory.root), "store", "--endpoint", b.store_address)
        out = json.loads(exo(*b_store, "query", "--query-string", "brown fox"))
        return out if out.get("entities") else None

    results = wait_until(queried, 20, "the entity through `exo store query` on the other node", interval=0.3)
    (entity,) = [r["entity"] for r in results["entities"]]
    assert entity["traits"][0]["message"] == {
        "@type": "type.googleapis.com/exocore.test.TestMessage",
        "string1": "quick brown fox",
    }
    assert entity["lastOperationId"] == written["operationIds"][0]
