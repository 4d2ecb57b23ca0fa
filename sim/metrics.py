"""Metrics of the per-request table, one function for the simulator and the testbed.

The table is ``scheduler.records.RequestRecord`` rows (``COLUMNS``).  ``summarize`` groups it and reports,
per group: request count, TTFT mean and percentiles, added TTFT over the local-DRAM-layerwise baseline of
the same request (``ttft_s - baseline_ttft_s``), first-layer wait, GPU stall (total and per layer), bytes
fetched and the fetch goodput.  Times in the summary are milliseconds (``_ms`` columns).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scheduler.records import COLUMNS, RequestRecord

DEFAULT_GROUP = ("experiment", "source", "path", "policy", "link_Gbps", "concurrency")


def to_frame(records: Iterable[RequestRecord]) -> pd.DataFrame:
    """Records -> DataFrame with exactly ``COLUMNS`` plus ``added_ttft_s``."""
    df = pd.DataFrame([r.as_dict() for r in records], columns=list(COLUMNS))
    return with_derived(df)


def with_derived(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["added_ttft_s"] = df["ttft_s"] - df["baseline_ttft_s"]
    return df


def read_requests(path: str | Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a requests table, missing columns {missing}")
    return with_derived(df)


def summarize(
    df: pd.DataFrame, by: Sequence[str] = DEFAULT_GROUP, num_layers: int | None = None
) -> pd.DataFrame:
    """One row per group of the per-request table.

    ``num_layers`` (if given) adds ``stall_per_layer_ms`` (stall spread over the layers after the first).
    """
    if "added_ttft_s" not in df.columns:
        df = with_derived(df)
    by = [c for c in by if c in df.columns]

    def agg(g: pd.DataFrame) -> pd.Series:
        ttft = g["ttft_s"].to_numpy() * 1e3
        added = g["added_ttft_s"].to_numpy() * 1e3
        fetched = g["bytes_fetched"].to_numpy(dtype=float)
        fetch_time = g["first_layer_wait_s"].to_numpy() + g["stall_s"].to_numpy()
        row = {
            "requests": len(g),
            "ttft_mean_ms": float(np.mean(ttft)),
            "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "ttft_p90_ms": float(np.percentile(ttft, 90)),
            "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "baseline_ttft_mean_ms": float(np.nanmean(g["baseline_ttft_s"].to_numpy() * 1e3))
            if g["baseline_ttft_s"].notna().any()
            else float("nan"),
            "added_ttft_mean_ms": float(np.nanmean(added)) if np.isfinite(added).any() else float("nan"),
            "added_ttft_p99_ms": float(np.nanpercentile(added, 99))
            if np.isfinite(added).any()
            else float("nan"),
            "first_layer_wait_mean_ms": float(g["first_layer_wait_s"].mean() * 1e3),
            "stall_mean_ms": float(g["stall_s"].mean() * 1e3),
            "bytes_fetched_mean": float(fetched.mean()),
            "compute_mean_ms": float(g["compute_s"].mean() * 1e3),
            "fetch_goodput_Gbps": float(8 * fetched.sum() / 1e9 / fetch_time.sum())
            if fetch_time.sum() > 0
            else float("nan"),
        }
        if num_layers and num_layers > 1:
            row["stall_per_layer_ms"] = row["stall_mean_ms"] / (num_layers - 1)
        return pd.Series(row)

    if not by:
        return agg(df).to_frame().T
    rows = []
    for key, g in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), **agg(g).to_dict()})
    out = pd.DataFrame(rows)
    if "requests" in out.columns:
        out["requests"] = out["requests"].astype(int)
    return out


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student's t over the values, e.g. one per
    seed); the half-width is NaN for fewer than two values."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def ratio_ci95(num: Sequence[float], den: Sequence[float], seed: int = 0, resamples: int = 2000) -> tuple:
    """``mean(num) / mean(den)`` over paired samples (one pair per seed) and its 95 % percentile-bootstrap
    interval (``lo``, ``hi``): the seeds are resampled with their pairs, so a seed that is hard for both
    policies moves both means.  The interval is NaN for fewer than two pairs."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    ratio = float(a.mean() / b.mean())
    if len(a) < 2:
        return ratio, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    boot = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return ratio, float(lo), float(hi)
