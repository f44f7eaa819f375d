"""Per-client limits of the gateway: answered with RESOURCE_EXHAUSTED (HTTP 413 / 429).

* `request_bytes_max`: the encoded request of any call (gRPC message or HTTP body);
* `streams_per_token_max`: concurrent `WatchQuery` streams opened with one token;
* `calls_per_token_max`: concurrent unary calls (gRPC or HTTP) in flight with one token.

Counters live in this process only: with several gateway replicas, a client spreading its calls over
them gets each replica's allowance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from exocommon.errors import ResourceExhausted

__all__ = ["Limits", "LimitSettings", "RequestTooLarge", "TooManyCalls", "TooManyStreams"]


class RequestTooLarge(ResourceExhausted):
    """The request is larger than `request_bytes_max`."""


class TooManyStreams(ResourceExhausted):
    """The token already has `streams_per_token_max` open WatchQuery streams."""


class TooManyCalls(ResourceExhausted):
    """The token already has `calls_per_token_max` calls in flight."""


@dataclass(frozen=True)
class LimitSettings:
    request_bytes_max: int = 8 * 1024 * 1024
    streams_per_token_max: int = 64
    calls_per_token_max: int = 256

    def __post_init__(self) -> None:
        for name in ("request_bytes_max", "streams_per_token_max", "calls_per_token_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class Limits:
    """Counters per token (single event loop: no locks)."""

    def __init__(self, settings: LimitSettings | None = None) -> None:
        self.settings = settings or LimitSettings()
        self._calls_max = self.settings.calls_per_token_max
        self._streams: dict[str, int] = {}
        self._calls: dict[str, int] = {}

    def check_request_size(self, size: int) -> None:
        if size > self.settings.request_bytes_max:
            raise RequestTooLarge(
                f"request of {size} bytes is larger than the gateway's limit of "
                f"{self.settings.request_bytes_max} bytes"
            )

    @contextlib.contextmanager
    def stream(self, token: str) -> Iterator[None]:
        """Holds one stream slot of `token` for the duration of the block."""
        count = self._streams.get(token, 0)
        if count >= self.settings.streams_per_token_max:
            raise TooManyStreams(
                f"too many concurrent WatchQuery streams for this auth token "
                f"(limit {self.settings.streams_per_token_max}); close some first"
            )
        self._streams[token] = count + 1
        try:
            yield
        finally:
            _decrement(self._streams, token)

    @contextlib.contextmanager
    def call(self, token: str) -> Iterator[None]:
        """Holds one in-flight call slot of `token` for the duration of the block."""
        self.acquire_call(token)
        try:
            yield
        finally:
            self.release_call(token)

    def acquire_call(self, token: str) -> None:
        """Takes one in-flight call slot of `token` (give it back with `release_call`). The gRPC hot
        path uses this pair rather than `call`: a generator context manager per call costs more."""
        count = self._calls.get(token, 0)
        if count >= self._calls_max:
            raise TooManyCalls(f"too many concurrent calls for this auth token (limit {self._calls_max})")
        self._calls[token] = count + 1

    def release_call(self, token: str) -> None:
        _decrement(self._calls, token)

    def statistics(self) -> dict[str, int]:
        return {
            "open_streams": sum(self._streams.values()),
            "calls_in_flight": sum(self._calls.values()),
            "tokens_with_streams": len(self._streams),
        }


def _decrement(counters: dict[str, int], key: str) -> None:
    count = counters.get(key, 0) - 1
    if count > 0:
        counters[key] = count
    else:
        counters.pop(key, None)
