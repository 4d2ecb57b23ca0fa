"""Soak benchmark of the object tier: many concurrent clients mixing PUT, GET, gather and existence checks
against one ObjectCache server for a bounded time, checking every byte.

    python -m testbed.bench.soak --duration-s 120 --clients 64            # writes results/bench/soak.json

Each client is a thread with its own ``ObjectCacheClient`` (gather mode).  A client loops over a weighted
mix of operations:

* ``put``: a new chunk object (random bytes derived from its name, so nothing is kept in memory) with
  ``If-None-Match: *`` (``put_chunk``);
* ``get``: a whole-object GET of a chunk some client already wrote, compared byte for byte;
* ``gather``: ``load_layers`` of 1-8 written chunks, every layer compared with the expected slices;
* ``exists``: existence of a mix of written and never-written names, compared with the truth.

A monitor samples the server's RSS and open file descriptors once a second.  At the end every written
object is checked to still exist (lost objects), the clients are closed, and the server's descriptors must
return to their starting level.  The JSON records the command, machine, date, operation counts, latency
percentiles per operation (ms), throughput, RSS and fd series, and every error.  ``tests/testbed/
test_soak.py`` runs a short version (tens of seconds) in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from scheduler.geometry import ModelSpec
from testbed.bench import faults
from testbed.bench.common import machine
from testbed.client.core import ObjectCacheClient
from testbed.objectstore.launch import ServerProcess, start_server
from testbed.wire import kvformat

# Small chunks keep the soak about request handling, not bandwidth: 4 layers x 16 KiB (+4 KiB header).
SOAK_MODEL = ModelSpec("soak", 4, 4, 64, 2, 256, 4, 512, 1000)
CHUNK_TOKENS = 16
OP_WEIGHTS = {"put": 0.25, "get": 0.25, "gather": 0.3, "exists": 0.2}
BUCKET = "soak"


def chunk_blob(name: str) -> bytes:
    """The chunk object stored under ``name`` (deterministic in the name: verifiable without a copy)."""
    rng = np.random.default_rng(hash_name(name))
    sb = SOAK_MODEL.kv_bytes_per_chunk_layer(CHUNK_TOKENS)
    layers = [rng.integers(0, 256, sb, dtype=np.uint8).tobytes() for _ in range(SOAK_MODEL.num_layers)]
    return kvformat.encode_chunk(SOAK_MODEL, layers, CHUNK_TOKENS)


def hash_name(name: str) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(name.encode())


@dataclass
class _Shared:
    written: list[str]
    lock: threading.Lock
    stop: threading.Event
    latencies: dict[str, list[float]]
    errors: list[dict]
    counts: Counter


def _worker(idx: int, srv: ServerProcess, shared: _Shared, seed: int, get_client) -> None:
    rng = random.Random(seed * 1000 + idx)
    ops, weights = zip(*OP_WEIGHTS.items())
    sb = SOAK_MODEL.kv_bytes_per_chunk_layer(CHUNK_TOKENS)
    header_bytes = kvformat.header_size(SOAK_MODEL.num_layers)
    local_lat: dict[str, list[float]] = defaultdict(list)
    n_put = 0
    with ObjectCacheClient(
        srv.url, BUCKET, srv.access_key, srv.secret_key, mode="gather", max_concurrency=2, timeout_s=30
    ) as client:
        while not shared.stop.is_set():
            op = rng.choices(ops, weights)[0]
            with shared.lock:
                pool = list(shared.written[-512:]) if op != "put" else []
            if op != "put" and not pool:
                op = "put"
            t0 = time.perf_counter()
            try:
                if op == "put":
                    name = f"soak/{SOAK_MODEL.fingerprint()}/c{idx:03d}-{n_put:06d}-{seed}"
                    n_put += 1
                    if not client.put_chunk(name, chunk_blob(name)):
                        raise AssertionError(f"put {name}: the key already existed")
                    with shared.lock:
                        shared.written.append(name)
                elif op == "get":
                    name = rng.choice(pool)
                    body = get_client().get_object(Bucket=BUCKET, Key=name)["Body"].read()
                    if body != chunk_blob(name):
                        raise AssertionError(f"get {name}: bytes differ")
                elif op == "gather":
                    names = rng.sample(pool, min(len(pool), rng.randint(1, 8)))
                    blobs = [chunk_blob(n) for n in names]
                    for layer, view in client.load_layers(names):
                        start = header_bytes + layer * sb
                        expected = b"".join(b[start : start + sb] for b in blobs)
                        if bytes(view) != expected:
                            raise AssertionError(f"gather layer {layer} of {len(names)} chunks: bytes differ")
                else:
                    known = rng.sample(pool, min(len(pool), 4))
                    unknown = [
                        f"soak/{SOAK_MODEL.fingerprint()}/never-{rng.getrandbits(64):016x}" for _ in range(2)
                    ]
                    got = client.exists(known + unknown)
                    if got != [True] * len(known) + [False] * len(unknown):
                        raise AssertionError(f"exists answered {got}")
            except Exception as e:  # recorded, the soak goes on
                with shared.lock:
                    shared.errors.append(
                        {
                            "op": op,
                            "client": idx,
                            "error": f"{type(e).__name__}: {e}"[:500],
                            "t_s": time.time(),
                        }
                    )
                    if len(shared.errors) <= 3:
                        traceback.print_exc()
                continue
            local_lat[op].append(time.perf_counter() - t0)
    with shared.lock:
        for op, lat in local_lat.items():
            shared.latencies[op].extend(lat)
            shared.counts[op] += len(lat)


def _percentiles_ms(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    a = np.asarray(samples) * 1e3
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "p999": float(np.percentile(a, 99.9)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def run_soak(
    duration_s: float = 120.0,
    clients: int = 64,
    *,
    seed: int = 0,
    server_args: list[str] | None = None,
    data_dir: str | None = None,
    sample_s: float = 1.0,
) -> dict:
    """Run the soak against a fresh server; returns the result document (see the module docstring).

    A benchmark driver: the server, the client threads, the sampling loop and the report share the run's
    counters; kept in the order they run.
    """
    import boto3
    from botocore.config import Config

    tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="objectcache-soak-")
    srv = start_server(data_dir or tmp.name, args=list(server_args or []))
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=srv.url,
            aws_access_key_id=srv.access_key,
            aws_secret_access_key=srv.secret_key,
            region_name=srv.region,
            config=Config(
                s3={"addressing_style": "path"},
                max_pool_connections=clients + 4,
                retries={"max_attempts": 1},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        s3.create_bucket(Bucket=BUCKET)
        time.sleep(0.2)
        fds_start, rss_start = faults.process_fds(srv.pid), faults.process_rss_bytes(srv.pid)
        shared = _Shared([], threading.Lock(), threading.Event(), defaultdict(list), [], Counter())
        samples: list[dict] = []

        def monitor(t0: float) -> None:
            while not shared.stop.wait(sample_s):
                samples.append(
                    {
                        "t_s": round(time.monotonic() - t0, 2),
                        "rss_bytes": faults.process_rss_bytes(srv.pid),
                        "fds": faults.process_fds(srv.pid),
                        "objects": len(shared.written),
                    }
                )

        t0 = time.monotonic()
        threads = [
            threading.Thread(target=_worker, args=(i, srv, shared, seed, lambda: s3), name=f"soak-{i}")
            for i in range(clients)
        ]
        mon = threading.Thread(target=monitor, args=(t0,), name="soak-monitor")
        mon.start()
        for t in threads:
            t.start()
        shared.stop.wait(duration_s)
        shared.stop.set()
        for t in threads:
            t.join(120)
        hung = [t.name for t in threads if t.is_alive()]
        mon.join(10)
        elapsed_s = time.monotonic() - t0

        # Lost objects: everything acknowledged must still be there, whole.
        written = list(shared.written)
        lost: list[str] = []
        with ObjectCacheClient(srv.url, BUCKET, srv.access_key, srv.secret_key, max_concurrency=8) as c:
            for i in range(0, len(written), 256):
                batch = written[i : i + 256]
                lost += [n for n, ok in zip(batch, c.exists(batch)) if not ok]
        listed, token = 0, None
        while True:
            kw = {"Bucket": BUCKET, "MaxKeys": 1000, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kw)
            listed += page.get("KeyCount", 0)
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        s3.close()
        time.sleep(1.0)  # let the server notice closed keep-alive connections
        deadline = time.monotonic() + 10
        while faults.process_fds(srv.pid) > fds_start + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        fds_end = faults.process_fds(srv.pid)
        rss_end = faults.process_rss_bytes(srv.pid)
    finally:
        srv.stop()
        if tmp is not None:
            tmp.cleanup()

    warm = [s for s in samples if s["t_s"] >= 0.25 * duration_s] or samples
    total_ops = sum(shared.counts.values())
    errors_by_op = Counter(e["op"] for e in shared.errors)
    rss_after_warmup = warm[0]["rss_bytes"] if warm else rss_start
    rss_max = max([s["rss_bytes"] for s in samples] + [rss_end])
    doc = {
        "command": " ".join(["python -m testbed.bench.soak", *sys.argv[1:]])
        if __name__ == "__main__"
        else "run_soak()",
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": duration_s,
        "elapsed_s": elapsed_s,
        "clients": clients,
        "op_weights": OP_WEIGHTS,
        "object_bytes": len(chunk_blob("x")),
        "ops": dict(shared.counts),
        "ops_total": total_ops,
        "ops_per_s": total_ops / elapsed_s,
        "latency_ms": {op: _percentiles_ms(lat) for op, lat in sorted(shared.latencies.items())},
        "errors": len(shared.errors),
        "errors_by_op": dict(errors_by_op),
        "error_samples": shared.errors[:20],
        "hung_clients": hung,
        "objects_written": len(written),
        "objects_listed": listed,
        "lost_objects": len(lost),
        "lost_samples": lost[:10],
        "server_rss_bytes": {
            "start": rss_start,
            "after_warmup": rss_after_warmup,
            "max": rss_max,
            "end": rss_end,
            "growth_after_warmup": rss_end - rss_after_warmup,
        },
        "server_fds": {
            "start": fds_start,
            "max": max([s["fds"] for s in samples] + [fds_end]),
            "end": fds_end,
        },
        "samples": samples,
    }
    doc["ok"] = bool(
        doc["errors"] == 0
        and not hung
        and doc["lost_objects"] == 0
        and listed == len(written)
        and fds_end <= fds_start + 2
    )
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=120.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench/soak.json")
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    a = p.parse_args(argv)
    doc = run_soak(a.duration_s, a.clients, seed=a.seed, server_args=a.server_arg)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    lat = " ".join(
        f"{op}:p50={v['p50']:.1f}/p99={v['p99']:.1f}ms" for op, v in doc["latency_ms"].items() if v
    )
    rss = doc["server_rss_bytes"]
    print(
        f"soak {doc['elapsed_s']:.0f}s x {doc['clients']} clients: {doc['ops_total']} ops "
        f"({doc['ops_per_s']:.0f}/s), errors {doc['errors']}, lost {doc['lost_objects']}, "
        f"objects {doc['objects_written']}, RSS {rss['start'] / 2**20:.0f}->{rss['max'] / 2**20:.0f}->"
        f"{rss['end'] / 2**20:.0f} MiB, fds {doc['server_fds']}, {lat} -> {out} ({'OK' if doc['ok'] else 'FAIL'})"
    )
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
