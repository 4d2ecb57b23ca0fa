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


def tcp_ceiling_Bps(total_bytes: int, block_bytes: int = 8 << 20, sndbuf_bytes: int = 0) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    payload = bytes(block_bytes)

    def send() -> None:
        conn, _ = srv.accept()
        if sndbuf_bytes:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf_bytes)
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
        total = args.chunks * slice_bytes * model.num_layers
        # Interleaved so that load from other processes hits ceiling and gather alike.  The ceiling is the
        # better of default socket buffers and the 4 MiB send buffer the server uses.
        rows = []
        for _ in range(args.repeat):
            ceiling = max(tcp_ceiling_Bps(total), tcp_ceiling_Bps(total, sndbuf_bytes=4 << 20))
            dt_raw, n = gather_once(srv, "bench", keys, buf, verify=False)
            dt_ver, _ = gather_once(srv, "bench", keys, buf, verify=True)
            rows.append(
                {
                    "ceiling_GBps": ceiling / 1e9,
                    "raw_GBps": n / dt_raw / 1e9,
                    "verified_GBps": n / dt_ver / 1e9,
                }
            )

    def med(key: str) -> float:
        return float(np.median([r[key] for r in rows]))

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1min": os.getloadavg()[0],
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "chunks": args.chunks,
        "slice_bytes": slice_bytes,
        "bytes_per_gather": n,
        "loopback_tcp_ceiling_GBps": med("ceiling_GBps"),
        "gather_raw_GBps": med("raw_GBps"),
        "gather_verified_GBps": med("verified_GBps"),
        "raw_fraction_of_ceiling": float(np.median([r["raw_GBps"] / r["ceiling_GBps"] for r in rows])),
        "verified_fraction_of_ceiling": float(
            np.median([r["verified_GBps"] / r["ceiling_GBps"] for r in rows])
        ),
        "runs": rows,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
