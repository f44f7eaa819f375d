"""Addresses and ports."""

from __future__ import annotations

import socket
from contextlib import ExitStack

from exocommon.errors import InvalidArgument


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that are free now (all held open together so none repeats)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
    return ports


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:port`) -> (host, port); raises InvalidArgument naming the address."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidArgument(f"address {address!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidArgument(f"address {address!r} has port {port} outside 1-65535")
    return host.strip("[]"), port
