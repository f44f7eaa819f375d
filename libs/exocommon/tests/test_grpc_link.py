"""exocommon.grpc_util.link: many unary calls over one stream, against a real grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from exocommon.errors import InvalidArgument
from exocommon.grpc_util import ServiceServer, create_channel, link
from exocommon.grpc_util.errors import INTERNAL_ERROR_DETAILS
from exocommon.grpc_util.link import (
    LINK_METHOD,
    PIECE_BYTES,
    LinkBroken,
    LinkCallError,
    LinkClient,
    link_registration,
)
from exocore.store.v1 import link_pb2

ECHO = "/test.Service/Echo"
SLOW = "/test.Service/Slow"


class Handlers:
    def __init__(self) -> None:
        self.started: list[bytes] = []
        self.cancelled: list[bytes] = []
        self.remaining: list[float | None] = []

    async def echo(self, body: bytes, remaining: float | None) -> bytes:
        self.remaining.append(remaining)
        return b"echo:" + body

    async def fail(self, body: bytes, remaining: float | None) -> bytes:
        raise InvalidArgument(f"bad request {body.decode()}")

    async def crash(self, body: bytes, remaining: float | None) -> bytes:
        raise RuntimeError("secret detail")

    async def slow(self, body: bytes, remaining: float | None) -> bytes:
        self.started.append(body)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.append(body)
            raise
        return body

    def mapping(self) -> dict:
        return {
            ECHO: self.echo,
            "/test.Service/Fail": self.fail,
            "/test.Service/Crash": self.crash,
            "/test.Service/Slow": self.slow,
        }


@contextlib.asynccontextmanager
async def link_server(handlers: Handlers | None, **kwargs) -> AsyncIterator[ServiceServer]:
    registrations = [link_registration(handlers.mapping())] if handlers is not None else []
    server = ServiceServer("link-test", "127.0.0.1:0", registrations, drain_delay_s=0, grace_s=0.2, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def link_client(address: str, **kwargs) -> AsyncIterator[LinkClient]:
    channel = create_channel(address, retry=False)
    client = LinkClient(channel, **kwargs)
    try:
        yield client
    finally:
        await client.close()
        await channel.close()


async def test_concurrent_calls_share_one_stream_and_get_their_own_answers():
    handlers = Handlers()
    async with link_server(handlers) as server, link_client(server.address) as client:
        bodies = [f"call {i}".encode() for i in range(200)]
        results = await asyncio.gather(*(client.call(ECHO, body, 5.0) for body in bodies))
        assert results == [b"echo:" + body for body in bodies]
        assert all(r is not None and 0 < r <= 5.0 for r in handlers.remaining)
        assert await client.call(ECHO, b"", None) == b"echo:"
        assert handlers.remaining[-1] is None


async def test_with_enough_calls_in_flight_a_frame_waits_for_more_calls():
    handlers = Handlers()
    async with (
        link_server(handlers) as server,
        link_client(server.address, gather_s=1.0, gather_min_in_flight=2) as client,
    ):
        assert await client.call(ECHO, b"alone", 5.0) == b"echo:alone"  # 1 in flight: written at once
        before = client.statistics()
        slow = asyncio.create_task(client.call("/test.Service/Slow", b"held", 10.0))
        await asyncio.sleep(0.05)
        # The Slow call keeps one in flight: each of these makes two, so their frames wait for more.
        calls = []
        for i in range(4):
            calls.append(asyncio.create_task(client.call(ECHO, f"call {i}".encode(), 10.0)))
            await asyncio.sleep(0.02)
        assert await asyncio.gather(*calls) == [f"echo:call {i}".encode() for i in range(4)]
        after = client.statistics()
        assert after["calls"] - before["calls"] == 5
        assert after["frames"] - before["frames"] <= 2  # Slow's frame, then one for the four (not 5 frames)
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow


async def test_large_bodies_do_not_wait_for_the_gathering():
    # Pieces fill their frames: waiting for more calls would only slow a large body down.
    handlers = Handlers()
    async with (
        link_server(handlers) as server,
        link_client(server.address, gather_s=60.0, gather_min_in_flight=1) as client,
    ):
        big = bytes(range(256)) * (PIECE_BYTES * 3 // 256)
        assert await client.call(ECHO, big, 5.0) == b"echo:" + big


async def test_a_caller_with_few_calls_in_flight_does_not_wait_for_the_gathering():
    async with link_server(Handlers()) as server, link_client(server.address, gather_s=60.0) as client:
        # Below `gather_min_in_flight`: a 60 s hold would make these miss their 5 s deadline.
        for i in range(3):
            assert await client.call(ECHO, f"{i}".encode(), 5.0) == f"echo:{i}".encode()
        assert client.statistics() == {"frames": 3, "calls": 3}


async def test_large_bodies_travel_in_pieces_both_ways():
    async with link_server(Handlers()) as server, link_client(server.address) as client:
        big = bytes(range(256)) * (PIECE_BYTES * 3 // 256 + 7)
        small = b"small"
        results = await asyncio.gather(client.call(ECHO, big, 10.0), client.call(ECHO, small, 10.0))
        assert results == [b"echo:" + big, b"echo:" + small]


async def test_handler_errors_become_statuses():
    async with link_server(Handlers()) as server, link_client(server.address) as client:
        with pytest.raises(LinkCallError) as info:
            await client.call("/test.Service/Fail", b"x", 5.0)
        assert (info.value.code, info.value.details) == (grpc.StatusCode.INVALID_ARGUMENT, "bad request x")
        with pytest.raises(LinkCallError) as info:
            await client.call("/test.Service/Crash", b"", 5.0)
        assert (info.value.code, info.value.details) == (grpc.StatusCode.INTERNAL, INTERNAL_ERROR_DETAILS)
        with pytest.raises(LinkCallError) as info:
            await client.call("/test.Service/Nope", b"", 5.0)
        assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
        assert await client.call(ECHO, b"still", 5.0) == b"echo:still"  # the stream lives on


async def test_a_call_past_its_deadline_or_cancelled_is_cancelled_on_the_server():
    handlers = Handlers()
    async with link_server(handlers) as server, link_client(server.address) as client:
        with pytest.raises(LinkCallError) as info:
            await client.call("/test.Service/Slow", b"deadline", 0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        task = asyncio.create_task(client.call("/test.Service/Slow", b"cancelled", None))
        for _ in range(100):
            if b"cancelled" in handlers.started:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if len(handlers.cancelled) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(handlers.cancelled) == [b"cancelled", b"deadline"]


async def test_the_server_answers_deadline_exceeded_when_a_call_outlives_its_deadline():
    # A client that does not cancel on its own: the server's timer ends the call and answers it.
    handlers = Handlers()
    async with link_server(handlers) as server:
        channel = create_channel(server.address, retry=False)
        try:
            call = channel.stream_stream(
                LINK_METHOD,
                request_serializer=link_pb2.LinkFrame.SerializeToString,
                response_deserializer=link_pb2.LinkFrame.FromString,
            )()
            await call.write(
                link_pb2.LinkFrame(calls=[link_pb2.LinkCall(id=7, method=SLOW, body=b"x", timeout_ms=100)])
            )
            frame = await asyncio.wait_for(call.read(), 10)
            assert [(c.id, c.code, c.details) for c in frame.calls] == [
                (7, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "Deadline Exceeded")
            ]
            assert handlers.cancelled == [b"x"]
            await call.write(
                link_pb2.LinkFrame(calls=[link_pb2.LinkCall(id=8, method=ECHO, body=b"y", timeout_ms=5000)])
            )
            frame = await asyncio.wait_for(call.read(), 10)
            assert [(c.id, c.code, c.body) for c in frame.calls] == [(8, 0, b"echo:y")]
            call.cancel()
        finally:
            await channel.close()


async def test_a_server_without_links_is_reported_as_unsupported():
    async with link_server(None) as server, link_client(server.address) as client:
        with pytest.raises(LinkBroken) as info:
            await client.call(ECHO, b"x", 5.0)
        assert info.value.unsupported
        assert client.unsupported


@contextlib.asynccontextmanager
async def raw_link_server(metadata_delay_s: float | None) -> AsyncIterator[tuple[str, list[tuple[str, float]]]]:
    """A link server of its own: sends its initial metadata after `metadata_delay_s` (None: never before
    its first answer), records when that happened and when each request frame arrived, answers b"ok"."""
    events: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    async def calls(requests, context):
        async def read() -> None:
            async for frame in requests:
                events.append(("frame", loop.time()))
                for call in frame.calls:
                    await context.write(link_pb2.LinkFrame(calls=[link_pb2.LinkCall(id=call.id, body=b"ok")]))

        reader = asyncio.create_task(read())
        if metadata_delay_s is not None:
            await asyncio.sleep(metadata_delay_s)
            events.append(("metadata", loop.time()))
            await context.send_initial_metadata(())
        await reader

    service, method = LINK_METHOD.strip("/").split("/")
    handler = grpc.stream_stream_rpc_method_handler(
        calls,
        request_deserializer=link_pb2.LinkFrame.FromString,
        response_serializer=link_pb2.LinkFrame.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", events
    finally:
        await server.stop(0)


async def test_a_new_stream_writes_its_first_frame_once_the_server_answered():
    # (a frame written while a server without the link answers UNIMPLEMENTED made grpc end the call INTERNAL)
    async with raw_link_server(0.3) as (address, events), link_client(address) as client:
        assert await client.call(ECHO, b"x", 5.0) == b"ok"
        assert [kind for kind, _ in events] == ["metadata", "frame"]


async def test_a_server_that_answers_nothing_first_still_gets_the_calls(monkeypatch):
    monkeypatch.setattr(link, "HANDSHAKE_S", 0.2)
    async with raw_link_server(None) as (address, events), link_client(address) as client:
        started = asyncio.get_running_loop().time()
        assert await client.call(ECHO, b"x", 5.0) == b"ok"
        assert [kind for kind, _ in events] == ["frame"]
        assert events[0][1] - started >= 0.15  # written once the wait was over
        assert await client.call(ECHO, b"y", 5.0) == b"ok"  # later frames do not wait


async def test_calls_in_flight_when_the_server_goes_away_fail_and_the_next_call_reopens():
    handlers = Handlers()
    async with link_server(handlers) as server:
        port = server.bound_port
        async with link_client(server.address) as client:
            assert await client.call(ECHO, b"first", 5.0) == b"echo:first"
            slow = asyncio.create_task(client.call("/test.Service/Slow", b"in flight", 10.0))
            while not handlers.started:
                await asyncio.sleep(0.01)
            await server.stop(0)
            with pytest.raises(LinkBroken) as info:
                await slow
            assert not info.value.unsupported
            restarted = ServiceServer(
                "link-test", f"127.0.0.1:{port}", [link_registration(handlers.mapping())], drain_delay_s=0
            )
            await restarted.start()
            try:
                for _ in range(50):
                    with contextlib.suppress(LinkBroken):
                        assert await client.call(ECHO, b"again", 5.0) == b"echo:again"
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("the link did not reopen")
            finally:
                await restarted.stop()


def test_the_chain_link_names_are_those_of_the_chain_protos():
    from exocommon.grpc_util.link import CHAIN_APPEND_METHOD, CHAIN_LOG_LINK_SERVICE
    from exocore.chain.v1 import chain_pb2

    services = chain_pb2.DESCRIPTOR.services_by_name
    assert CHAIN_LOG_LINK_SERVICE == services["ChainLogLink"].full_name
    assert (
        CHAIN_APPEND_METHOD
        == f"/{services['ChainLog'].full_name}/{services['ChainLog'].methods_by_name['Append'].name}"
    )
