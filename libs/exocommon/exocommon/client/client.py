"""The async client of a cell's `exocore.store.v1.EntityStore` (a gateway, or a store replica directly).

    async with Client("127.0.0.1:3330", token) as client:
        result = await client.mutate(MutationBuilder().put_trait("", TestMessage(string1="hi")).return_entities())
        results = await client.query(QueryBuilder.match("hi").count(10))
        async for results in client.watch(QueryBuilder.trait(TestMessage)):
            ...  # first results right away, then each time they change

* `token`: an auth token (SPEC.md 1.11; base58 text or `AuthToken`) sent as ``authorization: Bearer <token>``
  metadata on every call; a gateway requires one, a store replica ignores it. `Client.for_node(node_dir)`
  targets that node's gateway with a short-lived token signed by the node's own key.
* Every call has a deadline: `mutation_timeout_s` (10 s) and `query_timeout_s` (5 s) by default (the
  original's SDK had the two swapped, SPEC.md 11 item 12), or ``timeout=`` per call.
* Failed calls raise the typed `exocommon.errors` class of their status (`Unauthenticated`,
  `InvalidArgument`, `Unavailable`, `ResourceExhausted`, `DeadlineExceeded`...).
* Queries and watch subscriptions are retried by the channel when the endpoint is unreachable
  (UNAVAILABLE before any answer); mutations are not retried automatically, since a mutation that
  reached the store may have been written.
* `watch(query)` is an async iterator that survives failures: when its stream ends or fails with a
  transient status (UNAVAILABLE, CANCELLED by the server, DEADLINE_EXCEEDED, ABORTED) it re-subscribes
  with a capped exponential backoff. The new subscription's first results are delivered unless they
  hash like the last delivered ones, so the iterator always catches up to the latest results and never
  repeats one. Other errors (a bad query, a refused token, too many streams) end it with their error.
  `watch.latest` holds the last delivered results.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

from exocommon.auth_token import AuthToken
from exocommon.client.builders import MutationBuilder, QueryBuilder
from exocommon.client.registry import TypeRegistry, default_registry
from exocommon.clock import now_ns
from exocommon.errors import ExocoreError, FailedPrecondition, InvalidArgument
from exocommon.grpc_util import create_channel, exception_from_rpc_error
from exocommon.grpc_util.client import RETRY_POLICY
from exocore.store import mutation_pb2, query_pb2
from exocore.store.v1 import entity_store_pb2_grpc

__all__ = [
    "MUTATION_TIMEOUT_S",
    "QUERY_TIMEOUT_S",
    "Client",
    "Watch",
    "normalize_endpoint",
]

MUTATION_TIMEOUT_S = 10.0
QUERY_TIMEOUT_S = 5.0
# A token made by `Client.for_node` is valid this long (a fresh one is signed per client).
NODE_TOKEN_LIFETIME_S = 3600
RESUBSCRIBE_BACKOFF_INITIAL_S = 0.1
RESUBSCRIBE_BACKOFF_MAX_S = 5.0

_RESUBSCRIBE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)

_SERVICE = "exocore.store.v1.EntityStore"


def _service_config() -> str:
    """Retries (UNAVAILABLE before any answer) for Query and WatchQuery only, never for Mutate."""
    retried = {"name": [{"service": _SERVICE, "method": "Query"}, {"service": _SERVICE, "method": "WatchQuery"}]}
    return json.dumps({"methodConfig": [{**retried, "retryPolicy": RETRY_POLICY}]})


def normalize_endpoint(endpoint: str) -> str:
    """``host:port`` from ``host:port``, ``grpc://host:port`` or ``http://host:port[/]``."""
    text = endpoint.strip()
    for scheme in ("grpc://", "http://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"endpoint must be host:port, got {endpoint!r}")
    return text


def _token_text(token: str | AuthToken | None) -> str | None:
    if token is None:
        return None
    if isinstance(token, AuthToken):
        return token.encode_base58()
    text = token.strip()
    return text or None


class Client:
    """Async client (see module docstring). Create it anywhere; its channel opens on first use, in the
    running event loop, and must be used from that loop only."""

    def __init__(
        self,
        endpoint: str,
        token: str | AuthToken | None = None,
        *,
        registry: TypeRegistry | None = None,
        mutation_timeout_s: float = MUTATION_TIMEOUT_S,
        query_timeout_s: float = QUERY_TIMEOUT_S,
        resubscribe_backoff_initial_s: float = RESUBSCRIBE_BACKOFF_INITIAL_S,
        resubscribe_backoff_max_s: float = RESUBSCRIBE_BACKOFF_MAX_S,
        channel_options: list[tuple[str, Any]] | None = None,
    ) -> None:
        if mutation_timeout_s <= 0 or query_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self.endpoint = normalize_endpoint(endpoint)
        self.token = _token_text(token)
        self.registry = registry or default_registry()
        self.mutation_timeout_s = mutation_timeout_s
        self.query_timeout_s = query_timeout_s
        self.resubscribe_backoff_initial_s = resubscribe_backoff_initial_s
        self.resubscribe_backoff_max_s = resubscribe_backoff_max_s
        self._channel_options = list(channel_options or [])
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {self.token}"),) if self.token else ()
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: entity_store_pb2_grpc.EntityStoreStub | None = None
        self._closed = False

    @classmethod
    def for_node(
        cls, node_dir: str | os.PathLike[str], cell_id: str | None = None, **kwargs: Any
    ) -> Client:
        """A client of the node's own gateway (`addresses.gateway`) with a token for the cell signed by the
        node's key, valid `NODE_TOKEN_LIFETIME_S`. `cell_id` may be omitted when the node has one cell."""
        endpoint, token = node_endpoint_and_token(node_dir, cell_id)
        return cls(endpoint, token, **kwargs)

    # --- plumbing -------------------------------------------------------------------------------------

    def _get_stub(self) -> entity_store_pb2_grpc.EntityStoreStub:
        if self._closed:
            raise FailedPrecondition("client is closed")
        if self._stub is None:
            options = [("grpc.service_config", _service_config()), *self._channel_options]
            self._channel = create_channel(self.endpoint, options=options)
            self._stub = entity_store_pb2_grpc.EntityStoreStub(self._channel)
        return self._stub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def close(self) -> None:
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- calls ----------------------------------------------------------------------------------------

    async def mutate(
        self, request: mutation_pb2.MutationRequest | MutationBuilder, *, timeout: float | None = None
    ) -> mutation_pb2.MutationResult:
        """Writes the mutations (all or nothing); their operation ids, and entities if requested."""
        if isinstance(request, MutationBuilder):
            request = request.build()
        stub = self._get_stub()
        try:
            return await stub.Mutate(request, timeout=timeout or self.mutation_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise exception_from_rpc_error(exc) from None

    async def query(
        self, query: query_pb2.EntityQuery | QueryBuilder, *, timeout: float | None = None
    ) -> query_pb2.EntityResults:
        if isinstance(query, QueryBuilder):
            query = query.build()
        stub = self._get_stub()
        try:
            return await stub.Query(query, timeout=timeout or self.query_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise exception_from_rpc_error(exc) from None

    def watch(self, query: query_pb2.EntityQuery | QueryBuilder) -> Watch:
        """An async iterator of the query's results, re-subscribing on failure (module docstring)."""
        if isinstance(query, QueryBuilder):
            query = query.build()
        return Watch(self, query)

    def _open_watch(self, query: query_pb2.EntityQuery) -> grpc.aio.UnaryStreamCall:
        return self._get_stub().WatchQuery(query, timeout=None, metadata=self._metadata)


class Watch(AsyncIterator[query_pb2.EntityResults]):
    """Results of a watched query (see the module docstring). `aclose()` (or `async with`) ends it."""

    def __init__(self, client: Client, query: query_pb2.EntityQuery) -> None:
        self._client = client
        self._query = query
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._closed = False
        self._backoff_s = client.resubscribe_backoff_initial_s
        self._fresh_subscription = False
        self.latest: query_pb2.EntityResults | None = None
        self.subscriptions = 0
        self.last_error: ExocoreError | None = None

    @property
    def resubscriptions(self) -> int:
        return max(0, self.subscriptions - 1)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> query_pb2.EntityResults:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._call is None:
                self._call = self._client._open_watch(self._query)
                self.subscriptions += 1
                self._fresh_subscription = True
            try:
                results = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                if self._closed:
                    raise StopAsyncIteration from None
                error = exception_from_rpc_error(exc)
                if exc.code() not in _RESUBSCRIBE_CODES:
                    self._call = None
                    self._closed = True
                    raise error from None
                self.last_error = error
                await self._wait_before_resubscribing()
                continue
            except asyncio.CancelledError:
                self._cancel_call()
                raise
            if results is grpc.aio.EOF:  # the server ended the stream (e.g. a replica shutting down)
                await self._wait_before_resubscribing()
                continue
            self._backoff_s = self._client.resubscribe_backoff_initial_s
            assert isinstance(results, query_pb2.EntityResults)
            fresh, self._fresh_subscription = self._fresh_subscription, False
            if fresh and self.latest is not None and results.hash and results.hash == self.latest.hash:
                continue  # the new subscription's first results are the ones already delivered
            self.latest = results
            return results

    async def _wait_before_resubscribing(self) -> None:
        self._cancel_call()
        delay = self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self._client.resubscribe_backoff_max_s)
        await asyncio.sleep(delay)

    def _cancel_call(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def aclose(self) -> None:
        self._closed = True
        self._cancel_call()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def node_endpoint_and_token(
    node_dir: str | os.PathLike[str], cell_id: str | None = None, lifetime_s: int = NODE_TOKEN_LIFETIME_S
) -> tuple[str, str]:
    """The gateway address of the node in `node_dir` and a fresh token for its cell signed by its key."""
    from exocommon.config import NodeDirectory

    directory = NodeDirectory(Path(node_dir))
    if not directory.node_yaml.exists():
        raise FailedPrecondition(f"no node in {node_dir} (no node.yaml)")
    local = directory.load_local_node()
    cells = directory.load_cells(local)
    if cell_id is not None:
        cells = [cell for cell in cells if str(cell.id) == cell_id or cell.name == cell_id]
    if not cells:
        raise FailedPrecondition(f"node {local.name} has no cell" + (f" {cell_id}" if cell_id else ""))
    if len(cells) > 1:
        names = ", ".join(f"{cell.name} ({cell.id})" for cell in cells)
        raise FailedPrecondition(f"node {local.name} has several cells ({names}): choose one")
    cell = cells[0]
    gateway = local.addresses.gateway
    if not gateway:
        raise FailedPrecondition(f"node {local.name} has no gateway address (addresses.gateway in node.yaml)")
    now = now_ns()
    token = AuthToken.create(str(cell.id), local.keypair, now, now + lifetime_s * 1_000_000_000)
    return gateway, token.encode_base58()

