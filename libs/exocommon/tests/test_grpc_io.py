"""`prefer_poller_io` in fresh interpreters: it must run before grpc is imported, and a value the user
set wins."""

from __future__ import annotations

import os
import subprocess
import sys

from exocommon.grpc_io import POLLER_IO_EXPERIMENTS


def run(code: str, env_value: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_sets_the_experiments_before_grpc_is_imported():
    code = "from exocommon.grpc_io import prefer_poller_io as p; import os; print(p(), os.environ['GRPC_EXPERIMENTS'])"
    assert run(code) == f"True {POLLER_IO_EXPERIMENTS}"


def test_does_nothing_once_grpc_is_imported_or_when_the_user_chose():
    late = (
        "import grpc, os\n"
        "from exocommon.grpc_io import prefer_poller_io as p\n"
        "print(p(), 'GRPC_EXPERIMENTS' in os.environ)"
    )
    assert run(late) == "False False"
    chosen = (
        "from exocommon.grpc_io import prefer_poller_io as p; import os; print(p(), os.environ['GRPC_EXPERIMENTS'])"
    )
    assert run(chosen, "event_engine_client") == "True event_engine_client"


def test_every_experiment_named_is_known_to_this_grpc():
    # grpc logs "Unknown experiment" for a name it does not have; none may appear.
    env = {**os.environ, "GRPC_EXPERIMENTS": POLLER_IO_EXPERIMENTS}
    code = (
        "import asyncio, grpc.aio\n"
        "async def m():\n"
        "    s = grpc.aio.server(); s.add_insecure_port('127.0.0.1:0'); await s.start(); await s.stop(None)\n"
        "asyncio.run(m())"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Unknown experiment" not in done.stderr, done.stderr
