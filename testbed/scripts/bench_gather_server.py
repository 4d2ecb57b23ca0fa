"""Server-side gather throughput on loopback, against the raw loopback TCP ceiling.

    .venv/bin/python testbed/scripts/bench_gather_server.py [--chunks 16] [--model llama-3.1-8b] [--repeat 5]

Starts the ObjectCache server (filesystem store, no fsync), stores ``--chunks`` random chunk objects, then
gathers all layers ``--repeat`` times with a minimal reader (``readinto`` one preallocated buffer, optionally
verifying every slice with xxh3 like the client does).  The ceiling is one TCP connection on loopback moving
the same number of bytes with ``sendall``/``recv_into`` and no HTTP.  Prints and saves JSON to
``results/bench/gather_server.json`` with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scheduler.geometry import get_model  # noqa: E402
from scheduler.keys import KeyScope, object_key  # noqa: E402
from testbed.kvformat import encode_chunk, slice_checksum  # noqa: E402
from testbed.launch import start_server  # noqa: E402
from tests.fixtures.servers import signed_request  # noqa: E402


def tcp_ceiling_Bps(total_bytes: int, block_bytes: int = 8 << 20) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    payload = bytes(block_bytes)

    def send() -> None:
        conn, _ = srv.accept()
        sent = 0
        while sent < total_bytes:
            conn.sendall(payload)
            sent += block_bytes
        conn.close()

    t = threading.Thread(target=send)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    buf = memoryview(bytearray(block_bytes))
    got = 0
    t0 = time.perf_counter()
    while True:
        n = c.recv_into(buf)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    t.join()
    c.close()
    srv.close()
    return got / dt


def gather_once(server, bucket: str, keys: list[str], buf: memoryview, verify: bool) -> tuple[float, int]:
    body = json.dumps({"version": 1, "keys": keys}).encode()
    t0 = time.perf_counter()
    resp = signed_request(server, "POST", f"/{bucket}?gather", body=body)
    assert resp.status == 200, resp.read()
    total = 0
    head = bytearray(20)
    while True:
        resp.readinto(memoryview(head)[:4])
        if head[:4] == b"OCEN":
            resp.read(4)
            break
        resp.readinto(memoryview(head)[4:20])
        layer, n, sb = struct.unpack_from("<IIQ", head, 4)
        sums = struct.unpack(f"<{n}Q", resp.read(8 * n))
        view = buf[: n * sb]
        got = 0
        while got < len(view):
            got += resp.readinto(view[got:])
        if verify:
            for i in range(n):
                if slice_checksum(view[i * sb : (i + 1) * sb]) != sums[i]:
                    raise RuntimeError(f"checksum mismatch in layer {layer} chunk {i}")
        total += got
    return time.perf_counter() - t0, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "gather_server.json"))
    args = ap.parse_args()
    model = get_model(args.model)
    scope = KeyScope(model.fingerprint(), "bench")
    rng = np.random.default_rng(0)
    slice_bytes = model.kv_bytes_per_chunk_layer()
    layer = rng.integers(0, 256, slice_bytes, dtype=np.uint8).tobytes()
    with start_server(args=["--no-fsync"]) as srv:
        s3 = srv.boto3_client()
        s3.create_bucket(Bucket="bench")
        keys = []
        for i in range(args.chunks):
            name = object_key(scope, f"{i:064x}")
            blob = encode_chunk(model, [layer] * model.num_layers)
            s3.put_object(Bucket="bench", Key=name, Body=blob)
            keys.append(name)
        buf = memoryview(bytearray(args.chunks * slice_bytes))
        results = {}
        for verify in (False, True):
            rates = []
            for _ in range(args.repeat):
                dt, n = gather_once(srv, "bench", keys, buf, verify)
                rates.append(n / dt)
            results["gather_verified" if verify else "gather_raw"] = {
                "median_GBps": float(np.median(rates)) / 1e9,
                "max_GBps": max(rates) / 1e9,
                "bytes_per_gather": n,
            }
    ceiling = [tcp_ceiling_Bps(args.chunks * slice_bytes * model.num_layers) for _ in range(3)]
    ceiling_GBps = float(np.median(ceiling)) / 1e9
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "chunks": args.chunks,
        "slice_bytes": slice_bytes,
        "loopback_tcp_ceiling_GBps": ceiling_GBps,
        **results,
        "raw_fraction_of_ceiling": results["gather_raw"]["median_GBps"] / ceiling_GBps,
        "verified_fraction_of_ceiling": results["gather_verified"]["median_GBps"] / ceiling_GBps,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
