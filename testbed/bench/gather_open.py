"""Server-side cost of opening a gather's objects: ``gather.open_batch`` on the filesystem store.

    .venv/bin/python -m testbed.bench.gather_open [--keys 30] [--repeat 50] [--out results/bench/gather_open.json]

Writes ``--objects`` chunk objects of ``--model``'s geometry (tiny 4-token chunks: the open reads only the
header and trailer, so payload size does not matter) to a filesystem store under ``--dir`` (default: a temp
dir in /dev/shm), then times opening and checking ``--keys`` of them (open, trailer, header checksum, size),
median over repeats.  This is the per-gather work the server does before a stream's first byte
(``docs/engine.md``, "Why the first layer comes late at 60K").  Prints and saves JSON (command, machine,
date, git revision).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scheduler.geometry import PRESETS
from testbed.bench.common import machine
from testbed.objectstore import gather
from testbed.objectstore.store import FilesystemStore
from testbed.wire import kvformat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--objects", type=int, default=240)
    ap.add_argument("--keys", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    ap.add_argument("--out", default="results/bench/gather_open.json")
    a = ap.parse_args(argv)
    spec, ct = PRESETS[a.model], 4
    sb = spec.kv_bytes_per_chunk_layer(ct)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        store = FilesystemStore(d, fsync=False)
        store.create_bucket("bench-open")
        keys = [f"{i:064x}" for i in range(a.objects)]
        for i, k in enumerate(keys):
            w = store.begin_write("bench-open", k)
            w.write(
                kvformat.encode_chunk(spec, [bytes([(i + j) % 251]) * sb for j in range(spec.num_layers)], ct)
            )
            w.commit()
        times = []
        for r in range(a.repeat + 1):
            batch = keys[(r * a.keys) % a.objects :][: a.keys]
            t0 = time.perf_counter()
            res = gather.open_batch(store, "bench-open", batch)
            dt_s = time.perf_counter() - t0
            for h, _ in res:
                h.close()
            if r:  # the first is a warm-up
                times.append(dt_s)
    med = statistics.median(times)
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    out = {
        "command": "python -m testbed.bench.gather_open " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_rev": rev,
        "machine": machine(),
        "model": a.model,
        "keys_per_gather": a.keys,
        "repeats": a.repeat,
        "open_gather_ms_median": med * 1e3,
        "open_per_key_us_median": med / a.keys * 1e6,
    }
    print(json.dumps(out, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
