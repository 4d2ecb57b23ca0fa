"""Shaped links between Linux network namespaces: two "hosts" joined by a veth pair with an HTB rate cap.

``ShapedLink(rate_Gbps)`` creates two namespaces, ``<prefix><pid>-<n>-a`` (the storage side, address
``10.214.<k>.1``) and ``...-b`` (the client side, ``10.214.<k>.2``), joined by a veth pair.  Each veth end
gets an HTB root qdisc with one class of ``rate = ceil = rate_Gbps`` (optionally a netem delay under it), so
traffic in either direction is capped like a NIC of that speed.  ``popen(side, argv)`` runs a process in a
namespace.  ``close()`` kills the processes it started, then deletes both namespaces (which removes the veth
pair and the qdiscs with them); it runs on ``with`` exit, at interpreter exit, and ``cleanup_stale()``
removes the namespaces of processes that died without closing (SIGKILL).  Only namespaces with this module's
prefix and a dead owner pid are ever touched.

Root (CAP_NET_ADMIN) and iproute2 (``ip``, ``tc``) are required; ``unavailable_reason()`` says what is
missing, and constructing a link raises ``NetnsUnavailable`` with that reason.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence

NS_PREFIX = "ocshaped"
_counter = itertools.count()
_live: set[ShapedLink] = set()
_live_lock = threading.Lock()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, no netns support)."""


def run_cmd(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run an ``ip``/``tc`` command (bounded to 30 s); with ``check``, a failure raises with its stderr."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed (exit {res.returncode}): {res.stderr.strip()}")
    return res


def unavailable_reason() -> str | None:
    """Why shaped links cannot be created here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command is missing: apt-get install -y iproute2"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    res = run_cmd(["ip", "netns", "add", probe], check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    run_cmd(["ip", "netns", "del", probe], check=False)
    return None


def list_namespaces(prefix: str = NS_PREFIX) -> list[str]:
    res = run_cmd(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def delete_namespace(ns: str) -> None:
    for pid in run_cmd(["ip", "netns", "pids", ns], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    run_cmd(["ip", "netns", "del", ns], check=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = NS_PREFIX) -> list[str]:
    """Delete namespaces of this module whose creating process no longer exists; returns their names."""
    removed = []
    for ns in list_namespaces(prefix):
        m = re.match(rf"^{re.escape(prefix)}(\d+)-", ns)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            delete_namespace(ns)
            removed.append(ns)
    return removed


def shape(ns: str, dev: str, rate_Gbps: float, delay_ms: float = 0.0) -> None:
    """Cap ``dev``'s egress in namespace ``ns`` at ``rate_Gbps`` with one HTB class, plus a netem delay if
    asked.  ``rate_Gbps <= 0`` means uncapped (only the delay, if any, is applied)."""
    if rate_Gbps <= 0 and delay_ms <= 0:
        return
    ex = ["ip", "netns", "exec", ns, "tc"]
    rate_bit = int(rate_Gbps * 1e9) if rate_Gbps > 0 else int(100e9)
    # A burst of ~1 ms at line rate: small enough to keep the cap tight, large enough that the HTB timer
    # granularity does not cost throughput at multi-Gbps rates.
    burst = max(64 * 1024, int(rate_bit / 8 * 1e-3))
    run_cmd([*ex, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
    run_cmd([*ex, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", f"{rate_bit}bit",
             "ceil", f"{rate_bit}bit", "burst", str(burst), "cburst", str(burst), "quantum", "60000"])  # fmt: skip
    if delay_ms > 0:
        run_cmd([*ex, "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "netem", "delay",
                 f"{delay_ms}ms", "limit", "100000"])  # fmt: skip


class ShapedLink:
    """Two namespaces joined by a capped veth pair (see the module docstring)."""

    def __init__(self, rate_Gbps: float, delay_ms: float = 0.0, prefix: str = NS_PREFIX) -> None:
        if not rate_Gbps > 0:
            raise ValueError("rate_Gbps must be > 0")
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        cleanup_stale(prefix)
        n = next(_counter)
        self.rate_Gbps = rate_Gbps
        self.delay_ms = delay_ms
        base = f"{prefix}{os.getpid()}-{n}"
        self.ns = {"a": f"{base}-a", "b": f"{base}-b"}
        subnet = (os.getpid() * 7 + n) % 250 + 1
        self.addr = {"a": f"10.214.{subnet}.1", "b": f"10.214.{subnet}.2"}
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        with _live_lock:
            _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in self.ns.values():
            run_cmd(["ip", "netns", "add", ns])
            run_cmd(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        dev = {"a": "veth-a", "b": "veth-b"}
        run_cmd(["ip", "link", "add", dev["a"], "netns", self.ns["a"], "type", "veth", "peer", "name", dev["b"],
              "netns", self.ns["b"]])  # fmt: skip
        for side in ("a", "b"):
            ex = ["ip", "netns", "exec", self.ns[side], "ip"]
            run_cmd([*ex, "addr", "add", f"{self.addr[side]}/24", "dev", dev[side]])
            run_cmd([*ex, "link", "set", dev[side], "up"])
            shape(self.ns[side], dev[side], self.rate_Gbps, self.delay_ms)

    def prefix(self, side: str) -> list[str]:
        """argv prefix that runs a command inside namespace ``side`` ('a' storage, 'b' client)."""
        return ["ip", "netns", "exec", self.ns[side]]

    def popen(self, side: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``side``; it is killed on ``close``."""
        proc = subprocess.Popen([*self.prefix(side), *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, side: str, argv: Sequence[str], timeout_s: float = 600, **kwargs
    ) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(side), *argv], timeout=timeout_s, **kwargs)

    def tc_stats(self, side: str) -> str:
        dev = "veth-a" if side == "a" else "veth-b"
        return run_cmd(["ip", "netns", "exec", self.ns[side], "tc", "-s", "class", "show", "dev", dev]).stdout

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for ns in self.ns.values():
            delete_namespace(ns)
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> ShapedLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    with _live_lock:
        links = list(_live)
    for link in links:
        link.close()
