"""The testbed harness: run the simulator's experiments on the real object tier and write the same table.

``python -m testbed`` (Hydra, ``configs/testbed.yaml``) composes the simulator's config groups (model, gpu,
network, storage, workload, policy, experiment) plus ``topology`` and ``compute_mode``, builds the topology
(``testbed.harness.topology``), and for each run of the experiment:

1. writes a *plan* per GPU host (``testbed.harness.worker``): the requests, their prompts (block ids), cached and new
   tokens, and the emulated per-layer compute time from the configured compute model (the same
   ``scheduler.compute`` model the simulator uses);
2. warm-up: one worker PUTs every chunk the requests will read (idempotent), populating the object tier;
3. starts one worker per host (``Topology.start_worker``: a process here, or an agent's on a cluster node),
   waits until all are ready, then releases them at a common wall-clock start (on a cluster converted to
   each node's clock with the offset measured just before);
4. collects the rows and turns them into ``scheduler.records.RequestRecord`` rows (``source="testbed"``,
   ``compute_mode`` recorded), written to ``<results_dir>/<experiment>/requests.csv`` with a
   ``summary.csv`` from ``sim.metrics.summarize`` (the one metrics function of both sides).

Experiments (``configs/experiment/testbed_*.yaml``, key ``runs``):

* ``context_sweep``: one request at a time (a closed loop of one client), every cached x new pair.
* ``shared_bandwidth``: N concurrent requests with mixed contexts arriving within ``arrival_window_s``; for
  each policy the storage server's pacer enforces the policy on an egress of ``cap x network.efficiency``
  (``cap`` from ``caps_Gbps``): restarted with it (local, netns) or set through its admin operation
  (cluster).
* ``workload``: the simulator's workload generators (``sim.workloads.make_workload``: synthetic sessions or a
  Mooncake trace), open loop (Poisson) or closed loop; a request's cached prefix is its longest run of
  blocks seen in earlier requests (the warm-up stores them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from scheduler.records import RequestRecord
from sim.config import WorkloadConfig
from sim.runner import Setup, dram_layerwise_ttft_s, setup_compute
from testbed import REPO_ROOT
from testbed.harness.jobs import WorkerFailed, WorkerJob
from testbed.harness.topology import Topology, TopologyConfig

BLOCK_TOKENS = 256  # prompt blocks of the sweep experiments (one chunk each)


@dataclass
class Req:
    """One request of a run: the prompt (block ids of ``block_tokens`` tokens) and how much of it is cached."""

    request_id: str
    arrival_s: float
    cached_tokens: int
    new_tokens: int
    block_ids: list[int]
    client: int | None = None
    think_s: float = 0.0


@dataclass
class RunSpec:
    """What one batch of concurrent requests runs under."""

    experiment: str
    policy: str = "equal"
    pacer_Gbps: float = 0.0
    link_Gbps: float = 0.0
    concurrency: int = 1
    note: str = ""


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
    def storage_url(self, policy: str, pacer_Gbps: float) -> str:
        """Start (or keep) the server with this pacer setting; objects persist only within one server."""
        key = (policy, round(pacer_Gbps, 6))
        if self._storage_key != key or self.topology.storage is None:
            self.topology.start_storage(policy=policy, pacer_Gbps=pacer_Gbps)
            self._storage_key = key
        return self.topology.storage.url

    def credentials(self) -> tuple[str, str]:
        from testbed.objectstore.auth import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY

        return self.access_key or DEFAULT_ACCESS_KEY, self.secret_key or DEFAULT_SECRET_KEY

    # --- plans ------------------------------------------------------------------------------------------------
    def plan(self, url: str, reqs: list[Req]) -> dict:
        spec = self.setup.spec
        comp = setup_compute(self.setup)
        over = getattr(comp, "overhead_time_s", lambda *_: 0.0)
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
                    "layer_time_s": comp.layer_time_s(r.cached_tokens, r.new_tokens),
                    "overhead_s": over(r.cached_tokens, r.new_tokens),
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
        url = self.storage_url(run.policy, run.pacer_Gbps)
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


# --- request builders --------------------------------------------------------------------------------------


_prompt_ids = iter(range(1, 1 << 62, 1 << 20))


def fresh_prompt(tokens: int, block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """Block ids of a prompt no other request shares (its own block-id range)."""
    base = next(_prompt_ids)
    return list(range(base, base + -(-tokens // block_tokens)))


def sweep_requests(prefix_tokens, new_tokens, repeats: int = 1, gap_s: float = 0.05) -> list[Req]:
    """One closed-loop client: every (cached, new) pair in turn, ``gap_s`` apart (no overlap)."""
    reqs = []
    for rep in range(int(repeats)):
        for c in prefix_tokens:
            for n in new_tokens:
                blocks = fresh_prompt(int(c) + int(n))
                reqs.append(
                    Req(f"sweep-{c}+{n}-r{rep}", 0.0, int(c), int(n), blocks, client=0, think_s=gap_s)
                )
    return reqs


def mixed_requests(rng: np.random.Generator, n: int, p: dict, tag: str) -> list[Req]:
    """The simulator's shared-bandwidth draw (``sim.experiments.draw_mixed``) as testbed requests."""
    from sim.experiments import draw_mixed

    out = []
    for i, (a, c, w) in enumerate(draw_mixed(rng, n, p)):
        out.append(Req(f"{tag}-{i}", float(a), int(c), int(w), fresh_prompt(int(c) + int(w))))
    return out


def workload_requests(
    h: Harness, wl: WorkloadConfig, rng: np.random.Generator, limit: int | None = None
) -> list[Req]:
    """The simulator's workload (synthetic or trace) with object-tier hits from earlier requests' blocks."""
    from sim.workloads import make_workload

    trace = make_workload(wl, rng)
    if limit:
        trace = trace[: int(limit)]
    ct = h.setup.model.chunk_tokens
    bt = int(wl.block_tokens)
    seen: set[tuple[int, ...]] = set()
    out = []
    for r in trace:
        hit = 0
        for i in range(len(r.hash_ids)):
            if tuple(r.hash_ids[: i + 1]) in seen:
                hit = i + 1
            else:
                break
        for i in range(len(r.hash_ids)):
            seen.add(tuple(r.hash_ids[: i + 1]))
        total = min(int(r.input_length), len(r.hash_ids) * bt)
        cached = min(hit * bt, total - 1) // ct * ct
        out.append(
            Req(
                r.request_id,
                float(r.arrival_s),
                cached,
                total - cached,
                list(r.hash_ids),
                r.client,
                r.think_s,
            )
        )
    return out


# --- experiments ---------------------------------------------------------------------------------------------


def exp_context_sweep(h: Harness, p: dict) -> list[RequestRecord]:
    reqs = sweep_requests(p["prefix_tokens"], p["new_tokens"], p.get("repeats", 1), p.get("gap_s", 0.05))
    link = float(h.topology.cfg.storage_Gbps or h.setup.link_Gbps)
    run = RunSpec("context_sweep", h.setup.policy.name, 0.0, link, 1, "sweep")
    return h.records(run, reqs, h.run_batch(run, reqs))


def exp_shared_bandwidth(h: Harness, p: dict, progress=None) -> list[RequestRecord]:
    from sim.experiments import sub_seed

    records: list[RequestRecord] = []
    for n in p["concurrency"]:
        for cap in p["caps_Gbps"]:
            for rep in range(int(p.get("repeats", 1))):
                rng = np.random.default_rng(sub_seed(h.seed, "shared_bandwidth", n, rep))
                base = mixed_requests(rng, int(n), p, f"n{n}-c{cap}-r{rep}")
                for pol in p["policies"]:
                    # Fresh prompts per policy so no run reads another's objects from a warm page cache.
                    reqs = [
                        dataclasses.replace(r, block_ids=fresh_prompt(r.cached_tokens + r.new_tokens))
                        for r in base
                    ]
                    pacer = float(cap) * h.setup.network.efficiency
                    run = RunSpec("shared_bandwidth", pol, pacer, float(cap), int(n), f"rep{rep}")
                    records += h.records(run, reqs, h.run_batch(run, reqs))
                    if progress:
                        progress(1)
    return records


def exp_workload(h: Harness, p: dict) -> list[RequestRecord]:
    wl = h.workload
    # The workload's prompts are chains of its own blocks (512 tokens in Mooncake traces).
    h = dataclasses.replace(h, block_tokens=int(wl.block_tokens))
    reqs = workload_requests(h, wl, np.random.default_rng(h.seed), p.get("num_requests"))
    link = float(h.topology.cfg.storage_Gbps or h.setup.link_Gbps)
    run = RunSpec("workload", h.setup.policy.name, float(p.get("pacer_Gbps", 0.0)), link, len(reqs), wl.name)
    return h.records(run, reqs, h.run_batch(run, reqs))


EXPERIMENTS = {
    "context_sweep": exp_context_sweep,
    "shared_bandwidth": exp_shared_bandwidth,
    "workload": exp_workload,
}


def write_table(records: list[RequestRecord], root: Path, name: str, meta: dict) -> pd.DataFrame:
    from sim.metrics import summarize, to_frame

    df = to_frame(records)
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    df.to_csv(d / "requests.csv", index=False)
    ok = df[np.isfinite(df.ttft_s)]
    if len(ok):
        summarize(ok).to_csv(d / "summary.csv", index=False)
    (d / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return df


def machine() -> str:
    import os

    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"


def register_testbed_configs() -> None:
    """The simulator's group schemas plus ``base_topology`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from sim.config import register_configs

    register_configs()
    ConfigStore.instance().store(group="topology", name="base_topology", node=TopologyConfig)


def run_from_cfg(cfg) -> dict[str, pd.DataFrame]:
    """What ``python -m testbed`` does with a composed config."""
    from omegaconf import OmegaConf

    from sim.app import cfg_hash, setup_from_cfg
    from testbed.harness.topology import make_topology

    setup, workload = setup_from_cfg(cfg)
    setup = resolve_profile(setup)
    topo_cfg = TopologyConfig(**OmegaConf.to_container(cfg.topology, resolve=True))
    runs = list(cfg.experiment.runs)
    params = {n: OmegaConf.to_container(cfg.experiment.params[n], resolve=True) for n in runs}
    for n in runs:
        if n not in EXPERIMENTS:
            raise KeyError(f"unknown testbed experiment {n!r}; known: {sorted(EXPERIMENTS)}")
    root = Path(cfg.get("results_dir", "results/testbed"))
    out: dict[str, pd.DataFrame] = {}
    bar = None
    if cfg.get("progress", True):
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc="testbed", unit="experiment", file=sys.stderr)
    with make_topology(topo_cfg) as topo:
        h = Harness(
            setup, topo, str(cfg.get("compute_mode", "emulated")), int(cfg.seed), cfg_hash(cfg), workload,
            bucket=topo_cfg.bucket, access_key=topo_cfg.access_key, secret_key=topo_cfg.secret_key,
        )  # fmt: skip
        for n in runs:
            t0 = time.perf_counter()
            recs = EXPERIMENTS[n](h, params[n])
            meta = {
                "command": " ".join(sys.argv),
                "machine": machine(),
                "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "wall_s": time.perf_counter() - t0,
                "topology": topo.describe(),
                "compute_mode": h.compute_mode,
                "params": params[n],
                "log": h.log,
            }
            out[n] = write_table(
                recs, root, f"{cfg.experiment.name}_{n}" if len(runs) > 1 else cfg.experiment.name, meta
            )
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for n, df in out.items():
        ok = df[np.isfinite(df.ttft_s)]
        print(f"{n}: {len(ok)}/{len(df)} requests, TTFT mean {ok.ttft_s.mean() * 1e3:.1f} ms")
    return out


def resolve_profile(setup: Setup) -> Setup:
    """A relative ``gpu.profile`` is relative to the repository root (works from any directory)."""
    prof = setup.gpu.profile
    if prof and not Path(prof).is_absolute():
        setup = dataclasses.replace(setup, gpu=dataclasses.replace(setup.gpu, profile=str(REPO_ROOT / prof)))
    return setup
