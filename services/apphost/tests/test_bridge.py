"""The app host's store bridge: a store request that cannot be answered in time gets an error reply.

SPEC 11 item 12: the original's SDK dropped expired requests silently, leaving the caller waiting.
Here the app always hears back: the reply carries the store's answer or an error naming why not.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from exoapphost.bridge import GrpcStoreBridge
from exoapphost.runner import AppSpec
from exocore.apps import runtime_pb2

pytestmark = pytest.mark.timeout(30)

APP = AppSpec("app-id", "app", "1")


async def _hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(30)
    return b""


async def _answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"results:" + request


async def ask(bridge: GrpcStoreBridge, message: runtime_pb2.OutMessage) -> runtime_pb2.InMessage:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[runtime_pb2.InMessage] = loop.create_future()
    bridge.submit(APP, message, lambda reply: loop.call_soon_threadsafe(answered.set_result, reply))
    return await asyncio.wait_for(answered, 10)


async def test_a_request_past_its_deadline_gets_an_error_reply_and_an_answer_its_data():
    server = grpc.aio.server()
    handlers = {
        "Query": grpc.unary_unary_rpc_method_handler(_hang),
        "Mutate": grpc.unary_unary_rpc_method_handler(_answer),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("exocore.store.v1.EntityStore", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bridge = GrpcStoreBridge(f"127.0.0.1:{port}", timeout_s=0.3)
    try:
        query = runtime_pb2.OutMessage(type=runtime_pb2.STORE_ENTITY_QUERY, rendez_vous_id=7, data=b"q")
        reply = await ask(bridge, query)
        assert reply.rendez_vous_id == 7 and reply.type == runtime_pb2.STORE_ENTITY_RESULTS
        assert reply.error.startswith("DEADLINE_EXCEEDED")

        mutation = runtime_pb2.OutMessage(type=runtime_pb2.STORE_MUTATION_REQUEST, rendez_vous_id=8, data=b"m")
        reply = await ask(bridge, mutation)
        assert reply.rendez_vous_id == 8 and not reply.error and reply.data == b"results:m"
    finally:
        await bridge.close()
        await server.stop(0)


async def test_a_bridge_without_a_store_answers_with_an_error():
    bridge = GrpcStoreBridge("", timeout_s=1)
    try:
        reply = await ask(bridge, runtime_pb2.OutMessage(type=runtime_pb2.STORE_ENTITY_QUERY, rendez_vous_id=3))
        assert reply.rendez_vous_id == 3 and reply.error == "no store address configured for the app host"
    finally:
        await bridge.close()
