"""Speed benchmark: simulated requests per second and events per second for 10,000 requests.

``python -m sim.bench [--requests N] [--policy NAME] [--rate R] [--out results/bench/sim.json]`` generates the
synthetic shared-prefix workload (Poisson arrivals), serves every request's prefix from the object tier with
the gather path (so requests contend for the 100 Gbps link under the policy), and reports wall time, simulated
requests per second, SimPy events and fluid timer events per second.  The result is saved as JSON with the
command, the machine and the date.

The default rate, 5 requests/s, loads the 100 Gbps link to about 40%: the link carries about 12.5 of these
requests a second, so a rate above that (the old default, 20, is about 1.6x) makes flows pile up without
bound and the run does not finish in reasonable time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sim.config import PolicyConfig, WorkloadConfig
from sim.runner import SimRequest, simulate
from sim.setup import Setup
from sim.workloads import synthetic

# Below the link's capacity (about 12.5 requests/s of this workload on 100 Gbps): about 40% utilisation.
DEFAULT_RATE_PER_S = 5.0


def bench_requests(n: int, seed: int, rate_per_s: float, chunk_tokens: int) -> list[SimRequest]:
    wl = WorkloadConfig(num_requests=n, rate_per_s=rate_per_s)
    trace = synthetic(wl, np.random.default_rng(seed))
    reqs = []
    for r in trace:
        # Everything but the newest block is a cached prefix in the object tier (whole chunks only).
        cached = max(0, (r.input_length - wl.block_tokens) // chunk_tokens * chunk_tokens)
        reqs.append(SimRequest(r.request_id, r.arrival_s, cached, r.input_length - cached, "gather"))
    return reqs


def run_bench(
    n: int = 10_000, policy: str = "bandwidth_aware", seed: int = 0, rate_per_s: float = DEFAULT_RATE_PER_S
) -> dict:
    setup = Setup(policy=PolicyConfig(name=policy))
    reqs = bench_requests(n, seed, rate_per_s, setup.model.chunk_tokens)
    t0, c0 = time.perf_counter(), time.process_time()
    records, stats = simulate(reqs, setup, "bench", "bench", seed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ttft = np.array([r.ttft_s for r in records])
    return {
        "requests": n,
        "policy": policy,
        "rate_per_s": rate_per_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "sim_requests_per_s": n / wall,
        "sim_requests_per_cpu_s": n / cpu,
        "simpy_events_per_cpu_s": stats.simpy_events / cpu,
        "simpy_events": stats.simpy_events,
        "simpy_events_per_s": stats.simpy_events / wall,
        "fluid_timer_events": stats.timer_events,
        "fluid_timer_events_per_s": stats.timer_events / wall,
        "stale_timers": stats.stale_timers,
        "policy_calls": stats.policy_calls,
        "single_flow_skips": stats.single_flow_skips,
        "simulated_s": stats.sim_end_s,
        "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
        "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
        "link_utilisation": stats.utilisation,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--policy", default="bandwidth_aware")
    ap.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE_PER_S,
        help="Poisson arrival rate in requests/s (default %(default)s: about 40%% of the 100 Gbps link, which "
        "carries about 12.5 requests/s; above that flows pile up and the run does not finish)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench/sim.json")
    args = ap.parse_args(argv)
    res = run_bench(args.requests, args.policy, args.seed, args.rate)
    res.update(
        command="python -m sim.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, {platform.processor() or 'cpu'}",
        python=platform.python_version(),
        date_utc=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # Wall-clock numbers depend on other load on the machine; the cpu_s-based ones much less.
        load_average_1m=os.getloadavg()[0],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
