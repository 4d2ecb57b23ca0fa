"""Where a prefix load's time goes: N parallel gathers of a prefix, stamped by the client.

    .venv/bin/python -m testbed.bench.first_layer [--chunks 64] [--streams 8] [--repeat 4]

Starts our server twice on one filesystem store (unpaced, and paced at ``--gbps`` with 64 KiB pieces), stores
``--chunks`` random chunk objects of ``--model``'s geometry, then runs ``--streams`` parallel gathers of
contiguous chunk groups (like the engine's object source) with the client's ``timings`` stamps.  Against the
paced server it runs the streams two ways, round by round: ``paced_streams`` (each stream a flow of its own:
the policy splits the link between the streams) and ``paced_group`` (the streams share one ``pace_group``:
one flow whose members take the deadline in turn, as the engine sends them).  Per run the latest stream's
stamps (ms from the start): ``sent`` (request about to be sent: client setup), ``response`` (status and
headers in), ``first_layer`` (layer 0 received and verified), ``end``; and for the paced variants
``end_over_link`` (``end`` over the time the prefix takes at ``--gbps``: 1.0 is the link floor).  Medians
over repeats after a warm-up.  Prints and saves JSON (command, machine, date) to ``--out``.
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
import uuid
from pathlib import Path

import numpy as np

from scheduler.geometry import get_model
from testbed.client.core import ObjectCacheClient
from testbed.objectstore.launch import start_server
from testbed.wire.kvformat import encode_chunk


def run_gathers(client, names, bufs, sb, streams, cpl_s, pace_group: str | None = None) -> dict:
    bounds = [round(g * len(names) / streams) for g in range(streams + 1)]
    stamps: list[dict] = [{} for _ in range(streams)]
    t0 = time.monotonic()

    def run(g: int) -> None:
        lo, hi = bounds[g], bounds[g + 1]
        outs = [b[lo * sb : hi * sb] for b in bufs]
        for _ in client.load_layers(
            names[lo:hi], out=outs, timings=stamps[g], compute_per_layer_s=cpl_s, pace_group=pace_group
        ):
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
    cpl_s = args.compute_per_layer_ms / 1e3
    link_ms = args.chunks * sb * spec.num_layers / (args.gbps * 1e9 / 8) * 1e3
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
                kinds = ("unpaced",) if label == "unpaced" else ("paced_streams", "paced_group")
                rows: dict[str, list[dict]] = {k: [] for k in kinds}
                for r in range(args.repeat + 1):
                    for kind in kinds:
                        group = uuid.uuid4().hex if kind == "paced_group" else None
                        row = run_gathers(c, names, bufs, sb, args.streams, cpl_s, group)
                        if r:  # round 0 warms the connections and the page cache
                            rows[kind].append(row)
            finally:
                c.close()
                srv.stop()
            for kind, kind_rows in rows.items():
                res[kind] = {k: statistics.median(r[k] for r in kind_rows) for k in kind_rows[0]}
                if kind != "unpaced":
                    res[kind]["end_over_link"] = res[kind]["end"] / link_ms
                print(kind, {k: round(v, 2) for k, v in res[kind].items()}, flush=True)
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
        "link_Gbps": args.gbps,
        "link_floor_ms": link_ms,
        "ms_from_start_latest_stream": res,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
