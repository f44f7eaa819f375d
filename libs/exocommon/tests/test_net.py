import socket

import pytest

from exocommon.errors import InvalidArgument
from exocommon.net import free_ports, split_host_port


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_split_host_port():
    assert split_host_port("127.0.0.1:3310") == ("127.0.0.1", 3310)
    assert split_host_port("[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1", ":80", "host:0", "host:70000", "host:x"):
        with pytest.raises(InvalidArgument, match="address"):
            split_host_port(bad)
