"""The topology interface and the ``local`` topology (everything on this machine's loopback).

A ``Topology`` runs the testbed's roles: ``start_storage`` starts (or re-paces) the ObjectCache server on the
storage host, ``start_worker(i, action, plan, timeout_s)`` runs a ``python -m testbed.harness.worker`` action
on GPU host ``i`` (a ``testbed.harness.jobs.WorkerJob``), ``clock``/``sync_clocks``/``clock_offset_s`` give
the common start a meaning across hosts, and ``close`` tears everything down.  ``TopologyConfig`` is the
schema of ``configs/topology/*.yaml``.  The other topologies: ``testbed.harness.netns_topology`` and
``testbed.harness.cluster_topology``; ``testbed.harness.topology.make_topology`` picks one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed import REPO_ROOT
from testbed.harness.jobs import ProcessJob, WorkerJob
from testbed.objectstore.launch import stop_process


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


def run_checked(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
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


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Topology:
    """Base: local loopback.  Subclasses change where commands run and what the server binds to."""

    name = "local"
    storage_host = "127.0.0.1"
    storage_flags: tuple[str, ...] = ()  # server flags the topology needs (beyond ``cfg.server_args``)
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
        cmd += list(self.storage_flags) + list(self.cfg.server_args) + list(extra or [])
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=python_env(), cwd=REPO_ROOT
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
                env=python_env(),
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
