"""Gather benchmarks: ``python -m testbed.bench.gather gather`` (writes ``results/bench/gather.json``).

Three measurements, Llama-3.1-8B geometry (32 layers, 256-token chunks: 1 MiB per chunk-layer slice,
32 MiB per chunk object), all through ``testbed.client.core.ObjectCacheClient`` with checksums verified:

1. **Delivery time** of all 32 layers of N chunks (N = 1, 4, 16, 64, 256) by path: gather from our server,
   per-(chunk, layer) ranged GETs against Ceph RGW and against our server, whole-object GETs against RGW.
   64 distinct chunks are stored (2 GiB); N = 256 names each of them 4 times (RGW's memstore holds ~2x the
   bytes in RAM, so 8 GiB of distinct chunks would not fit next to everything else).  Whole-object GETs need
   all layers in memory at once, so they stop at N = 64.  Median of ``--repeats`` rounds (1 for N >= 64);
   each round runs every path once, round-robin, so background load hits all paths alike.
   The fallbacks run 16 requests concurrently; ``ranged-serial@rgw`` (N <= 16) is the same ranged path
   with one request at a time (a naive layerwise reader).
2. **Loopback throughput** of gather (N = 64, 2 GiB) against the raw TCP ceiling of plain Python sockets
   (``sendall`` / ``recv_into``, no HTTP, no checksums), measured interleaved in the same run.
3. **Shaped link**: our server in one network namespace, the client in another, joined by a veth pair with
   an HTB cap (``--shaped-gbps``, default 2).  (a) one unpaced gather stream: fraction of the cap;
   (b) two concurrent streams with different compute hints through the server's pacer (policy ``equal``,
   then ``bandwidth_aware``, pacer capacity 95 % of the cap): each stream's transfer time (hence mean rate)
   against the scheduler's fluid model running the same policy on the same two flows, at the pacer's
   configured capacity and at the aggregate rate the pacer actually delivered (``testbed.bench.shaped``).

Needs root for (3) (skipped with the reason otherwise) and Ceph RGW for the RGW rows (skipped likewise).

``python -m testbed.bench.gather first-byte`` (writes ``results/bench/gather_first_layer.json``): one gather
of N distinct chunk objects (N = 16, 256) from our server on loopback, plain (every object opened and checked
before the answer: the behaviour before early streams) and early (``stream_early``: the first layer leaves as
soon as the first 2 objects are checked, the rest are opened meanwhile), interleaved round by round.  Per
gather the client's stamps in ms from the request: ``response`` (status and headers in), ``first_byte``
(the first layer frame's head in: its payload follows), ``first_layer`` (layer 0 received and verified),
``end``.  Medians over ``--repeats`` after a warm-up round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from scheduler.geometry import get_model
from testbed import REPO_ROOT
from testbed.bench.common import BUCKET, machine, names_for, store_chunks, time_load
from testbed.bench.shaped import bench_shaped
from testbed.client.core import ObjectCacheClient
from testbed.objectstore.launch import start_server

DISTINCT_CHUNKS = 64


def tcp_ceiling_Bps(total_bytes: int, block_bytes: int = 1 << 20) -> float:
    """Raw loopback TCP throughput of plain Python sockets (sender thread, ``recv_into`` receiver)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    payload = memoryview(bytearray(block_bytes))

    def sender() -> None:
        conn, _ = srv.accept()
        with conn:
            left = total_bytes
            while left > 0:
                k = min(left, block_bytes)
                conn.sendall(payload[:k])
                left -= k

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    buf = memoryview(bytearray(block_bytes))
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.perf_counter()
        while got < total_bytes:
            k = c.recv_into(buf)
            if not k:
                break
            got += k
        dt = time.perf_counter() - t0
    t.join()
    srv.close()
    return got / dt


# --- part 1 and 2 --------------------------------------------------------------------------------------------
def bench_paths(model, sizes: list[int], repeats: int, with_rgw: bool, log) -> dict:
    """A benchmark driver: the rounds interleave every path so background load hits all alike, which keeps
    them in one loop."""
    from testbed.harness.rgw import RGWUnavailable, start_rgw

    sb = model.kv_bytes_per_chunk_layer()
    rows: list[dict] = []
    notes: list[str] = []
    rgw = None
    if with_rgw:
        try:
            rgw = start_rgw(store_bytes=12 << 30, timeout_s=120)
        except RGWUnavailable as e:
            notes.append(f"RGW rows skipped: {e}")
            log(notes[-1])
    try:
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(start_server(args=["--no-fsync"]))
            creds = {"server": (srv.url, srv.access_key, srv.secret_key)}
            if rgw is not None:
                creds["rgw"] = (rgw.endpoint_url, rgw.access_key, rgw.secret_key)
            targets = {t: ObjectCacheClient(url, BUCKET, ak, sk) for t, (url, ak, sk) in creds.items()}
            n_store = min(DISTINCT_CHUNKS, max(sizes))
            log(f"storing {n_store} chunks of {model.kv_bytes_per_chunk() >> 20} MiB on {sorted(targets)}")
            t0 = time.perf_counter()
            distinct = store_chunks(list(targets.values()), model, n_store)
            log(f"stored in {time.perf_counter() - t0:.1f} s")
            if rgw is not None:
                # Our server in front of RGW (S3-proxy store), sharing RGW's bucket: gather next to storage.
                opts = [f"endpoint_url={rgw.endpoint_url}", f"access_key={rgw.access_key}"]
                opts += [f"secret_key={rgw.secret_key}"]
                proxy = stack.enter_context(
                    start_server(
                        args=["--store", "s3proxy", *[a for o in opts for a in ("--store-option", o)]]
                    )
                )
                creds["proxy"] = (proxy.url, proxy.access_key, proxy.secret_key)
            # (mode, target, label, max_concurrency); ranged-serial: one request at a time, the naive reader.
            paths = [("gather", "server", "gather", 16), ("ranged", "server", "ranged", 16)]
            if rgw is not None:
                paths += [("ranged", "rgw", "ranged", 16), ("whole", "rgw", "whole", 16)]
                paths += [("ranged", "rgw", "ranged-serial", 1), ("gather", "proxy", "gather", 16)]
            for n in sizes:
                names = names_for(distinct, n)
                todo = [
                    p
                    for p in paths
                    if not ((p[0] == "whole" and n > DISTINCT_CHUNKS) or (p[3] == 1 and n > 16))
                ]
                clients = [
                    ObjectCacheClient(creds[t][0], BUCKET, *creds[t][1:], mode=mode, max_concurrency=conc)
                    for mode, t, _, conc in todo
                ]
                rings = [None if p[0] == "whole" else [bytearray(n * sb) for _ in range(2)] for p in todo]
                runs: list[list[dict]] = [[] for _ in todo]
                # Round-robin over the paths, so that load from other processes hits every path alike.
                for _ in range(1 if n >= 64 else repeats):
                    for i, c in enumerate(clients):
                        runs[i].append(time_load(c, names, rings[i]))
                        assert c.last_path == todo[i][0]
                for c in clients:
                    c.close()
                del rings
                for (_, target, label, _), rs in zip(todo, runs):
                    secs = [r["seconds"] for r in rs]
                    med = statistics.median(secs)
                    row = {
                        "n_chunks": n,
                        "path": f"{label}@{target}",
                        "seconds": med,
                        "runs_s": secs,
                        "first_layer_s": statistics.median(r["first_layer_s"] for r in rs),
                        "bytes": rs[0]["bytes"],
                        "GBps": rs[0]["bytes"] / med / 1e9,
                    }
                    rows.append(row)
                    log(f"N={n:4d} {row['path']:18s} {med:8.3f} s  {row['GBps']:6.2f} GB/s")
            # Part 2: gather vs the raw TCP ceiling, interleaved.
            n2 = min(64, n_store)
            names = distinct[:n2]
            c = ObjectCacheClient(srv.url, BUCKET, srv.access_key, srv.secret_key, mode="gather")
            ring = [bytearray(n2 * sb) for _ in range(2)]
            pairs = []
            for _ in range(repeats):
                r = time_load(c, names, ring)
                ceiling = tcp_ceiling_Bps(r["bytes"])
                pairs.append({"gather_Bps": r["bytes"] / r["seconds"], "tcp_ceiling_Bps": ceiling})
                log(
                    f"loopback: gather {pairs[-1]['gather_Bps'] / 1e9:.2f} GB/s, raw TCP {ceiling / 1e9:.2f} GB/s"
                )
            c.close()
            for c in targets.values():
                c.close()
    finally:
        if rgw is not None:
            rgw.stop()
    loop = {
        "n_chunks": n2,
        "bytes": n2 * sb * model.num_layers,
        "runs": pairs,
        "gather_GBps": statistics.median(p["gather_Bps"] for p in pairs) / 1e9,
        "tcp_ceiling_GBps": statistics.median(p["tcp_ceiling_Bps"] for p in pairs) / 1e9,
        "fraction_of_tcp": statistics.median(p["gather_Bps"] / p["tcp_ceiling_Bps"] for p in pairs),
    }
    return {"rows": rows, "loopback": loop, "notes": notes}


# --- entry point ---------------------------------------------------------------------------------------------
def print_table(report: dict) -> None:
    rows = report["delivery"]["rows"]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    sizes = sorted({r["n_chunks"] for r in rows})
    print("\nTime to deliver all 32 layers (s; median):")
    print(f"{'N':>5} " + " ".join(f"{p:>16}" for p in paths))
    for n in sizes:
        cells = {r["path"]: r["seconds"] for r in rows if r["n_chunks"] == n}
        print(f"{n:>5} " + " ".join(f"{cells[p]:>16.3f}" if p in cells else f"{'-':>16}" for p in paths))
    for k in ("speedup_vs_rgw_ranged_n16", "loopback_fraction_of_tcp", "shaped_fraction_of_cap"):
        print(f"{k}: {report.get(k)}")


def run_gather(args) -> dict:
    model = get_model(args.model)
    sizes = [int(x) for x in args.sizes.split(",")]

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    report: dict = {
        "command": " ".join(["python -m testbed.bench.gather", *sys.argv[1:]]),
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model.name,
        "slice_bytes": model.kv_bytes_per_chunk_layer(),
        "distinct_chunks_stored": min(DISTINCT_CHUNKS, max(sizes)),
    }
    report["delivery"] = bench_paths(model, sizes, args.repeats, not args.skip_rgw, log)
    by = {(r["n_chunks"], r["path"]): r["seconds"] for r in report["delivery"]["rows"]}
    runs = {(r["n_chunks"], r["path"]): r["runs_s"] for r in report["delivery"]["rows"]}
    if (16, "ranged@rgw") in by:
        # Paired per round (same moment's load on both paths), then the median over rounds.
        report["speedup_vs_rgw_ranged_n16_paired"] = statistics.median(
            a / b for a, b in zip(runs[(16, "ranged@rgw")], runs[(16, "gather@server")])
        )
        report["speedup_vs_rgw_ranged_n16"] = by[(16, "ranged@rgw")] / by[(16, "gather@server")]
        report["speedup_vs_rgw_whole_n16"] = by[(16, "whole@rgw")] / by[(16, "gather@server")]
        report["speedup_vs_rgw_ranged_serial_n16"] = by[(16, "ranged-serial@rgw")] / by[(16, "gather@server")]
    if (16, "ranged@server") in by:
        report["speedup_vs_server_ranged_n16"] = by[(16, "ranged@server")] / by[(16, "gather@server")]
    report["loopback_fraction_of_tcp"] = report["delivery"]["loopback"]["fraction_of_tcp"]
    if not args.skip_shaped:
        report["shaped"] = bench_shaped(model, args.shaped_gbps, args.shaped_chunks, log)
        if "single_stream" in report["shaped"]:
            report["shaped_fraction_of_cap"] = report["shaped"]["single_stream"]["fraction_of_cap"]
            pols = report["shaped"]["policies"].values()
            report["shaped_policy_max_relative_error"] = max(
                e for p in pols for e in p["relative_error_at_pacer_rate"]
            )
            report["shaped_policy_max_relative_error_at_delivered_rate"] = max(
                e for p in pols for e in p["relative_error_at_delivered_rate"]
            )
    report["targets"] = {
        "speedup_vs_rgw_ranged_n16": ">= 20",
        "loopback_fraction_of_tcp": ">= 0.70",
        "shaped_fraction_of_cap": ">= 0.90",
        "shaped_policy_max_relative_error": "<= 0.10",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")
    return report


def run_first_byte(args) -> dict:
    """The ``first-byte`` subcommand (module docstring)."""
    from testbed.wire.kvformat import encode_chunk

    model = get_model(args.model)
    sizes = [int(x) for x in args.sizes.split(",")]
    ct = args.chunk_tokens
    sb = model.kv_bytes_per_chunk_layer(ct)
    n_store = max(sizes)
    rows: dict = {}
    with start_server(args=["--no-fsync"]) as srv:
        c = ObjectCacheClient(srv.url, BUCKET, srv.access_key, srv.secret_key, mode="gather", timeout_s=60)
        c.ensure_bucket()
        names = [f"fb/{model.fingerprint()}/{i:064x}" for i in range(n_store)]
        layer = bytes(range(256)) * (sb // 256) + bytes(sb % 256)
        blob = encode_chunk(model, [layer] * model.num_layers, ct)
        for i in range(0, n_store, 16):
            c.put_chunks([(n, blob) for n in names[i : i + 16]])
        reader = c._gather_reader
        for n in sizes:
            bufs = [bytearray(n * sb) for _ in range(model.num_layers)]
            runs: dict = {"plain": [], "early": []}
            for r in range(args.repeats + 1):
                for label in ("plain", "early"):
                    reader.stream_early = label == "early"
                    st: dict = {}
                    t0 = time.monotonic()
                    for _ in c.load_layers(names[:n], out=bufs, timings=st):
                        pass
                    end = time.monotonic()
                    if r:  # the first round warms up
                        ms = {k[:-2]: (st[k] - st["sent_s"]) * 1e3 for k in ("response_s", "first_byte_s")}
                        ms["first_layer"] = (st["first_layer_s"] - st["sent_s"]) * 1e3
                        ms["end"] = (end - st["sent_s"]) * 1e3
                        ms["client_setup"] = (st["sent_s"] - t0) * 1e3
                        runs[label].append(ms)
            row = {}
            for label, rs in runs.items():
                row[label] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
                row[label]["runs"] = rs
            row["first_byte_saved_ms"] = row["plain"]["first_byte"] - row["early"]["first_byte"]
            rows[str(n)] = row
            print(
                f"N={n:4d} first byte: plain {row['plain']['first_byte']:.2f} ms, early "
                f"{row['early']['first_byte']:.2f} ms; first layer: plain {row['plain']['first_layer']:.2f}"
                f" ms, early {row['early']['first_layer']:.2f} ms",
                flush=True,
            )
        c.close()
    report = {
        "command": " ".join(["python -m testbed.bench.gather", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": model.name,
        "chunk_tokens": ct,
        "slice_bytes": sb,
        "what": "one gather of N distinct objects on loopback (filesystem store, page cache warm); ms from "
        "the request being sent; plain: every object checked before the answer (the old behaviour), "
        "early: stream_early (first layer as parts, 2 objects checked first); medians",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.bench.gather")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gather", help="run the three gather benchmarks")
    g.add_argument("--model", default="llama-3.1-8b")
    g.add_argument("--sizes", default="1,4,16,64,256", help="chunk counts N")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--skip-rgw", action="store_true")
    g.add_argument("--skip-shaped", action="store_true")
    g.add_argument("--shaped-gbps", type=float, default=2.0)
    g.add_argument("--shaped-chunks", type=int, default=16)
    g.add_argument("--out", default=str(REPO_ROOT / "results" / "bench" / "gather.json"))
    f = sub.add_parser("first-byte", help="time to the first layer byte: plain vs early gathers")
    f.add_argument("--model", default="llama-3.1-8b")
    f.add_argument("--sizes", default="16,256", help="chunk counts N")
    f.add_argument(
        "--chunk-tokens",
        type=int,
        default=16,
        help="tokens per stored chunk (small objects: the open cost is per object, not per byte)",
    )
    f.add_argument("--repeats", type=int, default=20)
    f.add_argument("--out", default=str(REPO_ROOT / "results" / "bench" / "gather_first_layer.json"))
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers, RGW and namespaces started here are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.cmd == "first-byte":
        run_first_byte(args)
    else:
        run_gather(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
