"""The discovery mailbox (SPEC.md 7) as seen by its users: PINs and a blocking REST client.

The mailbox is a short-lived anonymous store addressed by 9-digit PINs, used to exchange a joining
node's config and the cell config back (`exo cell join` / `exo cell node add`). The server lives in
`exogateway.discovery`; this module is what a node needs to talk to it, with no dependency beyond
the standard library.

* `format_pin(123456789) == "123 456 789"`; `parse_pin(" 123 456\\t789 ")` ignores whitespace and
  raises `InvalidPin` outside [100 000 000, 999 999 999].
* `DiscoveryClient(url)`: `create(data, expect_reply)`, `get(pin)` (one-shot read),
  `reply(reply_pin, reply_token, data, expect_reply)`, `get_loop(pin, timeout)` (polls every second
  while the payload is absent). Payload bytes travel base64-encoded in JSON bodies.
* Errors are typed: `PayloadNotFound` (404), `InvalidReply` (401), `PayloadTooLarge` (413),
  `MailboxFull` (507), `InvalidRequest` (400); an unreachable server is `Unavailable`. The server
  raises the same classes, whose `http_status` gives its HTTP status.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from exocommon.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

PIN_MIN = 100_000_000
PIN_MAX = 999_999_999
# One default everywhere (the original had 8005 in the library and 8085 in the CLI).
DEFAULT_PORT = 8085
DEFAULT_REQUEST_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 1.0


class InvalidPin(NotFound):
    """Not a PIN: the server answers 404 for it, as for an absent payload."""

    http_status = 404


class PayloadNotFound(NotFound):
    """No live payload under this PIN (never created, expired, or already read)."""

    http_status = 404


class InvalidReply(Unauthenticated):
    """The reply slot does not exist (or expired) or the reply token does not match."""

    http_status = 401


class PayloadTooLarge(ResourceExhausted):
    http_status = 413


class MailboxFull(ResourceExhausted):
    """The mailbox holds its maximum number of payloads and reply slots."""

    http_status = 507


class InvalidRequest(InvalidArgument):
    """A request body that is not the expected JSON."""

    http_status = 400


def format_pin(pin: int) -> str:
    """``123456789`` -> ``"123 456 789"``."""
    text = f"{pin:09d}"
    return f"{text[0:3]} {text[3:6]} {text[6:9]}"


def parse_pin(value: str | int) -> int:
    """A PIN from its display or plain form (whitespace ignored); `InvalidPin` if it is not one."""
    if isinstance(value, bool):
        raise InvalidPin(f"not a PIN: {value!r}")
    if isinstance(value, int):
        pin = value
    else:
        digits = "".join(value.split())
        if not digits.isascii() or not digits.isdigit():
            raise InvalidPin(f"not a PIN: {value!r} (expected 9 digits, like '123 456 789')")
        pin = int(digits)
    if not PIN_MIN <= pin <= PIN_MAX:
        raise InvalidPin(f"not a PIN: {value!r} (expected a number from {PIN_MIN} to {PIN_MAX})")
    return pin


def format_expiration(unix_s: float) -> str:
    """RFC 3339 in UTC with millisecond precision, e.g. ``2024-05-01T12:00:00.000Z``."""
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_expiration(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class CreateResponse:
    """Answer to a create or a reply: where the payload is, until when, and the reply slot if any."""

    pin: int
    expiration: datetime
    reply_pin: int | None


@dataclass(frozen=True)
class Payload:
    """A payload read from the mailbox; `reply_pin`/`reply_token` are set if a reply is expected."""

    pin: int
    data: bytes
    reply_pin: int | None
    reply_token: int | None


_ERRORS: dict[int, type[Exception]] = {
    400: InvalidRequest,
    401: InvalidReply,
    404: PayloadNotFound,
    413: PayloadTooLarge,
    507: MailboxFull,
}


def _optional_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unavailable(f"discovery service sent an invalid {what}: {value!r}")
    return value


class DiscoveryClient:
    """Blocking client of the REST API (see module doc). `sleep`/`monotonic` are injectable for tests."""

    def __init__(
        self,
        url: str,
        timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"discovery service URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._monotonic = monotonic

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            error = _ERRORS.get(exc.code)
            if error is not None:
                raise error(detail or f"discovery service answered {exc.code}") from None
            raise Unavailable(f"discovery service at {self.url} answered {exc.code} {detail}".rstrip()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unavailable(f"cannot reach the discovery service at {self.url}: {reason}") from None
        try:
            decoded = json.loads(raw)
        except ValueError:
            raise Unavailable(f"discovery service at {self.url} sent a body that is not JSON") from None
        if not isinstance(decoded, dict):
            raise Unavailable(f"discovery service at {self.url} sent an unexpected body")
        return decoded

    @staticmethod
    def _create_response(body: dict[str, Any]) -> CreateResponse:
        try:
            return CreateResponse(
                pin=parse_pin(body["pin"]),
                expiration=parse_expiration(body["expiration"]),
                reply_pin=_optional_int(body.get("reply_pin"), "reply_pin"),
            )
        except (KeyError, TypeError, ValueError, NotFound) as exc:
            raise Unavailable(f"discovery service sent an invalid answer: {exc}") from None

    def create(self, data: bytes, expect_reply: bool = False) -> CreateResponse:
        """Leaves `data` under a new PIN (and reserves a reply slot if `expect_reply`)."""
        body = {"data": base64.b64encode(data).decode("ascii"), "expect_reply": expect_reply}
        return self._create_response(self._request("POST", "/", body))

    def get(self, pin: int | str) -> Payload:
        """Reads (and thereby removes) the payload under `pin`; `PayloadNotFound` if absent."""
        pin = parse_pin(pin)
        body = self._request("GET", f"/{pin}")
        try:
            data = base64.b64decode(body["data"], validate=True)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise Unavailable(f"discovery service sent an invalid payload: {exc}") from None
        return Payload(
            pin=pin,
            data=data,
            reply_pin=_optional_int(body.get("reply_pin"), "reply_pin"),
            reply_token=_optional_int(body.get("reply_token"), "reply_token"),
        )

    def reply(self, reply_pin: int, reply_token: int, data: bytes, expect_reply: bool = False) -> CreateResponse:
        """Answers a payload in its reply slot; the creator reads the answer with `get(reply_pin)`."""
        reply_pin = parse_pin(reply_pin)
        body = {
            "data": base64.b64encode(data).decode("ascii"),
            "reply_token": reply_token,
            "expect_reply": expect_reply,
        }
        return self._create_response(self._request("PUT", f"/{reply_pin}", body))

    def get_loop(self, pin: int | str, timeout: float) -> Payload:
        """`get(pin)` every second while the payload is absent; `PayloadNotFound` after `timeout` s."""
        deadline = self._monotonic() + timeout
        while True:
            try:
                return self.get(pin)
            except PayloadNotFound:
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    shown = format_pin(parse_pin(pin))
                    raise PayloadNotFound(f"no payload under PIN {shown} after {timeout:g} s") from None
                self._sleep(min(POLL_INTERVAL_S, remaining))


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
    except (ValueError, OSError):
        return ""
    return str(body.get("error", "")) if isinstance(body, dict) else ""


__all__ = [
    "DEFAULT_PORT",
    "PIN_MAX",
    "PIN_MIN",
    "CreateResponse",
    "DiscoveryClient",
    "InvalidPin",
    "InvalidReply",
    "InvalidRequest",
    "MailboxFull",
    "Payload",
    "PayloadNotFound",
    "PayloadTooLarge",
    "format_expiration",
    "format_pin",
    "parse_expiration",
    "parse_pin",
]
