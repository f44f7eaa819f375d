"""Settings of a service process (as opposed to its logic)."""

from __future__ import annotations

import gc

# Exit statuses of a service process, a contract with `exo daemon` (which does not restart a child
# that exited with EXIT_CONFIG until the configuration changes) and the container entrypoint.
EXIT_FAILURE = 1  # failed while running (cannot listen, storage failed): worth restarting
EXIT_CONFIG = 2  # cannot run with this configuration: restarting will not help


class ConfigurationProblem(Exception):
    """The service cannot run with this configuration; restarting will not help (EXIT_CONFIG)."""


# A young-generation collection every this many net allocations (CPython's default: 700).
GC_THRESHOLD_ALLOCATIONS = 20_000


def tune_garbage_collector() -> None:
    """Fewer cyclic garbage collections, for a long-running service; call it once set up, just before
    serving. Services hold many long-lived objects (the chain's pending-store mirror, the store's RAM
    index bookkeeping) and allocate several per request; with the default thresholds (a collection
    every 700 allocations, a full one every 100 of those) collections took about a quarter of the
    chain's CPU under load and doubled the store's query p99. Almost all garbage is freed by reference
    counting anyway; what exists at startup (modules, configuration) is moved out of the collector's
    sight for good."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_ALLOCATIONS, 10, 10)


__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "GC_THRESHOLD_ALLOCATIONS", "ConfigurationProblem", "tune_garbage_collector"]
