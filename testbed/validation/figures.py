"""The validation's figure: simulated against measured TTFT, the error distribution, the policy ratio."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


def plot_validation(table: pd.DataFrame, res: dict, fig_dir: str | Path) -> list[Path]:
    """Sim vs real TTFT per config (held-out and calibration), the error distribution, and the
    shared-bandwidth ratio measured vs predicted.  Returns the saved PNG paths (``validation_*.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for (exp, split), g in table.groupby(["experiment", "split"]):
        ax.scatter(g.ttft_s * 1e3, g.sim_ttft_s * 1e3, s=18, label=f"{exp} ({split})", alpha=0.8)
    hi = float(np.nanmax([table.ttft_s.max(), table.sim_ttft_s.max()])) * 1e3 * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    ax.plot([0, hi], [0, hi * 1.1], "k:", lw=0.8)
    ax.plot([0, hi], [0, hi * 0.9], "k:", lw=0.8)
    ax.set_xlabel("testbed TTFT (ms)")
    ax.set_ylabel("simulated TTFT (ms)")
    ax.set_title("TTFT per config (dotted: +-10%)")
    ax.legend(fontsize=7)
    ax = axes[1]
    held = table[table.split == "held_out"]
    for exp, g in held.groupby("experiment"):
        ax.hist(g.rel_err * 100, bins=20, alpha=0.6, label=exp)
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel("(sim - real) / real (%)")
    ax.set_ylabel("held-out configs")
    ax.set_title(
        f"held-out |err|: median {res.get('median_abs_err', math.nan) * 100:.1f}%, "
        f"P90 {res.get('p90_abs_err', math.nan) * 100:.1f}%"
    )
    ax.legend(fontsize=7)
    ax = axes[2]
    meas, sim = res.get("bw_added_ms_measured", {}), res.get("bw_added_ms_sim", {})
    pols = [p for p in ("equal", "bandwidth_aware") if f"{p}_added_ms" in meas]
    x = np.arange(len(pols))
    ax.bar(x - 0.2, [meas[f"{p}_added_ms"] for p in pols], 0.4, label="testbed")
    ax.bar(x + 0.2, [sim.get(f"{p}_added_ms", math.nan) for p in pols], 0.4, label="simulator")
    ax.set_xticks(x, pols)
    ax.set_ylabel("mean added TTFT (ms)")
    ax.set_title(
        f"shared bandwidth: equal/bw-aware {res.get('bw_ratio_measured', math.nan):.2f} (testbed) vs "
        f"{res.get('bw_ratio_sim', math.nan):.2f} (sim)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = fig_dir / "validation_sim_vs_testbed.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def plot_gpu_validation(runs: dict[str, dict], out: str | Path) -> Path:
    """Simulated against measured TTFT of the GPU validation, one panel per host (``runs``: raw path ->
    ``gpu_validation`` result): DRAM layerwise (circles) and ObjectCache paced (triangles), held-out configs
    filled, calibration configs hollow, log axes, dotted +-10 %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 5.6), squeeze=False)
    style = {"dram_layerwise": ("o", "tab:blue"), "objectcache_paced": ("^", "tab:red")}
    words = {
        "dram_layerwise": "local DRAM, layerwise",
        "objectcache_paced": "object tier (gather), paced at the link rate",
    }
    for ax, (name, res) in zip(axes[0], runs.items()):
        rows = [t for t in res["configs"] if t["path"] in style]
        labelled = 0
        for t in rows:
            marker, color = style[t["path"]]
            held = t["split"] == "held_out"
            ax.scatter(t["real_ms"], t["sim_ms"], marker=marker, s=40, edgecolors=color,
                       facecolors=color if held else "none", linewidths=1.2)  # fmt: skip
            if held and abs(t["rel_err"]) > 0.10:
                # Alternate sides so neighbouring outliers' labels do not overlap.
                dx, dy = (6, -12) if labelled % 2 == 0 else (-70, 8)
                labelled += 1
                ax.annotate(f"{t['config']} {t['rel_err'] * 100:+.0f}%", (t["real_ms"], t["sim_ms"]),
                            fontsize=7, xytext=(dx, dy), textcoords="offset points")  # fmt: skip
        lo = 0.8 * min(min(t["real_ms"], t["sim_ms"]) for t in rows)
        hi = 1.2 * max(max(t["real_ms"], t["sim_ms"]) for t in rows)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [lo * 1.1, hi * 1.1], "k:", lw=0.8, label="+-10 %")
        ax.plot([lo, hi], [lo * 0.9, hi * 0.9], "k:", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured TTFT on the GPU (ms)")
        ax.set_ylabel("simulated TTFT (ms)")
        ax.set_title(
            f"{Path(name).stem}: {res.get('gpu')}\nheld-out |err| median "
            f"{res['heldout_median_abs_err'] * 100:.1f}%, P90 {res['heldout_p90_abs_err'] * 100:.1f}%",
            fontsize=9,
        )
        for p, (marker, color) in style.items():
            ax.scatter([], [], marker=marker, color=color, label=words[p])
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        "Simulated vs measured TTFT, Llama-3.1-8B, one point per cached+new tokens config; "
        "held-out configs filled, calibration configs hollow",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
