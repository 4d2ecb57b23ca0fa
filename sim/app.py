"""What ``python -m sim`` does with a composed config: run the experiments, write tables, figures, headline.

Outputs:

* ``<results_dir>/<experiment>/requests.csv`` (default ``results/sim``): one ``RequestRecord`` row per
  simulated request (plus ``added_ttft_s``).
* ``<results_dir>/<experiment>/summary.csv``: the experiment's summary (ratios included where it has them).
* ``<figures_dir>/<experiment>_*.png`` (default ``<results_dir>/figures``): the experiment's figures.
* ``<results_dir>/headline.json``: when the experiment config sets ``headline: true`` (the default run
  does), the headline numbers recomputed from this run's results, with the targets and by how much each is
  met or missed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from sim.experiments import REGISTRY, Context, ExperimentResult, job_count
from sim.setup import Setup, cfg_hash, setup_from_cfg


def testbed_only(cfg) -> str | None:
    """Why ``python -m sim`` cannot run this config (a testbed experiment), or None.  The experiment group
    is shared with ``python -m testbed``, whose ``testbed_*`` experiments run on the real system."""
    name = str(cfg.experiment.get("name", ""))
    if name.startswith("testbed_"):
        return (
            f"experiment={name} is a testbed experiment (the real object tier, not the simulator): run it with "
            f"`python -m testbed experiment={name}`; `python -m sim` runs: {', '.join(sorted(_registry()))} "
            "(or the experiment configs headline, smoke)"
        )
    return None


def _registry():
    import sim.regimes  # noqa: F401  registers the load_sweep experiment
    import sim.trace  # noqa: F401  registers the trace experiment

    return REGISTRY


def run_experiments(cfg, out_root: Path | None = None) -> dict[str, ExperimentResult]:
    """Run every experiment in ``cfg.experiment.runs``; write tables and figures; return the results."""
    from omegaconf import OmegaConf

    registry = _registry()
    setup, workload = setup_from_cfg(cfg)
    seed = int(cfg.seed)
    chash = cfg_hash(cfg)
    root = Path(out_root if out_root is not None else cfg.get("results_dir", "results/sim"))
    fig_dir = Path(cfg.get("figures_dir") or root / "figures")
    runs = list(cfg.experiment.runs)
    params = {name: OmegaConf.to_container(cfg.experiment.params[name], resolve=True) for name in runs}
    for name in runs:
        if name not in registry:
            raise KeyError(f"unknown experiment {name!r}; known: {sorted(registry)}")
    total = sum(job_count(n, params[n]) for n in runs)
    bar = None
    if cfg.get("progress", True):
        from tqdm import tqdm

        bar = tqdm(total=total, desc="sim", unit="run", file=sys.stderr, dynamic_ncols=True)
    results: dict[str, ExperimentResult] = {}
    ctx = Context(setup=setup, workload=workload, seed=seed, config_hash=chash)
    if bar is not None:
        ctx.progress = bar.update
    t0 = time.perf_counter()
    for name in runs:
        if bar is not None:
            bar.set_description(f"sim {name}")
        res = registry[name](ctx, params[name])
        results[name] = res
        write_result(res, root, chash, seed)
        if cfg.get("figures", True):
            from sim.figures import plot

            plot(name, res.requests, res.summary, fig_dir)
    wall_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    n_requests = sum(len(r.requests) for r in results.values())
    meta = {
        "command": _command(),
        "config_hash": chash,
        "seed": seed,
        "wall_s": wall_s,
        "simulated_requests": n_requests,
        "sim_requests_per_s": n_requests / wall_s if wall_s > 0 else math.nan,
        "timer_events": sum(s.timer_events for s in ctx.stats),
    }
    if cfg.experiment.get("headline", False):
        headline = build_headline(results, meta, setup)
        path = root / "headline.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(headline, indent=2, default=_json_default) + "\n")
        print_headline(headline)
    return results


def _command() -> str:
    """The command line of this run (its Hydra overrides), for the result files."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return " ".join(["python -m sim", *HydraConfig.get().overrides.task])
    except ValueError:  # composed outside ``python -m sim`` (tests, notebooks)
        return "sim.app.run_experiments (composed config)"


def write_result(res: ExperimentResult, root: Path, chash: str, seed: int) -> None:
    d = root / res.name
    d.mkdir(parents=True, exist_ok=True)
    res.requests.to_csv(d / "requests.csv", index=False)
    summary = res.summary.copy()
    if "config_hash" not in summary.columns:
        summary.insert(0, "config_hash", chash)
    if "seed" not in summary.columns:
        summary.insert(1, "seed", seed)
    summary.to_csv(d / "summary.csv", index=False)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _verdict(value: float, target: float, lower_is_better: bool) -> dict:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"met": None, "note": "not measured in this run"}
    met = value <= target if lower_is_better else value >= target
    if lower_is_better:
        note = f"{value:.4g} vs target <= {target:g}: " + (
            "met" if met else f"missed by {value - target:.4g}"
        )
    else:
        note = f"{value:.4g} vs target >= {target:g}: " + (
            "met" if met else f"missed by {target - value:.4g}"
        )
    return {"met": bool(met), "note": note}


def build_headline(results: dict[str, ExperimentResult], meta: dict, setup: Setup) -> dict:
    h: dict = {
        "generated_by": "python -m sim",
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "parameters": {
            "model": setup.model.name,
            "gpu": setup.gpu.name,
            "network_Gbps": setup.network.link_Gbps,
            "network_efficiency": setup.network.efficiency,
            "per_request_s": setup.storage.per_request_s,
            "server_concurrency": setup.storage.server_concurrency,
            "client_concurrency": setup.storage.client_concurrency,
            "chunk_tokens": setup.model.chunk_tokens,
            "pcie_GBps": setup.gpu.pcie_Bps / 1e9,
        },
        **meta,
    }
    targets: dict = {}
    for res in results.values():
        h.update(res.headline)
    r64 = h.get("ttft_ratio_64k_vs_dram")
    if isinstance(r64, dict):
        targets["ttft_ratio_64k_vs_dram_layerwise"] = _verdict(r64["vs_dram_layerwise"], 1.056, True)
        targets["ttft_ratio_64k_vs_dram_whole"] = _verdict(r64["vs_dram_whole"], 1.056, True)
    a4 = h.get("added_ms_4k_vs_dram_layerwise")
    if isinstance(a4, dict):
        targets["added_ms_4k_vs_dram_layerwise"] = _verdict(a4["added_ms"], 56.0, True)
    if "bw_aware_vs_equal_best" in h:
        targets["bw_aware_vs_equal_best"] = _verdict(h["bw_aware_vs_equal_best"], 1.8, False)
        targets["bw_aware_vs_equal_min"] = _verdict(h["bw_aware_vs_equal_min"], 1.2, False)
        targets["bw_aware_vs_bound_max"] = _verdict(h["bw_aware_vs_bound_max"], 1.10, True)
    if "bw_aware_vs_srtf_min" in h:
        # Never worse than simple priority beyond 2 %.
        targets["bw_aware_vs_srtf_min"] = _verdict(h["bw_aware_vs_srtf_min"], 0.98, False)
    ls = h.get("load_sweep")
    if isinstance(ls, dict) and "bw_aware_vs_srtf_best" in ls:
        targets["load_sweep_bw_aware_vs_srtf_best"] = _verdict(ls["bw_aware_vs_srtf_best"], 1.10, False)
        targets["load_sweep_bw_aware_vs_srtf_min"] = _verdict(ls["bw_aware_vs_srtf_min"], 0.98, False)
        targets["load_sweep_bw_aware_vs_equal_min"] = _verdict(ls["bw_aware_vs_equal_min"], 1.2, False)
    h["targets"] = targets
    return h


def print_headline(h: dict) -> None:
    print("headline (headline.json):")
    for key, v in h.get("targets", {}).items():
        print(f"  {key:38s} {v['note']}")
    print(
        f"  {'sim_requests_per_s':38s} {h.get('sim_requests_per_s', math.nan):.1f} ({h.get('simulated_requests')} requests in {h.get('wall_s', 0):.1f} s)"
    )


def run(cfg) -> None:
    pd.set_option("display.width", 160)
    run_experiments(cfg)
