"""Calibration: fit the simulator's link efficiency and per-request overhead from single-transfer probes.

The simulator models an object-tier request as a fixed cost (``storage.request_overhead_s + ttfb_s +
network.rtt_s``) followed by a fluid transfer at ``link_Gbps * efficiency``.  The probes
(``testbed.harness.probes``, run by a worker on a client host) measure exactly those two numbers on the real
path (topology, server, client), bottom-up; every probe reads objects it has not read before:

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
from pathlib import Path

import numpy as np

from scheduler.units import gbps_to_Bps
from testbed.harness.experiments import compose_testbed, wants_help
from testbed.harness.probes import probe_requests
from testbed.harness.runner import build_harness


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
    overrides = list(sys.argv[1:] if argv is None else argv)
    if wants_help(overrides):
        print(
            f"usage: python -m testbed.validation.calibrate [hydra overrides of configs/testbed.yaml]\n\n{__doc__}"
        )
        return 0
    cfg = compose_testbed(overrides)
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
