"""Emulated GPU compute: the engine's layerwise structure without a GPU, on real bytes from a real network.

A reader thread consumes the client's layer stream (``ObjectCacheClient.load_layers``) and timestamps each
layer's arrival; the request thread runs the one shared GPU recurrence ``scheduler.layerwise.layer_times``
over those arrivals (read lazily: the arrival of layer ``l`` is waited for only when the GPU is ready for it)
and sleeps to each layer's end, then for ``overhead_s`` (embedding, LM head).  This is exactly the
simulator's layer model.  Sleeps go to absolute deadlines, so sleep overshoot does not accumulate over
layers.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterator

from scheduler.layerwise import layer_times
from testbed.harness.plan import PlannedRequest


def sleep_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``deadline`` (seconds)."""
    # No spinning: with many concurrent requests on few cores a spin-wait steals CPU and the GIL from the
    # readers; the overshoot of one sleep (a fraction of a millisecond) does not accumulate over layers.
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left)


class LayerArrivals:
    """Arrival stamps (``time.perf_counter``) of a request's layers, filled by a reader thread."""

    def __init__(self, num_layers: int) -> None:
        self.ready_s = [math.nan] * num_layers
        self.count = 0
        self.bytes = 0
        self.error: BaseException | None = None
        self.done = False
        self.cond = threading.Condition()

    def read(self, client, names: list[str], compute_per_layer_s: float, timings: dict) -> None:
        """Consume the layer stream (the reader thread's body); errors are kept for ``wait``."""
        try:
            for layer, view in client.load_layers(
                names, compute_per_layer_s=compute_per_layer_s, timings=timings
            ):
                now = time.perf_counter()
                with self.cond:
                    self.ready_s[layer] = now
                    self.count = layer + 1
                    self.bytes += memoryview(view).nbytes
                    self.cond.notify_all()
        except BaseException as exc:  # surfaced in the request thread
            with self.cond:
                self.error = exc
                self.cond.notify_all()
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def wait(self, request_id: str) -> Iterator[float]:
        """Each layer's arrival in order, blocking until it has arrived (``RuntimeError`` if it never does)."""
        for layer in range(len(self.ready_s)):
            with self.cond:
                while self.count <= layer and self.error is None and not self.done:
                    self.cond.wait()
                if self.count <= layer:
                    raise RuntimeError(f"{request_id}: layer {layer} never arrived: {self.error!r}")
            yield self.ready_s[layer]


def emulated_request(client, names: list[str], req: PlannedRequest, num_layers: int, t0: float) -> dict:
    """Gather the prefix ``names`` layer by layer while emulating the GPU (see the module docstring).

    ``t0`` is the request's arrival (``time.perf_counter``, s); every time in the returned row is relative to
    it.  Without ``names`` (nothing cached) the layers compute back to back from ``t0``.
    """
    arrivals = LayerArrivals(num_layers)
    timings: dict = {}
    reader = threading.Thread(
        target=arrivals.read, args=(client, names, req.compute_per_layer_s, timings),
        name=f"load-{req.request_id}", daemon=True,
    )  # fmt: skip
    if names:
        reader.start()
        ready: Iterator[float] = arrivals.wait(req.request_id)
    else:
        ready = iter([t0] * num_layers)
    first_wait_s = stall_s = 0.0
    prev_end_s = t0
    for layer, (start_s, end_s) in enumerate(layer_times(ready, req.compute_per_layer_s, t0)):
        if layer == 0:
            first_wait_s = start_s - t0
        else:
            stall_s += start_s - prev_end_s
        prev_end_s = end_s
        sleep_until(end_s)
    sleep_until(prev_end_s + req.overhead_s)
    ttft_s = time.perf_counter() - t0
    if names:
        reader.join()
    trace_request(req.request_id, t0, arrivals.ready_s[0], ttft_s, timings)
    return {
        "ttft_s": ttft_s,
        "first_layer_wait_s": first_wait_s,
        "stall_s": stall_s,
        "bytes_fetched": int(arrivals.bytes),
        "compute_s": num_layers * req.compute_per_layer_s + req.overhead_s,
        "ready_s": [r - t0 for r in arrivals.ready_s],
        "path": client.last_path or "gather" if names else "recompute",
    }


def trace_request(request_id: str, t0: float, ready0: float, ttft_s: float, timings: dict) -> None:
    """Debugging aid: ``OC_WORKER_TRACE=<dir>`` appends one JSON line per request to
    ``<dir>/worker-<pid>.jsonl`` with absolute stamps (``time.perf_counter``, the same clock as
    ``time.monotonic`` on Linux: arrival ``t0``, request ``sent_s``, headers in ``response_s``, layer 0 in
    ``ready0``) and the server's ``stream_id``; joined with ``OC_PACER_TRACE`` (same clock, ``t_abs``) it
    shows where a slow request lost its time."""
    trace_dir = os.environ.get("OC_WORKER_TRACE")
    if not trace_dir:
        return
    row = {"id": request_id, "t0": t0, "ready0": ready0, "ttft": ttft_s, **timings}
    with open(os.path.join(trace_dir, f"worker-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
