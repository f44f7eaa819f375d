"""Tests for exocommon.grpc_util against a real grpc.aio server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exocommon import errors
from exocommon.errors import (
    Aborted,
    ExocoreError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from exocommon.grpc_util import (
    DNS_MIN_RESOLUTION_INTERVAL_MS,
    DNS_QUERY_TIMEOUT_MS,
    ServiceServer,
    check_health,
    configure_logging,
    create_channel,
    deadline,
    exception_from_rpc_error,
    wait_ready,
)
from exocommon.grpc_util.errors import INTERNAL_ERROR_DETAILS
from exocommon.grpc_util.logging import KeyValueFormatter, parse_level
from exocommon.grpc_util.server import MIN_PING_INTERVAL_OPTION

SERVICE = "test.Echo"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class EchoState:
    flaky_attempts: int = 0
    stream_cleaned_up: bool = False
    forever_closed: asyncio.Event = field(default_factory=asyncio.Event)


def echo_handler(state: EchoState) -> grpc.GenericRpcHandler:
    """A raw-bytes service (no protos needed) exercising all four RPC kinds."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"invalid":
            raise InvalidArgument("bad x")
        if request == b"boom":
            raise RuntimeError("secret text 42")
        if request == b"abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "explicit abort")
        return request

    async def flaky(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        state.flaky_attempts += 1
        if state.flaky_attempts <= 2:
            raise Unavailable("try again")
        return b"ok after %d" % state.flaky_attempts

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            if request == b"missing":
                raise NotFound("no such thing")
            yield b"second"
        finally:
            state.stream_cleaned_up = True

    async def forever(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            yield b"tick"
            await asyncio.Event().wait()
            yield b"never"
        finally:
            state.forever_closed.set()

    async def stream_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
        # reader/writer style streaming handler (coroutine, not generator)
        await context.write(b"first")
        raise NotFound("gone")

    async def collect(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        parts = []
        async for part in requests:
            if part == b"bad":
                raise PermissionDenied("nope")
            parts.append(part)
        return b"".join(parts)

    async def chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for part in requests:
            if part == b"bad":
                raise Aborted("conflict")
            yield part.upper()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "StreamWrite": grpc.unary_stream_rpc_method_handler(stream_write),
            "Forever": grpc.unary_stream_rpc_method_handler(forever),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )


def add_generic(handler: grpc.GenericRpcHandler, server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((handler,))


@dataclass
class Env:
    server: ServiceServer
    channel: grpc.aio.Channel
    state: EchoState


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    state = EchoState()
    server = ServiceServer(
        "test", "127.0.0.1:0", [(add_generic, echo_handler(state), SERVICE)], drain_delay_s=0.0, grace_s=0.2
    )
    await server.start()
    channel = create_channel(f"127.0.0.1:{server.bound_port}")
    try:
        yield Env(server, channel, state)
    finally:
        await channel.close()
        await server.stop(0)


def method(env: Env, name: str, kind: str = "unary_unary") -> grpc.aio.MultiCallable:
    return getattr(env.channel, kind)(f"/{SERVICE}/{name}")


async def rpc_error(awaitable: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    return info.value


# -- server: health, reflection, drain ----------------------------------------------------------


async def test_bound_port_and_echo(env: Env) -> None:
    assert env.server.bound_port > 0
    assert env.server.address == f"127.0.0.1:{env.server.bound_port}"
    assert await method(env, "Unary")(b"hi", timeout=deadline(2)) == b"hi"


async def test_health_serving_after_start(env: Env) -> None:
    assert await check_health(env.channel)
    assert await check_health(env.channel, SERVICE)
    assert not await check_health(env.channel, "no.such.Service")


async def test_reflection_lists_services(env: Env) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(env.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for response in call:
        names |= {s.name for s in response.list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


async def test_stop_sets_not_serving_before_draining() -> None:
    server = ServiceServer(
        "test", "127.0.0.1:0", [(add_generic, echo_handler(EchoState()), SERVICE)], drain_delay_s=0.6
    )
    await server.start()
    channel = create_channel(f"127.0.0.1:{server.bound_port}")
    health = health_pb2_grpc.HealthStub(channel)
    try:
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await watch.read()).status == SERVING

        stopping = asyncio.create_task(server.stop(grace=0.2))
        # The watching gateway hears about it at once ...
        assert (await asyncio.wait_for(watch.read(), 1)).status == NOT_SERVING
        await asyncio.sleep(0.1)
        for name in ("", SERVICE):
            response = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=1)
            assert response.status == NOT_SERVING
        assert not await check_health(channel)
        # ... while the server still answers during the drain delay.
        assert not stopping.done()
        assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"still here", timeout=1) == b"still here"
        await server.stop()  # idempotent: joins the running stop
        assert stopping.done()
        await server.wait_for_termination()
        assert not await check_health(channel, timeout=0.3)
    finally:
        await channel.close()
        await server.stop(0)


# -- error mapping --------------------------------------------------------------------------------


async def test_typed_error_in_unary(env: Env) -> None:
    err = await rpc_error(method(env, "Unary")(b"invalid", timeout=2))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "bad x"
    typed = exception_from_rpc_error(err)
    assert type(typed) is InvalidArgument
    assert str(typed) == "bad x"


async def test_unexpected_error_is_internal_without_leaking(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="exocommon.grpc.errors"):
        err = await rpc_error(method(env, "Unary")(b"boom", timeout=2))
    assert err.code() is grpc.StatusCode.INTERNAL
    assert err.details() == INTERNAL_ERROR_DETAILS
    assert "secret" not in (err.details() or "")
    (record,) = [r for r in caplog.records if r.name == "exocommon.grpc.errors"]
    assert record.exc_info is not None and "secret text 42" in str(record.exc_info[1])
    assert type(exception_from_rpc_error(err)) is errors.Internal


async def test_explicit_abort_passes_through(env: Env) -> None:
    err = await rpc_error(method(env, "Unary")(b"abort", timeout=2))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "explicit abort"


async def test_typed_error_in_async_generator_stream(env: Env) -> None:
    call = method(env, "Stream", "unary_stream")(b"missing", timeout=2)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call:
            received.append(item)
    assert received == [b"first"]
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such thing"
    assert type(exception_from_rpc_error(info.value)) is NotFound
    assert env.state.stream_cleaned_up


async def test_stream_ok(env: Env) -> None:
    call = method(env, "Stream", "unary_stream")(b"x", timeout=2)
    assert [item async for item in call] == [b"first", b"second"]
    assert await call.code() is grpc.StatusCode.OK


async def test_client_cancel_closes_wrapped_generator(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="exocommon.grpc.requests"):
        call = method(env, "Forever", "unary_stream")(b"", timeout=5)
        assert await call.read() == b"tick"
        call.cancel()
        # the handler's `finally` runs promptly through both interceptor wrappers
        await asyncio.wait_for(env.state.forever_closed.wait(), 2)
        for _ in range(50):
            if any(getattr(r, "method", "").endswith("/Forever") for r in caplog.records):
                break
            await asyncio.sleep(0.01)
    codes = [r.code for r in caplog.records if getattr(r, "method", "").endswith("/Forever")]  # type: ignore[attr-defined]
    assert codes == ["CANCELLED"]


async def test_deadline_exceeded_on_slow_stream(env: Env) -> None:
    call = method(env, "Forever", "unary_stream")(b"", timeout=0.2)
    assert await call.read() == b"tick"
    err = await rpc_error(call.read())
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(env.state.forever_closed.wait(), 2)


async def test_typed_error_in_writer_style_stream(env: Env) -> None:
    call = method(env, "StreamWrite", "unary_stream")(b"x", timeout=2)
    assert await call.read() == b"first"
    err = await rpc_error(call.read())
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert err.details() == "gone"


async def test_typed_error_in_stream_unary(env: Env) -> None:
    collect = method(env, "Collect", "stream_unary")
    assert await collect(iter([b"a", b"b"]), timeout=2) == b"ab"
    err = await rpc_error(collect(iter([b"a", b"bad"]), timeout=2))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "nope"


async def test_typed_error_in_stream_stream(env: Env) -> None:
    chat = method(env, "Chat", "stream_stream")
    call = chat(iter([b"a", b"b", b"bad", b"c"]), timeout=2)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call:
            received.append(item)
    assert received == [b"A", b"B"]
    assert info.value.code() is grpc.StatusCode.ABORTED
    assert type(exception_from_rpc_error(info.value)) is Aborted


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "cls", [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ExocoreError)]
)
def test_exception_from_rpc_error_round_trip(cls: type[ExocoreError]) -> None:
    typed = exception_from_rpc_error(FakeRpcError(getattr(grpc.StatusCode, cls.grpc_status), "msg"))
    assert type(typed) is cls
    assert str(typed) == "msg"


def test_exception_from_rpc_error_unmapped_code() -> None:
    typed = exception_from_rpc_error(FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"))
    assert type(typed) is ExocoreError
    assert str(typed) == "UNIMPLEMENTED: Method not found!"


# -- client: retries, readiness --------------------------------------------------------------------


async def test_retry_policy_retries_unavailable(env: Env) -> None:
    assert await method(env, "Flaky")(b"", timeout=5) == b"ok after 3"
    assert env.state.flaky_attempts == 3


async def test_no_retry_when_disabled(env: Env) -> None:
    async with create_channel(f"127.0.0.1:{env.server.bound_port}", retry=False) as channel:
        err = await rpc_error(channel.unary_unary(f"/{SERVICE}/Flaky")(b"", timeout=2))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert type(exception_from_rpc_error(err)) is Unavailable
    assert env.state.flaky_attempts == 1


async def test_wait_ready_and_unreachable() -> None:
    with pytest.raises(ValueError):
        deadline(0)
    async with create_channel("127.0.0.1:1") as channel:
        with pytest.raises(Unavailable):
            await wait_ready(channel, 0.3)
        assert not await check_health(channel, timeout=0.3)


async def test_wait_ready_ok(env: Env) -> None:
    await wait_ready(env.channel, 2)


# -- logging ---------------------------------------------------------------------------------------


async def test_request_log_lines(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="exocommon.grpc.requests"):
        await method(env, "Unary")(b"hi", timeout=2)
        await rpc_error(method(env, "Unary")(b"invalid", timeout=2))
        await rpc_error(method(env, "Nope")(b"", timeout=2))
        assert [item async for item in method(env, "Stream", "unary_stream")(b"", timeout=2)]
    lines = [
        (r.levelno, r.method, r.code)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "exocommon.grpc.requests"
    ]
    assert (logging.DEBUG, f"/{SERVICE}/Unary", "OK") in lines
    assert (logging.INFO, f"/{SERVICE}/Unary", "INVALID_ARGUMENT") in lines
    assert (logging.INFO, f"/{SERVICE}/Nope", "UNIMPLEMENTED") in lines
    assert (logging.DEBUG, f"/{SERVICE}/Stream", "OK") in lines
    ok = next(r for r in caplog.records if getattr(r, "code", None) == "OK")
    assert ok.peer.startswith("ipv4:127.0.0.1:")  # type: ignore[attr-defined]
    assert ok.duration_ms >= 0  # type: ignore[attr-defined]


def test_key_value_formatter() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("exo.test", logging.WARNING, __file__, 1, "hello %s", ("world",), exc_info)
    record.method = "/a.B/C"
    record.note = 'has "quotes" and spaces'
    line = KeyValueFormatter("store").format(record)
    assert "\n" not in line
    assert line.startswith("ts=")
    assert 'level=warn service=store logger=exo.test msg="hello world" method=/a.B/C' in line
    assert 'note="has \\"quotes\\" and spaces"' in line
    assert "exc=" in line and "ValueError: bad\\nthing" in line


def test_parse_level_and_configure_logging() -> None:
    assert parse_level("off") > logging.CRITICAL
    assert parse_level("WARN") == logging.WARNING
    assert parse_level("trace") < logging.DEBUG
    with pytest.raises(ValueError):
        parse_level("loud")
    root, grpc_logger = logging.getLogger(), logging.getLogger("grpc")
    saved_level, saved_handlers, saved_grpc_level = root.level, list(root.handlers), grpc_logger.level
    out = io.StringIO()
    try:
        configure_logging("info", "chain", stream=out)
        configure_logging("debug", "chain", stream=out)  # replaces, does not duplicate
        logging.getLogger("exo.x").debug("dbg", extra={"k": 1})
        assert out.getvalue().count("\n") == 1
        assert "level=debug service=chain logger=exo.x msg=dbg k=1" in out.getvalue()
        assert grpc_logger.level == logging.INFO
    finally:
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)
        grpc_logger.setLevel(saved_grpc_level)


# -- SIGTERM in a real process -----------------------------------------------------------------------

SIGTERM_SCRIPT = """
import asyncio
from exocommon.grpc_util import ServiceServer, configure_logging

async def main():
    configure_logging("info", "sigtest")
    server = ServiceServer("sigtest", "127.0.0.1:0", drain_delay_s=0.5, grace_s=1.0)
    port = await server.start()
    server.install_signal_handlers()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def test_sigterm_graceful_shutdown() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIGTERM_SCRIPT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        async with create_channel(f"127.0.0.1:{port}") as channel:
            assert await check_health(channel)
            proc.send_signal(signal.SIGTERM)
            # NOT_SERVING shows up during the drain delay, while the server still answers.
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(50):
                response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == NOT_SERVING:
                    break
                await asyncio.sleep(0.02)
            assert response.status == NOT_SERVING
            proc.send_signal(signal.SIGTERM)  # a second signal is ignored, not fatal
            rc = await asyncio.wait_for(proc.wait(), 5)
        stderr = (await proc.stderr.read()).decode()
        assert rc == 0, stderr
        assert "service=sigtest" in stderr
        assert 'msg="signal received, shutting down"' in stderr and "signal=SIGTERM" in stderr
        assert 'msg="signal received, shutdown already in progress"' in stderr
        assert 'msg="shutdown complete"' in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _idle_stream_survives_pings(server_options: list[tuple[str, int]], seconds: float) -> bool:
    """Whether a health Watch stream (no data after its first answer) stays open for `seconds` while
    the client pings every 200 ms."""
    server = ServiceServer("pings", "127.0.0.1:0", drain_delay_s=0.0, grace_s=0.2, options=server_options)
    port = await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.keepalive_time_ms", 200),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        await call.read()  # SERVING

        async def rest() -> None:
            await call.read()

        try:
            await asyncio.wait_for(rest(), timeout=seconds)
        except TimeoutError:
            return True  # still open, nothing more to read
        except grpc.aio.AioRpcError:
            return False  # GOAWAY too_many_pings ends the stream
        return False
    finally:
        call.cancel()
        await channel.close()
        await server.stop()


async def test_server_accepts_client_keepalive_pings_on_idle_streams():
    # The key ServiceServer sets is the one grpc core reads: with it lowered, frequent pings on an idle
    # stream are fine; with the server's default (10 s), the same pings get the stream cut.
    # (grpc cuts after a few strikes: about 3-4 s at this ping rate.)
    assert await _idle_stream_survives_pings([(MIN_PING_INTERVAL_OPTION, 100)], 6.0)
    assert not await _idle_stream_survives_pings([], 6.0)


def test_wrapped_handlers_are_built_once_per_method_and_handler():
    from exocommon.grpc_util._handlers import WrappedHandlers

    async def behavior(request: bytes, context: object) -> bytes:
        return request

    first = grpc.unary_unary_rpc_method_handler(behavior)
    other = grpc.unary_unary_rpc_method_handler(behavior)
    cache = WrappedHandlers()
    builds: list[grpc.RpcMethodHandler] = []

    def build(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        wrapped = grpc.unary_unary_rpc_method_handler(handler.unary_unary)
        builds.append(wrapped)
        return wrapped

    a = cache.get("/s/M", first, lambda: build(first))
    assert cache.get("/s/M", first, lambda: build(first)) is a
    assert cache.get("/s/N", first, lambda: build(first)) is not a  # per method
    assert cache.get("/s/M", other, lambda: build(other)) is not a  # the method's handler changed
    assert len(builds) == 3


async def test_errors_are_mapped_on_every_call_not_only_the_first():
    # The interceptors reuse their wrapped handler from the second call on.
    state = EchoState()
    server = ServiceServer("t", "127.0.0.1:0", [(add_generic, echo_handler(state), SERVICE)], drain_delay_s=0.0)
    await server.start()
    channel = create_channel(f"127.0.0.1:{server.bound_port}")
    try:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/{SERVICE}/Unary")(b"invalid")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == "bad x"
            assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"fine") == b"fine"
    finally:
        await channel.close()
        await server.stop()


async def test_extra_interceptors_run_and_errors_are_still_mapped():
    # Logging and error mapping wrap the handlers at registration; extra interceptors still run first.
    seen: list[str] = []

    class Counting(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
            seen.append(handler_call_details.method)
            return await continuation(handler_call_details)

    state = EchoState()
    server = ServiceServer(
        "t", "127.0.0.1:0", [(add_generic, echo_handler(state), SERVICE)], drain_delay_s=0.0, interceptors=[Counting()]
    )
    await server.start()
    channel = create_channel(f"127.0.0.1:{server.bound_port}")
    try:
        assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"fine") == b"fine"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(f"/{SERVICE}/Unary")(b"invalid")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == "bad x"
        assert seen == [f"/{SERVICE}/Unary"] * 2
    finally:
        await channel.close()
        await server.stop()


# Run in a mount namespace with its own /etc/hosts and /etc/resolv.conf: a server on 127.0.0.1 and a
# channel to a name the test changes (after the first failed call) in /etc/hosts.
LATE_NAME_CLIENT = """
import asyncio, sys, time
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
import grpc.aio
from exocommon.grpc_util import create_channel

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stub = health_pb2_grpc.HealthStub(create_channel(f"exo-late-peer:{port}", retry=False))
    changed = None
    while True:
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            break
        except grpc.aio.AioRpcError:
            if changed is None:
                print("failing", flush=True)
                sys.stdin.readline()  # the test changed the name
                changed = time.monotonic()
        await asyncio.sleep(0.05)
    print(f"reached {time.monotonic() - changed:.2f}", flush=True)

asyncio.run(main())
"""


def _private_mounts() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


def _seconds_to_reach_a_changed_name(tmp_path: Path, hosts_before: str, hosts_after: str, resolv_conf: str) -> float:
    """How long the client takes to reach its server once /etc/hosts changed from `hosts_before`."""
    hosts, resolv, script = tmp_path / "hosts", tmp_path / "resolv.conf", tmp_path / "client.py"
    hosts.write_text(hosts_before)
    resolv.write_text(resolv_conf)
    script.write_text(LATE_NAME_CLIENT)
    command = (
        f"mount --bind {hosts} /etc/hosts && mount --bind {resolv} /etc/resolv.conf && exec {sys.executable} {script}"
    )
    with subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as client:
        try:
            assert client.stdout is not None and client.stdin is not None and client.stderr is not None
            assert client.stdout.readline().strip() == "failing", client.stderr.read()
            hosts.write_text(hosts_after)  # in place: the bind mount sees it
            client.stdin.write("changed\n")
            client.stdin.flush()
            answer = client.stdout.readline().split()
            assert answer and answer[0] == "reached", client.stderr.read()
            return float(answer[1])
        finally:
            client.kill()


needs_private_mounts = pytest.mark.skipif(
    not _private_mounts(), reason="needs root and unshare (a private /etc/hosts in a mount namespace)"
)


@needs_private_mounts
def test_a_name_that_moves_to_another_address_is_looked_up_again_within_seconds(tmp_path):
    # Nothing listens on 127.0.0.2: the connection fails, and grpc's default waits 30 s (measured:
    # 30.03 s) before it looks the name up again.
    took = _seconds_to_reach_a_changed_name(
        tmp_path, "127.0.0.2 exo-late-peer\n", "127.0.0.1 exo-late-peer\n", Path("/etc/resolv.conf").read_text()
    )
    assert took < 3 * DNS_MIN_RESOLUTION_INTERVAL_MS / 1000 + 2


@needs_private_mounts
def test_a_lookup_that_a_dns_server_never_answers_gives_up_within_seconds(tmp_path):
    # A name unknown to /etc/hosts goes to a DNS server that never answers (as podman's resolver did for
    # containers not created yet): grpc's default gives up after 12 s and reached the name added to
    # /etc/hosts meanwhile after 24 s.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        try:
            silent.bind(("127.0.0.66", 53))
        except OSError as exc:
            pytest.skip(f"cannot listen on 127.0.0.66:53: {exc}")
        took = _seconds_to_reach_a_changed_name(
            tmp_path,
            "127.0.0.1 localhost\n",
            "127.0.0.1 localhost\n127.0.0.1 exo-late-peer\n",
            "nameserver 127.0.0.66\n",
        )
    assert took < DNS_QUERY_TIMEOUT_MS / 1000 + 6
