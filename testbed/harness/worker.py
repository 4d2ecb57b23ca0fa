"""The GPU-client side of the testbed: run a plan of requests against the object tier and time each one.

A *plan* (JSON, written by the harness) names the endpoint, the model geometry, the compute mode and the
requests (arrival offset, cached and new tokens, the prompt's blocks, the emulated per-layer compute time).
``python -m testbed.harness.worker warmup --plan P`` writes every chunk object the plan's requests will read (the
warm-up that populates the object tier); ``python -m testbed.harness.worker probe --plan P --out O`` runs the calibration probes
(``testbed.validation.calibrate``); ``python -m testbed.harness.worker run --plan P --out O`` waits for the
start barrier, issues the requests (open loop: each at its arrival offset; closed loop: one thread per
client, ``think_s`` between requests) and writes one row per request to ``O``.  On a cluster this is the
command each GPU node runs; in the ``local`` and ``netns`` topologies the harness starts it.

Compute modes (``compute_mode``, recorded in every row):

* ``emulated``: the engine's structure without a GPU.  A reader thread consumes the client's layer stream
  (``ObjectCacheClient.load_layers``) and timestamps each layer; the request thread "computes" layer ``l``
  from ``max(arrival of layer l, end of layer l-1)`` for ``layer_time_s`` (sleeping to an absolute deadline,
  so sleep overshoot does not accumulate), then ``overhead_s`` (embedding, LM head).  This is exactly the
  simulator's layer model, with real bytes on a real network.
* ``cpu`` / ``gpu``: the torch layerwise engine (``testbed.engine.prefill.PrefillEngine`` with
  ``testbed.engine.objectsource.ObjectCacheSource``) on the CPU or on CUDA, random weights.

Token ids are derived from block ids (``block_tokens``), so two requests that share leading blocks share
chunk keys, exactly like the workload generators' ``hash_ids``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.geometry import ModelSpec
from scheduler.keys import KeyScope, chunk_keys, object_key

NAMESPACE = "testbed"


# --- prompts and chunk objects ---------------------------------------------------------------------------------


def block_token_ids(block_ids: list[int], block_tokens: int, vocab_size: int) -> np.ndarray:
    """Deterministic token ids of a prompt made of ``block_ids`` (each ``block_tokens`` tokens)."""
    out = np.empty(len(block_ids) * block_tokens, dtype=np.int64)
    for i, b in enumerate(block_ids):
        rng = np.random.default_rng(0x5EED0000 + int(b))
        out[i * block_tokens : (i + 1) * block_tokens] = rng.integers(1, vocab_size, size=block_tokens)
    return out


def prompt_keys(spec: ModelSpec, block_ids: list[int], block_tokens: int, chunk_tokens: int) -> list[str]:
    scope = KeyScope(spec.fingerprint(), NAMESPACE)
    return chunk_keys(block_token_ids(block_ids, block_tokens, spec.vocab_size), scope, chunk_tokens)


def object_names(spec: ModelSpec, keys: list[str]) -> list[str]:
    scope = KeyScope(spec.fingerprint(), NAMESPACE)
    return [object_key(scope, k) for k in keys]


def synthetic_chunk(spec: ModelSpec, chunk_tokens: int, name: str) -> bytes:
    """A chunk object with deterministic, finite KV values (small normals in the model's dtype)."""
    from testbed.wire import kvformat

    rng = np.random.default_rng(int(name[-16:], 16))
    n = spec.kv_bytes_per_chunk_layer(chunk_tokens) // spec.dtype_bytes
    layers = []
    for _ in range(spec.num_layers):
        x = (rng.standard_normal(n, dtype=np.float32) * 0.1).astype(np.float32)
        if spec.dtype_bytes == 4:
            layers.append(x.tobytes())
        elif spec.dtype_bytes == 2:  # bf16: the high half of each float32
            layers.append((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
        else:
            layers.append(x.view(np.uint8)[: n * spec.dtype_bytes].tobytes())
    return kvformat.encode_chunk(spec, layers, chunk_tokens)


# --- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class PlannedRequest:
    request_id: str
    arrival_s: float
    cached_tokens: int
    new_tokens: int
    block_ids: list[int]
    layer_time_s: float
    overhead_s: float
    client: int | None = None
    think_s: float = 0.0


def load_plan(path: str | Path) -> dict:
    plan = json.loads(Path(path).read_text())
    plan["spec"] = ModelSpec(**plan["model"])
    plan["requests"] = [PlannedRequest(**r) for r in plan["requests"]]
    return plan


def make_client(plan: dict, concurrency: int = 16):
    from testbed.client.core import ObjectCacheClient

    return ObjectCacheClient(
        plan["endpoint"],
        plan["bucket"],
        plan["access_key"],
        plan["secret_key"],
        mode=plan.get("client_mode", "auto"),
        max_concurrency=max(4, concurrency),
        timeout_s=float(plan.get("timeout_s", 60.0)),
    )


def request_names(plan: dict, req: PlannedRequest) -> list[str]:
    spec, ct = plan["spec"], int(plan["chunk_tokens"])
    keys = prompt_keys(spec, req.block_ids, int(plan["block_tokens"]), ct)
    n = req.cached_tokens // ct
    if len(keys) < n:
        raise ValueError(f"{req.request_id}: prompt has {len(keys)} full chunks, plan caches {n}")
    return object_names(spec, keys[:n])


def warmup(plan: dict) -> int:
    """PUT every chunk a request of the plan reads (idempotent); returns the number written."""
    names: dict[str, None] = {}
    for req in plan["requests"]:
        for n in request_names(plan, req):
            names.setdefault(n, None)
    client = make_client(plan)
    try:
        client.ensure_bucket()
        todo = [n for n, present in zip(names, client.exists(list(names))) if not present]
        written = 0
        for i in range(0, len(todo), 16):
            batch = todo[i : i + 16]
            items = [(n, synthetic_chunk(plan["spec"], int(plan["chunk_tokens"]), n)) for n in batch]
            written += client.put_chunks(items)
        return written
    finally:
        client.close()


# --- one request ---------------------------------------------------------------------------------------------


def emulated_request(client, names: list[str], req: PlannedRequest, num_layers: int, t0: float) -> dict:
    """Gather the prefix layer by layer while emulating the GPU (see the module docstring).

    ``t0`` is the request's arrival (``time.perf_counter``); every time in the row is relative to it.
    """
    ready = [math.nan] * num_layers
    arrived = threading.Condition()
    state = {"n": 0, "error": None, "bytes": 0}

    timings: dict = {}

    def reader() -> None:
        try:
            for layer, view in client.load_layers(
                names, compute_per_layer_s=req.layer_time_s, timings=timings
            ):
                now = time.perf_counter()
                with arrived:
                    ready[layer] = now
                    state["n"] = layer + 1
                    state["bytes"] += memoryview(view).nbytes
                    arrived.notify_all()
        except BaseException as exc:  # surfaced in the request thread
            with arrived:
                state["error"] = exc
                arrived.notify_all()
        finally:
            with arrived:
                state["done"] = True
                arrived.notify_all()

    th = threading.Thread(target=reader, name=f"load-{req.request_id}", daemon=True)
    if names:
        th.start()
    busy = t0
    stall = 0.0
    first_wait = 0.0
    for layer in range(num_layers):
        if names:
            with arrived:
                while state["n"] <= layer and state["error"] is None and not state.get("done"):
                    arrived.wait()
                if state["n"] <= layer:
                    raise RuntimeError(f"{req.request_id}: layer {layer} never arrived: {state['error']!r}")
            begin = max(ready[layer], busy)
        else:
            begin = busy
        if layer == 0:
            first_wait = begin - t0
        else:
            stall += begin - busy
        busy = begin + req.layer_time_s
        _sleep_until(busy)
    end = busy + req.overhead_s
    _sleep_until(end)
    ttft = time.perf_counter() - t0
    if names:
        th.join()
    _trace_request(req.request_id, t0, ready[0], ttft, timings)
    return {
        "ttft_s": ttft,
        "first_layer_wait_s": first_wait,
        "stall_s": stall,
        "bytes_fetched": int(state["bytes"]),
        "compute_s": num_layers * req.layer_time_s + req.overhead_s,
        "ready_s": [r - t0 for r in ready],
        "path": client.last_path or "gather" if names else "recompute",
    }


def _trace_request(request_id: str, t0: float, ready0: float, ttft: float, timings: dict) -> None:
    """Debugging aid: ``OC_WORKER_TRACE=<dir>`` appends one JSON line per request to
    ``<dir>/worker-<pid>.jsonl`` with absolute stamps (``time.perf_counter``, the same clock as
    ``time.monotonic`` on Linux: arrival ``t0``, request
    ``sent_s``, headers in ``response_s``, layer 0 in ``ready0``) and the server's ``stream_id``; joined with
    ``OC_PACER_TRACE`` (same clock, ``t_abs``) it shows where a slow request lost its time."""
    trace_dir = os.environ.get("OC_WORKER_TRACE")
    if not trace_dir:
        return
    row = {"id": request_id, "t0": t0, "ready0": ready0, "ttft": ttft, **timings}
    with open(os.path.join(trace_dir, f"worker-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def _sleep_until(deadline: float) -> None:
    # Sleep to an absolute deadline (no spinning: with many concurrent requests on few cores a spin-wait
    # steals CPU and the GIL from the readers); the overshoot (~0.1 ms) does not accumulate over layers.
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left)


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
        _sleep_until(start + req.arrival_s)
        one(req)

    def closed_loop(chain: list[PlannedRequest]) -> None:
        _sleep_until(start + min(r.arrival_s for r in chain))
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
    if a.action == "probe":  # calibration probes (testbed.validation.calibrate), on this host
        from testbed.validation.calibrate import run_probes

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
