"""The Python client library of a cell (ARCHITECTURE.md, SPEC.md 4.7).

* `Client(endpoint, token)`: async `mutate`, `query`, `watch` (re-subscribing async iterator) against a
  gateway's `exocore.store.v1.EntityStore`; `Client.for_node(node_dir)` targets a node's own gateway with a
  token signed by the node. `SyncClient`: the same, blocking.
* `MutationBuilder`, `QueryBuilder`, `TraitQueryBuilder`, `projection`: request builders.
* `TypeRegistry`, `pack_any`, `unpack_any`: traits in `google.protobuf.Any`.
* Errors are `exocommon.errors` classes (`Unauthenticated`, `InvalidArgument`, `Unavailable`, ...).
"""

from exocommon.client.builders import MutationBuilder, QueryBuilder, TraitQueryBuilder, projection
from exocommon.client.client import (
    MUTATION_TIMEOUT_S,
    QUERY_TIMEOUT_S,
    Client,
    Watch,
    node_endpoint_and_token,
    normalize_endpoint,
)
from exocommon.client.registry import TypeRegistry, default_registry, load_generated_modules, pack_any, unpack_any
from exocommon.client.sync import SyncClient, SyncWatch

__all__ = [
    "MUTATION_TIMEOUT_S",
    "QUERY_TIMEOUT_S",
    "Client",
    "MutationBuilder",
    "QueryBuilder",
    "SyncClient",
    "SyncWatch",
    "TraitQueryBuilder",
    "TypeRegistry",
    "Watch",
    "default_registry",
    "load_generated_modules",
    "node_endpoint_and_token",
    "normalize_endpoint",
    "pack_any",
    "projection",
    "unpack_any",
]
