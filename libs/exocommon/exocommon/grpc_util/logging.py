"""Structured logging for services: a one-line key=value formatter and a request-log interceptor.

* `configure_logging(level, service)` installs, on the root logger, a stderr handler printing
  ``ts=2026-01-02T03:04:05.678Z level=info service=chain logger=... msg="..." key=value ...``.
  Anything passed as ``extra={...}`` to a log call is appended as key=value; exceptions are
  appended as one escaped ``exc="..."`` field so every record stays one line. Level names are
  the exo CLI's: off, error, warn, info, debug, trace (plus warning/critical).
* one line per call, ``msg=rpc method=... peer=... code=... duration_ms=...``, at DEBUG when the call
  ends OK and INFO otherwise (logger ``exocommon.grpc.requests``): written by the handler wrapper of
  `ServiceServer`, or by `RequestLoggingInterceptor` (both in `_served`).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import sys
import time
from typing import TextIO

import grpc
import grpc.aio

__all__ = [
    "TRACE",
    "KeyValueFormatter",
    "configure_logging",
    "log_unimplemented",
    "parse_level",
]

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_OFF = logging.CRITICAL + 10

_LEVELS: dict[str, int] = {
    "off": _OFF,
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}

_LEVEL_NAMES: dict[int, str] = {
    logging.CRITICAL: "critical",
    logging.ERROR: "error",
    logging.WARNING: "warn",
    logging.INFO: "info",
    logging.DEBUG: "debug",
    TRACE: "trace",
}

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_request_log = logging.getLogger("exocommon.grpc.requests")


def parse_level(level: str) -> int:
    """The stdlib level for an exo CLI level name (case-insensitive); ValueError if unknown."""
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (expected one of {', '.join(_LEVELS)})") from None


def _quote(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' ="\\\n\r\t') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """One line per record: ts, level, service, logger, msg, then extras and exc."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
        parts = [
            f"ts={ts.strftime('%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}Z",
            f"level={_LEVEL_NAMES.get(record.levelno, record.levelname.lower())}",
            f"service={_quote(self.service)}",
            f"logger={_quote(record.name)}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        if record.stack_info:
            parts.append(f"stack={_quote(record.stack_info)}")
        return " ".join(parts)


def configure_logging(level: str, service: str, *, stream: TextIO | None = None) -> None:
    """Routes all logging to one key=value handler on stderr (or `stream`) at `level`.

    Idempotent: calling it again replaces the handler it installed before. grpc's own DEBUG
    chatter (logger ``grpc``) is only shown at ``trace``.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_exocore_handler", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(KeyValueFormatter(service))
    handler._exocore_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    numeric = parse_level(level)
    root.setLevel(numeric)
    # grpc's cython layer logs a line per call/loop lookup at DEBUG: only show it at trace.
    logging.getLogger("grpc").setLevel(numeric if numeric <= TRACE else max(numeric, logging.INFO))


def _code_name(code: object) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _peer_of(context: grpc.aio.ServicerContext) -> str:
    # Read when the call starts: once a call is cancelled and released, `context.peer()` can crash
    # the process (SIGSEGV seen with grpcio 1.85 on a cancelled server-streaming call).
    try:
        return context.peer()
    except Exception:
        return "?"


def _finish(
    method: str, context: grpc.aio.ServicerContext, start: float, error: BaseException | None, peer: str
) -> None:
    code = context.code()
    if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
        name = "CANCELLED"
    elif code is not None:
        name = _code_name(code)  # set by context.abort / set_code
    elif error is not None:
        name = "UNKNOWN"  # grpc's status for an exception escaping the handler
    else:
        name = "OK"
    level = logging.DEBUG if name == "OK" else logging.INFO
    if not _request_log.isEnabledFor(level):
        return
    _request_log.log(
        level,
        "rpc",
        extra={
            "method": method,
            "peer": peer,
            "code": name,
            "duration_ms": round((time.monotonic() - start) * 1000, 2),
        },
    )


def log_unimplemented(method: str) -> None:
    """The request log line of a call to a method the server does not serve."""
    _request_log.info("rpc", extra={"method": method, "code": "UNIMPLEMENTED"})
