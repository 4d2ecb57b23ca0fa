"""Calibration probes: single transfers on the real path, timed on a client host.

``python -m testbed.harness.worker probe --plan P --out O`` runs ``run_probes`` on a GPU-client host; the
plan's requests are the probes ``probe_requests`` builds.  Every probe reads objects it has not read before
(a fresh prompt per repetition), as a real request does.  Bottom-up:

1. *single GET*: one whole-object GET of one chunk (latency, s);
2. *N concurrent GETs*: N whole-object GETs at once (wall time, s);
3. *one gather*: a gather of k chunks for several k (``PROBE_TOTAL_MIB``), timing the first layer and the
   last byte (s);
4. *per-layer compute*: the emulated worker's layer loop alone (the sleep overshoot per layer, s).

``testbed.validation.calibrate.fit`` turns the result into the simulator's parameters.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from testbed.harness.emulate import sleep_until
from testbed.harness.plan import make_client, request_names
from testbed.harness.requests import Req, fresh_prompt

PROBE_TOTAL_MIB = (0.5, 2, 8, 32, 64)  # gather sizes of the probes (rounded to whole chunks)
WARM_ID = "probe-warm-0"
EMULATED_LAYER_S = 1.5e-3  # the per-layer compute the compute probe emulates (s)


def probe_sizes(chunk_bytes: int) -> list[int]:
    """Chunks per gather probe for chunk objects of ``chunk_bytes``."""
    return sorted({max(1, round(t * 2**20 / chunk_bytes)) for t in PROBE_TOTAL_MIB})


def probe_requests(chunk_tokens: int, chunk_bytes: int, repeats: int = 5) -> list[Req]:
    """Probe prompts: ``repeats`` fresh prefixes per size (every probe gathers objects for the first time,
    as a real request does), plus one to warm the connection."""
    reqs = [Req(WARM_ID, 0.0, chunk_tokens, 1, fresh_prompt(chunk_tokens + 1))]
    for k in probe_sizes(chunk_bytes):
        for i in range(repeats):
            reqs.append(Req(f"probe-{k}-{i}", 0.0, k * chunk_tokens, 1, fresh_prompt(k * chunk_tokens + 1)))
    return reqs


def run_probes(plan: dict, repeats: int = 5, concurrent: int = 8) -> dict:
    """Run the probes of the plan's requests on this host (see the module docstring); times in seconds."""
    from testbed.client.core import make_boto3_client

    spec = plan["spec"]
    names = {r.request_id: request_names(plan, r) for r in plan["requests"]}
    slice_bytes = spec.kv_bytes_per_chunk_layer(int(plan["chunk_tokens"]))
    out: dict = {"slice_bytes": slice_bytes, "num_layers": spec.num_layers}
    client = make_client(plan, concurrency=concurrent + 2)
    try:
        for _ in client.load_layers(names[WARM_ID]):  # connection and code paths warm
            pass
        probes = {rid: n for rid, n in names.items() if rid != WARM_ID}
        # Plain S3 GETs through boto3, as any S3 client reads (no gather).
        s3 = make_boto3_client(
            plan["endpoint"], plan["access_key"], plan["secret_key"], plan.get("region", "us-east-1"),
            float(plan.get("timeout_s", 60.0)), concurrent + 2,
        )  # fmt: skip
        try:
            out.update(get_probes(s3, plan["bucket"], names[WARM_ID][0], probes, repeats, concurrent))
        finally:
            s3.close()
        out["gather"] = gather_probes(client, probes, spec.num_layers)
        out["compute"] = compute_probe(spec.num_layers, repeats)
    finally:
        client.close()
    return out


def get_probes(s3, bucket: str, warm_name: str, probes: dict[str, list[str]], repeats: int, concurrent: int):
    """Whole-object GET latency (one at a time) and the wall time of ``concurrent`` GETs at once."""

    def get(name: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=name)["Body"].read()

    get(warm_name)
    chunk_bytes = None
    latency_s = []
    for name in [n[0] for n in probes.values()][:repeats]:
        t0 = time.perf_counter()
        chunk_bytes = len(get(name))
        latency_s.append(time.perf_counter() - t0)
    pool_names = [n for ns in probes.values() for n in ns]
    wall_s = []
    with ThreadPoolExecutor(concurrent) as pool:
        for i in range(repeats):
            many = pool_names[i * concurrent : (i + 1) * concurrent]
            if len(many) < concurrent:
                break
            t0 = time.perf_counter()
            list(pool.map(get, many))
            wall_s.append(time.perf_counter() - t0)
    return {
        "single_get": {"bytes": chunk_bytes, "latency_s": latency_s},
        "concurrent_gets": {"n": concurrent, "bytes_each": chunk_bytes, "wall_s": wall_s},
    }


def gather_probes(client, probes: dict[str, list[str]], num_layers: int) -> list[dict]:
    """One gather per probe: chunks, layer and total bytes, first-layer and last-byte time (s)."""
    out = []
    for ns in probes.values():
        t0 = time.perf_counter()
        first = None
        total = 0
        for layer, view in client.load_layers(ns):
            if layer == 0:
                first = time.perf_counter() - t0
            total += memoryview(view).nbytes
        last = time.perf_counter() - t0
        out.append({"chunks": len(ns), "layer_bytes": total // num_layers, "total_bytes": total,
                    "first_layer_s": first, "last_byte_s": last})  # fmt: skip
    return out


def compute_probe(num_layers: int, repeats: int) -> dict:
    """The emulated layer loop alone: overshoot per layer (s) of sleeping to ``EMULATED_LAYER_S`` deadlines."""
    errs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        busy = t0
        for _ in range(num_layers):
            busy += EMULATED_LAYER_S
            sleep_until(busy)
        errs.append((time.perf_counter() - t0 - num_layers * EMULATED_LAYER_S) / num_layers)
    return {"layer_s": EMULATED_LAYER_S, "overshoot_per_layer_s": errs}
