"""What the object-tier benchmarks share: benchmark chunk objects, timing one layer-by-layer load, and the
machine a result was measured on (every results file records it)."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from scheduler.keys import KeyScope, object_key
from testbed.client import ObjectCacheClient
from testbed.wire.kvformat import encode_chunk

BUCKET = "bench-gather"


def chunk_names(model, n: int, namespace: str = "bench") -> list[str]:
    scope = KeyScope(model.fingerprint(), namespace)
    return [object_key(scope, f"{i:064x}") for i in range(n)]


def make_chunk(model, i: int) -> bytes:
    rng = np.random.default_rng(1000 + i)
    sb = model.kv_bytes_per_chunk_layer()
    return encode_chunk(model, [rng.bytes(sb) for _ in range(model.num_layers)])


def store_chunks(clients: list[ObjectCacheClient], model, n: int) -> list[str]:
    names = chunk_names(model, n)
    for c in clients:
        c.ensure_bucket()
    for i, name in enumerate(names):
        blob = make_chunk(model, i)
        for c in clients:
            c.put_chunk(name, blob)
    return names


def names_for(distinct: list[str], n: int) -> list[str]:
    return [distinct[i % len(distinct)] for i in range(n)]


def time_load(client: ObjectCacheClient, names: list[str], ring: list[bytearray] | None, **kw) -> dict:
    """Load all layers; returns seconds, bytes, first-layer latency and per-layer arrival times."""
    arrivals = []
    n_bytes = 0
    t0 = time.perf_counter()
    out = None if ring is None else [ring[i % len(ring)] for i in range(32)]
    for _layer, view in client.load_layers(names, out=out, **kw):
        arrivals.append(time.perf_counter() - t0)
        n_bytes += len(view)
    return {"seconds": arrivals[-1], "bytes": n_bytes, "first_layer_s": arrivals[0], "arrivals_s": arrivals}


def machine() -> dict:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "mem_total_bytes": mem,
        "uname": " ".join(platform.uname()),
        "python": platform.python_version(),
        "loadavg_1min_at_start": os.getloadavg()[0],
    }
