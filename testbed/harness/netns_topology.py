"""The ``netns`` topology: a storage host and N client hosts as Linux network namespaces on this machine.

The hosts are joined through a bridge in a "switch" namespace by veth pairs.  HTB caps: the storage host's
uplink (``storage_Gbps``, shared by every client: the shared storage egress) and each switch port towards a
client host (``host_Gbps``, the per-host link).  Root is required (a clear error otherwise).  Namespaces are
named ``ocnet<pid>-<role>``; ``close`` kills the processes inside and deletes them, ``atexit`` and
SIGINT/SIGTERM handlers call ``close``, and ``cleanup_stale`` removes namespaces left by a process that no
longer exists (after a SIGKILL), so nothing is left behind.

Addresses: 10.213.<k>.0/24 (storage .1, client host i .(10+i)), ``k`` derived from the pid so two concurrent
harnesses do not collide.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal

from testbed.harness import netns
from testbed.harness.topology_base import Topology, TopologyConfig, TopologyError, run_checked

NS_PREFIX = "ocnet"


def netns_available() -> tuple[bool, str]:
    """(usable, reason): root, the ``ip`` and ``tc`` tools, and permission to create a namespace."""
    reason = netns.unavailable_reason()
    return reason is None, (f"the netns topology cannot run: {reason}" if reason else "")


def list_namespaces() -> list[str]:
    return netns.list_namespaces(NS_PREFIX)


def cleanup_stale() -> list[str]:
    """Delete ``ocnet<pid>-*`` namespaces whose creating process is gone; return their names."""
    return netns.cleanup_stale(NS_PREFIX)


class NetnsTopology(Topology):
    """Namespaces ``storage``, ``sw`` (a bridge) and ``h0..h{N-1}``; see the module docstring."""

    name = "netns"
    # The storage address lives on a bridge between this machine's namespaces, reachable from nowhere else,
    # and the workers sign with the documented default credential: the server must be told it is fine.
    storage_flags = ("--insecure-default-credentials",)

    def __init__(self, cfg: TopologyConfig) -> None:
        ok, why = netns_available()
        if not ok:
            raise TopologyError(why)
        super().__init__(cfg)
        cleanup_stale()
        self.tag = f"{NS_PREFIX}{os.getpid()}"
        k = 16 + os.getpid() % 200
        self.subnet = f"10.213.{k}"
        self.storage_host = f"{self.subnet}.1"
        self.namespaces: list[str] = []
        self._closed = False
        atexit.register(self.close)
        self._old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _on_signal(self, signum, frame) -> None:
        self.close()
        old = self._old_handlers.get(signum)
        if callable(old):
            old(signum, frame)
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def host_addr(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def _add_ns(self, role: str) -> str:
        name = self.ns(role)
        run_checked(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run_checked(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        return name

    def _attach(self, role: str, addr: str, gbps_out: float, gbps_in: float) -> None:
        """veth pair role<->switch; ``gbps_out`` caps the role's egress, ``gbps_in`` the switch port to it."""
        ns, sw = self.ns(role), self.ns("sw")
        a, b = f"v{role}", f"p{role}"
        run_checked(["ip", "link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", sw])
        run_checked(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", a])
        run_checked(["ip", "netns", "exec", ns, "ip", "link", "set", a, "up"])
        run_checked(["ip", "netns", "exec", sw, "ip", "link", "set", b, "master", "br0"])
        run_checked(["ip", "netns", "exec", sw, "ip", "link", "set", b, "up"])
        netns.shape(ns, a, gbps_out, self.cfg.delay_ms / 2)
        netns.shape(sw, b, gbps_in, self.cfg.delay_ms / 2)

    def _build(self) -> None:
        sw = self._add_ns("sw")
        run_checked(["ip", "netns", "exec", sw, "ip", "link", "add", "br0", "type", "bridge"])
        run_checked(["ip", "netns", "exec", sw, "ip", "link", "set", "br0", "up"])
        self._add_ns("storage")
        self._attach("storage", self.storage_host, self.cfg.storage_Gbps, 0.0)
        for i in range(self.hosts):
            self._add_ns(f"h{i}")
            self._attach(f"h{i}", self.host_addr(i), 0.0, self.cfg.host_Gbps)

    def prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)] + self._nice()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            super().close()
        for ns in reversed(self.namespaces):
            netns.delete_namespace(ns)
        self.namespaces = []
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def describe(self) -> dict:
        return {
            "topology": self.name,
            "hosts": self.hosts,
            "storage_Gbps": self.cfg.storage_Gbps,
            "host_Gbps": self.cfg.host_Gbps,
            "delay_ms": self.cfg.delay_ms,
            "namespaces": list(self.namespaces),
        }
