"""Per-phase timelines of single prefill requests from the object tier, and their figure.

    # on the GPU machine: trace one request per configuration (writes JSON)
    python -m testbed.validation.timeline measure --configs 4096+128,61440+128 --out timeline.json
    # anywhere with matplotlib: draw it
    python -m testbed.validation.timeline plot timeline.json --out timeline.png

``measure`` starts our server on loopback (paced at ``--link-gbps``, 0: unpaced; filesystem store), saves
each configuration's prefix through the engine's own save path (a full recompute of the prompt, which is
also the logits reference), measures the DRAM-layerwise TTFT (its per-layer compute is the pacer's hint, as
in ``testbed.validation.gpu``), then prefills from the object tier ``--warmups`` times and once more with
``PrefillEngine.timeline`` on (``testbed.engine.timeline``: ms from the request's start: gather request
sent, response headers, first byte, first layer per stream; each layer's arrival in the pinned buffer, the
host's wait and the layer's compute).  Needs only torch, numpy and the repository (no transformers: random
weights of the model's geometry; timing does not depend on values).  ``plot`` draws one panel per request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from testbed.validation.gpu import parse_configs


def log(msg: str) -> None:
    print(f"[timeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure(args) -> dict:
    """The ``measure`` command (module docstring)."""
    import torch

    from testbed.client.core import ObjectCacheClient
    from testbed.engine.dram import DramSource, DramTier
    from testbed.engine.kvload import LayerCopier
    from testbed.engine.model import build_model
    from testbed.engine.objectsource import ObjectCacheSource
    from testbed.engine.prefill import PrefillEngine, rel_err
    from testbed.engine.save import KVSaver
    from testbed.engine.timeline import Timeline
    from testbed.objectstore.launch import start_server

    configs = parse_configs(args.configs)
    dev = torch.device(args.device)
    ct = args.chunk_tokens
    model = build_model(args.model, device=dev, fast_init=True, seed=args.seed)
    spec = model.spec
    max_chunks = max(c for c, _ in configs) // ct
    tier_chunks = max(c + n for c, n in configs) // ct
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{platform.machine()}"
    engine = PrefillEngine(model, chunk_tokens=ct, namespace="timeline")
    tier = DramTier(spec, tier_chunks, chunk_tokens=ct, device=dev)
    copier = LayerCopier(spec, ct, dev, max_chunks, model.lm_head.weight.dtype)
    setup = {
        "model": spec.name,
        "device": gpu,
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "chunk_tokens": ct,
        "link_Gbps": args.link_gbps or None,
        "reader": args.reader,
        "streams": args.streams,
        "min_stream_mib": args.min_stream_mib,
        "warmups": args.warmups,
    }
    flags = ["--no-fsync", "--io-threads", str(args.io_threads)]
    if args.link_gbps:
        flags += ["--egress-gbps", str(args.link_gbps), "--piece-kib", str(args.piece_kib)]
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="oc-timeline-"))
    srv = start_server(data_dir, args=flags)
    client = ObjectCacheClient(
        srv.url, "objectcache-kv", srv.access_key, srv.secret_key, mode="gather", max_concurrency=16,
        timeout_s=120,
    )  # fmt: skip
    oc = None
    requests = []
    try:
        client.ensure_bucket()
        saver = KVSaver(tier, object_client=client, scope=engine.scope)
        oc = ObjectCacheSource(
            client, engine.scope, copier, check_exists=False, reader=args.reader, streams=args.streams,
            min_stream_bytes=args.min_stream_mib << 20,
        )  # fmt: skip
        oc.reserve(max_chunks)
        gen = torch.Generator().manual_seed(args.seed)
        for cached, new in configs:
            ids = torch.randint(0, spec.vocab_size, (cached + new,), generator=gen)
            engine.saver = saver
            ref = engine.prefill(ids)
            saver.flush()
            engine.saver = None
            n = cached // ct
            lw = DramSource(tier, copier, layerwise=True)
            dram_ms = []
            for _ in range(args.warmups + 1):
                dram_ms.append(engine.prefill(ids, lw, max_cached_chunks=n, save=False).ttft_s * 1e3)
            cpl_s = dram_ms[-1] / 1e3 / spec.num_layers
            ttfts = []
            for _ in range(args.warmups):
                r = engine.prefill(ids, oc, max_cached_chunks=n, compute_per_layer_s=cpl_s, save=False)
                ttfts.append(r.ttft_s * 1e3)
            engine.timeline = Timeline(dev)
            r = engine.prefill(ids, oc, max_cached_chunks=n, compute_per_layer_s=cpl_s, save=False)
            trace = engine.timeline.to_dict()
            engine.timeline = None
            requests.append(
                {
                    "config": f"{cached}+{new}",
                    "cached_tokens": cached,
                    "new_tokens": new,
                    "source": r.source,
                    "streams_used": oc.stream_count(n),
                    "fallback": r.fallback,
                    "ttft_ms": r.ttft_s * 1e3,
                    "warmup_ttft_ms": ttfts,
                    "dram_layerwise_ttft_ms": dram_ms[-1],
                    "compute_per_layer_hint_ms": cpl_s * 1e3,
                    "logits_rel_err": rel_err(r.logits, ref.logits),
                    "timeline": trace,
                }
            )
            log(
                f"[{cached}+{new}] TTFT {r.ttft_s * 1e3:.1f} ms (DRAM layerwise {dram_ms[-1]:.1f} ms) {r.fallback}"
            )
            del ref, r
            tier.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if oc is not None:
            oc.close()
        client.close()
        srv.stop()
    return {"setup": setup, "requests": requests}


# --- the figure ---------------------------------------------------------------------------------------------
def plot_timeline(doc: dict, out: str | Path) -> Path:
    """One panel per request: per layer (rows, layer 0 on top) the fetch (from the previous layer's arrival,
    or the first byte, to this layer's arrival in the pinned buffer), the host's wait and the layer's
    compute, against ms from the request's start; the request's phases as labelled vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs = doc["requests"]
    fig, axes = plt.subplots(len(reqs), 1, figsize=(11, 3.2 + 2.4 * len(reqs)), squeeze=False)
    for ax, req in zip(axes[:, 0], reqs):
        tl = req["timeline"]
        layers = tl["layers"]
        groups = tl.get("groups_ms", {})
        marks = tl.get("marks_ms", {})

        def latest(key, groups=groups):
            vals = [v for v in groups.get(key, []) if v is not None]
            return max(vals) if vals else None

        first_byte = latest("first_byte")
        prev = first_byte if first_byte is not None else marks.get("load_start", 0.0)
        for row in layers:
            y = row["layer"]
            if row.get("arrived_ms") is not None:
                a = row["arrived_ms"]
                start = min(prev, a)
                ax.barh(y - 0.2, a - start, left=start, height=0.35, color="tab:blue", alpha=0.7)
                prev = a
            if row.get("wait_ms"):
                w0, w1 = row["wait_ms"]
                ax.barh(y + 0.2, max(w1 - w0, 1e-3), left=w0, height=0.35, color="lightgrey")
            if row.get("compute_ms"):
                c0, c1 = row["compute_ms"]
                ax.barh(y + 0.2, max(c1 - c0, 1e-3), left=c0, height=0.35, color="tab:orange", alpha=0.9)
        phases = [
            ("request sent", latest("request_sent"), "tab:green"),
            ("response head (control round trip + open)", latest("response_headers"), "tab:purple"),
            ("first payload byte", first_byte, "tab:blue"),
            ("first layer verified", latest("first_layer"), "tab:cyan"),
            ("TTFT", marks.get("ttft"), "black"),
        ]
        n_layers = max((r["layer"] for r in layers), default=0) + 1
        for i, (label, x, color) in enumerate(phases):
            if x is None:
                continue
            ax.axvline(x, color=color, lw=1, ls="--")
            ax.text(x, -1.0 - 0.9 * i, f" {label} {x:.1f} ms", color=color, fontsize=7, va="center")
        ax.set_ylim(n_layers + 0.5, -5.5)
        ax.set_xlim(left=0)
        ax.set_ylabel("layer")
        ax.set_xlabel("ms from the request's start")
        ax.set_title(
            f"{req['config']} tokens (cached+new) from the object tier: TTFT {req['ttft_ms']:.1f} ms, "
            f"DRAM layerwise {req['dram_layerwise_ttft_ms']:.1f} ms, {req['streams_used']} streams"
            + (f"; fell back: {req['fallback'][:60]}" if req.get("fallback") else ""),
            fontsize=9,
        )
    s = doc["setup"]
    link = f"paced {s['link_Gbps']:g} Gbps" if s.get("link_Gbps") else "unpaced"
    fig.suptitle(
        f"{s['model']} on {s['device']}, our server on loopback ({link}), {s['reader']} reader; blue: a "
        f"layer's fetch until it is in the pinned buffer, grey: host waits for it, orange: its compute",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m testbed.validation.timeline")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="trace one request per configuration (JSON)")
    m.add_argument("--model", default="llama-3.1-8b")
    m.add_argument("--device", default="cuda")
    m.add_argument("--configs", default="4096+128,61440+128", help="cached+new token pairs")
    m.add_argument("--chunk-tokens", type=int, default=256)
    m.add_argument("--reader", default="process", choices=["process", "thread"])
    m.add_argument("--streams", type=int, default=8)
    m.add_argument("--min-stream-mib", type=int, default=128)
    m.add_argument("--link-gbps", type=float, default=100.0, help="pace the server (0: unpaced)")
    m.add_argument("--piece-kib", type=int, default=64)
    m.add_argument("--io-threads", type=int, default=16)
    m.add_argument("--warmups", type=int, default=3)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--data-dir", default=None)
    m.add_argument("--out", required=True)
    m.add_argument("--plot", default=None, help="also draw the figure here")
    p = sub.add_parser("plot", help="draw a measured timeline")
    p.add_argument("json")
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "plot":
        print(f"wrote {plot_timeline(json.loads(Path(args.json).read_text()), args.out)}")
        return 0
    doc = {
        "command": "python -m testbed.validation.timeline " + " ".join(shlex.quote(a) for a in argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **measure(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {args.out}")
    if args.plot:
        log(f"wrote {plot_timeline(doc, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
