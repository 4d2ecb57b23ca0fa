"""Where the first layer's time goes: N parallel gathers of a prefix, stamped by the client.

    .venv/bin/python -m testbed.bench.first_layer [--chunks 64] [--streams 8] [--repeat 4]

Starts our server twice on one filesystem store (unpaced, and paced at ``--gbps`` with 64 KiB pieces), stores
``--chunks`` random chunk objects of ``--model``'s geometry, then runs ``--streams`` parallel gathers of
contiguous chunk groups (like the engine's object source) with the client's ``timings`` stamps.  Per run the
latest stream's stamps (ms from the start): ``sent`` (request about to be sent: client setup), ``response``
(status and headers in: the server has checked every object of its gather), ``first_layer`` (layer 0
received and verified), ``end``.  Medians over repeats after a warm-up.  Prints and saves JSON (command,
machine, date) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from scheduler.geometry import get_model
from testbed.client.core import ObjectCacheClient
from testbed.objectstore.launch import start_server
from testbed.wire.kvformat import encode_chunk


def run_gathers(client, names, bufs, sb, streams, cpl_s) -> dict:
    bounds = [round(g * len(names) / streams) for g in range(streams + 1)]
    stamps: list[dict] = [{} for _ in range(streams)]
    t0 = time.monotonic()

    def run(g: int) -> None:
        lo, hi = bounds[g], bounds[g + 1]
        outs = [b[lo * sb : hi * sb] for b in bufs]
        for _ in client.load_layers(names[lo:hi], out=outs, timings=stamps[g], compute_per_layer_s=cpl_s):
            pass

    threads = [threading.Thread(target=run, args=(g,)) for g in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = {k[:-2]: (max(s[k] for s in stamps) - t0) * 1e3 for k in ("sent_s", "response_s", "first_layer_s")}
    row["end"] = (time.monotonic() - t0) * 1e3
    return row


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--gbps", type=float, default=100.0)
    ap.add_argument("--compute-per-layer-ms", type=float, default=16.0, help="the pacer's hint")
    ap.add_argument("--out", default="results/bench/first_layer_breakdown_cpu.json")
    args = ap.parse_args(argv)
    spec = get_model(args.model)
    sb = spec.kv_bytes_per_chunk_layer(256)
    names = [f"diag/{spec.fingerprint()}/{i:064x}" for i in range(args.chunks)]
    bufs = [memoryview(bytearray(args.chunks * sb)) for _ in range(spec.num_layers)]
    res = {}
    with tempfile.TemporaryDirectory(prefix="oc-first-layer-") as data:
        variants = (("unpaced", []), ("paced", ["--egress-gbps", str(args.gbps), "--piece-kib", "64"]))
        for label, extra in variants:
            srv = start_server(data, args=["--no-fsync", *extra])
            c = ObjectCacheClient(
                srv.url, "diag-kv", srv.access_key, srv.secret_key, mode="gather", timeout_s=60
            )
            try:
                c.ensure_bucket()
                if label == "unpaced":
                    layer = np.random.default_rng(0).integers(0, 256, sb, dtype=np.uint8).tobytes()
                    blob = encode_chunk(spec, [layer] * spec.num_layers)
                    for i in range(0, args.chunks, 8):
                        c.put_chunks([(n, blob) for n in names[i : i + 8]])
                rows = [
                    run_gathers(c, names, bufs, sb, args.streams, args.compute_per_layer_ms / 1e3)
                    for _ in range(args.repeat + 1)
                ][1:]
            finally:
                c.close()
                srv.stop()
            res[label] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(label, {k: round(v, 1) for k, v in res[label].items()}, flush=True)
    out = {
        "command": "python -m testbed.bench.first_layer " + " ".join(shlex.quote(a) for a in argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": spec.name,
        "chunks": args.chunks,
        "streams": args.streams,
        "layer_bytes": args.chunks * sb,
        "ms_from_start_latest_stream": res,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
