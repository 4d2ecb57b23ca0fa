"""Write-back benchmark: new chunk objects from DRAM into ObjectCache's server, before vs after, one run.

    .venv/bin/python -m testbed.bench.writeback --chunks 32 [--model llama-3.1-8b] [--streams 8]
        [--repeat 3] [--fsync both|on|off] [--out results/bench/writeback.json]

The source is what ``KVSaver`` uploads from: one buffer per (chunk, layer), like the DRAM tier's pinned slots.
Every path goes through the KVSaver loop (batches of 16 chunks, each encoded then put) against a loopback
server started with ``testbed.objectstore.launch.start_server`` (``--no-fsync``, and/or with fsync):

* ``serial_boto3``: ``encode_chunk`` (one joined copy) then one boto3 ``put_object`` at a time (SHA-256 of
  the payload by botocore, checked again by the server);
* ``before``: the previous ``KVSaver``/``put_chunks`` path: ``encode_chunk`` per chunk, then the batch's PUTs
  through boto3 on 16 threads (SHA-256 signed payloads);
* ``after``: ``encode_chunk_parts`` (slice checksums once, no copy) and ``put_chunks`` over ``--streams``
  keep-alive PUT streams, ``UNSIGNED-PAYLOAD`` + ``x-oc-verify: kvchunk`` (the server verifies header and
  slices while writing, before the atomic commit).

Paths are interleaved round by round; each round writes fresh names and deletes them afterwards.  Also
recorded: single-thread costs of the pieces (xxh3 of the slices, SHA-256, a 32 MiB copy, ``encode_chunk``)
and the server's and client's CPU seconds per GB of each path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import xxhash

from scheduler.geometry import get_model
from testbed.bench.common import machine
from testbed.client import ObjectCacheClient
from testbed.objectstore.launch import start_server
from testbed.wire.kvformat import encode_chunk, encode_chunk_parts

BUCKET = "bench-writeback"
BATCH = 16  # KVSaver._upload's batch


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pieces(model, layers) -> dict:
    """Single-thread GB/s of what a PUT of one chunk object costs, piece by piece."""
    blob = encode_chunk(model, layers)
    gb = len(blob) / 1e9

    def best(fn, n=3) -> float:
        t = min(_timed(fn) for _ in range(n))
        return round(gb / t, 3)

    return {
        "object_bytes": len(blob),
        "xxh3_slices_GBps": best(lambda: [xxhash.xxh3_64_intdigest(v) for v in layers]),
        "sha256_GBps": best(lambda: hashlib.sha256(blob).digest()),
        "copy_32MiB_GBps": best(lambda: bytes(bytearray(blob))) * 2,  # two copies timed
        "encode_chunk_GBps": best(lambda: encode_chunk(model, layers)),
        "encode_chunk_parts_GBps": best(lambda: encode_chunk_parts(model, layers)),
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_path(path: str, c: ObjectCacheClient, model, src, names: list[str]) -> None:
    for i in range(0, len(names), BATCH):
        idx = range(i, min(i + BATCH, len(names)))
        if path == "after":
            c.put_chunks([(names[j], encode_chunk_parts(model, src[j])) for j in idx])
        elif path == "before":
            c.put_chunks([(names[j], encode_chunk(model, src[j])) for j in idx])
        else:  # serial_boto3
            for j in idx:
                c.put_chunk(names[j], encode_chunk(model, src[j]))


def bench_server(args, model, src, fsync: bool) -> dict:
    srv = start_server(args=[] if fsync else ["--no-fsync"])
    gb = len(src) * (encode_chunk_parts(model, src[0])[0].nbytes + model.num_layers * len(src[0][0])) / 1e9
    runs: dict[str, list[dict]] = {p: [] for p in args.paths}
    try:
        clients = {
            "after": ObjectCacheClient(
                srv.url, BUCKET, srv.access_key, srv.secret_key, max_concurrency=16, put_streams=args.streams
            ),
            "before": ObjectCacheClient(
                srv.url,
                BUCKET,
                srv.access_key,
                srv.secret_key,
                max_concurrency=16,
                put_streams=16,
                fast_put=False,
            ),
            "serial_boto3": ObjectCacheClient(
                srv.url, BUCKET, srv.access_key, srv.secret_key, max_concurrency=16, fast_put=False
            ),
        }
        clients["after"].ensure_bucket()
        for r in range(args.repeat):
            for path in args.paths:
                c = clients[path]
                names = [f"wb/{path}/{r}/{i:06d}" for i in range(len(src))]
                s0, c0, t0 = _proc_cpu_s(srv.proc.pid), _self_cpu_s(), time.perf_counter()
                run_path(path, c, model, src, names)
                t1, s1, c1 = time.perf_counter(), _proc_cpu_s(srv.proc.pid), _self_cpu_s()
                assert all(c.exists(names)), f"{path}: not every object was written"
                runs[path].append(
                    {
                        "seconds": round(t1 - t0, 3),
                        "GBps": round(gb / (t1 - t0), 3),
                        "server_cpu_s_per_GB": round((s1 - s0) / gb, 3),
                        "client_cpu_s_per_GB": round((c1 - c0) / gb, 3),
                    }
                )
                print(f"fsync={fsync} round {r} {path}: {runs[path][-1]}", flush=True)
                c.delete_chunks(names)
        for c in clients.values():
            c.close()
    finally:
        srv.stop()
    out: dict = {"bytes": int(gb * 1e9), "runs": runs}
    for path, rs in runs.items():
        out[path] = {
            k: round(statistics.median(x[k] for x in rs), 3)
            for k in ("GBps", "seconds", "server_cpu_s_per_GB", "client_cpu_s_per_GB")
        }
    if "after" in runs and "before" in runs:
        out["after_over_before"] = round(out["after"]["GBps"] / out["before"]["GBps"], 2)
    if "after" in runs and "serial_boto3" in runs:
        out["after_over_serial_boto3"] = round(out["after"]["GBps"] / out["serial_boto3"]["GBps"], 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--streams", type=int, default=8, help="parallel PUT streams of the new path")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fsync", choices=("both", "on", "off"), default="both")
    ap.add_argument("--paths", default="before,after,serial_boto3")
    ap.add_argument("--out", default="results/bench/writeback.json")
    args = ap.parse_args(argv)
    args.paths = args.paths.split(",")
    model = get_model(args.model)
    sb = model.kv_bytes_per_chunk_layer()
    rng = np.random.default_rng(7)
    pool = [rng.bytes(sb) for _ in range(min(64, args.chunks * model.num_layers))]
    # One buffer per (chunk, layer) as the DRAM tier holds them; a pool of distinct slices, rotated per chunk
    # so every chunk object differs (bounded memory for many chunks).
    src = [
        [pool[(i * 7 + layer) % len(pool)] for layer in range(model.num_layers)] for i in range(args.chunks)
    ]
    result = {
        "command": " ".join(
            [Path(sys.executable).name, "-m", "testbed.bench.writeback", *(argv or sys.argv[1:])]
        ),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "model": args.model,
        "chunks": args.chunks,
        "streams": args.streams,
        "pieces_single_thread": pieces(model, src[0]),
    }
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.fsync]
    for fsync in modes:
        result["fsync" if fsync else "no_fsync"] = bench_server(args, model, src, fsync)
    result["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    summary = {
        k: {p: result[k][p]["GBps"] for p in args.paths} | {"ratio": result[k].get("after_over_before")}
        for k in ("no_fsync", "fsync")
        if k in result
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
