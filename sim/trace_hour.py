"""A real production hour through the three tiers, under each bandwidth policy.

    python -m sim.trace_hour [--trace ../shared/traces/mooncake_conversation_trace.jsonl] [--dram-GiB 8]
        [--policies equal,srtf,bandwidth_aware] [--limit N] [--out results/trace/mooncake_hour.json]

The Mooncake FAST'25 conversation trace (12,031 requests of one hour; 512-token prefix blocks named by hash)
is replayed at its own arrival times on one simulated node (Llama-3.1-8B on the H100 profile, 100 Gbps to the
object tier, as ``python -m sim``'s defaults): per request the tier manager finds the longest cached prefix in
HBM, DRAM and the object tier, the planner decides what to fetch and what to recompute
(``scheduler.planner``), and the new chunks are written back.  The tier decisions do not depend on the
bandwidth policy, so each (DRAM capacity, object tier on/off) is planned once and simulated under every
policy.  Writes one JSON (command, date, machine, per configuration: token share per tier, TTFT mean / P50 /
P99, added TTFT mean / P99, bytes from the object tier) and a figure beside it.

The trace is not part of the repository: get ``FAST25-release/traces/conversation_trace.jsonl`` from the
Mooncake repository (kvcache-ai/Mooncake on GitHub) and pass its path; the bundled
``sim/traces/mooncake_sample.jsonl`` (200 requests in the same format) is the default, so the command runs
anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sim.config import GpuConfig, ModelConfig, NetworkConfig, PolicyConfig, StorageConfig, WorkloadConfig
from sim.experiments import Context
from sim.metrics import summarize, to_frame
from sim.runner import simulate
from sim.setup import Setup
from sim.trace import plan_requests
from sim.workloads import load_mooncake

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "sim" / "traces" / "mooncake_sample.jsonl"
POLICY_LABELS = {
    "equal": "equal sharing",
    "srtf": "shortest remaining first",
    "bandwidth_aware": "bandwidth-aware",
}


def replay(trace_path: Path, dram_GiB: float, policies: list[str], limit: int | None, log) -> list[dict]:
    """One row per (object tier off/on, policy): the summary of the whole replay."""
    workload = WorkloadConfig(name="mooncake", kind="trace", trace_path=str(trace_path), block_tokens=512)
    trace = load_mooncake(trace_path, limit=limit)
    setup = Setup(model=ModelConfig(), gpu=GpuConfig(), network=NetworkConfig(), storage=StorageConfig())
    ctx = Context(setup=setup, workload=workload, seed=0, config_hash="trace_hour")
    params = {"hbm_capacity_GiB": 2, "eviction": "lru", "upload_delay_s": 1.0, "path": "gather"}
    rows = []
    for object_tier in (False, True):
        t0, c0 = time.perf_counter(), time.process_time()
        reqs, tokens, _ = plan_requests(ctx, trace, dram_GiB, object_tier, params)
        log(f"planned {len(reqs)} requests (object tier {'on' if object_tier else 'off'}) "
            f"in {time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} CPU-s)")  # fmt: skip
        total = sum(tokens.values())
        for policy in policies:
            t0, c0 = time.perf_counter(), time.process_time()
            run_setup = dataclasses.replace(setup, policy=PolicyConfig(name=policy))
            records, _ = simulate(reqs, run_setup, "trace_hour", ctx.config_hash, 0, note=policy)
            s = summarize(to_frame(records), by=()).iloc[0].to_dict()
            wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            log(f"  {policy:16s} TTFT mean {s['ttft_mean_ms']:.1f} ms, added {s['added_ttft_mean_ms']:.1f} ms "
                f"({wall_s:.1f} s, {cpu_s:.1f} CPU-s)")  # fmt: skip
            rows.append(
                {
                    "object_tier": object_tier,
                    "policy": policy,
                    "dram_capacity_GiB": dram_GiB,
                    "requests": int(s["requests"]),
                    **{k: float(s[k]) for k in ("ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms")},
                    "added_ttft_mean_ms": float(s["added_ttft_mean_ms"]),
                    "added_ttft_p99_ms": float(s["added_ttft_p99_ms"]),
                    **{f"{t}_token_share": tokens[t] / total for t in ("hbm", "dram", "object", "recompute")},
                    "object_bytes": int(setup.spec.kv_bytes(tokens["object"])),
                    "simulate_wall_s": wall_s,
                    "simulate_cpu_s": cpu_s,
                }
            )
    return rows


def plot(rows: list[dict], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        sel = [r for r in rows if r["policy"] == policy]
        x = np.arange(len(sel)) + i * width
        label = POLICY_LABELS.get(policy, policy)
        axes[0].bar(x, [r["ttft_mean_ms"] for r in sel], width, label=f"{label}: mean")
        axes[0].scatter(x, [r["ttft_p99_ms"] for r in sel], marker="_", s=300, color="k")
        axes[1].bar(x, [r["added_ttft_mean_ms"] for r in sel], width, label=label)
    ticks = ["HBM + DRAM only", "with object tier"]
    for ax, ylabel in zip(axes, ("TTFT (ms); black bar: P99", "added TTFT over local DRAM layerwise (ms)")):
        ax.set_xticks(np.arange(2) + width * (len(policies) - 1) / 2, ticks)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].axhline(0, color="k", lw=0.5)
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.trace_hour", description=__doc__.split("\n\n")[1])
    ap.add_argument(
        "--trace", default=str(SAMPLE), help="Mooncake-format JSONL (default: the bundled sample)"
    )
    ap.add_argument("--dram-GiB", type=float, default=8.0)
    ap.add_argument("--policies", default="equal,srtf,bandwidth_aware")
    ap.add_argument("--limit", type=int, default=None, help="first N requests only")
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "sim" / "trace_hour.json"))
    args = ap.parse_args(argv)
    trace_path = Path(args.trace)
    if not trace_path.exists():
        ap.error(f"{trace_path} does not exist (the full hour: see --help for where to get it)")

    def log(msg: str) -> None:
        print(f"[trace_hour {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    t0 = time.perf_counter()
    rows = replay(trace_path, args.dram_GiB, policies, args.limit, log)
    out = Path(args.out)
    doc = {
        "command": " ".join(["python -m sim.trace_hour", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, python {platform.python_version()}",
        "trace": trace_path.name,
        "setup": "Llama-3.1-8B, H100 profile, 100 Gbps RoCE to the object tier, RGW-like server, 2 GiB HBM, "
        f"{args.dram_GiB:g} GiB DRAM, LRU, write-back after 1 s",
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"), f"{trace_path.name}, {rows[0]['requests']} requests; {doc['setup']}")
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
