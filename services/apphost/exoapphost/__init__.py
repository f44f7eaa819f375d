"""The app host: runs a cell's WebAssembly apps with limits, next to the store (SPEC.md 5).

Modules: `runtime` (one wasmtime instance with fuel, epoch deadline and memory cap), `runner` (a
thread per app: tick loop, store requests, restarts with backoff), `bridge` (store requests over
gRPC), `service` (the apps of a cell and the `exocore.apps.v1.AppHost` API), `settings`
(node.yaml `apphost:`), `scaffold` (`exo app generate`), `bench` (`make bench-apphost`).
The guest SDK (C) is in ``services/apphost/sdk``.
"""

from pathlib import Path


def sdk_dir() -> Path:
    """The folder of the C guest SDK (exocore.h, exocore.c)."""
    return Path(__file__).resolve().parent.parent / "sdk"
