"""`python -m exocommon.grpc_util.healthcheck`: the probe of compose healthchecks and k8s exec probes."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from grpc_health.v1 import health_pb2

from exocommon.grpc_util import ServiceServer
from exocommon.grpc_util.healthcheck import check, main
from exocommon.net import free_ports


async def test_serving_not_serving_unknown_and_unreachable(capsys):
    server = ServiceServer("test", "127.0.0.1:0", drain_delay_s=0.0, grace_s=0.2)
    await server.start()
    address = server.address
    try:
        await server.health.set("busy", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await asyncio.to_thread(check, address) == (True, "SERVING")
        assert await asyncio.to_thread(check, address, "busy") == (False, "NOT_SERVING")
        serving, seen = await asyncio.to_thread(check, address, "nothing.Such")
        assert not serving and seen.startswith("NOT_FOUND")
        assert await asyncio.to_thread(main, [address]) == 0
        assert capsys.readouterr().out.strip() == f"{address}: SERVING"
        assert await asyncio.to_thread(main, [address, "--service", "busy"]) == 1
        assert capsys.readouterr().err.strip() == f"{address} busy: NOT_SERVING"
    finally:
        await server.stop()
    serving, seen = await asyncio.to_thread(check, f"127.0.0.1:{free_ports(1)[0]}", "", 1.0)
    assert not serving and seen.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))


def test_runs_as_a_module():
    port = free_ports(1)[0]
    result = subprocess.run(
        [sys.executable, "-m", "exocommon.grpc_util.healthcheck", f"127.0.0.1:{port}", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"127.0.0.1:{port}: ")
