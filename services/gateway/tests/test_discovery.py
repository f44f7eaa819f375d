"""The discovery mailbox (SPEC.md 7): the core with a fake clock, the REST API through a real HTTP
server on 127.0.0.1 and the gRPC service through a real grpc server, both over one mailbox."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from aiohttp import web

from exocommon.discovery import (
    DiscoveryClient,
    InvalidPin,
    InvalidReply,
    MailboxFull,
    PayloadNotFound,
    PayloadTooLarge,
    format_pin,
    parse_pin,
)
from exocore.discovery.v1 import discovery_pb2, discovery_pb2_grpc
from exogateway.discovery import CORS_HEADERS, DiscoveryServer, Mailbox, MailboxConfig, create_http_app


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------
# PINs
# ---------------------------------------------------------------------------------------------


def test_pin_format_and_parse():
    assert format_pin(123_456_789) == "123 456 789"
    assert format_pin(100_000_000) == "100 000 000"
    assert format_pin(999_999_999) == "999 999 999"
    assert parse_pin("123 456 789") == 123_456_789
    assert parse_pin(" 99 9 9 99 999 ") == 999_999_999
    assert parse_pin("100000000\n") == 100_000_000
    assert parse_pin(999_999_999) == 999_999_999
    for bad in ("123", "foo", "", "99 999 999", "1 000 000 000", "１２３４５６７８９", 0, 1_000_000_000, True):
        with pytest.raises(InvalidPin):
            parse_pin(bad)


# ---------------------------------------------------------------------------------------------
# Core, with a fake clock
# ---------------------------------------------------------------------------------------------


def test_core_create_get_is_one_shot_and_pins_in_range():
    clock = FakeClock()
    mailbox = Mailbox(monotonic=clock, wall_clock=clock)
    created = mailbox.create(b"hello", expect_reply=False)
    assert 100_000_000 <= created.pin <= 999_999_999
    assert created.reply_pin is None
    assert created.expiration_unix_s == clock.now + 90
    taken = mailbox.get(created.pin)
    assert (taken.data, taken.reply_pin, taken.reply_token) == (b"hello", None, None)
    with pytest.raises(PayloadNotFound):
        mailbox.get(created.pin)
    assert len(mailbox) == 0


def test_core_expiries_and_purge():
    clock = FakeClock()
    mailbox = Mailbox(monotonic=clock, wall_clock=clock)
    kept = mailbox.create(b"a", expect_reply=True)
    assert len(mailbox) == 2  # payload and reply slot
    clock.now += 89.9
    assert mailbox.purge() == 0
    clock.now += 0.1  # payloads live 90 s
    assert mailbox.purge() == 1
    with pytest.raises(PayloadNotFound):
        mailbox.get(kept.pin)
    # The reply slot lives 180 s: a reply is still accepted until then.
    second = mailbox.create(b"b", expect_reply=True)
    token = mailbox.get(second.pin).reply_token
    clock.now += 179.9
    mailbox.reply(second.reply_pin, token, b"answer")
    assert mailbox.get(second.reply_pin).data == b"answer"
    third = mailbox.create(b"c", expect_reply=True)
    token = mailbox.get(third.pin).reply_token
    clock.now += 180
    with pytest.raises(InvalidReply):  # expired even before the purge runs
        mailbox.reply(third.reply_pin, token, b"late")
    assert mailbox.purge() >= 1
    assert len(mailbox) == 0


def test_core_expired_payload_is_not_served_before_purge():
    clock = FakeClock()
    mailbox = Mailbox(MailboxConfig(payload_expiration_s=0.1), monotonic=clock, wall_clock=clock)
    created = mailbox.create(b"x")
    clock.now += 0.11
    with pytest.raises(PayloadNotFound):
        mailbox.get(created.pin)


def test_core_pins_avoid_live_payloads_and_slots():
    class Scripted:
        """Draws the same PIN twice before a new one: the second draw must be skipped."""

        def __init__(self) -> None:
            self.pins = iter([111_111_111, 111_111_111, 222_222_222, 222_222_222, 333_333_333])

        def randint(self, lo: int, hi: int) -> int:
            return next(self.pins) if hi < 2**32 else 42

    mailbox = Mailbox(rng=Scripted())  # type: ignore[arg-type]
    first = mailbox.create(b"a", expect_reply=True)
    assert (first.reply_pin, first.pin) == (111_111_111, 222_222_222)
    assert mailbox.create(b"b").pin == 333_333_333


def test_core_limits():
    mailbox = Mailbox(MailboxConfig(max_payloads=3, max_payload_size=10))
    with pytest.raises(PayloadTooLarge):
        mailbox.create(b"x" * 11)
    mailbox.create(b"x" * 10)
    mailbox.create(b"y", expect_reply=True)  # payload + slot: 3 entries
    with pytest.raises(MailboxFull):
        mailbox.create(b"z")


# ---------------------------------------------------------------------------------------------
# Real servers (REST + gRPC over one mailbox), in a thread with their own event loop
# ---------------------------------------------------------------------------------------------


class RunningServer:
    def __init__(self, config: MailboxConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = DiscoveryServer("127.0.0.1", 0, 0, Mailbox(config))
        self._run(self.server.start())
        self.url = self.server.http_url
        self.channel = grpc.insecure_channel(self.server.grpc_address)
        self.grpc = discovery_pb2_grpc.DiscoveryStub(self.channel)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.channel.close()
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def server(request) -> Iterator[RunningServer]:
    config = getattr(request, "param", None) or MailboxConfig()
    running = RunningServer(config)
    try:
        yield running
    finally:
        running.close()


def test_rest_create_then_get(server):
    client = DiscoveryClient(server.url)
    created = client.create(b"hello world")
    assert created.reply_pin is None
    assert created.expiration.timestamp() == pytest.approx(time.time() + 90, abs=5)
    with pytest.raises(PayloadNotFound):
        client.get(100_000_000)
    assert client.get(created.pin).data == b"hello world"
    with pytest.raises(PayloadNotFound):  # one-shot
        client.get(created.pin)


def test_rest_three_step_exchange_with_reply_tokens(server):
    client = DiscoveryClient(server.url)
    created = client.create(b"payload1", expect_reply=True)
    assert created.reply_pin is not None and created.reply_pin != created.pin

    got = client.get(created.pin)
    assert got.data == b"payload1" and got.reply_pin == created.reply_pin
    assert got.reply_token is not None and 0 < got.reply_token < 2**64

    replied = client.reply(got.reply_pin, got.reply_token, b"payload2", expect_reply=True)
    assert replied.pin == created.reply_pin and replied.reply_pin is not None

    got2 = client.get(created.reply_pin)
    assert got2.data == b"payload2" and got2.reply_pin == replied.reply_pin

    with pytest.raises(InvalidReply):
        client.reply(got2.reply_pin, got2.reply_token ^ 1, b"intruder")
    status, _, _ = server.request(
        "PUT", f"/{got2.reply_pin}", json.dumps({"data": "", "reply_token": got2.reply_token + 1}).encode()
    )
    assert status == 401
    final = client.reply(got2.reply_pin, got2.reply_token, b"payload3")
    assert final.reply_pin is None

    got3 = client.get(got2.reply_pin)
    assert got3.data == b"payload3" and got3.reply_pin is None and got3.reply_token is None
    with pytest.raises(InvalidReply):  # the slot was consumed
        client.reply(got2.reply_pin, got2.reply_token, b"again")


@pytest.mark.parametrize("server", [MailboxConfig(payload_expiration_s=0.1)], indirect=True)
def test_rest_payload_expires(server):
    client = DiscoveryClient(server.url)
    created = client.create(b"short-lived")
    time.sleep(0.11)
    with pytest.raises(PayloadNotFound):
        client.get(created.pin)


@pytest.mark.parametrize("server", [MailboxConfig(max_payloads=2, max_payload_size=1000)], indirect=True)
def test_rest_limits_and_bad_requests(server):
    def post(body: dict | bytes) -> int:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return server.request("POST", "/", raw)[0]

    b64 = base64.b64encode
    assert post({"data": b64(b"x" * 1001).decode()}) == 413
    assert post(b"{" + b" " * 5000 + b"}") == 413  # body larger than any valid request
    assert post(b"not json") == 400
    assert post({"expect_reply": True}) == 400
    assert post({"data": "%%%"}) == 400
    assert post({"data": "", "expect_reply": "yes"}) == 400
    assert post([1, 2]) == 400
    assert post({"data": b64(b"x" * 1000).decode()}) == 200
    assert post({"data": ""}) == 200
    assert post({"data": ""}) == 507
    # PUT without a token
    assert server.request("PUT", "/123456789", json.dumps({"data": ""}).encode())[0] == 400


def test_rest_unknown_paths_and_bad_pins_are_404(server):
    assert server.request("GET", "/")[0] == 404
    assert server.request("GET", "/12345")[0] == 404
    assert server.request("GET", "/1000000000")[0] == 404
    assert server.request("GET", "/abc")[0] == 404
    assert server.request("GET", "/123456789/more")[0] == 404
    assert server.request("DELETE", "/123456789")[0] == 404
    assert server.request("POST", "/123456789", b"{}")[0] == 404
    assert server.request("PUT", "/", b"{}")[0] == 404
    # a PIN with spaces in the path is still a PIN (parsing ignores whitespace)
    created = DiscoveryClient(server.url).create(b"spaced")
    status, _, body = server.request("GET", "/" + format_pin(created.pin).replace(" ", "%20"))
    assert status == 200 and base64.b64decode(json.loads(body)["data"]) == b"spaced"


def test_rest_cors_headers_and_options(server):
    for method, path, body in (("OPTIONS", "/", None), ("OPTIONS", "/anything/at/all", None)):
        status, headers, _ = server.request(method, path, body)
        assert status == 200
        for name, value in CORS_HEADERS.items():
            assert headers[name] == value
    status, headers, body = server.request("POST", "/", json.dumps({"data": "aGk="}).encode())
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Content-Type"].startswith("application/json")
    assert set(json.loads(body)) == {"pin", "expiration", "reply_pin"}
    status, headers, body = server.request("GET", "/100000000")
    assert status == 404 and headers["Access-Control-Allow-Origin"] == "*"
    assert "error" in json.loads(body)


def test_client_get_loop_polls_until_the_payload_arrives(server):
    client = DiscoveryClient(server.url)
    created = client.create(b"question", expect_reply=True)
    got = client.get(created.pin)

    def answer_later() -> None:
        time.sleep(1.2)
        DiscoveryClient(server.url).reply(got.reply_pin, got.reply_token, b"answer")

    threading.Thread(target=answer_later, daemon=True).start()
    started = time.monotonic()
    assert client.get_loop(created.reply_pin, timeout=10).data == b"answer"
    assert 1.0 <= time.monotonic() - started < 5


def test_client_get_loop_times_out():
    sleeps: list[float] = []
    clock = FakeClock()

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    class NeverThere(DiscoveryClient):
        def get(self, pin):
            raise PayloadNotFound("absent")

    client = NeverThere("http://127.0.0.1:1", sleep=fake_sleep, monotonic=clock)
    with pytest.raises(PayloadNotFound, match="after 3.5 s"):
        client.get_loop(123_456_789, timeout=3.5)
    assert sleeps == [1.0, 1.0, 1.0, 0.5]


def test_client_unreachable_server_is_unavailable():
    from exocommon.errors import Unavailable
    from exocommon.net import free_ports

    with pytest.raises(Unavailable, match="cannot reach"):
        DiscoveryClient(f"http://127.0.0.1:{free_ports(1)[0]}", timeout_s=2).create(b"x")


# ---------------------------------------------------------------------------------------------
# gRPC, same mailbox
# ---------------------------------------------------------------------------------------------


def test_grpc_exchange_and_errors(server):
    stub = server.grpc
    created = stub.Create(discovery_pb2.CreateRequest(data=b"one", expect_reply=True), timeout=5)
    assert 100_000_000 <= created.pin <= 999_999_999 and created.reply_pin
    assert created.expiration.seconds == pytest.approx(time.time() + 90, abs=5)

    with pytest.raises(grpc.RpcError) as missing:
        stub.Get(discovery_pb2.GetRequest(pin=100_000_000), timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad_pin:
        stub.Get(discovery_pb2.GetRequest(pin=42), timeout=5)
    assert bad_pin.value.code() == grpc.StatusCode.NOT_FOUND

    got = stub.Get(discovery_pb2.GetRequest(pin=created.pin), timeout=5)
    assert got.data == b"one" and got.reply_pin == created.reply_pin and got.reply_token

    with pytest.raises(grpc.RpcError) as wrong:
        stub.Reply(
            discovery_pb2.ReplyRequest(reply_pin=got.reply_pin, reply_token=got.reply_token ^ 1, data=b"x"), timeout=5
        )
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED

    replied = stub.Reply(
        discovery_pb2.ReplyRequest(reply_pin=got.reply_pin, reply_token=got.reply_token, data=b"two"), timeout=5
    )
    assert replied.pin == created.reply_pin and replied.reply_pin == 0
    # The REST API serves the same mailbox.
    final = DiscoveryClient(server.url).get(created.reply_pin)
    assert final.data == b"two" and final.reply_pin is None


@pytest.mark.parametrize("server", [MailboxConfig(max_payloads=1, max_payload_size=4)], indirect=True)
def test_grpc_limits(server):
    with pytest.raises(grpc.RpcError) as too_large:
        server.grpc.Create(discovery_pb2.CreateRequest(data=b"12345"), timeout=5)
    assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    server.grpc.Create(discovery_pb2.CreateRequest(data=b"1234"), timeout=5)
    with pytest.raises(grpc.RpcError) as full:
        server.grpc.Create(discovery_pb2.CreateRequest(data=b"1"), timeout=5)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "full" in full.value.details()


# ---------------------------------------------------------------------------------------------
# Mounted below a prefix (as the gateway serves it)
# ---------------------------------------------------------------------------------------------


async def test_http_app_mounted_as_subapp():
    mailbox = Mailbox()
    root = web.Application()
    root.add_subapp("/discovery/", create_http_app(mailbox))
    runner = web.AppRunner(root)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        client = DiscoveryClient(f"http://127.0.0.1:{port}/discovery")
        created = await asyncio.to_thread(client.create, b"mounted")
        got = await asyncio.to_thread(client.get, created.pin)
        assert got.data == b"mounted"
    finally:
        await runner.cleanup()
