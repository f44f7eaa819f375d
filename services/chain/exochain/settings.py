"""The engine settings of a node, from node.yaml's `chain:` section (SPEC 2.6-2.9).

| node.yaml key                     | engine field                                     | default |
| --------------------------------- | ------------------------------------------------ | ------- |
| `commit_interval_ms`              | commit_manager.commit_maximum_interval_ns        | 3000    |
| `block_proposal_timeout_ms`       | commit_manager.block_proposal_timeout_ns         | 7000    |
| `cleanup_after_block_depth`       | commit_manager.operations_cleanup_after_block_depth | 6    |
| `commit_max_pending_operations`   | commit_manager.commit_maximum_pending_store_count | 10     |
| `tick_interval_ms`                | tick_interval_ns                                 | 100     |
| `sync_interval_ms`                | pending_sync / chain_sync request_min_interval_ns | 5000   |
| `commit_min_interval_ms`          | commit_manager.commit_minimum_interval_ns        | none (new) |

Everything else keeps the original's defaults (`exochain.core.common`).
"""

from __future__ import annotations

import dataclasses

from exochain.core.common import (
    NS_PER_MS,
    ChainSyncConfig,
    CommitManagerConfig,
    EngineConfig,
    PendingSyncConfig,
)
from exocommon.config import ConfigError, LocalNodeConfig

# The original ticks its engine every second. The commit manager only proposes, signs and commits
# on a tick, so each step of a commit (proposal, signatures, commit on every node) waits for the next
# tick of the node concerned: with 1 s an append takes seconds to be committed even on an idle cell.
# A tick costs microseconds when there is nothing to do, so 100 ms keeps append-to-commit latency
# in the hundreds of milliseconds for a negligible CPU cost.
DEFAULT_TICK_INTERVAL_MS = 100

# The original backs off sync requests to an unresponsive peer from 5 s up to 30 s; a configured
# minimum interval keeps that ratio for the maximum.
SYNC_MAX_INTERVAL_FACTOR = 6


def _setting(cfg: LocalNodeConfig, name: str, default: int, source: str) -> int:
    if not cfg.HasField("chain") or not cfg.chain.HasField(name):
        return default
    value = int(getattr(cfg.chain, name).value)
    if value < 1:
        raise ConfigError(source, f"chain.{name}", f"must be at least 1, got {value}")
    return value


def engine_config_from_node(cfg: LocalNodeConfig, source: str = "node.yaml") -> EngineConfig:
    """The engine configuration for node config `cfg`; ConfigError names a bad value."""
    commit_defaults = CommitManagerConfig()
    pending_defaults = PendingSyncConfig()
    chain_defaults = ChainSyncConfig()

    def ms(name: str, default_ns: int) -> int:
        return _setting(cfg, name, default_ns // NS_PER_MS, source) * NS_PER_MS

    commit_manager = dataclasses.replace(
        commit_defaults,
        commit_maximum_interval_ns=ms("commit_interval_ms", commit_defaults.commit_maximum_interval_ns),
        block_proposal_timeout_ns=ms("block_proposal_timeout_ms", commit_defaults.block_proposal_timeout_ns),
        operations_cleanup_after_block_depth=_setting(
            cfg, "cleanup_after_block_depth", commit_defaults.operations_cleanup_after_block_depth, source
        ),
        commit_maximum_pending_store_count=_setting(
            cfg, "commit_max_pending_operations", commit_defaults.commit_maximum_pending_store_count, source
        ),
        commit_minimum_interval_ns=ms("commit_min_interval_ms", commit_defaults.commit_minimum_interval_ns),
    )
    sync_min_ns = ms("sync_interval_ms", pending_defaults.request_min_interval_ns)
    configured_sync = cfg.HasField("chain") and cfg.chain.HasField("sync_interval_ms")
    pending_sync = pending_defaults
    chain_sync = chain_defaults
    if configured_sync:
        sync_max_ns = sync_min_ns * SYNC_MAX_INTERVAL_FACTOR
        pending_sync = dataclasses.replace(
            pending_defaults, request_min_interval_ns=sync_min_ns, request_max_interval_ns=sync_max_ns
        )
        chain_sync = dataclasses.replace(
            chain_defaults, request_min_interval_ns=sync_min_ns, request_max_interval_ns=sync_max_ns
        )
    return EngineConfig(
        tick_interval_ns=ms("tick_interval_ms", DEFAULT_TICK_INTERVAL_MS * NS_PER_MS),
        pending_sync=pending_sync,
        commit_manager=commit_manager,
        chain_sync=chain_sync,
    )


__all__ = ["DEFAULT_TICK_INTERVAL_MS", "SYNC_MAX_INTERVAL_FACTOR", "engine_config_from_node"]
