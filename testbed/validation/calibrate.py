"""Calibration: fit the simulator's link efficiency and per-request overhead from single-transfer probes.

The simulator models an object-tier request as a fixed cost (``storage.request_overhead_s + ttfb_s +
network.rtt_s``) followed by a fluid transfer at ``link_Gbps * efficiency``.  The probes measure exactly
those two numbers on the real path (topology, server, client), bottom-up:

Every probe reads objects it has not read before (a fresh prompt per repetition), as a real request does.

1. *single GET*: one whole-object GET of one chunk (latency);
2. *N concurrent GETs*: N whole-object GETs at once (the aggregate goodput of plain S3 requests);
3. *one gather*: a gather of k chunks for several k, timing the first layer and the last byte.  The
   goodput ``B`` is the streaming rate between them (no fixed cost in it); a least-squares line through
   ``first_layer - layer_bytes / B = a + c * k`` gives the per-request overhead ``a`` and the server's
   per-chunk cost ``c`` (it opens and checks every object before the first byte:
   ``storage.gather_per_chunk_s``);
4. *per-layer compute*: the emulated worker's layer loop alone (the sleep overshoot per layer).

``python -m testbed.validation.calibrate topology=netns`` runs the probes on the configured topology and writes
``results/testbed/calibration.json``; ``fit`` turns probe results into the overrides
(``network.efficiency``, ``storage.request_overhead_s``, ``storage.gather_per_chunk_s``, ``storage.ttfb_s``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from scheduler.units import gbps_to_Bps
from testbed import REPO_ROOT

PROBE_TOTAL_MIB = (0.5, 2, 8, 32, 64)  # gather sizes of the probes (rounded to whole chunks)


def probe_sizes(chunk_bytes: int) -> list[int]:
    return sorted({max(1, round(t * 2**20 / chunk_bytes)) for t in PROBE_TOTAL_MIB})


def probe_requests(chunk_tokens: int, chunk_bytes: int, repeats: int = 5) -> list:
    """Probe prompts: ``repeats`` fresh prefixes per size (every probe gathers objects for the first time,
    as a real request does), plus one to warm the connection."""
    from testbed.harness.runner import Req, fresh_prompt

    reqs = [Req("probe-warm-0", 0.0, chunk_tokens, 1, fresh_prompt(chunk_tokens + 1))]
    for k in probe_sizes(chunk_bytes):
        for i in range(repeats):
            reqs.append(Req(f"probe-{k}-{i}", 0.0, k * chunk_tokens, 1, fresh_prompt(k * chunk_tokens + 1)))
    return reqs


def run_probes(plan: dict, repeats: int = 5, concurrent: int = 8) -> dict:
    """Executed by ``python -m testbed.harness.worker probe`` on a client host; the plan's requests are the probes."""
    from testbed.harness.worker import _sleep_until, make_client, request_names

    spec = plan["spec"]
    reqs = plan["requests"]
    names = {r.request_id: request_names(plan, r) for r in reqs}
    slice_bytes = spec.kv_bytes_per_chunk_layer(int(plan["chunk_tokens"]))
    out: dict = {"slice_bytes": slice_bytes, "num_layers": spec.num_layers}
    client = make_client(plan, concurrency=concurrent + 2)
    try:
        for _ in client.load_layers(names["probe-warm-0"]):  # connection and code paths warm
            pass
        s3 = client._s3
        s3.get_object(Bucket=plan["bucket"], Key=names["probe-warm-0"][0])["Body"].read()
        chunk_bytes = None
        lat = []
        firsts = [n[0] for rid, n in names.items() if rid != "probe-warm-0"]
        for name in firsts[:repeats]:
            t0 = time.perf_counter()
            body = s3.get_object(Bucket=plan["bucket"], Key=name)["Body"].read()
            lat.append(time.perf_counter() - t0)
            chunk_bytes = len(body)
        out["single_get"] = {"bytes": chunk_bytes, "latency_s": lat}
        pool_names = [n for r in reqs if r.request_id != "probe-warm-0" for n in names[r.request_id]]
        times = []
        with ThreadPoolExecutor(concurrent) as pool:
            for i in range(repeats):
                many = pool_names[i * concurrent : (i + 1) * concurrent]
                if len(many) < concurrent:
                    break
                t0 = time.perf_counter()
                list(pool.map(lambda n: s3.get_object(Bucket=plan["bucket"], Key=n)["Body"].read(), many))
                times.append(time.perf_counter() - t0)
        out["concurrent_gets"] = {"n": concurrent, "bytes_each": chunk_bytes, "wall_s": times}
        gathers = []
        for r in reqs:
            if r.request_id == "probe-warm-0":
                continue
            ns = names[r.request_id]
            t0 = time.perf_counter()
            first = None
            total = 0
            for layer, view in client.load_layers(ns):
                if layer == 0:
                    first = time.perf_counter() - t0
                total += memoryview(view).nbytes
            last = time.perf_counter() - t0
            gathers.append({"chunks": len(ns), "layer_bytes": total // spec.num_layers, "total_bytes": total,
                            "first_layer_s": first, "last_byte_s": last})  # fmt: skip
        out["gather"] = gathers
        layer_s = 1.5e-3
        errs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            busy = t0
            for _ in range(spec.num_layers):
                busy += layer_s
                _sleep_until(busy)
            errs.append((time.perf_counter() - t0 - spec.num_layers * layer_s) / spec.num_layers)
        out["compute"] = {"layer_s": layer_s, "overshoot_per_layer_s": errs}
    finally:
        client.close()
    return out


def fit(probes: dict, link_Gbps: float, rtt_s: float = 0.0) -> dict:
    """Per-request overhead ``a``, per-chunk gather overhead ``c`` and goodput ``B`` from the gather probes
    (see the module docstring); the fit's error is reported over first-layer and last-byte times."""
    g = probes["gather"]
    # Goodput from the streaming part alone (first layer to last byte): no fixed costs in it.
    # Only the large probes: a shaper's burst lets small transfers run above the line rate.
    top = max(p["total_bytes"] for p in g)
    big = [p for p in g if p["total_bytes"] >= top / 4 and p["last_byte_s"] > p["first_layer_s"]]
    B = float(
        np.median(
            [(p["total_bytes"] - p["layer_bytes"]) / (p["last_byte_s"] - p["first_layer_s"]) for p in big]
        )
    )
    # The fixed costs from the first-layer times: first - layer_bytes / B = a + c * chunks.
    n = np.array([p["chunks"] for p in g], dtype=float)
    y0 = np.array([p["first_layer_s"] - p["layer_bytes"] / B for p in g])
    (a, c), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], axis=1), y0, rcond=None)
    c = max(0.0, float(c))
    n = np.concatenate([n, n])
    x = np.array([p["layer_bytes"] for p in g] + [p["total_bytes"] for p in g], dtype=float)
    y = np.array([p["first_layer_s"] for p in g] + [p["last_byte_s"] for p in g], dtype=float)
    line_Bps = gbps_to_Bps(link_Gbps) if link_Gbps > 0 else math.nan
    eff = B / line_Bps if link_Gbps > 0 else math.nan
    pred = a + c * n + x / B
    single = probes.get("single_get", {})
    conc = probes.get("concurrent_gets", {})
    return {
        "per_request_s": float(a),
        "gather_per_chunk_s": c,
        "goodput_Bps": float(B),
        "goodput_Gbps": float(B * 8 / 1e9),
        "efficiency": float(eff),
        "fit_rel_err_median": float(np.median(np.abs(pred - y) / y)),
        "overrides": {
            "network.efficiency": round(float(min(eff, 1.0)), 4) if math.isfinite(eff) else None,
            "network.rtt_s": rtt_s,
            "storage.request_overhead_s": round(max(0.0, float(a) - rtt_s), 6),
            "storage.ttfb_s": 0.0,
            "storage.gather_per_chunk_s": round(c, 7),
        },
        "single_get_latency_ms": float(np.median(single.get("latency_s", [math.nan])) * 1e3),
        "concurrent_gets_Gbps": float(conc["n"] * conc["bytes_each"] * 8 / 1e9 / np.median(conc["wall_s"]))
        if conc
        else math.nan,
        "compute_overshoot_per_layer_us": float(np.median(probes["compute"]["overshoot_per_layer_s"]) * 1e6)
        if "compute" in probes
        else math.nan,
    }


def calibrate(h, repeats: int = 5) -> dict:
    """Run the probes through the harness ``h`` (unpaced server) and fit; returns probes + fit."""
    ct = h.setup.model.chunk_tokens
    reqs = probe_requests(ct, h.setup.spec.kv_bytes_per_chunk(ct), repeats)
    url = h.storage_url("equal", 0.0)
    plan = h.plan(url, reqs)
    h.run_worker_action("warmup", plan)
    plan["probe_repeats"] = repeats
    probes = h.run_worker_action("probe", plan)
    link = float(h.topology.cfg.storage_Gbps or 0.0)
    return {
        "probes": probes,
        "fit": fit(probes, link, h.setup.network.rtt_s if link else 0.0),
        "link_Gbps": link,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m testbed.validation.calibrate [hydra overrides]``: probes on the configured topology."""
    from hydra import compose, initialize_config_dir

    from testbed.harness.runner import register_testbed_configs
    from testbed.validation.validate import build_harness

    register_testbed_configs()
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("testbed", overrides=overrides)
    with build_harness(cfg) as h:
        res = calibrate(h)
    res["command"] = "python -m testbed.validation.calibrate " + " ".join(overrides)
    out = Path(cfg.get("results_dir", "results/testbed")) / "calibration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["fit"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
