"""The GPU-client side of the testbed: run a plan of requests against the object tier and time each one.

``python -m testbed.harness.worker warmup --plan P`` writes every chunk object the plan's requests will read
(the warm-up that populates the object tier); ``... probe --plan P --out O`` runs the calibration probes
(``testbed.harness.probes``); ``... run --plan P --out O`` waits for the start barrier, issues the requests
(open loop: each at its arrival offset; closed loop: one thread per client, ``think_s`` between requests)
and writes one row per request to ``O``.  On a cluster this is the command each GPU node runs (through its
agent); in the ``local`` and ``netns`` topologies the harness starts it.  The plan's format:
``testbed.harness.plan``.

Compute modes (``compute_mode``, recorded in every row):

* ``emulated``: the engine's structure without a GPU (``testbed.harness.emulate``): real bytes on a real
  network, the simulator's layer model for the GPU.
* ``cpu`` / ``gpu``: the torch layerwise engine (``testbed.engine.prefill.PrefillEngine`` with
  ``testbed.engine.objectsource.ObjectCacheSource``) on the CPU or on CUDA, random weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

from scheduler.geometry import ModelSpec
from testbed.harness.emulate import emulated_request, sleep_until
from testbed.harness.plan import (
    NAMESPACE,
    PlannedRequest,
    block_token_ids,
    load_plan,
    make_client,
    request_names,
    warmup,
)


class EngineRunner:
    """``cpu``/``gpu`` compute: the torch layerwise engine against the object tier."""

    def __init__(self, plan: dict, device: str, client) -> None:
        import torch

        from testbed.engine.kvload import LayerCopier
        from testbed.engine.model import build_model
        from testbed.engine.objectsource import ObjectCacheSource
        from testbed.engine.prefill import PrefillEngine

        spec = plan["spec"]
        self.torch = torch
        self.model = build_model(spec.name, device=device, fast_init=True)
        ct = int(plan["chunk_tokens"])
        self.engine = PrefillEngine(self.model, chunk_tokens=ct, namespace=NAMESPACE)
        max_chunks = max([r.cached_tokens // ct for r in plan["requests"]] + [1])
        copier = LayerCopier(self.model.spec, ct, torch.device(device), max_chunks, self.model.cfg.dtype)
        self.source = ObjectCacheSource(client, self.engine.scope, copier, check_exists=False)
        self.lock = threading.Lock()  # one GPU: requests take turns on the engine
        self.plan = plan

    def run(self, req: PlannedRequest, t0: float) -> dict:
        ids = block_token_ids(req.block_ids, int(self.plan["block_tokens"]), self.model.spec.vocab_size)
        ids = ids[: req.cached_tokens + req.new_tokens]
        ct = int(self.plan["chunk_tokens"])
        with self.lock:
            res = self.engine.prefill(ids, self.source, max_cached_chunks=req.cached_tokens // ct, save=False)
        ttft = time.perf_counter() - t0
        waits = res.load.wait_s if res.load is not None else []
        return {
            "ttft_s": ttft,
            "first_layer_wait_s": float(waits[0]) if waits else 0.0,
            "stall_s": float(sum(waits[1:])) if waits else 0.0,
            "bytes_fetched": int(res.load.bytes_loaded) if res.load is not None else 0,
            "compute_s": math.nan,
            "path": "gather" if res.cached_tokens else "recompute",
            "note": res.fallback,
        }


# --- the run -------------------------------------------------------------------------------------------------


def run_plan(plan: dict, go_file: str | None = None, ready_file: str | None = None) -> list[dict]:
    """Issue the plan's requests; return one row per request (times relative to the common start, plus
    ``arrival_wall_s``: the arrival on this host's wall clock)."""
    reqs: list[PlannedRequest] = plan["requests"]
    mode = plan.get("compute_mode", "emulated")
    spec: ModelSpec = plan["spec"]
    client = make_client(plan, concurrency=len(reqs) + 2)
    names = {r.request_id: request_names(plan, r) for r in reqs}
    engine = None
    if mode in ("cpu", "gpu"):
        engine = EngineRunner(plan, "cuda" if mode == "gpu" else "cpu", client)
    elif mode != "emulated":
        raise ValueError(f"unknown compute_mode {mode!r}: emulated, cpu or gpu")
    if ready_file:
        Path(ready_file).write_text("ready")
    start_wall = _wait_go(go_file) if go_file else time.time()
    # Map the common wall-clock start to this process's perf_counter.
    start = time.perf_counter() - (time.time() - start_wall)
    rows: list[dict] = []
    lock = threading.Lock()

    def one(req: PlannedRequest) -> None:
        t0 = time.perf_counter()
        try:
            if engine is not None:
                out = engine.run(req, t0)
            else:
                out = emulated_request(client, names[req.request_id], req, spec.num_layers, t0)
            out["error"] = ""
        except Exception as exc:  # one failed request is a row with its error, not a dead run
            out = {"ttft_s": math.nan, "error": f"{type(exc).__name__}: {exc}"}
        # arrival_wall_s: on this host's wall clock, so a coordinator can check the common start across hosts.
        out.update(
            request_id=req.request_id,
            arrival_s=t0 - start,
            arrival_wall_s=start_wall + (t0 - start),
            compute_mode=mode,
        )
        with lock:
            rows.append(out)

    def open_loop(req: PlannedRequest) -> None:
        sleep_until(start + req.arrival_s)
        one(req)

    def closed_loop(chain: list[PlannedRequest]) -> None:
        sleep_until(start + min(r.arrival_s for r in chain))
        for req in chain:
            if req.think_s > 0:
                time.sleep(req.think_s)
            one(req)

    threads = []
    by_client: dict[int, list[PlannedRequest]] = {}
    for r in reqs:
        if r.client is None:
            threads.append(threading.Thread(target=open_loop, args=(r,), daemon=True))
        else:
            by_client.setdefault(r.client, []).append(r)
    for cid in sorted(by_client):
        threads.append(threading.Thread(target=closed_loop, args=(by_client[cid],), daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + float(plan.get("run_timeout_s", 600.0))
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    client.close()
    done = {r["request_id"] for r in rows}
    for r in reqs:
        if r.request_id not in done:
            rows.append(
                {"request_id": r.request_id, "ttft_s": math.nan, "error": "timed out", "compute_mode": mode}
            )
    return rows


def _wait_go(go_file: str, timeout_s: float = 120.0) -> float:
    deadline = time.monotonic() + timeout_s
    p = Path(go_file)
    while time.monotonic() < deadline:
        if p.exists():
            text = p.read_text().strip()
            if text:
                return float(text)
        time.sleep(0.005)
    raise TimeoutError(f"no start signal in {go_file} after {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m testbed.harness.worker", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("action", choices=["warmup", "run", "probe"])
    ap.add_argument("--plan", required=True, help="plan JSON written by the harness")
    ap.add_argument("--out", help="rows JSON (run)")
    ap.add_argument("--go-file", help="wait for a wall-clock start time written to this file")
    ap.add_argument("--ready-file", help="written once the worker is ready to start")
    a = ap.parse_args(argv)
    plan = load_plan(a.plan)
    if a.action == "warmup":
        n = warmup(plan)
        print(f"warmup: {n} chunk objects written to {plan['endpoint']}", file=sys.stderr)
        return 0
    if a.action == "probe":  # calibration probes, on this host
        from testbed.harness.probes import run_probes

        res = run_probes(plan, repeats=int(plan.get("probe_repeats", 5)))
        Path(a.out).write_text(json.dumps(res))
        return 0
    rows = run_plan(plan, a.go_file, a.ready_file)
    text = json.dumps({"rows": rows, "pid": os.getpid()}, default=float)
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text)
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
