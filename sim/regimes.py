"""6. ``load_sweep``: the bandwidth policies across load regimes, each point over several seeds.

A stream of heterogeneous requests -- cached prefix log-uniform in ``cached_tokens`` (2K-64K by default,
whole chunks), new tokens log-uniform in ``new_tokens`` (128-8K), so per-layer compute differs ~30x --
fetches its prefix from the object tier with the gather path over one shared link.  The *offered load* is
the fraction of the link's capacity the requests' KV bytes would take:

- ``poisson``: open loop, arrivals at rate ``load * capacity_Bps / E[kv_bytes]``;
- ``closed``:  ``closed_clients`` clients, each sending its next request an exponential think time after
  its previous one finished, the mean think time set so that, at the requests' baseline (uncontended
  local-DRAM layerwise) TTFT, the clients would offer ``load`` of the link.

Every (arrival process, link, load) point runs ``seeds`` independent draws under each policy (the same
draw for every policy); the summary gives each policy's mean and P99 added TTFT with 95 % confidence
intervals over the seeds, and the paired ratios ``<baseline>_over_bw_aware`` with bootstrap intervals.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from sim.draws import sub_seed
from sim.experiments import Context, ExperimentResult, register, with_policy
from sim.metrics import mean_ci95, ratio_ci95, to_frame
from sim.runner import SimRequest, simulate
from sim.setup import Setup, dram_layerwise_ttft_s

EXP = "load_sweep"
# Draws behind the expected KV bytes and baseline TTFT of a request (one fixed seed: every run agrees).
MOMENT_DRAWS = 4000


def log_uniform_tokens(rng: np.random.Generator, n: int, bounds: list[int], multiple: int = 1) -> np.ndarray:
    """``n`` token counts log-uniform in ``[lo, hi]``, rounded to a positive multiple of ``multiple``."""
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo <= hi:
        raise ValueError(f"token bounds must satisfy 0 < lo <= hi, got {bounds}")
    x = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
    return np.maximum(multiple, np.round(x / multiple) * multiple).astype(int)


def draw_tokens(
    rng: np.random.Generator, n: int, p: dict, chunk_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cached (whole chunks) and new tokens of ``n`` requests."""
    cached = log_uniform_tokens(rng, n, p["cached_tokens"], chunk_tokens)
    new = log_uniform_tokens(rng, n, p["new_tokens"])
    return cached, new


def request_moments(setup: Setup, p: dict, seed: int) -> tuple[float, float]:
    """Expected KV bytes moved and expected baseline TTFT (s) of one request of the sweep's mix."""
    rng = np.random.default_rng(sub_seed(seed, EXP, "moments"))
    cached, new = draw_tokens(rng, MOMENT_DRAWS, p, setup.model.chunk_tokens)
    m = setup.spec
    kv_bytes = float(m.kv_bytes_per_token_layer * m.num_layers * cached.mean())
    base = [dram_layerwise_ttft_s(setup, int(c), int(w)) for c, w in zip(cached[:400], new[:400])]
    return kv_bytes, float(np.mean(base))


def regime_requests(
    rng: np.random.Generator, setup: Setup, p: dict, arrival: str, load: float, moments: tuple[float, float]
) -> list[SimRequest]:
    """One draw of the sweep's requests at ``load`` of the link, open (``poisson``) or ``closed`` loop."""
    n = int(p["requests"])
    kv_bytes, base_s = moments
    capacity_Bps = setup.links()["net"].capacity_Bps
    cached, new = draw_tokens(rng, n, p, setup.model.chunk_tokens)
    if arrival == "poisson":
        rate_per_s = load * capacity_Bps / kv_bytes
        arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, size=n))
        return [
            SimRequest(f"r{i}", float(a), int(c), int(w), "gather")
            for i, (a, c, w) in enumerate(zip(arrivals, cached, new))
        ]
    if arrival == "closed":
        clients = int(p["closed_clients"])
        # K clients cycling through think + request offer K * E[bytes] / (think + E[TTFT]) bytes/s.
        think_mean_s = max(0.0, clients * kv_bytes / (load * capacity_Bps) - base_s)
        thinks = rng.exponential(think_mean_s, size=n) if think_mean_s > 0 else np.zeros(n)
        return [
            SimRequest(f"r{i}", 0.0, int(c), int(w), "gather", client=i % clients, think_s=float(t))
            for i, (c, w, t) in enumerate(zip(cached, new, thinks))
        ]
    raise ValueError(f"unknown arrival process {arrival!r}; known: poisson, closed")


def load_sweep(ctx: Context, p: dict) -> ExperimentResult:
    policies = list(p["policies"])
    if "bandwidth_aware" not in policies:
        raise ValueError("load_sweep compares every policy with bandwidth_aware: list it in policies")
    frames, rows = [], []
    for cap in p["links_Gbps"]:
        setup = dataclasses.replace(ctx.setup, net_Gbps=float(cap))
        moments = request_moments(setup, p, ctx.seed)
        for arrival in p["arrivals"]:
            for load in p["loads"]:
                per_seed: dict[str, dict[str, list[float]]] = {
                    pol: {"mean": [], "p99": []} for pol in policies
                }
                for s in range(int(p["seeds"])):
                    note = f"{arrival}-load{load:g}-seed{s}"
                    for pol in policies:
                        rng = np.random.default_rng(
                            sub_seed(ctx.seed, EXP, arrival, float(cap), float(load), s)
                        )
                        reqs = regime_requests(rng, setup, p, arrival, float(load), moments)
                        recs, stats = simulate(
                            reqs, with_policy(setup, pol), EXP, ctx.config_hash, ctx.seed, note=note
                        )
                        ctx.stats.append(stats)
                        df = to_frame(recs)
                        frames.append(df)
                        added_ms = df.added_ttft_s.to_numpy() * 1e3
                        per_seed[pol]["mean"].append(float(added_ms.mean()))
                        per_seed[pol]["p99"].append(float(np.percentile(added_ms, 99)))
                    ctx.progress(1)
                rows.append(_point_row(arrival, float(cap), float(load), per_seed, ctx.seed))
    summary = pd.DataFrame(rows)
    summary.insert(0, "experiment", EXP)
    summary["contention"] = summary["equal_added_ms"] >= float(p["contention_min_added_ms"])
    requests = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return ExperimentResult(EXP, requests, summary, {"load_sweep": load_headline(summary, p)})


def _point_row(arrival: str, cap: float, load: float, per_seed: dict, seed: int) -> dict:
    row: dict = {
        "arrival": arrival,
        "link_Gbps": cap,
        "load": load,
        "seeds": len(per_seed["bandwidth_aware"]["mean"]),
    }
    for pol, v in per_seed.items():
        for stat, label in (("mean", "added_ms"), ("p99", "p99_added_ms")):
            mean, half = mean_ci95(v[stat])
            row[f"{pol}_{label}"], row[f"{pol}_{label}_ci95"] = mean, half
    bw = per_seed["bandwidth_aware"]
    for pol in per_seed:
        if pol == "bandwidth_aware":
            continue
        for stat, prefix in (("mean", ""), ("p99", "p99_")):
            r, lo, hi = ratio_ci95(per_seed[pol][stat], bw[stat], seed=seed)
            row[f"{prefix}{pol}_over_bw_aware"] = r
            row[f"{prefix}{pol}_over_bw_aware_lo"] = lo
            row[f"{prefix}{pol}_over_bw_aware_hi"] = hi
    return row


def _at(row: pd.Series) -> dict:
    return {"arrival": row.arrival, "link_Gbps": float(row.link_Gbps), "load": float(row.load)}


def load_headline(summary: pd.DataFrame, p: dict) -> dict:
    """Best and worst ratio of each baseline to bandwidth_aware over the contended points, with the
    bootstrap interval of that point; and the points where bandwidth_aware's P99 is worse than srtf's."""
    c = summary[summary.contention]
    out: dict = {
        "points": int(len(summary)),
        "contention_points": int(len(c)),
        "contention_definition": f"equal's mean added TTFT >= {p['contention_min_added_ms']} ms",
        "seeds_per_point": int(p["seeds"]),
        "interval": "95% percentile bootstrap over seeds (paired draws)",
    }
    if not len(c):
        return out
    for base in [b for b in ("srtf", "equal") if f"{b}_over_bw_aware" in c.columns]:
        col = f"{base}_over_bw_aware"
        for which, idx in (("best", c[col].idxmax()), ("min", c[col].idxmin())):
            row = c.loc[idx]
            out[f"bw_aware_vs_{base}_{which}"] = float(row[col])
            out[f"bw_aware_vs_{base}_{which}_ci95"] = [float(row[f"{col}_lo"]), float(row[f"{col}_hi"])]
            out[f"bw_aware_vs_{base}_{which}_at"] = _at(row)
    if "p99_srtf_over_bw_aware" in c.columns:
        worse = c[c.p99_srtf_over_bw_aware < 1.0]
        out["p99_worse_than_srtf_points"] = [
            {**_at(r), "p99_srtf_over_bw_aware": float(r.p99_srtf_over_bw_aware)} for _, r in worse.iterrows()
        ]
    return out


register(EXP, load_sweep)
