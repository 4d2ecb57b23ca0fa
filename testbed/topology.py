"""Where the testbed's roles run: one storage host (the ObjectCache S3 server) and N GPU-client hosts.

Three topologies, one interface (``Topology``): ``start_storage`` starts the server on the storage host,
``run_on_host(i, argv)`` runs a command (a ``python -m testbed.worker`` process) on GPU host ``i``, and
``close`` tears everything down.

* ``local``: everything on loopback (127.0.0.1) of this machine; no shaping.
* ``netns``: a storage host and N client hosts as Linux network namespaces, joined through a bridge in a
  "switch" namespace by veth pairs.  HTB caps: the storage host's uplink (``storage_Gbps``, shared by every
  client: the shared storage egress) and each switch port towards a client host (``host_Gbps``, the per-host
  link).  Root is required (a clear error otherwise).  Namespaces are named ``ocnet<pid>-<role>``; ``close``
  kills the processes inside and deletes them, ``atexit`` and SIGINT/SIGTERM handlers call ``close``, and
  ``cleanup_stale`` removes namespaces left by a process that no longer exists (after a SIGKILL), so nothing
  is left behind.
* ``cluster``: real machines.  Nothing is started here: the storage server runs on the storage node
  (``python -m testbed.server --host <addr> --port 9000 ...``) and each GPU node runs the harness with its
  ``host_index``; the experiment reads the endpoint from ``topology.storage_url``.

Addresses: the namespaces use 10.213.<k>.0/24 (storage .1, client host i .(10+i)), ``k`` derived from the pid
so two concurrent harnesses do not collide.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed import netns
from testbed.launch import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
NS_PREFIX = "ocnet"


@dataclass
class TopologyConfig:
    """Schema of ``configs/topology/*.yaml``.

    ``storage_Gbps`` caps the storage host's egress (0: uncapped); ``host_Gbps`` each client host's link
    (0: uncapped).  ``pacer_Gbps`` is the egress rate the server's pacer shares out with the policy (0: the
    pacer is off); the harness sets it per run for the shared-bandwidth experiment.  ``storage_url`` and
    ``host_index``/``hosts`` are for ``cluster``.
    """

    name: str = "local"
    hosts: int = 1
    storage_Gbps: float = 0.0
    host_Gbps: float = 0.0
    delay_ms: float = 0.0
    storage_url: str = ""
    bucket: str = "objectcache-testbed"
    access_key: str = ""
    secret_key: str = ""
    host_index: int = 0
    server_args: list[str] = field(default_factory=list)
    nice: int = 0  # niceness of the server and workers (negative: favoured over other load; root only)


class TopologyError(RuntimeError):
    pass


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise TopologyError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr.strip()}")
    return res


@dataclass
class StorageHandle:
    url: str
    proc: subprocess.Popen | None
    data_dir: Path | None
    log_path: Path | None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Topology:
    """Base: local loopback.  Subclasses change where commands run and what the server binds to."""

    name = "local"
    storage_host = "127.0.0.1"

    def __init__(self, cfg: TopologyConfig) -> None:
        self.cfg = cfg
        self.storage: StorageHandle | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="objectcache-topo-")
        self.work_dir = Path(self._tmp.name)

    @property
    def hosts(self) -> int:
        return max(1, int(self.cfg.hosts))

    def prefix(self, role: str) -> list[str]:
        """Command prefix that runs a process on ``role`` (``storage`` or ``h<i>``)."""
        return self._nice()

    def _nice(self) -> list[str]:
        return ["nice", "-n", str(int(self.cfg.nice))] if self.cfg.nice else []

    def start_storage(
        self, policy: str = "equal", pacer_Gbps: float = 0.0, extra: list[str] | None = None
    ) -> str:
        """(Re)start the ObjectCache server on the storage host; return its URL."""
        if self.storage is not None:
            self.storage.stop()
        data = self.work_dir / f"store-{time.monotonic_ns()}"
        data.mkdir(parents=True)
        ready = data / "ready.json"
        log_path = data / "server.log"
        cmd = self.prefix("storage") + [sys.executable, "-m", "testbed.server", "--host", self.storage_host]
        cmd += ["--port", "0", "--data-dir", str(data), "--ready-file", str(ready), "--no-fsync"]
        cmd += ["--policy", policy, "--log-level", "WARNING"]
        if pacer_Gbps and pacer_Gbps > 0:
            cmd += ["--egress-gbps", f"{pacer_Gbps:.6f}"]
        cmd += list(self.cfg.server_args) + list(extra or [])
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=_python_env(), cwd=REPO_ROOT
            )
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and proc.poll() is None and not ready.exists():
            time.sleep(0.02)
        self.storage = StorageHandle("", proc, data, log_path)
        if not ready.exists():
            self.storage.stop()
            raise TopologyError(f"storage server did not start:\n{self.storage.log_tail()}")
        self.storage.url = json.loads(ready.read_text())["url"]
        return self.storage.url

    def popen_on_host(self, i: int, argv: list[str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                self.prefix(f"h{i}") + argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_python_env(),
                cwd=REPO_ROOT,
            )

    def close(self) -> None:
        if self.storage is not None:
            self.storage.stop()
            self.storage = None
        self._tmp.cleanup()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"topology": self.name, "hosts": self.hosts}


class LocalTopology(Topology):
    name = "local"


# --- netns ---------------------------------------------------------------------------------------------------


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
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        return name

    def _attach(self, role: str, addr: str, gbps_out: float, gbps_in: float) -> None:
        """veth pair role<->switch; ``gbps_out`` caps the role's egress, ``gbps_in`` the switch port to it."""
        ns, sw = self.ns(role), self.ns("sw")
        a, b = f"v{role}", f"p{role}"
        _run(["ip", "link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", sw])
        _run(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", a])
        _run(["ip", "netns", "exec", ns, "ip", "link", "set", a, "up"])
        _run(["ip", "netns", "exec", sw, "ip", "link", "set", b, "master", "br0"])
        _run(["ip", "netns", "exec", sw, "ip", "link", "set", b, "up"])
        netns.shape(ns, a, gbps_out, self.cfg.delay_ms / 2)
        netns.shape(sw, b, gbps_in, self.cfg.delay_ms / 2)

    def _build(self) -> None:
        sw = self._add_ns("sw")
        _run(["ip", "netns", "exec", sw, "ip", "link", "add", "br0", "type", "bridge"])
        _run(["ip", "netns", "exec", sw, "ip", "link", "set", "br0", "up"])
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


# --- cluster -------------------------------------------------------------------------------------------------


class ClusterTopology(Topology):
    """Real machines: the server is already running at ``storage_url``; this host is ``host_index``."""

    name = "cluster"

    def __init__(self, cfg: TopologyConfig) -> None:
        if not cfg.storage_url:
            raise TopologyError(
                "topology=cluster needs topology.storage_url=http://<storage node>:<port> "
                "(start the server there: python -m testbed.server --host <addr> --port 9000 ...)"
            )
        super().__init__(cfg)
        self.storage = StorageHandle(cfg.storage_url.rstrip("/"), None, None, None)

    @property
    def hosts(self) -> int:
        return 1  # this process drives one GPU host; run one harness per GPU node

    def start_storage(
        self, policy: str = "equal", pacer_Gbps: float = 0.0, extra: list[str] | None = None
    ) -> str:
        # The server's policy and pacer are set where it was started (its --policy/--egress-gbps flags).
        return self.storage.url

    def close(self) -> None:
        self._tmp.cleanup()

    def describe(self) -> dict:
        return {"topology": self.name, "storage_url": self.cfg.storage_url, "host_index": self.cfg.host_index}


def make_topology(cfg: TopologyConfig) -> Topology:
    kinds = {"local": LocalTopology, "netns": NetnsTopology, "cluster": ClusterTopology}
    if cfg.name not in kinds:
        raise TopologyError(f"unknown topology {cfg.name!r}: local, netns or cluster")
    return kinds[cfg.name](cfg)
