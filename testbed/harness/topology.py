"""Where the testbed's roles run: one storage host (the ObjectCache S3 server) and N GPU-client hosts.

Three topologies, one interface (``Topology``): ``start_storage`` starts (or re-paces) the server on the
storage host, ``start_worker(i, action, plan, timeout_s)`` runs a ``python -m testbed.harness.worker`` action on GPU
host ``i`` (a ``testbed.harness.jobs.WorkerJob``), ``clock``/``sync_clocks``/``clock_offset_s`` give the common
start a meaning across hosts, and ``close`` tears everything down.

* ``local``: everything on loopback (127.0.0.1) of this machine; no shaping.
* ``netns``: a storage host and N client hosts as Linux network namespaces, joined through a bridge in a
  "switch" namespace by veth pairs.  HTB caps: the storage host's uplink (``storage_Gbps``, shared by every
  client: the shared storage egress) and each switch port towards a client host (``host_Gbps``, the per-host
  link).  Root is required (a clear error otherwise).  Namespaces are named ``ocnet<pid>-<role>``; ``close``
  kills the processes inside and deletes them, ``atexit`` and SIGINT/SIGTERM handlers call ``close``, and
  ``cleanup_stale`` removes namespaces left by a process that no longer exists (after a SIGKILL), so nothing
  is left behind.
* ``cluster``: real machines, driven from this process (the *coordinator*).  The storage server runs on the
  storage node (``python -m testbed.objectstore --host <addr> --port 9000 --allow-pacer-control ...``), one agent
  per GPU node (``python -m testbed.harness.agent``, ``testbed/harness/agent.py``); the harness sets the server's pacer
  through its admin operation instead of restarting it, measures every agent's clock offset before each
  run and releases all hosts at one common start (``testbed.harness.coordinator``).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testbed import REPO_ROOT
from testbed.harness import netns
from testbed.harness.agent import DEFAULT_AGENT_TOKEN, load_token
from testbed.harness.coordinator import (
    AgentClient,
    AgentJob,
    ClockSample,
    StorageControlError,
    set_pacer,
    storage_health,
)
from testbed.harness.jobs import ProcessJob, WorkerJob
from testbed.objectstore.launch import stop_process

NS_PREFIX = "ocnet"


@dataclass
class TopologyConfig:
    """Schema of ``configs/topology/*.yaml``.

    ``storage_Gbps`` caps the storage host's egress (0: uncapped); ``host_Gbps`` each client host's link
    (0: uncapped).  The harness sets the pacer's policy and rate per run (the shared-bandwidth experiment).

    ``cluster`` only: ``storage_url`` (the server, as the GPU nodes reach it), ``workers`` (one agent URL
    per GPU node; ``hosts`` is their number), the agents' shared token (``agent_token_file``, else
    ``agent_token``, else ``OBJECTCACHE_AGENT_TOKEN``, else the documented loopback test token),
    ``agent_timeout_s`` (bound on every request to an agent), ``max_clock_offset_s`` (an agent whose clock
    is further off than this from the coordinator's stops the run: NTP/PTP is not working there),
    ``clock_samples`` (round trips per offset estimate), ``start_lead_s`` (the common start is this far
    after the release) and ``pacer_control`` (false: keep the pacer the server was started with).
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
    workers: list[str] = field(default_factory=list)
    agent_token: str = ""
    agent_token_file: str = ""
    agent_timeout_s: float = 10.0
    max_clock_offset_s: float = 0.05
    clock_samples: int = 5
    start_lead_s: float = 0.5
    pacer_control: bool = True
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
    start_lead_s = 0.2  # the common start is this far after the release (s): every host sees the go file

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
        self,
        policy: str = "equal",
        egress_Gbps: float = 0.0,
        extra: list[str] | None = None,
        policy_kwargs: dict | None = None,
    ) -> str:
        """(Re)start the ObjectCache server on the storage host with its pacer running ``policy`` (keyword
        arguments ``policy_kwargs``) on an egress of ``egress_Gbps`` (0: unpaced); return its URL."""
        if self.storage is not None:
            self.storage.stop()
        data = self.work_dir / f"store-{time.monotonic_ns()}"
        data.mkdir(parents=True)
        ready = data / "ready.json"
        log_path = data / "server.log"
        cmd = self.prefix("storage") + [
            sys.executable,
            "-m",
            "testbed.objectstore.server",
            "--host",
            self.storage_host,
        ]
        cmd += ["--port", "0", "--data-dir", str(data), "--ready-file", str(ready), "--no-fsync"]
        cmd += ["--policy", policy, "--log-level", "WARNING"]
        if policy_kwargs:
            cmd += ["--policy-kwargs", json.dumps(policy_kwargs, sort_keys=True)]
        if egress_Gbps and egress_Gbps > 0:
            cmd += ["--egress-gbps", f"{egress_Gbps:.6f}"]
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

    # --- workers ---------------------------------------------------------------------------------------------

    def worker_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "testbed.harness.worker", *args]

    def start_worker(self, host: int, action: str, plan: dict, timeout_s: float) -> WorkerJob:
        """Start ``python -m testbed.harness.worker <action>`` with ``plan`` on GPU host ``host``."""
        return ProcessJob(
            host,
            action,
            plan,
            self.work_dir,
            self.worker_argv,
            lambda argv, log: self.popen_on_host(host, argv, log),
        )

    def clock(self) -> float:
        """The coordinator's wall clock (s): common start times are given on it."""
        return time.time()

    def sync_clocks(self) -> None:
        """Measure the hosts' clock offsets before a run (one machine: nothing to measure)."""

    def clock_offset_s(self, host: int) -> float:
        """Host ``host``'s clock minus the coordinator's (s), as last measured."""
        return 0.0

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
    """Real machines: the server runs at ``storage_url``, one agent per GPU node at ``workers[i]``.

    Building it checks that the server answers and that every agent answers, accepts the token and keeps a
    clock within ``max_clock_offset_s`` of this machine's, so a misconfiguration fails before the first run.
    ``start_storage`` sets the pacer through the server's admin operation (objects stay: the server is not
    restarted); ``sync_clocks`` re-measures the offsets before every run; ``describe`` records each
    measurement and the pacer settings (they end up in the run's ``run.json``).  ``clock`` is injectable.
    """

    name = "cluster"

    def __init__(self, cfg: TopologyConfig, clock: Callable[[], float] | None = None) -> None:
        if not cfg.storage_url:
            raise TopologyError(
                "topology=cluster needs topology.storage_url=http://<storage node>:<port> (start the server "
                "there: python -m testbed.objectstore --host <addr> --port 9000 --allow-pacer-control ...)"
            )
        if not cfg.workers:
            raise TopologyError(
                "topology=cluster needs topology.workers=[http://<gpu node>:9200,...] (start an agent on each "
                "GPU node: python -m testbed.harness.agent --host <addr> --port 9200 --token-file F)"
            )
        super().__init__(cfg)
        if clock is not None:
            self.clock = clock  # type: ignore[method-assign]
        self.storage = StorageHandle(cfg.storage_url.rstrip("/"), None, None, None)
        token = _agent_token(cfg)
        self.agents = [
            AgentClient(u, token, cfg.agent_timeout_s, clock=lambda: self.clock()) for u in cfg.workers
        ]
        self.samples: list[ClockSample] = []
        self.clock_log: list[dict] = []
        self.pacer_log: list[dict] = []
        try:
            self.pacer = _settings(storage_health(self.storage.url, cfg.agent_timeout_s))
        except StorageControlError as e:
            raise TopologyError(
                f"{e}; start it on the storage node: python -m testbed.objectstore --host <addr> --port 9000 "
                "--allow-pacer-control ..."
            ) from None
        self.sync_clocks()

    @property
    def hosts(self) -> int:
        return len(self.cfg.workers)

    @property
    def start_lead_s(self) -> float:  # type: ignore[override]
        return float(self.cfg.start_lead_s)

    def start_storage(
        self,
        policy: str = "equal",
        egress_Gbps: float = 0.0,
        extra: list[str] | None = None,
        policy_kwargs: dict | None = None,
    ) -> str:
        """Set the running server's pacer (``egress_Gbps`` 0: unpaced; ``policy_kwargs`` the policy's keyword
        arguments) and return its URL."""
        from testbed.objectstore.auth import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY

        if extra:
            raise TopologyError("topology=cluster cannot pass flags to a server it did not start")
        url, timeout_s = self.storage.url, self.cfg.agent_timeout_s
        try:
            if self.cfg.pacer_control:
                ak, sk = self.cfg.access_key or DEFAULT_ACCESS_KEY, self.cfg.secret_key or DEFAULT_SECRET_KEY
                settings = set_pacer(
                    url, policy, egress_Gbps, ak, sk, policy_kwargs=policy_kwargs, timeout_s=timeout_s
                )
                self.pacer = _settings(settings)
            else:  # the operator's settings stay; record what they are
                self.pacer = _settings(storage_health(url, timeout_s))
        except StorageControlError as e:
            raise TopologyError(str(e)) from None
        self.pacer_log.append(
            {
                "requested": _settings(
                    {"policy": policy, "egress_gbps": egress_Gbps, "policy_kwargs": policy_kwargs}
                ),
                "server": self.pacer,
            }
        )
        return url

    def start_worker(self, host: int, action: str, plan: dict, timeout_s: float) -> WorkerJob:
        return AgentJob(self.agents[host], host, action, plan, timeout_s, lambda: self.clock_offset_s(host))

    def sync_clocks(self) -> None:
        """Every agent's clock offset (Cristian's algorithm); ``TopologyError`` if one exceeds the bound."""
        self.samples = [a.clock_sample(self.cfg.clock_samples) for a in self.agents]
        self.clock_log.append(
            {
                "t_s": self.clock(),
                "offsets_s": [s.offset_s for s in self.samples],
                "rtt_s": [s.rtt_s for s in self.samples],
            }
        )
        bound = float(self.cfg.max_clock_offset_s)
        for i, s in enumerate(self.samples):
            if abs(s.offset_s) > bound:
                raise TopologyError(
                    f"clock offset of agent {s.url} (host {i}) is {s.offset_s * 1e3:+.1f} ms "
                    f"(round trip {s.rtt_s * 1e3:.1f} ms), above topology.max_clock_offset_s = {bound:g} s: "
                    "synchronise the clocks (NTP/PTP, e.g. `chronyc tracking`) or raise the bound"
                )

    def clock_offset_s(self, host: int) -> float:
        return self.samples[host].offset_s if self.samples else 0.0

    def close(self) -> None:
        self._tmp.cleanup()  # the server and the agents belong to the operator: they keep running

    def describe(self) -> dict:
        return {
            "topology": self.name,
            "hosts": self.hosts,
            "storage_url": self.storage.url,
            "workers": list(self.cfg.workers),
            "pacer": self.pacer,
            "pacer_changes": self.pacer_log,
            "clock": {
                "max_clock_offset_s": self.cfg.max_clock_offset_s,
                "agents": [
                    {"url": s.url, "host": s.host, "offset_s": s.offset_s, "rtt_s": s.rtt_s}
                    for s in self.samples
                ],
                "measurements": self.clock_log,
            },
        }


def _agent_token(cfg: TopologyConfig) -> str:
    if cfg.agent_token_file:
        try:
            return load_token(cfg.agent_token_file) or ""
        except (OSError, ValueError) as e:
            raise TopologyError(f"cannot read topology.agent_token_file: {e}") from None
    return cfg.agent_token or load_token() or DEFAULT_AGENT_TOKEN


def _settings(doc: dict) -> dict:
    """The pacer settings of a health or pacer-control document (``policy_kwargs`` only when there are any)."""
    out = {k: doc.get(k) for k in ("policy", "egress_gbps")}
    if doc.get("policy_kwargs"):
        out["policy_kwargs"] = dict(doc["policy_kwargs"])
    return out


def make_topology(cfg: TopologyConfig) -> Topology:
    kinds = {"local": LocalTopology, "netns": NetnsTopology, "cluster": ClusterTopology}
    if cfg.name not in kinds:
        raise TopologyError(f"unknown topology {cfg.name!r}: local, netns or cluster")
    return kinds[cfg.name](cfg)
