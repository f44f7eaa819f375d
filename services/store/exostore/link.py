"""The store's side of the gateway link (`exocore.store.v1.StoreLink`, see `exocommon.grpc_util.link`).

A gateway sends its clients' Mutate and Query calls over one stream per store replica instead of one
gRPC call each; they run exactly as the EntityStore methods of `service.EntityStoreServicer` (same
`StoreService` calls, same errors), which stays the public contract. WatchQuery streams keep their
own gRPC calls.
"""

from __future__ import annotations

from collections.abc import Callable

from exocommon.grpc_util.link import LinkHandler, LinkServicer, link_registration, parse_request
from exocore.store import mutation_pb2, query_pb2
from exostore.service import SERVICE_NAME, StoreService

__all__ = ["link_handlers", "store_link_registration"]


def link_handlers(service: StoreService) -> dict[str, LinkHandler]:
    async def mutate(body: bytes, time_remaining: float | None) -> bytes:
        request = parse_request(mutation_pb2.MutationRequest, body)
        return (await service.mutate(request, time_remaining)).SerializeToString()

    async def query(body: bytes, time_remaining: float | None) -> bytes:
        return (await service.query(parse_request(query_pb2.EntityQuery, body))).SerializeToString()

    return {f"/{SERVICE_NAME}/Mutate": mutate, f"/{SERVICE_NAME}/Query": query}


def store_link_registration(service: StoreService) -> tuple[Callable[..., None], LinkServicer, str]:
    """The `ServiceServer` registration of the link serving `service`."""
    return link_registration(link_handlers(service))
