"""Types shared by the replication cores: the cell as the chain sees it, configuration, outputs."""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from exocommon.ids import PeerId, consistent_clock_id
from exocommon.keys import Keypair, PublicKey
from exocore.chain.v1 import chain_pb2

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class ChainCell:
    """The cell's chain membership: who votes, with which key (static config, SPEC 1.4)."""

    cell_id: str
    cell_public_key: PublicKey
    chain_node_keys: Mapping[str, PublicKey]
    # Every member's key (any role), for checking the author of an operation.
    member_keys: Mapping[str, PublicKey]

    @property
    def chain_node_ids(self) -> list[str]:
        """Sorted by id string: the order of commit turns (SPEC 2.8)."""
        return sorted(self.chain_node_keys)

    def is_chain_node(self, node_id: str) -> bool:
        return node_id in self.chain_node_keys

    def has_quorum(self, count: int) -> bool:
        n = len(self.chain_node_keys)
        return n > 0 and count > n // 2

    def member_key(self, node_id: str) -> PublicKey | None:
        return self.member_keys.get(node_id) or self.chain_node_keys.get(node_id)

    def clock_slot(self, node_id: str) -> int:
        """The node's 3-digit slot in operation ids, unique within the cell.

        The original used `clock_id % 1000` and hoped two nodes never share it (SPEC 11, item 16);
        a collision makes two nodes issue the same operation ids. Here every node of the cell
        computes the same table from the membership: nodes sorted by id take their natural slot,
        or the next free one.
        """
        return _clock_slots(tuple(sorted({*self.member_keys, *self.chain_node_keys})))[node_id]


@functools.cache
def _clock_slots(node_ids: tuple[str, ...]) -> dict[str, int]:
    slots: dict[str, int] = {}
    taken: set[int] = set()
    for node_id in node_ids:
        slot = consistent_clock_id(PeerId.from_str(node_id)) % 1000
        while slot in taken:
            slot = (slot + 1) % 1000
        slots[node_id] = slot
        taken.add(slot)
    return slots


@dataclass(frozen=True)
class LocalChainNode:
    node_id: str
    keypair: Keypair


@dataclass(frozen=True)
class PendingSyncConfig:
    max_operations_per_range: int = 30
    request_min_interval_ns: int = 5 * NS_PER_S
    request_max_interval_ns: int = 30 * NS_PER_S
    operations_depth_after_cleanup: int = 2


@dataclass(frozen=True)
class CommitManagerConfig:
    operations_cleanup_after_block_depth: int = 6
    commit_maximum_pending_store_count: int = 10
    commit_maximum_interval_ns: int = 3 * NS_PER_S
    block_proposal_timeout_ns: int = 7 * NS_PER_S
    # Beyond the original (0: none, the original's behaviour): a proposal for having
    # `commit_maximum_pending_store_count` entries waiting is not made sooner than this after the
    # last block's proposal, so that a steady trickle of entries (one client appending in sequence)
    # makes blocks of several entries rather than a block for each one or two when that count is low.
    commit_minimum_interval_ns: int = 0


@dataclass(frozen=True)
class ChainSyncConfig:
    request_min_interval_ns: int = 5 * NS_PER_S
    request_max_interval_ns: int = 30 * NS_PER_S
    meta_sync_max_failures: int = 2
    metadata_sync_begin_count: int = 5
    metadata_sync_end_count: int = 5
    metadata_sync_sampled_count: int = 10
    blocks_max_send_size: int = 2 * 1024 * 1024
    max_leader_common_block_height_delta: int = 5


@dataclass(frozen=True)
class EngineConfig:
    tick_interval_ns: int = 1 * NS_PER_S
    pending_sync: PendingSyncConfig = field(default_factory=PendingSyncConfig)
    commit_manager: CommitManagerConfig = field(default_factory=CommitManagerConfig)
    chain_sync: ChainSyncConfig = field(default_factory=ChainSyncConfig)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message the shell must send to another chain node. `urgent` messages (proposals and votes)
    should overtake the others queued for that node: a proposal stuck behind a backlog of entry
    pushes lets the next turn's proposer propose a concurrent block."""

    to_node_id: str
    message: chain_pb2.PeerMessage
    urgent: bool = False
    # For a push of local entries: the highest id it carries. Once the shell delivered it (and the
    # pushes before it), it reports that id (`Engine.peer_received`).
    own_up_to: int = 0


@dataclass
class RequestTracker:
    """When a periodic request to one peer may be sent again (SPEC 2.9): never sent, or the backoff
    elapsed; sending again without a response since counts a failure; a response resets failures.
    Backoff = min interval without failures, else min + min * 2^(failures-1), capped at max."""

    min_interval_ns: int
    max_interval_ns: int
    last_request_ns: int | None = None
    last_response_ns: int | None = None
    failures: int = 0

    def backoff_ns(self) -> int:
        if self.failures == 0:
            return self.min_interval_ns
        return min(self.max_interval_ns, self.min_interval_ns + self.min_interval_ns * 2 ** (self.failures - 1))

    def can_send(self, now_ns: int) -> bool:
        return self.last_request_ns is None or now_ns - self.last_request_ns >= self.backoff_ns()

    def sent(self, now_ns: int) -> None:
        if self.unanswered():
            self.failures += 1
        self.last_request_ns = now_ns

    def responded(self, now_ns: int) -> None:
        self.last_response_ns = now_ns
        self.failures = 0

    def unanswered(self) -> bool:
        """Whether the last request sent got no response since."""
        return self.last_request_ns is not None and (
            self.last_response_ns is None or self.last_response_ns < self.last_request_ns
        )

    def reset(self) -> None:
        self.last_request_ns = None
        self.last_response_ns = None
        self.failures = 0

    def force_next(self) -> None:
        """Allow an immediate next request (e.g. after a useful response)."""
        self.last_request_ns = None


class ChainSyncStatus(enum.Enum):
    UNKNOWN = "unknown"
    DOWNLOADING = "downloading"
    SYNCHRONIZED = "synchronized"


# MetaStore keys of the sync state shared by the cores (SPEC 2.6: pending_last_cleanup_block).
META_CLEANUP_OFFSET = "pending_last_cleanup_offset"
META_CLEANUP_HEIGHT = "pending_last_cleanup_height"
