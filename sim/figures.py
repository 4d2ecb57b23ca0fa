"""Figures of the experiments, from their tables (``requests.csv``, ``summary.csv``).

``python -m sim`` calls ``plot(name, requests, summary, out_dir)`` after each experiment; the notebooks call
the same functions on the committed golden results, so a figure is drawn by one piece of code.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PATH_STYLE = {
    "recompute": ("tab:gray", "x"),
    "dram": ("tab:blue", "s"),
    "dram_layerwise": ("tab:cyan", "D"),
    "s3_whole": ("tab:red", "v"),
    "s3_ranged": ("tab:orange", "^"),
    "gather": ("tab:green", "o"),
}


POLICY_STYLE = {
    "equal": ("tab:blue", "s", "equal sharing"),
    "srtf": ("tab:orange", "^", "shortest remaining first (srtf)"),
    "bandwidth_aware": ("tab:green", "o", "bandwidth-aware"),
}
ARRIVAL_WORDS = {"poisson": "open loop (Poisson arrivals)", "closed": "closed loop (clients with think time)"}


def _k(tokens: float) -> str:
    return f"{tokens / 1024:g}K" if tokens >= 1024 else f"{tokens:g}"


def _mix_words(requests: pd.DataFrame) -> str:
    """The model and request mix of a run, from its per-request table (for figure titles)."""
    if not len(requests):
        return ""
    c, n = requests.cached_tokens, requests.new_tokens
    return (
        f"{requests.model.iloc[0]} (simulated), "
        f"cached {_k(c.min())}-{_k(c.max())} / new {_k(n.min())}-{_k(n.max())} tokens"
    )


def _save(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def context_sweep(requests: pd.DataFrame, summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    df = requests[requests.note == "sweep"].copy()
    # Request ids are "<path>-<cached>+<new>": the panel is the configured new-token count (a recompute
    # row's own new_tokens is its whole context).
    df["panel_new"] = df.request_id.str.rsplit("+", n=1).str[1].astype(int)
    news = sorted(df.panel_new.unique())
    fig, axes = plt.subplots(1, len(news), figsize=(5 * len(news), 4), squeeze=False)
    for ax, new in zip(axes[0], news):
        for path, g in df[df.panel_new == new].groupby("path"):
            g = g.sort_values("cached_tokens")
            color, marker = PATH_STYLE.get(path, ("k", "."))
            ax.plot(g.context_tokens, g.ttft_s * 1e3, marker=marker, color=color, label=path)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"{new} new tokens")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    paths = [_save(fig, out_dir, "context_sweep_ttft")]
    split = requests[requests.note == "split"]
    if len(split):
        piv = split.pivot_table(index="new_tokens", columns="path", values="ttft_s")
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot(piv.index, piv["gather"] / piv["dram_layerwise"], "o-", label="gather / DRAM layerwise")
        ax.plot(piv.index, piv["gather"] / piv["dram"], "s-", label="gather / DRAM whole")
        ax.axhline(1.056, color="r", ls="--", lw=1, label="target 1.056")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("new tokens of a 64K context")
        ax.set_ylabel("TTFT ratio")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir, "context_sweep_64k_split"))
    return paths


def shared_bandwidth(requests: pd.DataFrame, summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    caps = sorted(summary.link_Gbps.unique())
    fig, axes = plt.subplots(1, len(caps), figsize=(4.5 * len(caps), 3.8), squeeze=False, sharey=False)
    cols = [c for c in summary.columns if c.endswith("_added_ms")]
    repeats = int(summary.repeats.max()) if "repeats" in summary.columns else 1
    for ax, cap in zip(axes[0], caps):
        g = summary[summary.link_Gbps == cap].sort_values("concurrency")
        for col in cols:
            pol = col[: -len("_added_ms")]
            color, marker, words = POLICY_STYLE.get(pol, ("k", "x", "offline lower bound (MILP)"))
            err = g[f"{col}_ci95"].fillna(0) if f"{col}_ci95" in g.columns else None
            ax.errorbar(
                g.concurrency, g[col], yerr=err, color=color, marker=marker, capsize=3,
                ls="--" if pol == "bound" else "-", label=words,
            )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (arriving within 50 ms)")
        ax.set_ylabel("mean added TTFT (ms)")
        ax.set_title(f"{cap:g} Gbps link")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"Added TTFT over infinite bandwidth; {_mix_words(requests)}; "
        + (f"error bars: 95 % interval over {repeats} draws" if repeats > 1 else "one draw per point"),
        fontsize=9,
    )
    return [_save(fig, out_dir, "shared_bandwidth_added_ttft")]


def chunk_size(requests: pd.DataFrame, summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for path, g in summary.groupby("path"):
        g = g.sort_values("chunk_tokens")
        color, marker = PATH_STYLE.get(path, ("k", "."))
        ax.plot(g.chunk_tokens, g.ttft_mean_ms, marker=marker, color=color, label=path)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chunk size (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return [_save(fig, out_dir, "chunk_size_ttft")]


def _first_layer_label(note: str) -> str:
    """Words for the first-layer strategies (``dram_first_4``, ``prefetch_5ms``, ...)."""
    if note.startswith("dram_first_"):
        k = note.rsplit("_", 1)[1]
        return "first layer kept in DRAM" if k == "1" else f"first {k} layers kept in DRAM"
    if note.startswith("prefetch_"):
        return f"fetch starts {note.split('_', 1)[1][:-2]} ms before the GPU is free"
    return {
        "gather": "object tier, gather alone",
        "dram": "local DRAM, whole copy first",
        "dram_layerwise": "local DRAM, layerwise (the baseline)",
    }.get(note, note)


def first_layer(requests: pd.DataFrame, summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Left: added TTFT per cached prefix for each way of hiding the first layer.  Right: the claim -- the
    mean added TTFT over short prefixes (<= 8K tokens, where the first layer dominates) per strategy."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for note, g in summary.groupby("note"):
        g = g.sort_values("cached_tokens")
        style = "-" if note in ("gather", "dram_layerwise") else ":"
        ax.plot(g.cached_tokens, g.added_ttft_mean_ms, style, marker="o", label=_first_layer_label(note))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached prefix (tokens)")
    ax.set_ylabel("added TTFT over local DRAM layerwise (ms)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    short = summary[summary.cached_tokens <= 8192].groupby("note").added_ttft_mean_ms.mean().sort_values()
    colors = ["tab:green" if n == "gather" else "tab:blue" for n in short.index]
    bx.barh([_first_layer_label(n) for n in short.index], short.to_numpy(), color=colors)
    for y, v in enumerate(short.to_numpy()):
        bx.text(v, y, f" {v:.1f}", va="center", fontsize=7)
    bx.set_xlabel("mean added TTFT, prefixes <= 8K tokens (ms)")
    bx.tick_params(axis="y", labelsize=7)
    bx.grid(alpha=0.3, axis="x")
    return [_save(fig, out_dir, "first_layer_added_ttft")]


def trace(requests: pd.DataFrame, summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Left: the claim -- mean TTFT against DRAM capacity with and without the object tier, and the target
    (the largest DRAM alone, +5 %) whose crossing gives the DRAM the object tier saves; P99 dashed.  Right:
    the share of prefix tokens served from a cache tier."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for obj, g in summary.groupby("object_tier"):
        g = g.sort_values("dram_capacity_GiB")
        label = "with the object tier" if obj else "HBM + DRAM only"
        color = "tab:green" if obj else "tab:blue"
        axes[0].plot(g.dram_capacity_GiB, g.ttft_mean_ms, marker="o", color=color, label=f"{label}: mean")
        axes[0].plot(
            g.dram_capacity_GiB, g.ttft_p99_ms, ls="--", color=color, alpha=0.5, label=f"{label}: P99"
        )
        axes[1].plot(g.dram_capacity_GiB, g.hit_rate_tokens, marker="o", color=color, label=label)
    off = summary[~summary.object_tier.astype(bool)].sort_values("dram_capacity_GiB")
    if len(off):
        target = float(off.ttft_mean_ms.iloc[-1]) * 1.05
        axes[0].axhline(target, color="k", lw=0.8, ls=":", label="largest DRAM alone, mean +5 %")
    axes[0].set_ylabel("TTFT (ms)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("prefix tokens served from a cache tier")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("DRAM capacity (GiB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return [_save(fig, out_dir, "trace_tiers")]


def load_sweep(requests: pd.DataFrame, summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Mean added TTFT per policy against offered load (rows: arrival process, columns: link), and the
    ratios of the baselines to bandwidth_aware; error bars are 95 % intervals over the seeds."""
    arrivals, caps = list(dict.fromkeys(summary.arrival)), sorted(summary.link_Gbps.unique())
    seeds = int(summary.seeds.max())
    setup = f"{_mix_words(requests)}, {seeds} seeds per point"
    fig, axes = plt.subplots(
        len(arrivals), len(caps), figsize=(4.2 * len(caps), 3.4 * len(arrivals)), squeeze=False
    )
    for i, arrival in enumerate(arrivals):
        for j, cap in enumerate(caps):
            ax = axes[i][j]
            g = summary[(summary.arrival == arrival) & (summary.link_Gbps == cap)].sort_values("load")
            for pol, (color, marker, words) in POLICY_STYLE.items():
                if f"{pol}_added_ms" in g.columns:
                    ax.errorbar(
                        g.load * 100, g[f"{pol}_added_ms"], yerr=g[f"{pol}_added_ms_ci95"].fillna(0),
                        color=color, marker=marker, capsize=3, label=words,
                    )  # fmt: skip
            ax.set_yscale("log")
            ax.set_title(f"{cap:g} Gbps link, {ARRIVAL_WORDS.get(arrival, arrival)}", fontsize=9)
            ax.set_xlabel("offered load (% of the link)")
            ax.set_ylabel("mean added TTFT (ms)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Added TTFT over local DRAM layerwise by policy ({setup})", fontsize=10)
    paths = [_save(fig, out_dir, "load_sweep_added_ttft")]

    fig, axes = plt.subplots(1, len(arrivals), figsize=(5.5 * len(arrivals), 4), squeeze=False)
    for ax, arrival in zip(axes[0], arrivals):
        for cap, ls in zip(caps, ("-", "--", ":", "-.")):
            g = summary[(summary.arrival == arrival) & (summary.link_Gbps == cap)].sort_values("load")
            for base in ("srtf", "equal"):
                col = f"{base}_over_bw_aware"
                if col not in g.columns:
                    continue
                color, marker, words = POLICY_STYLE[base]
                err = [g[col] - g[f"{col}_lo"], g[f"{col}_hi"] - g[col]]
                ax.errorbar(
                    g.load * 100, g[col], yerr=[e.fillna(0) for e in err], color=color, marker=marker,
                    ls=ls, capsize=3, label=f"{words} / bandwidth-aware, {cap:g} Gbps",
                )  # fmt: skip
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(ARRIVAL_WORDS.get(arrival, arrival), fontsize=9)
        ax.set_xlabel("offered load (% of the link)")
        ax.set_ylabel("added TTFT ratio (> 1: bandwidth-aware better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"Each baseline's added TTFT over bandwidth-aware's ({setup})", fontsize=10)
    paths.append(_save(fig, out_dir, "load_sweep_ratios"))
    return paths


PLOTTERS = {
    "context_sweep": context_sweep,
    "shared_bandwidth": shared_bandwidth,
    "chunk_size": chunk_size,
    "first_layer": first_layer,
    "trace": trace,
    "load_sweep": load_sweep,
}


def plot(name: str, requests: pd.DataFrame, summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    fn = PLOTTERS.get(name)
    return fn(requests, summary, Path(out_dir)) if fn is not None else []
