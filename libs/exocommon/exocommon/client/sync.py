"""A blocking client: the async `Client` driven by a private event loop in a background thread.

    with SyncClient("127.0.0.1:3330", token) as client:
        client.mutate(MutationBuilder().put_trait("", TestMessage(string1="hi")))
        for results in client.watch(QueryBuilder.all()):   # blocks between results
            ...

Same arguments, deadlines, errors and watch semantics as `Client`. Safe to call from several threads.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self, TypeVar

from exocommon.auth_token import AuthToken
from exocommon.client.builders import MutationBuilder, QueryBuilder
from exocommon.client.client import Client, Watch, node_endpoint_and_token
from exocore.store import mutation_pb2, query_pb2

__all__ = ["SyncClient", "SyncWatch"]

T = TypeVar("T")


class SyncClient:
    """Blocking twin of `Client` (see module docstring)."""

    def __init__(self, endpoint: str, token: str | AuthToken | None = None, **kwargs: Any) -> None:
        self._client = Client(endpoint, token, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="exocore-client", daemon=True)
        self._thread.start()
        self._closed = False

    @classmethod
    def for_node(cls, node_dir: str | os.PathLike[str], cell_id: str | None = None, **kwargs: Any) -> SyncClient:
        endpoint, token = node_endpoint_and_token(node_dir, cell_id)
        return cls(endpoint, token, **kwargs)

    @property
    def client(self) -> Client:
        """The async client underneath (use it only from this client's loop)."""
        return self._client

    @property
    def endpoint(self) -> str:
        return self._client.endpoint

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def mutate(
        self, request: mutation_pb2.MutationRequest | MutationBuilder, *, timeout: float | None = None
    ) -> mutation_pb2.MutationResult:
        return self._run(self._client.mutate(request, timeout=timeout))

    def query(
        self, query: query_pb2.EntityQuery | QueryBuilder, *, timeout: float | None = None
    ) -> query_pb2.EntityResults:
        return self._run(self._client.query(query, timeout=timeout))

    def watch(self, query: query_pb2.EntityQuery | QueryBuilder) -> SyncWatch:
        return SyncWatch(self, self._client.watch(query))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncWatch(Iterator[query_pb2.EntityResults]):
    """Blocking iterator over a `Watch`; `close()` ends it."""

    def __init__(self, owner: SyncClient, watch: Watch) -> None:
        self._owner = owner
        self.watch = watch

    @property
    def latest(self) -> query_pb2.EntityResults | None:
        return self.watch.latest

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> query_pb2.EntityResults:
        try:
            return self._owner._run(self.watch.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._owner._run(self.watch.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
