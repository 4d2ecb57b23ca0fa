"""Experiment 5, ``trace``: a Mooncake-format trace through the HBM, DRAM and object tiers.

For each DRAM capacity, with and without the object tier, the requests of the workload (synthetic shared-
prefix sessions by default, or a Mooncake JSONL with ``workload=mooncake``) are planned in arrival order:

1. The prompt's full chunks get keys from its block hash ids (a 512-token Mooncake block is
   ``block_tokens / chunk_tokens`` chunks, each named by ``(hash_id, j)``).
2. ``scheduler.tiers.TierManager.lookup_prefix`` gives the cached prefix per tier; the planner
   (``scheduler.planner.plan_fetch``) decides how much of it to fetch and from where, or to recompute.
3. The plan becomes a storage path: nothing to move (``hbm``), ``dram_layerwise``, ``gather`` (the object
   tier; DRAM-resident chunks of the same prefix stream over PCIe in parallel and are not the bottleneck, so
   only the object part is modelled as a transfer), or ``recompute``.
4. The prompt's chunks are written back: HBM and DRAM now, the object tier after ``upload_delay_s``
   (``TierManager.write_back`` / ``complete_writes``); a chunk the object tier has is not written again.

Then all requests run in one SimPy simulation, sharing the links.  Simplification: tier state is updated at
each request's arrival (as if its prefill and write-back were instant), so a request cannot hit chunks of a
request that is still in flight in reality only if they arrive within one TTFT of each other.

Summary per configuration: token hit rate per tier, TTFT mean/percentiles, and at the end the DRAM the
object tier saves: the smallest DRAM capacity that, with the object tier, reaches the mean TTFT of the
largest DRAM without it (within ``same_ttft_tolerance``), versus the smallest that does so without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pandas as pd

from scheduler.planner import plan_fetch
from scheduler.tiers import TierManager
from scheduler.units import GiB
from sim.draws import sub_seed
from sim.experiments import Context, ExperimentResult, register
from sim.metrics import summarize, to_frame
from sim.runner import SimRequest, simulate
from sim.setup import setup_compute
from sim.workloads import TraceRequest, make_workload


def chunk_keys_of(req: TraceRequest, block_tokens: int, chunk_tokens: int, cache: dict) -> list[str]:
    """Keys of the prompt's full chunks, derived from its block hash ids (chained by construction)."""
    per_block = max(1, block_tokens // chunk_tokens)
    n_chunks = min(req.input_length // chunk_tokens, len(req.hash_ids) * per_block)
    keys = []
    for i in range(n_chunks):
        h, j = req.hash_ids[i // per_block], i % per_block
        k = cache.get((h, j))
        if k is None:
            k = cache[(h, j)] = hashlib.sha256(f"{h}:{j}".encode()).hexdigest()
        keys.append(k)
    return keys


def plan_requests(ctx: Context, trace: list[TraceRequest], dram_GiB: float, object_tier: bool, p: dict):
    """Tier lookups, plans and write-backs in arrival order -> (SimRequests, per-tier token counts)."""
    setup = ctx.setup
    m, comp, st = setup.spec, setup_compute(setup), setup.storage
    chunk = setup.model.chunk_tokens
    chunk_bytes = m.kv_bytes_per_chunk(chunk)
    tiers = TierManager(
        hbm_bytes=float(p.get("hbm_capacity_GiB", st.hbm_capacity_GiB)) * GiB,
        dram_bytes=float(dram_GiB) * GiB,
        object_bytes=float(st.object_capacity_GiB) * GiB if object_tier else 0.0,
        policy=str(p.get("eviction", "lru")),
    )
    links = setup.links()
    bandwidth = {
        "dram": links["pcie"].capacity_Bps,
        "object": min(links["net"].capacity_Bps, links["server"].capacity_Bps),
    }
    overhead = {"dram": 0.0, "object": st.per_request_s + setup.network.rtt_s}
    upload_delay = float(p.get("upload_delay_s", 1.0))
    key_cache: dict = {}
    out: list[SimRequest] = []
    tokens = {"hbm": 0, "dram": 0, "object": 0, "recompute": 0}
    for req in trace:
        now = req.arrival_s
        # Uploads queued at least upload_delay ago have finished.  The queue is in arrival order (requests
        # are planned in arrival order), so they are its head: count until the first that has not.
        ready = 0
        for wb in tiers.write_queue.values():
            if not wb.queued_s + upload_delay <= now:
                break
            ready += 1
        if ready:
            tiers.complete_writes(now, ready)
        keys = chunk_keys_of(req, int(ctx.workload.block_tokens), chunk, key_cache)
        cached = {t: n * chunk for t, n in tiers.lookup_prefix(keys, now).items()}
        plan = plan_fetch(req.input_length, cached, m, comp, bandwidth, overhead, chunk)
        prefix = plan.fetch_tokens
        new = req.input_length - prefix
        if prefix == 0:
            path, fetch, tier = "recompute", 0, "none"
        elif plan.object_tokens:
            path, fetch, tier = str(p.get("path", "gather")), plan.object_tokens, "object"
        elif plan.dram_tokens:
            path, fetch, tier = "dram_layerwise", plan.dram_tokens, "dram"
        else:
            path, fetch, tier = "hbm", 0, "hbm"
        tokens["hbm"] += plan.hbm_tokens
        tokens["dram"] += plan.dram_tokens
        tokens["object"] += plan.object_tokens
        tokens["recompute"] += new
        out.append(
            SimRequest(
                req.request_id,
                req.arrival_s,
                prefix,
                new,
                path,
                tier,
                client=req.client,
                think_s=req.think_s,
                fetch_tokens=fetch,
            )  # fmt: skip
        )
        tiers.write_back(keys, chunk_bytes, "default", now, to_hbm=True)
    return out, tokens, tiers


def trace(ctx: Context, p: dict) -> ExperimentResult:
    exp = "trace"
    wl = ctx.workload
    if p.get("num_requests"):
        wl = dataclasses.replace(wl, num_requests=int(p["num_requests"]))
    workload = make_workload(wl, np.random.default_rng(sub_seed(ctx.seed, exp)))
    frames, rows = [], []
    for dram_GiB in p["dram_capacity_GiB"]:
        for obj in p["object_tier"]:
            reqs, tokens, tiers = plan_requests(ctx, workload, float(dram_GiB), bool(obj), p)
            note = f"dram={dram_GiB}GiB,object={'on' if obj else 'off'}"
            recs, stats = simulate(reqs, ctx.setup, exp, ctx.config_hash, ctx.seed, note=note)
            ctx.progress(1)
            df = to_frame(recs)
            df["dram_capacity_GiB"] = float(dram_GiB)
            df["object_tier"] = bool(obj)
            frames.append(df)
            s = summarize(df, by=()).iloc[0].to_dict()
            total = sum(tokens.values())
            counters = tiers.counters()
            rows.append(
                {
                    "experiment": exp,
                    "dram_capacity_GiB": float(dram_GiB),
                    "object_tier": bool(obj),
                    **{
                        k: s[k]
                        for k in ("requests", "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms")
                    },
                    "hit_rate_tokens": (total - tokens["recompute"]) / total if total else math.nan,
                    "hbm_token_share": tokens["hbm"] / total if total else math.nan,
                    "dram_token_share": tokens["dram"] / total if total else math.nan,
                    "object_token_share": tokens["object"] / total if total else math.nan,
                    "dram_chunk_hit_rate": _hit_rate(counters["dram"]),
                    "object_chunk_hit_rate": _hit_rate(counters["object"]),
                    "object_writes": tiers.writes_completed,
                    "object_writes_skipped": tiers.writes_skipped,
                    # Mean load / capacity over the simulated span.
                    **{f"{link}_utilisation": u for link, u in stats.utilisation.items()},
                }
            )
    summary = pd.DataFrame(rows)
    requests = pd.concat(frames, ignore_index=True)
    return ExperimentResult(exp, requests, summary, dram_saving(summary, float(p["same_ttft_tolerance"])))


def _hit_rate(c) -> float:
    n = c.hits + c.misses
    return c.hits / n if n else math.nan


def dram_saving(summary: pd.DataFrame, tol: float) -> dict:
    """DRAM needed for the same mean TTFT with and without the object tier (see module docstring)."""
    off = summary[~summary.object_tier].sort_values("dram_capacity_GiB")
    on = summary[summary.object_tier].sort_values("dram_capacity_GiB")
    if not len(off) or not len(on):
        return {}
    target = float(off.ttft_mean_ms.iloc[-1]) * (1 + tol)
    need_off = off[off.ttft_mean_ms <= target].dram_capacity_GiB.min()
    need_on = on[on.ttft_mean_ms <= target].dram_capacity_GiB.min()
    saved = float(need_off - need_on) if not (math.isnan(need_off) or math.isnan(need_on)) else math.nan
    return {
        "trace_target_ttft_mean_ms": target,
        "trace_dram_GiB_without_object_tier": float(need_off),
        "trace_dram_GiB_with_object_tier": float(need_on),
        "trace_dram_GiB_saved": saved,
        "trace_note": "smallest swept DRAM capacity reaching the mean TTFT of the largest DRAM without the object "
        f"tier (+{tol:.0%}); nan: not reached within the sweep",
    }


register("trace", trace)
