"""The testbed's experiments: the simulator's experiments run on the real object tier, written as the same table.

``python -m testbed`` (Hydra, ``configs/testbed.yaml``) composes the simulator's config groups (model, gpu,
network, storage, workload, policy, experiment) plus ``topology`` and ``compute_mode``, builds the topology
(``testbed.harness.topology``) and runs each experiment's batches through a ``testbed.harness.runner.Harness``;
the records go to ``<results_dir>/<experiment>/requests.csv`` with a ``summary.csv`` from ``sim.metrics.summarize`` (the one metrics function of both sides).

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
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from scheduler.records import RequestRecord
from sim.draws import sub_seed
from sim.metrics import summarize, to_frame
from testbed import REPO_ROOT
from testbed.harness.requests import fresh_prompt, mixed_requests, sweep_requests, workload_requests
from testbed.harness.runner import Harness, RunSpec, build_harness, machine
from testbed.harness.topology import TopologyConfig

# --- experiments ---------------------------------------------------------------------------------------------


def policy_kwargs(h: Harness, policy: str) -> dict:
    """The configured policy's keyword arguments (``policy.kwargs``) when ``policy`` is the configured one;
    the other policies an experiment compares run with their defaults."""
    return dict(h.setup.policy.kwargs) if policy == h.setup.policy.name else {}


def exp_context_sweep(h: Harness, p: dict) -> list[RequestRecord]:
    """One request at a time: every (cached, new) pair, unpaced."""
    reqs = sweep_requests(p["prefix_tokens"], p["new_tokens"], p.get("repeats", 1), p.get("gap_s", 0.05))
    link = float(h.topology.cfg.storage_Gbps or h.setup.link_Gbps)
    pol = h.setup.policy.name
    run = RunSpec("context_sweep", pol, 0.0, link, 1, "sweep", policy_kwargs(h, pol))
    return h.records(run, reqs, h.run_batch(run, reqs))


def exp_shared_bandwidth(h: Harness, p: dict, progress=None) -> list[RequestRecord]:
    """Concurrent mixed requests per (concurrency, cap, repeat), each policy on a pacer of ``cap x
    network.efficiency`` Gbps."""
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
                    egress_Gbps = float(cap) * h.setup.network.efficiency
                    run = RunSpec(
                        "shared_bandwidth",
                        pol,
                        egress_Gbps,
                        float(cap),
                        int(n),
                        f"rep{rep}",
                        policy_kwargs(h, pol),
                    )
                    records += h.records(run, reqs, h.run_batch(run, reqs))
                    if progress:
                        progress(1)
    return records


def exp_workload(h: Harness, p: dict) -> list[RequestRecord]:
    """The configured workload, paced at ``egress_Gbps`` (0: unpaced) under the configured policy."""
    wl = h.workload
    # The workload's prompts are chains of its own blocks (512 tokens in Mooncake traces).
    h = dataclasses.replace(h, block_tokens=int(wl.block_tokens))
    reqs = workload_requests(
        h.setup.model.chunk_tokens, wl, np.random.default_rng(h.seed), p.get("num_requests")
    )
    link = float(h.topology.cfg.storage_Gbps or h.setup.link_Gbps)
    pol = h.setup.policy.name
    egress_Gbps = float(p.get("egress_Gbps", 0.0))
    run = RunSpec("workload", pol, egress_Gbps, link, len(reqs), wl.name, policy_kwargs(h, pol))
    return h.records(run, reqs, h.run_batch(run, reqs))


EXPERIMENTS = {
    "context_sweep": exp_context_sweep,
    "shared_bandwidth": exp_shared_bandwidth,
    "workload": exp_workload,
}


def write_table(records: list[RequestRecord], root: Path, name: str, meta: dict) -> pd.DataFrame:
    """``<root>/<name>/{requests.csv, summary.csv, run.json}``; returns the requests table."""
    df = to_frame(records)
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    df.to_csv(d / "requests.csv", index=False)
    ok = df[np.isfinite(df.ttft_s)]
    if len(ok):
        summarize(ok).to_csv(d / "summary.csv", index=False)
    (d / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return df


def register_testbed_configs() -> None:
    """The simulator's group schemas plus ``base_topology`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from sim.config import register_configs

    register_configs()
    ConfigStore.instance().store(group="topology", name="base_topology", node=TopologyConfig)


def compose_testbed(overrides: list[str]):
    """``configs/testbed.yaml`` composed with Hydra ``overrides`` (for entry points that are not
    ``@hydra.main``)."""
    from hydra import compose, initialize_config_dir

    register_testbed_configs()
    with initialize_config_dir(str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("testbed", overrides=overrides)


def wants_help(argv: list[str]) -> bool:
    """True when a command line of Hydra overrides asks for help instead (``-h`` / ``--help``)."""
    return any(a in ("-h", "--help") for a in argv)


def run_from_cfg(cfg) -> dict[str, pd.DataFrame]:
    """What ``python -m testbed`` does with a composed config: every run of the experiment, one table each."""
    from omegaconf import OmegaConf

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
    with build_harness(cfg) as h:
        for n in runs:
            t0 = time.perf_counter()
            recs = EXPERIMENTS[n](h, params[n])
            meta = {
                "command": " ".join(sys.argv),
                "machine": machine(),
                "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "wall_s": time.perf_counter() - t0,
                "topology": h.topology.describe(),
                "compute_mode": h.compute_mode,
                "params": params[n],
                "log": h.log,
            }
            name = f"{cfg.experiment.name}_{n}" if len(runs) > 1 else cfg.experiment.name
            out[n] = write_table(recs, root, name, meta)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for n, df in out.items():
        ok = df[np.isfinite(df.ttft_s)]
        print(f"{n}: {len(ok)}/{len(df)} requests, TTFT mean {ok.ttft_s.mean() * 1e3:.1f} ms")
    return out
