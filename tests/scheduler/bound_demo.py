"""Print mean added TTFT of equal, srtf, bandwidth_aware and the offline bound on contended single links.

    .venv/bin/python -m tests.scheduler.bound_demo [--time-limit-s 20] [--quick] [--out PATH]

Instances: Llama-3.1-8B geometry, requests of mixed (cached, new) token counts (per-layer compute from the
H100 profile), arriving uniformly over a spread, one shared link.  The bound is the MILP of
``scheduler.bound`` (its dual bound when the time limit stops it) and never exceeds the optimum.  The table
is printed and saved as JSON (command, machine, date, rows) to ``--out``
(default ``results/bench/scheduler_bound_demo.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

from scheduler.bound import offline_bound
from scheduler.fluid import mean_added_ttft_s, run_fluid
from scheduler.policies import get_policy
from tests.scheduler.instances import llama_mix

INSTANCES = [
    # (seed, requests, link Gbps, arrival spread s)
    (0, 4, 25, 0.0),
    (1, 4, 50, 0.05),
    (2, 8, 50, 0.1),
    (3, 8, 100, 0.1),
    (4, 12, 100, 0.2),
    (5, 16, 100, 0.3),
    (6, 8, 200, 0.1),
    (7, 16, 400, 0.2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time-limit-s", type=float, default=20.0, help="MILP time limit per instance")
    ap.add_argument("--quick", action="store_true", help="LP relaxation only (looser, a second each)")
    ap.add_argument(
        "--out", default="results/bench/scheduler_bound_demo.json", help="JSON output ('' for none)"
    )
    args = ap.parse_args()
    rows = []
    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}")
    print(f"# bound: {'LP relaxation' if args.quick else f'MILP, time limit {args.time_limit_s:g} s'}")
    header = "| n | Gbps | spread ms | equal ms | srtf ms | bandwidth_aware ms | bound ms | ba / bound | bound status | solve s |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for seed, n, gbps, spread in INSTANCES:
        reqs, links = llama_mix(seed, n, gbps, spread)
        vals = {
            p: mean_added_ttft_s(run_fluid(reqs, links, get_policy(p), check=True))
            for p in ("equal", "srtf", "bandwidth_aware")
        }
        b = offline_bound(
            reqs,
            links,
            mip=not args.quick,
            time_limit_s=args.time_limit_s,
            clock=time.perf_counter,
            num_slots=120,
            num_buckets=40,
        )
        ratio = vals["bandwidth_aware"] / b.mean_added_ttft_s if b.mean_added_ttft_s > 0 else float("nan")
        rows.append(
            {
                "seed": seed,
                "requests": n,
                "link_Gbps": gbps,
                "spread_s": spread,
                **{f"{p}_added_ttft_s": v for p, v in vals.items()},
                "bound_added_ttft_s": b.mean_added_ttft_s,
                "bandwidth_aware_over_bound": ratio,
                "bound_status": b.status,
                "bound_solve_s": b.solve_s,
            }
        )
        print(
            f"| {n} | {gbps} | {spread * 1e3:.0f} | {vals['equal'] * 1e3:.1f} | {vals['srtf'] * 1e3:.1f} | "
            f"{vals['bandwidth_aware'] * 1e3:.1f} | {b.mean_added_ttft_s * 1e3:.1f} | {ratio:.3f} | {b.status} | "
            f"{b.solve_s:.1f} |",
            flush=True,
        )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {
            "command": " ".join(
                [os.path.basename(sys.executable), "-m", "tests.scheduler.bound_demo", *sys.argv[1:]]
            ),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "bound": "LP relaxation" if args.quick else f"MILP, time limit {args.time_limit_s:g} s",
            "rows": rows,
        }
        with open(args.out, "w") as fh:
            json.dump(meta, fh, indent=1)
        print(f"# saved {args.out}")


if __name__ == "__main__":
    main()
