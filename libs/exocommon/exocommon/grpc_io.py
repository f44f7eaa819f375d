"""grpc core's I/O mode for this project's processes: call `prefer_poller_io()` before grpc is imported.

grpc core (1.85) runs its I/O on the EventEngine by default: every read, write and completion moves
between the engine's own threads, the completion queue's poller thread and the asyncio loop. For the
short calls between our services those hand-offs cost a tenth to a quarter of a process's CPU per
call, and each is a thread wake-up, which on these VMs (idle vCPUs halt at once, no halt polling)
adds latency: a trivial round trip after 5 ms idle took ~1.2 ms with the EventEngine and ~0.4 ms
without. Turning off the EventEngine experiments falls back to the older I/O manager, which does
the reads in the poller thread. grpc reads `GRPC_EXPERIMENTS` once, when it is imported, so this
must run first; a `GRPC_EXPERIMENTS` the user set wins.
"""

from __future__ import annotations

import os
import sys

__all__ = ["POLLER_IO_EXPERIMENTS", "prefer_poller_io"]

# Only experiments this grpc knows (an unknown name is logged as an error at start-up).
POLLER_IO_EXPERIMENTS = (
    "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints,"
    "-event_engine_callback_cq,-event_engine_fork"
)


def prefer_poller_io() -> bool:
    """Sets `GRPC_EXPERIMENTS` unless set; False (nothing done) if grpc is already imported."""
    if "grpc" in sys.modules or "grpc._cython.cygrpc" in sys.modules:
        return False
    os.environ.setdefault("GRPC_EXPERIMENTS", POLLER_IO_EXPERIMENTS)
    return True
