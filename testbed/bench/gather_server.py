"""Server-side gather throughput on loopback, against the raw loopback TCP ceiling.

    .venv/bin/python -m testbed.bench.gather_server [--chunks 16] [--model llama-3.1-8b] [--repeat 5]

Starts the ObjectCache server (filesystem store, no fsync), stores ``--chunks`` random chunk objects, then
gathers all layers ``--repeat`` times with a minimal reader (``readinto`` one preallocated buffer, optionally
verifying every slice with xxh3 like the client does).  Two references move the same bytes over one loopback
TCP connection with ``sendall``/``recv_into`` and no HTTP: the *ceiling* (sender thread and receiver in one
process) and *two-process TCP* (sender in a child process, like server and client).  All receivers fill a
buffer of one layer's size front to back, as a client that keeps the bytes must.  A second server with
``--no-sendfile`` serves the same objects through buffers (A/B).  Prints and saves JSON to
``results/bench/gather_server.json`` with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil

from scheduler.geometry import get_model
from scheduler.keys import KeyScope, object_key
from testbed import REPO_ROOT
from testbed.bench.common import machine
from testbed.objectstore.launch import start_server
from testbed.wire.frames import FrameDecoder, first_bad_slice
from testbed.wire.kvformat import encode_chunk


def receive_all(c: socket.socket, buf: memoryview) -> int:
    """Receive until EOF, filling ``buf`` front to back and wrapping around, as a consumer that keeps the
    bytes must (receiving into the same few cache-hot megabytes over and over overstates the ceiling ~2x)."""
    got = pos = 0
    while True:
        if pos == len(buf):
            pos = 0
        n = c.recv_into(buf[pos:])
        if not n:
            return got
        got += n
        pos += n


def tcp_ceiling_Bps(
    total_bytes: int, recv_buf_bytes: int, block_bytes: int = 8 << 20, sndbuf_bytes: int = 0
) -> float:
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
    buf = memoryview(bytearray(recv_buf_bytes))
    t0 = time.perf_counter()
    got = receive_all(c, buf)
    dt = time.perf_counter() - t0
    t.join()
    c.close()
    srv.close()
    return got / dt


_SENDER = """
import socket, sys
total, block, sndbuf = (int(x) for x in sys.argv[1:4])
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1); print(s.getsockname()[1], flush=True)
c, _ = s.accept()
if sndbuf:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
buf = bytes(block); sent = 0
while sent < total:
    c.sendall(buf); sent += block
c.close()
"""


def tcp_two_process_Bps(
    total_bytes: int, recv_buf_bytes: int, block_bytes: int = 8 << 20, sndbuf_bytes: int = 4 << 20
) -> float:
    """The same transfer with sender and receiver in separate processes, as server and client are."""
    args = [sys.executable, "-c", _SENDER, str(total_bytes), str(block_bytes), str(sndbuf_bytes)]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    c = socket.create_connection(("127.0.0.1", port))
    buf = memoryview(bytearray(recv_buf_bytes))
    t0 = time.perf_counter()
    got = receive_all(c, buf)
    dt = time.perf_counter() - t0
    c.close()
    p.wait(30)
    return got / dt


class _SocketReader:
    """Exact reads from a socket, straight into the caller's buffer (no HTTP library in the way)."""

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self.leftover = memoryview(leftover)

    def readinto(self, view: memoryview) -> None:
        take = min(len(self.leftover), len(view))
        view[:take] = self.leftover[:take]
        self.leftover = self.leftover[take:]
        got = take
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if not n:
                raise EOFError("gather stream ended early")
            got += n

    def readinto_some(self, view: memoryview) -> int:
        """Some bytes into ``view`` (0 at the end of the stream): the frame decoder's source."""
        if len(self.leftover):
            take = min(len(self.leftover), len(view))
            view[:take] = self.leftover[:take]
            self.leftover = self.leftover[take:]
            return take
        return self.sock.recv_into(view)


def gather_once(
    server, bucket: str, keys: list[str], buf: memoryview, verify: bool, drain: bool = False
) -> tuple[float, int]:
    """One gather with a minimal client: a SigV4-signed request on a raw socket, frames read with
    ``recv_into`` into ``buf`` (so the number measures the server and TCP, not an HTTP library).

    ``drain``: do not parse frames, receive the whole body into ``buf`` (wrapping) like the TCP references;
    this isolates what the server delivers from the cost of frame-by-frame reading.
    """
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    body = json.dumps({"version": 1, "keys": keys}).encode()
    path = f"/{bucket}?gather"
    req = AWSRequest(method="POST", url=server.url + path, data=body)
    S3SigV4Auth(Credentials(server.access_key, server.secret_key), "s3", server.region).add_auth(req)
    head_lines = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
    t0 = time.perf_counter()
    sock = socket.create_connection((server.host, server.port))
    request = f"POST {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nContent-Length: {len(body)}\r\n"
    sock.sendall((request + head_lines + "Connection: close\r\n\r\n").encode() + body)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("no response")
        raw += chunk
    ttfb_s = time.perf_counter() - t0
    headers, _, leftover = raw.partition(b"\r\n\r\n")
    if not headers.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(headers.decode(errors="replace"))
    if drain:
        total = len(leftover) + receive_all(sock, buf)
        sock.close()
        gather_once.last_ttfb_s = ttfb_s
        return time.perf_counter() - t0, total
    r = _SocketReader(sock, leftover)
    decoder = FrameDecoder(r.readinto_some, max_slices=len(keys))
    total = 0
    while (frame := decoder.next_frame()) is not None:
        view = buf[: frame.payload_bytes]
        r.readinto(view)
        if verify and (bad := first_bad_slice(view, frame.checksums, frame.slice_bytes)) is not None:
            raise RuntimeError(f"checksum mismatch in layer {frame.layer} chunk {bad[0]}")
        total += len(view)
    sock.close()
    gather_once.last_ttfb_s = ttfb_s
    return time.perf_counter() - t0, total


def main() -> None:
    """A benchmark driver: set-up, the measured loop and the report in the order they run."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "bench" / "gather_server.json"))
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
        server = psutil.Process(srv.pid)
        # The same objects served through buffers (pread + write) instead of sendfile, for an A/B.
        buffered = start_server(srv.data_dir, args=["--no-fsync", "--no-sendfile"])
        for _ in range(args.repeat):
            # The references receive into a buffer of one layer's size, as the gather client does.
            layer_bytes = len(buf)
            ceiling = max(
                tcp_ceiling_Bps(total, layer_bytes), tcp_ceiling_Bps(total, layer_bytes, sndbuf_bytes=4 << 20)
            )
            two_process = tcp_two_process_Bps(total, layer_bytes)
            cpu0 = server.cpu_times()
            dt_raw, n = gather_once(srv, "bench", keys, buf, verify=False)
            ttfb_s = gather_once.last_ttfb_s
            cpu1 = server.cpu_times()
            dt_ver, _ = gather_once(srv, "bench", keys, buf, verify=True)
            server_cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            dt_buf, _ = gather_once(buffered, "bench", keys, buf, verify=False)
            dt_drain, n_drain = gather_once(srv, "bench", keys, buf, verify=False, drain=True)
            rows.append(
                {
                    "ceiling_GBps": ceiling / 1e9,
                    "two_process_tcp_GBps": two_process / 1e9,
                    "raw_GBps": n / dt_raw / 1e9,
                    # Request to response headers (signing, auth, opening and checking every object).
                    "raw_ttfb_ms": ttfb_s * 1e3,
                    "raw_streaming_GBps": n / (dt_raw - ttfb_s) / 1e9,
                    "verified_GBps": n / dt_ver / 1e9,
                    "buffered_raw_GBps": n / dt_buf / 1e9,
                    "drain_GBps": n_drain / dt_drain / 1e9,
                    # CPU the server spends per GB gathered: unlike GB/s, barely affected by other load.
                    "server_cpu_s_per_GB": server_cpu_s / (n / 1e9),
                }
            )
        buffered.stop()

    def med(key: str) -> float:
        return float(np.median([r[key] for r in rows]))

    report = {
        "command": " ".join(["python -m testbed.bench.gather_server", *sys.argv[1:]]),
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "chunks": args.chunks,
        "slice_bytes": slice_bytes,
        "bytes_per_gather": n,
        "loopback_tcp_ceiling_GBps": med("ceiling_GBps"),
        "gather_raw_GBps": med("raw_GBps"),
        "gather_verified_GBps": med("verified_GBps"),
        "gather_ttfb_ms": med("raw_ttfb_ms"),
        "gather_raw_streaming_GBps": med("raw_streaming_GBps"),
        "gather_buffered_raw_GBps": med("buffered_raw_GBps"),
        "gather_drain_GBps": med("drain_GBps"),
        "drain_fraction_of_two_process_tcp": float(
            np.median([r["drain_GBps"] / r["two_process_tcp_GBps"] for r in rows])
        ),
        "server_cpu_s_per_GB": med("server_cpu_s_per_GB"),
        "two_process_tcp_GBps": med("two_process_tcp_GBps"),
        "raw_fraction_of_ceiling": float(np.median([r["raw_GBps"] / r["ceiling_GBps"] for r in rows])),
        "raw_fraction_of_two_process_tcp": float(
            np.median([r["raw_GBps"] / r["two_process_tcp_GBps"] for r in rows])
        ),
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
