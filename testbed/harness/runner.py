"""The testbed harness: run a batch of requests on the real object tier and turn the rows into records.

A ``Harness`` holds everything a testbed run needs besides the requests: the simulator's ``Setup`` (model,
GPU compute model, network, storage, policy), the ``Topology``, the compute mode, seed and config hash.  For
one batch (``run_batch``, under a ``RunSpec``) it:

1. writes a *plan* per GPU host (``testbed.harness.plan``): the requests, their prompts (block ids), cached
   and new tokens, and the emulated compute per layer from the configured compute model (the same
   ``scheduler.compute`` model the simulator uses);
2. warm-up: one worker PUTs every chunk the requests will read (idempotent), populating the object tier;
3. starts one worker per host (``Topology.start_worker``: a process here, or an agent's on a cluster node),
   waits until all are ready, then releases them at a common wall-clock start (on a cluster converted to
   each node's clock with the offset measured just before);
4. collects the rows; ``records`` turns them into ``scheduler.records.RequestRecord`` rows
   (``source="testbed"``, ``compute_mode`` recorded).

The experiments built on it (``python -m testbed``) are in ``testbed.harness.experiments``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.records import RequestRecord
from sim.config import WorkloadConfig
from sim.setup import Setup, cfg_hash, dram_layerwise_ttft_s, overhead_time_s, setup_compute, setup_from_cfg
from testbed import REPO_ROOT
from testbed.harness.jobs import WorkerFailed, WorkerJob
from testbed.harness.requests import BLOCK_TOKENS, Req
from testbed.harness.topology import Topology, TopologyConfig, make_topology


@dataclass
class RunSpec:
    """What one batch of concurrent requests runs under: the server's pacer policy (with its keyword
    arguments) on an egress of ``egress_Gbps`` (0: unpaced), recorded with the link rate and concurrency."""

    experiment: str
    policy: str = "equal"
    egress_Gbps: float = 0.0
    link_Gbps: float = 0.0
    concurrency: int = 1
    note: str = ""
    policy_kwargs: dict = field(default_factory=dict)


@dataclass
class Harness:
    """Everything a testbed run needs besides the requests; built from a Hydra config or by hand (tests)."""

    setup: Setup
    topology: Topology
    compute_mode: str = "emulated"
    seed: int = 0
    config_hash: str = ""
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    block_tokens: int = BLOCK_TOKENS
    bucket: str = "objectcache-testbed"
    access_key: str = ""
    secret_key: str = ""
    timeout_s: float = 600.0
    log: list[str] = field(default_factory=list)
    _storage_key: tuple | None = None

    # --- storage ------------------------------------------------------------------------------------------
    def storage_url(self, policy: str, egress_Gbps: float, policy_kwargs: dict | None = None) -> str:
        """Start (or keep) the server with this pacer setting; objects persist only within one server."""
        kwargs = dict(policy_kwargs or {})
        key = (policy, round(egress_Gbps, 6), json.dumps(kwargs, sort_keys=True))
        if self._storage_key != key or self.topology.storage is None:
            self.topology.start_storage(policy=policy, egress_Gbps=egress_Gbps, policy_kwargs=kwargs)
            self._storage_key = key
        return self.topology.storage.url

    def credentials(self) -> tuple[str, str]:
        from testbed.objectstore.auth import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY

        return self.access_key or DEFAULT_ACCESS_KEY, self.secret_key or DEFAULT_SECRET_KEY

    # --- plans ------------------------------------------------------------------------------------------------
    def plan(self, url: str, reqs: list[Req]) -> dict:
        """The worker plan (``testbed.harness.plan``) of ``reqs`` against the server at ``url``."""
        spec = self.setup.spec
        comp = setup_compute(self.setup)
        ak, sk = self.credentials()
        return {
            "endpoint": url,
            "bucket": self.bucket,
            "access_key": ak,
            "secret_key": sk,
            "model": dataclasses.asdict(spec),
            "chunk_tokens": self.setup.model.chunk_tokens,
            "block_tokens": self.block_tokens,
            "compute_mode": self.compute_mode,
            "client_mode": "gather",
            "run_timeout_s": self.timeout_s,
            "requests": [
                {
                    **dataclasses.asdict(r),
                    "compute_per_layer_s": comp.layer_time_s(r.cached_tokens, r.new_tokens),
                    "overhead_s": overhead_time_s(comp, r.cached_tokens, r.new_tokens),
                }
                for r in reqs
            ],
        }

    def run_worker_action(
        self, action: str, plan: dict, host: int = 0, timeout_s: float = 600.0
    ) -> dict | None:
        """Run ``python -m testbed.harness.worker <action>`` (``warmup`` or ``probe``) on one host; return its JSON."""
        job = self.topology.start_worker(host, action, plan, timeout_s)
        try:
            res = job.wait(timeout_s)
        finally:
            job.cancel()
        if res.rc != 0:
            raise WorkerFailed(f"worker {action} on host {host} failed ({res.rc}):\n{res.log_tail}")
        return res.result

    def run_batch(self, run: RunSpec, reqs: list[Req]) -> list[dict]:
        """Warm up, then run ``reqs`` spread over the topology's hosts (open-loop requests round-robin, a
        closed-loop client's chain on one host); rows in request order."""
        url = self.storage_url(run.policy, run.egress_Gbps, run.policy_kwargs)
        self.run_worker_action("warmup", self.plan(url, reqs))
        hosts = self.topology.hosts
        shares = {}
        for h in range(hosts):
            mine = [r for i, r in enumerate(reqs) if (i if r.client is None else r.client) % hosts == h]
            if mine:
                shares[h] = mine
        self.topology.sync_clocks()  # a cluster's clock offsets, measured for this run (and recorded)
        jobs: list[WorkerJob] = []
        try:
            ready_s = 120.0  # building the client (and, for cpu/gpu, the model) before the barrier
            for h, mine in shares.items():
                plan = self.plan(url, mine)
                jobs.append(self.topology.start_worker(h, "run", plan, ready_s + self.timeout_s + 60))
            deadline = time.monotonic() + ready_s
            while not all([j.ready() for j in jobs]):  # every job polled: a dead one fails at once
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not get ready within 120 s")
                time.sleep(0.02)
            start_s = self.topology.clock() + self.topology.start_lead_s
            late = [(j.host, j.go(start_s)) for j in jobs]
            late = [(h, s) for h, s in late if s > 0]
            if late:
                self.log.append(f"{run.experiment}: hosts released after the common start: {late}")
            results = [(j.host, j.wait(self.timeout_s + 60)) for j in jobs]
        finally:
            for j in jobs:
                j.cancel()  # a no-op for finished jobs; on an error, no worker is left behind
        rows: list[dict] = []
        for h, res in results:
            if res.result is None:
                raise WorkerFailed(f"worker on host {h} wrote no rows:\n{res.log_tail}")
            offset_s = self.topology.clock_offset_s(h)
            for row in res.result["rows"]:
                row["host"] = h
                row["start_s"] = start_s  # the common start, on the coordinator's clock
                row["clock_offset_s"] = offset_s
                if "arrival_wall_s" in row:  # when it arrived, on the coordinator's clock
                    row["arrival_abs_s"] = row["arrival_wall_s"] - offset_s
                rows.append(row)
        order = {r.request_id: i for i, r in enumerate(reqs)}
        rows.sort(key=lambda r: order[r["request_id"]])
        errors = [r for r in rows if r.get("error")]
        if errors:
            self.log.append(f"{run.experiment}: {len(errors)} failed requests, first: {errors[0]['error']}")
        return rows

    # --- records -------------------------------------------------------------------------------------------
    def records(self, run: RunSpec, reqs: list[Req], rows: list[dict]) -> list[RequestRecord]:
        """One ``RequestRecord`` per request of ``reqs`` from the worker rows of ``run_batch``."""
        by_id = {r["request_id"]: r for r in rows}
        out = []
        for q in reqs:
            row = by_id[q.request_id]
            out.append(
                RequestRecord(
                    experiment=run.experiment,
                    source="testbed",
                    config_hash=self.config_hash,
                    seed=self.seed,
                    request_id=q.request_id,
                    model=self.setup.model.name,
                    context_tokens=q.cached_tokens + q.new_tokens,
                    cached_tokens=q.cached_tokens,
                    new_tokens=q.new_tokens,
                    path=str(row.get("path") or "gather"),
                    policy=run.policy,
                    link_Gbps=run.link_Gbps,
                    concurrency=run.concurrency,
                    arrival_s=float(row.get("arrival_s", q.arrival_s)),
                    ttft_s=float(row.get("ttft_s", math.nan)),
                    first_layer_wait_s=float(row.get("first_layer_wait_s", math.nan)),
                    stall_s=float(row.get("stall_s", math.nan)),
                    bytes_fetched=int(row.get("bytes_fetched", 0) or 0),
                    compute_s=float(row.get("compute_s", math.nan)),
                    compute_mode=self.compute_mode,
                    tier="object" if q.cached_tokens else "none",
                    baseline_ttft_s=dram_layerwise_ttft_s(self.setup, q.cached_tokens, q.new_tokens),
                    note=";".join(x for x in (run.note, self.topology.name, row.get("error", "")) if x),
                )
            )
        return out


@contextlib.contextmanager
def build_harness(cfg) -> Iterator[Harness]:
    """A ``Harness`` on the topology of a composed testbed config (torn down on exit)."""
    from omegaconf import OmegaConf

    setup, workload = setup_from_cfg(cfg)
    setup = resolve_profile(setup)
    topo_cfg = TopologyConfig(**OmegaConf.to_container(cfg.topology, resolve=True))
    with make_topology(topo_cfg) as topo:
        yield Harness(
            setup, topo, str(cfg.get("compute_mode", "emulated")), int(cfg.seed), cfg_hash(cfg), workload,
            bucket=topo_cfg.bucket, access_key=topo_cfg.access_key, secret_key=topo_cfg.secret_key,
        )  # fmt: skip


def resolve_profile(setup: Setup) -> Setup:
    """A relative ``gpu.profile`` is relative to the repository root (works from any directory)."""
    prof = setup.gpu.profile
    if prof and not Path(prof).is_absolute():
        setup = dataclasses.replace(setup, gpu=dataclasses.replace(setup.gpu, profile=str(REPO_ROOT / prof)))
    return setup


def machine() -> str:
    """This machine in one line (host, architecture, CPUs, Python), for results files."""
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"
