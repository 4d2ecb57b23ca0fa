"""How sim-vs-real errors are measured: relative TTFT errors, per config, and the shared-bandwidth ratio.

Errors are relative TTFT errors ``(sim - real) / real`` per request or config; ``error_stats`` reports
the median and P90 of their absolute value and of the signed value.  ``TARGETS`` are the validation's
acceptance targets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sim.setup import Setup
from testbed.validation.simulate import ideal_ttft_s

TARGETS = {
    "median_abs_err": 0.05,
    "p90_abs_err": 0.10,
    "bw_ratio_measured_min": 1.2,
    "bw_ratio_sim_rel_err": 0.10,
}


def error_stats(err: pd.Series) -> dict:
    e = err.dropna().to_numpy()
    if not len(e):
        return {"n": 0}
    a = np.abs(e)
    return {
        "n": int(len(e)),
        "median_abs_err": float(np.median(a)),
        "p90_abs_err": float(np.percentile(a, 90)),
        "median_signed_err": float(np.median(e)),
        "p90_signed_err": float(np.percentile(e, 90)),
        "p10_signed_err": float(np.percentile(e, 10)),
    }


def per_config(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config: the median over repeats (sweep: same cached x new; shared bandwidth: the same
    request of the same draw and policy over trials), so a stray slow run on a shared machine does not
    decide the error.  ``rel_err`` is recomputed from the medians."""
    df = df.copy()
    sweep = df.experiment == "context_sweep"
    df["config"] = ""
    df.loc[sweep, "config"] = "sweep/" + df.cached_tokens.astype(str) + "+" + df.new_tokens.astype(str)
    batch = df.note.str.split(";").str[0].str.replace(r"-t\d+$", "", regex=True)
    df.loc[~sweep, "config"] = df.policy + "/" + batch + "/" + df.request_id.astype(str)
    agg = {c: "first" for c in df.columns if c not in ("config",)}
    for c in ("ttft_s", "sim_ttft_s", "first_layer_wait_s", "stall_s", "arrival_s"):
        agg[c] = "median"
    out = df.groupby("config", sort=False).agg(agg).reset_index()
    out["repeats"] = df.groupby("config", sort=False).size().to_numpy()
    out["rel_err"] = (out.sim_ttft_s - out.ttft_s) / out.ttft_s
    return out


def bw_ratio(df: pd.DataFrame, setup: Setup, col: str) -> dict:
    """Mean added TTFT per policy and ``equal / bandwidth_aware``, pooled over the shared-bandwidth runs."""
    ideal = np.array([ideal_ttft_s(setup, c, n) for c, n in zip(df.cached_tokens, df.new_tokens)])
    added = df[col].to_numpy() - ideal
    by = pd.Series(added, index=df.index).groupby(df.policy).mean() * 1e3
    out = {f"{p}_added_ms": float(v) for p, v in by.items()}
    if "equal" in by and "bandwidth_aware" in by and by["bandwidth_aware"] > 0:
        out["ratio"] = float(by["equal"] / by["bandwidth_aware"])
    return out
