"""Simulator vs the GPU engine: the H100 single-request sweeps judged against the simulator.

``gpu_validation`` (``python -m testbed.validation.ttft validate``) calibrates the object path on half of a
measured grid and reports the error on the other half; ``h100_summary`` reads the sim-vs-real table of an
earlier ``summarize`` result.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from testbed import REPO_ROOT
from testbed.validation.errors import TARGETS, error_stats
from testbed.validation.simulate import SIM_PATH, gpu_setup, simulate_records


def h100_summary(path: Path) -> dict | None:
    """Sim vs real of the H100 single-request sweep (``testbed/validation/ttft.py``: gpu compute, local topology):
    per config and storage path, ``(sim - real) / real`` of the TTFT both sides report."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        real, sim = data["ttft_ms"], data["simulator"]["ttft_ms"]
    except (ValueError, KeyError, TypeError):
        return None
    rows = []
    for cfg_key, paths in real.items():
        for p, real_ms in paths.items():
            sim_ms = sim.get(cfg_key, {}).get(p)
            if sim_ms is not None and real_ms:
                rows.append({"config": cfg_key, "path": p, "real_ms": real_ms, "sim_ms": sim_ms,
                             "rel_err": (sim_ms - real_ms) / real_ms})  # fmt: skip
    errs = pd.Series([r["rel_err"] for r in rows], dtype=float)
    out = {
        "source": str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path),
        "command": data.get("command"),
        "machine": data.get("machine"),
        "date": data.get("date"),
        "profile": data["simulator"].get("profile"),
        **error_stats(errs),
        "by_path": {
            p: error_stats(pd.Series([r["rel_err"] for r in rows if r["path"] == p]))
            for p in sorted({r["path"] for r in rows})
        },
        "configs": rows,
    }
    return out


# The object path's fitted parameters (name, unit scale, lower, upper bound, start points): the server's open
# cost per stream and per key, the paced link's efficiency, the reader's handoff per layer, one stream's
# receive ceiling.  Fitted in scaled units (ms, GB/s) so one finite-difference step fits all.
OBJECT_PARAMS = (
    ("open_per_stream_s", 1e-3, 0.0, 50.0, (1.0, 10.0)),
    ("gather_per_chunk_s", 1e-3, 0.0, 2.0, (0.1,)),
    ("efficiency", 1.0, 0.2, 1.2, (0.6, 1.0)),
    ("handoff_per_layer_s", 1e-3, 0.0, 20.0, (0.5, 3.0)),
    ("stream_ceiling_Bps", 1e9, 0.2, 20.0, (1.0, 3.5)),
)
# Relative residuals beyond this count linearly (``soft_l1``): one odd measurement does not pull the fit.
F_SCALE = 0.05
# The paths the acceptance judges (held-out median and P90 over these).
ACCEPTANCE_PATHS = ("dram_layerwise", "objectcache_paced")


@dataclass(frozen=True)
class ObjectPathFit:
    """The fitted parameters: ``params`` (``gpu_setup`` keyword -> value, SI units), the fit's cost and the
    median |relative TTFT error| they reach on the calibration configs of the sources fitted."""

    median_abs_err: float
    params: dict
    cost: float = math.nan
    nfev: int = 0

    def __getattr__(self, name):  # fit.efficiency etc.
        try:
            return self.__dict__["params"][name]
        except KeyError:
            raise AttributeError(name) from None


def _rel(a: float, b: float) -> float:
    return (a - b) / b


def _residuals(setup_of, cal_raw: dict, real: dict, first: dict, srcs: dict[str, str]):
    """The residual function of ``least_squares``: the relative TTFT error of every calibration config and
    source, and the relative first-layer error where the run measured it."""

    def f(x):
        recs = simulate_records(setup_of(x), cal_raw, srcs)
        out = []
        for k, by in recs.items():
            for s, (ttft, fl) in by.items():
                out.append(_rel(ttft, real[k][s]))
                if first.get(k, {}).get(s):
                    out.append(_rel(fl, first[k][s]))
        return np.array(out)

    return f


def _ttft_median_err(setup, cal_raw, real, srcs) -> float:
    recs = simulate_records(setup, cal_raw, srcs)
    return float(np.median([abs(_rel(v[0], real[k][s])) for k, by in recs.items() for s, v in by.items()]))


def fit_h2d(cal_raw: dict, profile: str, real: dict, src: dict[str, str]) -> ObjectPathFit:
    """The host-to-device efficiency of the layerwise DRAM copies (the measured pinned rate times it), by
    robust least squares on the calibration configs of ``src`` (``dram_layerwise``); 1.0 without it."""
    if not src:
        return ObjectPathFit(math.nan, {"h2d_efficiency": 1.0})

    def setup_of(x):
        return gpu_setup(cal_raw, profile, h2d_efficiency=float(x[0]))

    f = _residuals(setup_of, cal_raw, real, {}, src)
    r = least_squares(f, [1.0], bounds=([0.5], [1.5]), loss="soft_l1", f_scale=F_SCALE, diff_step=1e-3)
    eff = float(r.x[0])
    return ObjectPathFit(_ttft_median_err(setup_of(r.x), cal_raw, real, src), {"h2d_efficiency": eff},
                         float(r.cost), int(r.nfev))  # fmt: skip


def fit_object_path(
    cal_raw: dict,
    profile: str,
    real: dict,
    obj: dict[str, str],
    first: dict | None = None,
    h2d_efficiency: float = 1.0,
    streams: int = 1,
) -> ObjectPathFit:
    """Robust least squares (``scipy.optimize.least_squares``, ``soft_l1``) of the object path's parameters
    (``OBJECT_PARAMS``) on the calibration configs of ``cal_raw``: the relative TTFT errors of the sources
    ``obj`` and, where measured (``first``: ms per config key and source), their first-layer waits; started
    from each point of a small grid, the lowest cost kept.  The per-request overhead is 0: with the same
    stream count in every config it is not separable from ``streams * open_per_stream_s``.  Without object
    sources: the defaults of a fast server at the full link rate."""
    if not obj:
        return ObjectPathFit(
            math.inf, {"request_overhead_s": 2e-4, "gather_per_chunk_s": 0.0, "efficiency": 1.0}
        )
    lo, hi = np.array([p[2] for p in OBJECT_PARAMS]), np.array([p[3] for p in OBJECT_PARAMS])

    def params_of(x) -> dict:
        out = {name: float(v) * sc for (name, sc, *_), v in zip(OBJECT_PARAMS, x)}
        return {"request_overhead_s": 0.0, "ttfb_s": 0.0, "rtt_s": 0.0, "gather_streams": streams, **out}

    def setup_of(x):
        return gpu_setup(cal_raw, profile, h2d_efficiency=h2d_efficiency, **params_of(x))

    f = _residuals(setup_of, cal_raw, real, first or {}, obj)
    best = None
    for x0 in itertools.product(*(p[4] for p in OBJECT_PARAMS)):
        r = least_squares(f, np.array(x0, dtype=float), bounds=(lo, hi), loss="soft_l1", f_scale=F_SCALE,
                          diff_step=1e-3, x_scale=np.maximum(np.array(x0), 0.1), max_nfev=200)  # fmt: skip
        if best is None or r.cost < best.cost:
            best = r
    return ObjectPathFit(_ttft_median_err(setup_of(best.x), cal_raw, real, obj), params_of(best.x),
                         float(best.cost), int(best.nfev))  # fmt: skip


def noise_floor(raw: dict, keys: list[str], paths=ACCEPTANCE_PATHS, boot: int = 2000, seed: int = 0) -> dict:
    """What the measurement itself varies by, per path over ``keys``: the spread of the repeats (std / median),
    the sampling error of their median (bootstrap: |median of a resample - median| / median, its mean per
    config), and for the object path the pairs that move the same bytes and are transfer-bound (new 128 and
    1K tokens, same prefix): ``|a - b| / (a + b)``, the smallest worst error any one prediction for both
    reaches."""
    rng = np.random.default_rng(seed)
    rows = {f"{r['cached_tokens']}+{r['new_tokens']}": r for r in raw["configs"]}
    out = {}
    for p in paths:
        cv, boot_err = [], []
        for k in keys:
            a = np.asarray(rows[k]["sources"].get(p, {}).get("ttft_ms_all", []), dtype=float)
            if len(a) < 2:
                continue
            med = np.median(a)
            cv.append(float(np.std(a) / med))
            meds = np.median(rng.choice(a, size=(boot, len(a))), axis=1)
            boot_err.append(float(np.mean(np.abs(meds - med)) / med))
        if cv:
            out[p] = {
                "repeat_cv_median": float(np.median(cv)),
                "repeat_cv_p90": float(np.percentile(cv, 90)),
                "median_of_repeats_err_median": float(np.median(boot_err)),
                "median_of_repeats_err_p90": float(np.percentile(boot_err, 90)),
            }
    pairs = {}
    by_cached: dict[int, dict[int, float]] = {}
    for r in raw["configs"]:
        if "objectcache_paced" in r["sources"] and r["new_tokens"] in (128, 1024):
            by_cached.setdefault(r["cached_tokens"], {})[r["new_tokens"]] = r["sources"]["objectcache_paced"][
                "ttft_ms"
            ]
    for c, d in sorted(by_cached.items()):
        if len(d) == 2:
            a, b = d[128], d[1024]
            pairs[f"{c}+128 vs {c}+1024"] = abs(a - b) / (a + b)
    if pairs:
        out["objectcache_same_transfer_pairs"] = {
            "half_rel_diff": pairs,
            "note": "same prefix, transfer-bound (new 128 vs 1K tokens): the same bytes over the same path; "
            "|a - b| / (a + b) is the least worst-case |error| of any one prediction for both",
        }
    return out


def gpu_validation(raw: dict, profile: str) -> dict:
    """Simulator vs the GPU engine on a single-request context sweep (``gpu`` compute, ``local`` topology:
    ``python -m testbed.validation.ttft measure --shared-prefix --configs <grid>`` on the GPU machine).

    The configs sorted by (cached, new) alternate calibration and held-out (the netns validation's split).
    On the calibration configs: ``fit_h2d`` fits the host-to-device efficiency on ``dram_layerwise``, then
    ``fit_object_path`` the object path's open cost (per stream, per key), link efficiency, reader handoff
    per layer and per-stream receive ceiling on ``objectcache_paced`` (TTFT and first-layer wait), with the
    run's stream count; recompute has nothing to fit (the GPU profile is measured).  Errors are
    ``(sim - real) / real`` of the median TTFT per (config, path), reported over the held-out configs: all
    paths, per path, and over ``ACCEPTANCE_PATHS`` (``heldout_median_abs_err``, ``heldout_p90_abs_err``)."""
    rows = sorted(raw["configs"], key=lambda r: (r["cached_tokens"], r["new_tokens"]))
    keys = [f"{r['cached_tokens']}+{r['new_tokens']}" for r in rows]
    cal_keys = set(keys[::2])
    paths = {s: p for s, p in SIM_PATH.items() if all(s in r["sources"] for r in rows)}
    real = {k: {s: r["sources"][s]["ttft_ms"] for s in paths} for k, r in zip(keys, rows)}
    first = {
        k: {s: r["sources"][s].get("first_layer_wait_ms") for s in paths if SIM_PATH[s] == "gather"}
        for k, r in zip(keys, rows)
    }
    cal_raw = dict(raw, configs=[r for k, r in zip(keys, rows) if k in cal_keys])
    obj = {s: p for s, p in paths.items() if p == "gather"}
    lw = {s: p for s, p in paths.items() if s == "dram_layerwise"}
    streams = int(raw.get("streams") or 1)
    h2d = fit_h2d(cal_raw, profile, real, lw)
    h2d_eff = h2d.params["h2d_efficiency"]
    best = fit_object_path(cal_raw, profile, real, obj, first, h2d_eff, streams)
    params = {**best.params, "h2d_efficiency": h2d_eff}
    recs = simulate_records(gpu_setup(raw, profile, **params), raw, paths)
    table = [
        {
            "config": k,
            "path": s,
            "real_ms": real[k][s],
            "sim_ms": recs[k][s][0],
            "rel_err": (recs[k][s][0] - real[k][s]) / real[k][s],
            "real_first_layer_ms": first[k].get(s),
            "sim_first_layer_ms": recs[k][s][1] if s in obj else None,
            "split": "calibration" if k in cal_keys else "held_out",
        }  # fmt: skip
        for k in keys
        for s in paths
    ]
    held = [t for t in table if t["split"] == "held_out"]
    acc = error_stats(pd.Series([t["rel_err"] for t in held if t["path"] in ACCEPTANCE_PATHS], dtype=float))
    return {
        "generated_by": "python -m testbed.validation.ttft validate",
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "measured_at": raw.get("measured_at"),
        "gpu": raw.get("gpu"),
        "machine": {k: raw.get(k) for k in ("gpu", "torch", "cpu_count", "pinned_h2d_GBps", "host")},
        "measure_command": raw.get("command"),
        "model": raw.get("model"),
        "link_Gbps": raw.get("link_Gbps"),
        "profile": profile,
        "acceptance_paths": list(ACCEPTANCE_PATHS),
        "heldout_median_abs_err": acc.get("median_abs_err", math.nan),
        "heldout_p90_abs_err": acc.get("p90_abs_err", math.nan),
        "heldout_n": acc.get("n", 0),
        "calibration": {
            **params,
            "object_calibration_median_abs_err": best.median_abs_err,
            "h2d_calibration_median_abs_err": h2d.median_abs_err,
            "object_fit_cost": best.cost,
            "configs": sorted(cal_keys),
            "fitted_on": sorted(obj) + sorted(lw),
            "method": "scipy.optimize.least_squares (soft_l1, f_scale 0.05) of relative errors on the "
            "calibration configs: h2d_efficiency on dram_layerwise TTFT; the object path's parameters on "
            "objectcache_paced TTFT and first-layer wait, from a grid of start points; gather_streams = the "
            "run's streams (every prefill of the grid used min(streams, keys) = streams)",
        },
        "all_paths": error_stats(pd.Series([t["rel_err"] for t in held], dtype=float)),
        "by_path": {
            s: error_stats(pd.Series([t["rel_err"] for t in held if t["path"] == s], dtype=float))
            for s in paths
        },
        "noise_floor": noise_floor(raw, [k for k in keys if k not in cal_keys]),
        "targets": {"median_abs_err": TARGETS["median_abs_err"], "p90_abs_err": TARGETS["p90_abs_err"]},
        "configs": table,
    }


def pooled_validation(runs: dict[str, dict]) -> dict:
    """Several hosts' ``gpu_validation`` results (raw path -> result) in one: each host calibrated on its own
    half, the held-out errors of ``ACCEPTANCE_PATHS`` pooled (``heldout_median_abs_err``,
    ``heldout_p90_abs_err``) and per host and path."""
    held = [(p, t) for p, r in runs.items() for t in r["configs"] if t["split"] == "held_out"]
    acc = error_stats(
        pd.Series([t["rel_err"] for _, t in held if t["path"] in ACCEPTANCE_PATHS], dtype=float)
    )
    paths = sorted({t["path"] for _, t in held})
    gpus = sorted({str(r.get("gpu")) for r in runs.values()})
    return {
        "generated_by": "python -m testbed.validation.ttft validate",
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": gpus[0] if len(gpus) == 1 else gpus,
        "acceptance_paths": list(ACCEPTANCE_PATHS),
        "heldout_median_abs_err": acc.get("median_abs_err", math.nan),
        "heldout_p90_abs_err": acc.get("p90_abs_err", math.nan),
        "heldout_n": acc.get("n", 0),
        "targets": {"median_abs_err": TARGETS["median_abs_err"], "p90_abs_err": TARGETS["p90_abs_err"]},
        "met": bool(
            acc.get("median_abs_err", math.inf) <= TARGETS["median_abs_err"]
            and acc.get("p90_abs_err", math.inf) <= TARGETS["p90_abs_err"]
        ),  # fmt: skip
        "by_path": {
            s: error_stats(pd.Series([t["rel_err"] for _, t in held if t["path"] == s], dtype=float))
            for s in paths
        },
        "by_host": {
            p: {
                "heldout_median_abs_err": r["heldout_median_abs_err"],
                "heldout_p90_abs_err": r["heldout_p90_abs_err"],
                "by_path": {
                    s: {k: v[k] for k in ("median_abs_err", "p90_abs_err")} for s, v in r["by_path"].items()
                },
            }
            for p, r in runs.items()
        },
        "hosts": runs,
    }
