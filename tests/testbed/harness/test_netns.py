"""Shaped links between network namespaces: created, capped, torn down, stale ones cleaned up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from testbed.harness import netns
from testbed.harness.netns import (
    NetnsUnavailable,
    ShapedLink,
    cleanup_stale,
    list_namespaces,
    unavailable_reason,
)

pytestmark = pytest.mark.netns
_REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"shaped links unavailable: {_REASON}")

_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 5001))
print("listening", flush=True)
c, _ = s.accept()
buf = bytearray(1 << 20)
while c.recv_into(buf):
    pass
"""
_SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5001))
total, block = int(sys.argv[2]), bytes(1 << 16)
t0 = time.perf_counter()
sent = 0
while sent < total:
    c.sendall(block)
    sent += len(block)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(sent * 8 / 1e9 / (time.perf_counter() - t0))
"""


@needs_netns
def test_link_is_capped_and_torn_down():
    cap_Gbps = 0.2
    with ShapedLink(cap_Gbps) as link:
        names = set(link.ns.values())
        assert names <= set(list_namespaces())
        srv = link.popen(
            "a", [sys.executable, "-c", _SERVER, link.addr["a"]], stdout=subprocess.PIPE, text=True
        )
        assert srv.stdout.readline().strip() == "listening"
        res = link.run(
            "b",
            [sys.executable, "-c", _SENDER, link.addr["a"], str(8 << 20)],
            capture_output=True,
            text=True,
            timeout_s=60,
        )
        assert res.returncode == 0, res.stderr
        gbps = float(res.stdout.strip())
        # An unshaped veth moves several Gbps here; through the HTB class it cannot beat the cap.
        assert gbps <= cap_Gbps * 1.1, gbps
        assert "rate 200Mbit" in link.tc_stats("a")
        # The namespaces are isolated from the host: the host has no route to the link's addresses.
        host = subprocess.run(["ip", "route", "get", link.addr["a"]], capture_output=True, text=True)
        assert "veth" not in host.stdout
    assert not names & set(list_namespaces())
    assert srv.poll() is not None  # killed with its namespace


@needs_netns
def test_cleanup_stale_removes_only_dead_owners():
    dead = f"{netns.NS_PREFIX}4194399-0-a"  # above pid_max: no such process can exist
    subprocess.run(["ip", "netns", "add", dead], check=True)
    with ShapedLink(1.0) as link:  # creating a link also cleans up stale ones
        assert dead not in list_namespaces()
        assert cleanup_stale() == []  # our own, live namespaces are kept
        assert set(link.ns.values()) <= set(list_namespaces())


def test_clear_error_without_root(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "root" in unavailable_reason()
    with pytest.raises(NetnsUnavailable, match="root"):
        ShapedLink(1.0)
    with pytest.raises(ValueError):
        ShapedLink(0.0)
