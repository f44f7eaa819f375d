"""`make bench-apphost` (`python -m exoapphost.bench`): the app host's figures, printed.

* cold start of the example app: load the module + instantiate + run the init exports, with a
  fresh engine each time: compiling from the .wasm, then with the compiled-module cache on disk
  (what a restarted app host does), then with the module already in memory (an app restart);
* host -> guest message round trips/s: a reply delivered to the bench guest, whose callback sends
  the next query out (8 chains), driven directly and through an app runner thread;
* store queries/s an app can issue: the bench guest's queries through a real store service (chain
  and store processes on a temporary one-node cell), directly and through the gateway.

A benchmark, not a test: nothing is asserted. `--skip-store` skips the part with processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exocommon.config import NodeDirectory
from exocommon.keys import Keypair
from exocore.apps import runtime_pb2
from exocore.store import entity_pb2, mutation_pb2
from exocore.store.v1 import entity_store_pb2_grpc
from exocore.test import test_pb2

from .bridge import GrpcStoreBridge, NodeToken
from .runner import REPLY_TYPES, AppRunner, AppSpec
from .runtime import AppInstance, WasmEngine
from .settings import AppLimits, RestartPolicy

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_WASM = EXAMPLES / "example" / "example.wasm"
BENCH_WASM = EXAMPLES / "bench" / "bench.wasm"


def _quiet(_level: int, _text: str) -> None:
    pass


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _start_timed(engine: WasmEngine, wasm: Path, key: str | None) -> float:
    """Seconds to load the module (compile, cache or memory) + instantiate + run the init exports."""
    started = time.perf_counter()
    module = engine.load_module(wasm, key)
    instance = AppInstance(engine, module, AppLimits(), on_log=_quiet, on_out_message=lambda m: None)
    instance.start()
    elapsed = time.perf_counter() - started
    instance.close()
    return elapsed


def cold_start(runs: int = 20) -> None:
    wasm = EXAMPLE_WASM
    key = "example"
    print(f"cold start of the example app ({wasm.stat().st_size} bytes of wasm; median of {runs})")
    compiled: list[float] = []
    cached: list[float] = []
    warm: list[float] = []
    engines: list[float] = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(5):
            engine = WasmEngine()  # no cache: compiles
            compiled.append(_start_timed(engine, wasm, None))
            engine.close()
        WasmEngine(cache_dir=Path(cache)).load_module(wasm, key)  # fills the disk cache
        for _ in range(runs):
            started = time.perf_counter()
            engine = WasmEngine(cache_dir=Path(cache))
            engines.append(time.perf_counter() - started)
            cached.append(_start_timed(engine, wasm, key))  # deserialized from the disk cache
            warm.append(_start_timed(engine, wasm, key))  # the module is in memory
            engine.close()
    print(f"  compile + instantiate + init:                   {_ms(statistics.median(compiled))}")
    print(f"  disk-cached module + instantiate + init:        {_ms(statistics.median(cached))}   <- target <= 50 ms")
    print(f"  module in memory (app restart) + inst. + init:  {_ms(statistics.median(warm))}")
    print(f"  (engine creation, once per process:             {_ms(statistics.median(engines))})")


def round_trips(seconds: float = 2.0) -> None:
    print("host -> guest message round trips (reply in, next query out; bench guest, 8 chains)")
    engine = WasmEngine()
    out: list[runtime_pb2.OutMessage] = []
    instance = AppInstance(
        engine, engine.load_module(BENCH_WASM), AppLimits(), on_log=_quiet, on_out_message=out.append
    )
    instance.start()
    reply = runtime_pb2.InMessage(type=runtime_pb2.STORE_ENTITY_RESULTS)
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(1000):
            reply.rendez_vous_id = out.pop().rendez_vous_id
            instance.deliver(reply.SerializeToString())
        count += 1000
    direct = count / (time.perf_counter() - started)
    instance.close()
    print(f"  direct (AppInstance.deliver):                {direct:,.0f} round trips/s   <- target >= 10,000")

    class Immediate:
        def submit(self, app: AppSpec, message: runtime_pb2.OutMessage, answer: Callable) -> None:
            answer(runtime_pb2.InMessage(type=REPLY_TYPES[message.type], rendez_vous_id=message.rendez_vous_id))

    runner = AppRunner(
        AppSpec("bench", "bench", wasm=BENCH_WASM.read_bytes()), engine, AppLimits(), RestartPolicy(), Immediate()
    )
    runner.start()
    time.sleep(0.3)
    before = runner.status().messages
    started = time.perf_counter()
    time.sleep(seconds)
    through_runner = (runner.status().messages - before) / (time.perf_counter() - started)
    runner.stop()
    engine.close()
    print(f"  through an app runner thread (inbox, batches): {through_runner:,.0f} round trips/s")


# ---------------------------------------------------------------------------------------------------
# Queries through a real store
# ---------------------------------------------------------------------------------------------------


def _exo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "exocli", "-l", "off", *args], check=True, capture_output=True)


def _serving(address: str, service: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def one_node_cell() -> Iterator[tuple[NodeDirectory, str]]:
    root = Path(tempfile.mkdtemp(prefix="bench-apphost-"))
    processes: list[subprocess.Popen[bytes]] = []
    log = (root / "services.log").open("wb")
    try:
        directory = NodeDirectory(root / "node")
        _exo("-d", str(directory.root), "node", "init", "--name", "bench")
        config = directory.load_node_config()
        config.chain.commit_interval_ms.value = 100
        config.chain.tick_interval_ms.value = 20
        directory.save_node_config(config)
        _exo("-d", str(directory.root), "cell", "init", "--name", "bench")
        (cell,) = directory.load_cell_configs()
        for module in ("exochain", "exostore", "exogateway"):
            argv = [sys.executable, "-m", module, "--dir", str(directory.root), "--cell", cell.id, "--log", "warn"]
            processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        for address in (config.addresses.store, config.addresses.gateway):
            while not _serving(address, "exocore.store.v1.EntityStore"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"services not serving; see {root / 'services.log'}")
                time.sleep(0.2)
        yield directory, cell.id
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _fill(address: str, entities: int) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = entity_store_pb2_grpc.EntityStoreStub(channel)
        for i in range(entities):
            message = test_pb2.TestMessage(string1=f"bench entity {i}")
            trait = entity_pb2.Trait()
            trait.message.Pack(message)
            stub.Mutate(
                mutation_pb2.MutationRequest(
                    mutations=[
                        mutation_pb2.EntityMutation(
                            entity_id=f"bench{i}", put_trait=mutation_pb2.PutTraitMutation(trait=trait)
                        )
                    ],
                    wait_indexed=i == entities - 1,
                ),
                timeout=10,
            )


def _queries_per_second(target: str, token: NodeToken, engine: WasmEngine, seconds: float) -> float:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make() -> GrpcStoreBridge:
        return GrpcStoreBridge(target, timeout_s=10, token=token)

    bridge = asyncio.run_coroutine_threadsafe(make(), loop).result()
    runner = AppRunner(
        AppSpec("bench", "bench", wasm=BENCH_WASM.read_bytes()), engine, AppLimits(), RestartPolicy(), bridge
    )
    runner.start()
    try:
        time.sleep(1.0)  # connect, warm up
        before = runner.status().messages
        started = time.perf_counter()
        time.sleep(seconds)
        rate = (runner.status().messages - before) / (time.perf_counter() - started)
        if runner.status().last_error:
            print(f"  (app error: {runner.status().last_error})")
        return rate
    finally:
        runner.stop()
        asyncio.run_coroutine_threadsafe(bridge.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def store_queries(seconds: float = 5.0, entities: int = 100) -> None:
    print(f"store queries/s an app issues (bench guest: 8 in flight, `all` page of 1, {entities} entities)")
    with one_node_cell() as (directory, cell_id):
        config = directory.load_node_config()
        _fill(config.addresses.store, entities)
        token = NodeToken(cell_id, Keypair.decode_base58(config.keypair))
        engine = WasmEngine()
        direct = _queries_per_second(config.addresses.store, token, engine, seconds)
        print(f"  to the store directly:                       {direct:,.0f} queries/s")
        gateway = _queries_per_second(config.addresses.gateway, token, engine, seconds)
        print(f"  through the gateway (auth token, routing):   {gateway:,.0f} queries/s")
        engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m exoapphost.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-store", action="store_true", help="skip the queries through store processes")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each throughput measurement")
    args = parser.parse_args()
    for wasm in (EXAMPLE_WASM, BENCH_WASM):
        if not wasm.exists():
            print(f"error: {wasm} is missing; build it with `make apps`", file=sys.stderr)
            return 1
    print(f"exoapphost benchmark (python {sys.version.split()[0]}, {os.cpu_count()} cpu)")
    cold_start()
    round_trips(args.seconds)
    if not args.skip_store:
        store_queries(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
