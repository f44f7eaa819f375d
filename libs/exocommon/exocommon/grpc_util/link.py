"""Many unary calls over one gRPC stream: `exocore.store.v1.StoreLink` (protos/exocore/store/v1/link.proto),
a gateway's link to a store replica; `exocore.chain.v1.ChainLogLink`, a store's to its chain node, is the
same with another service name (the `service` argument of `LinkClient` and `link_registration`).

A unary call through grpc.aio costs each side a new HTTP/2 stream, several completion-queue events
and their thread hand-offs: on a gateway, which only passes bytes on, that is most of its CPU per
call. A link sends the calls as entries of `LinkFrame`s on one long-lived bidirectional stream, and
a frame carries every entry that was ready when it was written, so under load one stream message
serves many calls.

* `LinkClient(channel)`: ``await client.call(method, request, timeout)`` returns the response bytes
  or raises `LinkCallError` (the status the server's handler ended with, or DEADLINE_EXCEEDED when
  `timeout` passed first) or `LinkBroken` (the stream failed: the call may or may not have run;
  ``unsupported`` when the server has no link, then nothing ran). The stream opens on the first
  call and again on the first call after it broke.
* `LinkServicer(handlers)`: serves the stream; `handlers` maps full method names to
  ``async (request_bytes, time_remaining_s | None) -> response_bytes``. A handler's `ExocoreError`
  becomes its status as `ErrorMappingInterceptor` would make it, anything else INTERNAL; a failed
  call is logged like `RequestLoggingInterceptor` logs one. `link_registration(handlers)` is its
  `ServiceServer` registration.

Deadlines: the client sends the remaining time and stops waiting when it passes; either way a call
the client stops waiting for (deadline, cancellation) is cancelled on the server, as a unary call
would be. Messages larger than `PIECE_BYTES` travel in pieces, so no frame comes near the message
size limit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from exocommon.errors import InvalidArgument
from exocore.store.v1 import link_pb2

from .errors import _status_for

__all__ = [
    "CHAIN_APPEND_METHOD",
    "CHAIN_LOG_LINK_SERVICE",
    "GATHER_MIN_IN_FLIGHT",
    "LINK_METHOD",
    "LINK_SERVICE",
    "PIECE_BYTES",
    "LinkBroken",
    "LinkCallError",
    "LinkClient",
    "LinkHandler",
    "LinkServicer",
    "link_registration",
    "parse_request",
]

LINK_SERVICE = "exocore.store.v1.StoreLink"
LINK_METHOD = f"/{LINK_SERVICE}/Calls"
# A chain node's link for its stores' appends, and the one call it carries (both sides use these).
CHAIN_LOG_LINK_SERVICE = "exocore.chain.v1.ChainLogLink"
CHAIN_APPEND_METHOD = "/exocore.chain.v1.ChainLog/Append"
# Bodies above this travel in pieces; a frame is closed once it holds this much.
PIECE_BYTES = 256 * 1024
_FRAME_BYTES = PIECE_BYTES
# `LinkClient`'s `gather_s` applies from this many calls in flight (a caller with a few waits for nothing).
GATHER_MIN_IN_FLIGHT = 8
# A new stream's first frame waits (at most this long) for the server's initial metadata, which
# `LinkServicer` sends at once: a server without the link answers UNIMPLEMENTED instead, and a frame
# written while that answer arrives made grpc end the call INTERNAL ("Internal error from Core"), so the
# client could not tell that nothing ran. Past the wait (a server that sends nothing first) it writes.
HANDSHAKE_S = 2.0

LinkHandler = Callable[[bytes, float | None], Awaitable[bytes]]

_request_log = logging.getLogger("exocommon.grpc.requests")
_log = logging.getLogger("exocommon.grpc.link")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class LinkCallError(Exception):
    """The call ended with a status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class LinkBroken(Exception):
    """The link's stream failed while the call was in flight (`unsupported`: the server has no link)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"link broken ({code.name}): {details}")
        self.code = code
        self.details = details

    @property
    def unsupported(self) -> bool:
        return self.code is grpc.StatusCode.UNIMPLEMENTED


class _FrameWriter:
    """Collects entries into frames and writes them one at a time with `write`, in order: entries
    added while a write is in flight go out together in the next frame."""

    def __init__(
        self,
        write: Callable[[link_pb2.LinkFrame], Awaitable[Any]],
        name: str,
        hold: Callable[[], float] | None = None,
    ) -> None:
        """`hold()`: how long a frame that just got its first entry waits for more before it is written
        (0: not at all); see `LinkClient`'s `gather_s`."""
        self._write = write
        self._hold = hold
        self._frames: list[link_pb2.LinkFrame] = []
        self._size = 0  # body bytes in the last frame
        self._wake: asyncio.Future[None] | None = None
        self._finishing = False
        self.frames_written = 0
        self.entries_written = 0
        self.task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def _frame(self, size: int) -> link_pb2.LinkFrame:
        if not self._frames or self._size + size > _FRAME_BYTES:
            self._frames.append(link_pb2.LinkFrame())
            self._size = 0
        self._size += size
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        return self._frames[-1]

    def add(self, call_id: int, body: bytes, **fields: Any) -> None:
        """Queues one request or response (in pieces when large)."""
        if len(body) <= PIECE_BYTES:
            self._frame(len(body)).calls.add(id=call_id, body=body, **fields)
            return
        view = memoryview(body)
        last = (len(body) - 1) // PIECE_BYTES * PIECE_BYTES
        for start in range(0, len(body), PIECE_BYTES):
            piece = bytes(view[start : start + PIECE_BYTES])
            if start < last:
                self._frame(len(piece)).calls.add(id=call_id, body=piece, more=True)
            else:
                self._frame(len(piece)).calls.add(id=call_id, body=piece, **fields)

    def cancel_call(self, call_id: int) -> None:
        self._frame(0).calls.add(id=call_id, cancel=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        hold = self._hold
        while True:
            if not self._frames:
                if self._finishing:
                    return
                self._wake = loop.create_future()
                await self._wake
                continue
            # Only a frame with room waits for more (large bodies' pieces go at once).
            if hold is not None and len(self._frames) == 1 and self._size < _FRAME_BYTES // 2 and not self._finishing:
                delay = hold()
                if delay > 0:
                    await asyncio.sleep(delay)
            frame = self._frames.pop(0)
            if not self._frames:
                self._size = 0
            self.frames_written += 1
            self.entries_written += len(frame.calls)
            try:
                await self._write(frame)
            except Exception as exc:  # the stream is gone: its reading side reports why
                _log.debug("link write failed: %s", exc)
                self._frames.clear()
                return

    async def finish(self) -> None:
        """Returns once everything queued is written."""
        self._finishing = True
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        await asyncio.shield(self.task)

    def close(self) -> None:
        self.task.cancel()


class _Assembler:
    """Joins the pieces of large bodies (see `_FrameWriter.add`)."""

    def __init__(self) -> None:
        self._pieces: dict[int, list[bytes]] = {}

    def body(self, entry: link_pb2.LinkCall) -> bytes | None:
        """The whole body once its last piece came, else None."""
        if entry.more:
            self._pieces.setdefault(entry.id, []).append(entry.body)
            return None
        pieces = self._pieces.pop(entry.id, None)
        if pieces is None:
            return entry.body
        pieces.append(entry.body)
        return b"".join(pieces)

    def forget(self, call_id: int) -> None:
        self._pieces.pop(call_id, None)


# --- client -------------------------------------------------------------------------------------------


class _Stream:
    """One opened link stream and its calls in flight."""

    def __init__(self, call: grpc.aio.StreamStreamCall, gather_s: float, gather_min_in_flight: int) -> None:
        self.call = call
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        hold = None
        if gather_s > 0:
            pending = self.pending

            def hold() -> float:
                return gather_s if len(pending) >= gather_min_in_flight else 0.0

        self.writer = _FrameWriter(self._write, "link-writer", hold)
        self.broken: LinkBroken | None = None
        self._answered = False
        self.reader: asyncio.Task[None] | None = None

    async def _write(self, frame: link_pb2.LinkFrame) -> None:
        call = self.call
        if not self._answered:  # see HANDSHAKE_S
            try:
                await asyncio.wait_for(asyncio.shield(call.initial_metadata()), HANDSHAKE_S)
            except TimeoutError:
                pass
            self._answered = True
        if call.done():
            raise ConnectionError("the link's stream ended")  # the reader reports the status
        await call.write(frame)


class LinkClient:
    """The calling side of a link over `channel` (see module docstring). Use from one event loop."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        service: str = LINK_SERVICE,
        *,
        gather_s: float = 0.0,
        gather_min_in_flight: int = GATHER_MIN_IN_FLIGHT,
    ) -> None:
        """`service`: the link service's full name (another service can carry `LinkFrame`s too).

        `gather_s`: while at least `gather_min_in_flight` calls are in flight, a request frame waits
        that long for more requests before it is written. Under load a frame then carries several
        calls instead of about one (each frame costs both sides a stream message: tens of µs of CPU),
        for a little latency that a caller with few calls in flight never pays. 0: frames go at once.
        """
        self._open_call = channel.stream_stream(
            f"/{service}/Calls",
            request_serializer=link_pb2.LinkFrame.SerializeToString,
            response_deserializer=link_pb2.LinkFrame.FromString,
        )
        self._gather_s = gather_s
        self._gather_min_in_flight = gather_min_in_flight
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)
        # Set once the server answered UNIMPLEMENTED: it has no link (callers then call directly).
        self.unsupported = False
        # Request frames and calls written on the streams closed so far (see `statistics`).
        self._frames_closed = 0
        self._calls_closed = 0

    def statistics(self) -> dict[str, int]:
        """Request frames written and the calls (entries) they carried, over every stream so far."""
        frames, calls = self._frames_closed, self._calls_closed
        if self._stream is not None:
            frames += self._stream.writer.frames_written
            calls += self._stream.writer.entries_written
        return {"frames": frames, "calls": calls}

    def _open(self) -> _Stream:
        stream = _Stream(self._open_call(timeout=None), self._gather_s, self._gather_min_in_flight)
        stream.reader = asyncio.get_running_loop().create_task(self._read(stream), name="link-reader")
        self._stream = stream
        return stream

    async def _read(self, stream: _Stream) -> None:
        assembler = _Assembler()
        code, details = grpc.StatusCode.UNAVAILABLE, "the link's stream ended"
        try:
            while True:
                frame = await stream.call.read()
                if frame is grpc.aio.EOF:
                    break
                for entry in frame.calls:
                    body = assembler.body(entry)
                    if body is None:
                        continue
                    future = stream.pending.pop(entry.id, None)
                    if future is None or future.done():
                        continue  # given up on (deadline, cancellation)
                    if entry.code:
                        future.set_exception(
                            LinkCallError(_CODES.get(entry.code, grpc.StatusCode.UNKNOWN), entry.details)
                        )
                    else:
                        future.set_result(body)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "the link was closed"
        except Exception as exc:  # a frame that does not parse, ...: every call in flight learns of it
            _log.warning("link stream failed", exc_info=exc)
            code, details = grpc.StatusCode.INTERNAL, f"the link failed: {exc}"
        finally:
            self._break(stream, LinkBroken(code, details))

    def _break(self, stream: _Stream, error: LinkBroken) -> None:
        if stream.broken is not None:
            return
        stream.broken = error
        if error.unsupported:
            self.unsupported = True
        if self._stream is stream:
            self._stream = None
        self._frames_closed += stream.writer.frames_written
        self._calls_closed += stream.writer.entries_written
        stream.writer.close()
        stream.call.cancel()
        pending, stream.pending = stream.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    async def call(self, method: str, request: bytes, timeout: float | None) -> bytes:
        """The response bytes of `method` (see module docstring for the errors)."""
        stream = self._stream or self._open()
        call_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        stream.pending[call_id] = future
        timeout_ms = 0 if timeout is None else max(1, min(int(timeout * 1000), 0xFFFFFFFF))
        stream.writer.add(call_id, request, method=method, timeout_ms=timeout_ms)
        timer = None if timeout is None else loop.call_later(timeout, _expire, future)
        try:
            return await future
        except (asyncio.CancelledError, LinkCallError):
            if stream.pending.pop(call_id, None) is not None and stream.broken is None:
                stream.writer.cancel_call(call_id)  # the server stops working on it
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def close(self) -> None:
        stream = self._stream
        if stream is not None:
            self._break(stream, LinkBroken(grpc.StatusCode.CANCELLED, "the link was closed"))


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(LinkCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


# --- server -------------------------------------------------------------------------------------------


class LinkServicer:
    """The serving side of links (see module docstring)."""

    def __init__(self, handlers: Mapping[str, LinkHandler]) -> None:
        self._handlers = dict(handlers)

    async def Calls(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.send_initial_metadata(())  # the client's first frame waits for it (HANDSHAKE_S)
        writer = _FrameWriter(context.write, "link-server-writer")
        assembler = _Assembler()
        tasks: dict[int, asyncio.Task[None]] = {}
        expired: set[int] = set()  # calls cancelled because their deadline passed
        loop = asyncio.get_running_loop()
        try:
            async for frame in requests:
                for entry in frame.calls:
                    if entry.cancel:
                        assembler.forget(entry.id)
                        task = tasks.pop(entry.id, None)
                        if task is not None:
                            task.cancel()
                        continue
                    body = assembler.body(entry)
                    if body is None:
                        continue
                    call_id = entry.id
                    timeout = entry.timeout_ms / 1000 if entry.timeout_ms else None
                    task = loop.create_task(self._serve(writer, call_id, entry.method, body, timeout, expired))
                    tasks[call_id] = task
                    if timeout is None:
                        task.add_done_callback(lambda _, call_id=call_id: tasks.pop(call_id, None))
                    else:
                        # A timer that cancels the task, rather than `asyncio.timeout` in `_serve`: that
                        # cost ~7 µs a call, a timer ~1.
                        timer = loop.call_later(timeout, _expire_call, task, call_id, expired)
                        task.add_done_callback(
                            lambda _, call_id=call_id, timer=timer: _call_done(tasks, expired, call_id, timer)
                        )
            # The client closed its side: answer what is in flight, then end the stream.
            if tasks:
                await asyncio.wait(list(tasks.values()))
            await writer.finish()
        finally:
            for task in list(tasks.values()):
                task.cancel()
            writer.close()

    async def _serve(
        self,
        writer: _FrameWriter,
        call_id: int,
        method: str,
        body: bytes,
        timeout: float | None,
        expired: set[int],
    ) -> None:
        start = time.monotonic()
        handler = self._handlers.get(method)
        try:
            if handler is None:
                raise _Unimplemented(method)
            response = await handler(body, timeout)
        except asyncio.CancelledError:
            if call_id in expired:  # cancelled by its deadline's timer (see `Calls`)
                expired.discard(call_id)
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                writer.add(call_id, b"", code=code.value[0], details="Deadline Exceeded")
                _log_call(method, code.name, start)
                return
            _log_call(method, "CANCELLED", start)  # the client gave up: it expects no answer
            raise
        except _Unimplemented:
            code = grpc.StatusCode.UNIMPLEMENTED
            writer.add(call_id, b"", code=code.value[0], details=f"method {method!r} is not served over the link")
            _log_call(method, code.name, start)
        except Exception as exc:
            code, details = _status_for(exc, method)
            writer.add(call_id, b"", code=code.value[0], details=details)
            _log_call(method, code.name, start)
        else:
            writer.add(call_id, response)
            if _request_log.isEnabledFor(logging.DEBUG):
                _log_call(method, "OK", start)


class _Unimplemented(Exception):
    pass


def _expire_call(task: asyncio.Task[None], call_id: int, expired: set[int]) -> None:
    if not task.done():
        expired.add(call_id)
        task.cancel()


def _call_done(
    tasks: dict[int, asyncio.Task[None]], expired: set[int], call_id: int, timer: asyncio.TimerHandle
) -> None:
    tasks.pop(call_id, None)
    expired.discard(call_id)
    timer.cancel()


def _log_call(method: str, code: str, start: float) -> None:
    level = logging.DEBUG if code == "OK" else logging.INFO
    if _request_log.isEnabledFor(level):
        _request_log.log(
            level,
            "rpc",
            extra={
                "method": method,
                "peer": "link",
                "code": code,
                "duration_ms": round((time.monotonic() - start) * 1000, 2),
            },
        )


def parse_request(message_type: Any, body: bytes) -> Any:
    """`message_type` parsed from a link request's bytes; INVALID_ARGUMENT when they do not parse."""
    try:
        return message_type.FromString(body)
    except Exception:
        raise InvalidArgument(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message") from None


def _add_link_servicer(servicer: LinkServicer, server: grpc.aio.Server, service: str = LINK_SERVICE) -> None:
    handlers = {
        "Calls": grpc.stream_stream_rpc_method_handler(
            servicer.Calls,
            request_deserializer=link_pb2.LinkFrame.FromString,
            response_serializer=link_pb2.LinkFrame.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def link_registration(
    handlers: Mapping[str, LinkHandler], service: str = LINK_SERVICE
) -> tuple[Callable[..., None], LinkServicer, str]:
    """The `ServiceServer` registration of a link serving `handlers`, as `service` (a service whose
    one method is `Calls(stream LinkFrame) returns (stream LinkFrame)`)."""

    def add(servicer: LinkServicer, server: grpc.aio.Server) -> None:
        _add_link_servicer(servicer, server, service)

    return (add, LinkServicer(handlers), service)
