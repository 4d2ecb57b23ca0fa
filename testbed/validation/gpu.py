"""TTFT of the layerwise prefill engine on a real GPU, per KV source (the H100 measurements).

``python -m testbed.validation.ttft measure`` and ``... check`` (run on the GPU machine) call ``measure`` and
``check`` here.

Setup of ``measure``: Llama-3.1-8B geometry with random bf16 weights on one GPU; for each (cached, new)
configuration a random prompt whose first ``cached`` tokens are a prefix cached in every tier: the DRAM tier
(pinned host memory) and the object tier (our ObjectCache server, started on loopback with the filesystem
store, reached through ``testbed.client.core`` with the gather extension).  Sources timed:

* ``recompute``: no cache, the whole prompt is prefilled;
* ``dram``: whole-prefix host-to-device copy before layer 0 (the non-layerwise baseline);
* ``dram_layerwise``: per-layer copies overlapping compute;
* ``objectcache_paced``: the server's pacer caps egress at ``--link-gbps`` (a configured link rate);
* ``objectcache_max``: unpaced: the highest rate this machine sustains over loopback.

Object sources read with ``--reader`` (default ``process``: the gather streams in a reader process, off the
engine's GIL; ``testbed.engine.reader``); a name ending in ``_thread`` / ``_process`` forces the reader, and
``_<k>stream(s)`` the number of gather streams (e.g. ``objectcache_paced_thread``,
``objectcache_max_thread_2streams``).

TTFT is the engine's host-measured time from the request (token ids on the host) to the last token's
logits on the device (stream synchronised), medians over repeats after a warm-up.  Every measured prefill's
logits are compared with the recompute's (``logits_rel_err``); a run that fell back to recompute is an error.
The lookup is the planner's job here (``check_exists=False``): the gather itself verifies that every chunk
exists before sending any payload, and a miss falls back to recompute.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

K = 1024


# (cached, new): the simulator's headline configurations (configs/experiment/context_sweep.yaml): 4K cached +
# 128 new, 16K + 1K, 60K + 4K (the 64K context of the headline ratio).
DEFAULT_CONFIGS = ((4 * K, 128), (16 * K, 1 * K), (60 * K, 4 * K))


SOURCES = (
    "recompute",
    "dram",
    "dram_layerwise",
    "objectcache_paced",
    "objectcache_paced_thread",
    "objectcache_max",
    "objectcache_max_thread",
    "objectcache_max_2streams",
    "objectcache_max_1stream",
)


def source_streams(name: str, default: int) -> int:
    """Gather streams of an object source name: ``objectcache_max_2streams`` -> 2, ``..._1stream`` -> 1."""
    m = re.search(r"_(\d+)streams?$", name)
    return int(m.group(1)) if m else default


def source_reader(name: str, default: str) -> str:
    """Reader of an object source name: ``..._thread[_2streams]`` -> thread, ``..._process`` -> process."""
    m = re.search(r"_(thread|process)(_\d+streams?)?$", name)
    return m.group(1) if m else default


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"4096+128,61440+4096"`` -> [(4096, 128), (61440, 4096)]."""
    return [tuple(int(x) for x in item.split("+")) for item in text.split(",")]  # type: ignore[misc]


def measure_h2d_GBps(torch, nbytes: int = 1 << 30) -> float:
    """Pinned host-to-device copy bandwidth (GB/s, 1e9), median of 5 timed copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times[1:]) / 1e9


def measure(args) -> dict:
    """The ``measure`` command (see the module docstring): raw JSON with one row per configuration and a
    timing entry per source (``time_source``).  Kept as one function, longer than most: the model, the two
    servers, their clients and the pinned reader buffers are built once and torn down together in one
    ``finally``, and every configuration reuses them."""
    import torch

    from testbed.client.core import ObjectCacheClient
    from testbed.engine.dram import DramSource, DramTier
    from testbed.engine.kvload import LayerCopier
    from testbed.engine.model import build_model
    from testbed.engine.objectsource import ObjectCacheSource
    from testbed.engine.prefill import PrefillEngine
    from testbed.engine.save import KVSaver
    from testbed.objectstore.launch import start_server

    configs = parse_configs(args.configs)
    sources = args.sources.split(",")
    dev = torch.device(args.device)
    ct = args.chunk_tokens
    t_start = time.time()
    model = build_model(args.model, device=dev, fast_init=True, seed=args.seed)
    spec = model.spec
    dtype = model.lm_head.weight.dtype
    max_chunks = max(c for c, _ in configs) // ct
    tier_chunks = max(c + n for c, n in configs) // ct  # the recompute saves every full chunk of the prompt
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{platform.machine()}"
    log(f"model {spec.name} on {gpu}; max prefix {max_chunks} chunks")
    h2d = measure_h2d_GBps(torch) if dev.type == "cuda" else None
    log(f"pinned H2D {h2d} GB/s")

    engine = PrefillEngine(model, chunk_tokens=ct, namespace="ttft")
    tier = DramTier(spec, tier_chunks, chunk_tokens=ct, device=dev)
    copier = LayerCopier(spec, ct, dev, max_chunks, dtype)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="oc-ttft-"))
    out: dict = {
        "model": spec.name,
        "gpu": gpu,
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "chunk_tokens": ct,
        "link_Gbps": args.link_gbps,
        "pinned_h2d_GBps": h2d,
        "repeats": args.repeats,
        "streams": args.streams,
        "reader": args.reader,
        "piece_kib": args.piece_kib,
        "min_stream_mib": args.min_stream_mib,
        "shared_prefix": bool(args.shared_prefix),
        "configs": [],
    }
    servers = {}
    try:
        flags = ["--no-fsync", "--io-threads", str(args.io_threads)]
        # Two servers over one filesystem store: unpaced, and paced to the configured link rate.
        servers["objectcache_max"] = start_server(data_dir, args=flags)
        clients = {"objectcache_max": _client(ObjectCacheClient, servers["objectcache_max"])}
        clients["objectcache_max"].ensure_bucket()
        servers["objectcache_paced"] = start_server(
            data_dir, args=flags + ["--egress-gbps", str(args.link_gbps), "--piece-kib", str(args.piece_kib)]
        )
        clients["objectcache_paced"] = _client(ObjectCacheClient, servers["objectcache_paced"])
        saver = KVSaver(tier, object_client=clients["objectcache_max"], scope=engine.scope)
        src = {
            "dram": DramSource(tier, copier, layerwise=False),
            "dram_layerwise": DramSource(tier, copier, layerwise=True),
        }
        # One object source per reader kind (their pinned receive buffers are the big allocation, made
        # once); the client picks the server.
        readers = {source_reader(n, args.reader) for n in sources if n.startswith("objectcache")}
        ocs = {
            r: ObjectCacheSource(
                clients["objectcache_max"], engine.scope, copier, check_exists=False, reader=r
            )
            for r in sorted(readers)
        }
        for oc in ocs.values():
            t0 = time.perf_counter()
            oc.reserve(max_chunks)
            log(f"{oc.reader} reader: buffers for {max_chunks} chunks in {time.perf_counter() - t0:.2f} s")
        # Inputs are random, never zeros; a fresh prompt per configuration, or (``--shared-prefix``) the
        # prefixes of one prompt, saved once: a grid of many configurations then writes the tiers once.
        gen = torch.Generator().manual_seed(args.seed)
        base = None
        if args.shared_prefix:
            base = torch.randint(0, spec.vocab_size, (max(c + n for c, n in configs),), generator=gen)
            longest = max(c for c, _ in configs)
            engine.saver = saver
            t0 = time.perf_counter()
            saved = engine.prefill(base[:longest])
            written = saver.flush()
            engine.saver = None
            log(f"shared prefix: saved {len(saved.saved_keys)} chunks ({written} objects) in "
                f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
            del saved
        for cached, new in configs:
            if base is not None:
                # The reference recompute does not save: the tiers already hold this prefix, computed as
                # the prefix of the longest one (causal attention: the same KV, up to GEMM-shape rounding).
                ids = base[: cached + new]
                ref = engine.prefill(ids)
            else:
                ids = torch.randint(0, spec.vocab_size, (cached + new,), generator=gen)
                # Populate both tiers through the engine's own save path: the full recompute of the prompt
                # saves its full chunks (DRAM now, the object tier in the background) and is the logits
                # reference, so the cached KV is bitwise the reference's and the error measures the engine.
                engine.saver = saver
                t0 = time.perf_counter()
                ref = engine.prefill(ids)
                written = saver.flush()
                engine.saver = None
                log(f"[{cached}+{new}] saved {len(ref.saved_keys)} chunks ({written} objects) in "
                    f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
            row = {"cached_tokens": cached, "new_tokens": new, "context_tokens": cached + new, "sources": {}}
            for name in sources:
                compute_per_layer_s = None
                if name.startswith("objectcache"):
                    oc = ocs[source_reader(name, args.reader)]
                    oc.client = clients[
                        "objectcache_paced" if name.startswith("objectcache_paced") else "objectcache_max"
                    ]
                    oc.streams = source_streams(name, args.streams)
                    # A name that says its stream count gets exactly that; the others scale with the prefix.
                    oc.min_stream_bytes = 0 if source_streams(name, 0) else args.min_stream_mib << 20
                    source = oc
                    # The pacer's hint: this request's per-layer compute, from the layerwise DRAM run.
                    lw = row["sources"].get("dram_layerwise")
                    compute_per_layer_s = lw["ttft_ms"] / 1e3 / spec.num_layers if lw else None
                else:
                    source = None if name == "recompute" else src[name]
                entry = time_source(
                    engine, ids, source, name, cached // ct, compute_per_layer_s, args.repeats, ref.logits
                )
                row["sources"][name] = entry
                log(
                    f"[{cached}+{new}] {name:18s} TTFT {entry['ttft_ms']:9.2f} ms  (rel err {entry['logits_rel_err']:.2e})"
                )
            out["configs"].append(row)
            del ref
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if base is None:  # the next configuration writes its own prefix: free this one's slots now
                tier.clear()
    finally:
        for oc in locals().get("ocs", {}).values():
            oc.close()
        for c in locals().get("clients", {}).values():
            c.close()
        for s in servers.values():
            s.stop()
    out["wall_s"] = time.time() - t_start
    return out


def time_source(
    engine,
    ids,
    source,
    name: str,
    cached_chunks: int,
    compute_per_layer_s: float | None,
    repeats: int,
    ref_logits,
) -> dict:
    """Prefill ``ids`` from ``source`` (None: recompute) ``repeats`` times after a warm-up; the median TTFT
    (ms), every TTFT, the worst logits error against ``ref_logits`` and the load's waits and timings (ms).
    ``compute_per_layer_s`` is the pacer's hint (s per layer); a run that fell back is an error."""
    from testbed.engine.prefill import rel_err

    runs = []
    errs = []
    for rep in range(repeats + 1):
        r = engine.prefill(
            ids, source, max_cached_chunks=cached_chunks, compute_per_layer_s=compute_per_layer_s, save=False
        )
        expected = "recompute" if source is None else source.name
        if r.fallback or r.source != expected:
            raise RuntimeError(f"{name}: fell back to {r.source}: {r.fallback}")
        if rep:  # rep 0 is the warm-up
            errs.append(rel_err(r.logits, ref_logits))
            # Keep the timings, not the run's KV and logits (GBs on the GPU at long prompts).
            runs.append(SimpleNamespace(ttft_s=r.ttft_s, cached_tokens=r.cached_tokens, load=r.load))
        del r
    ttfts = [r.ttft_s for r in runs]
    entry = {
        "ttft_ms": statistics.median(ttfts) * 1e3,
        "ttft_ms_all": [t * 1e3 for t in ttfts],
        "logits_rel_err": max(errs),
        "cached_tokens_used": runs[0].cached_tokens,
    }
    if runs[0].load is not None:
        entry["first_layer_wait_ms"] = statistics.median(r.load.first_layer_wait_s for r in runs) * 1e3
        entry["host_wait_ms"] = statistics.median(r.load.total_wait_s for r in runs) * 1e3
        entry["bytes_loaded"] = runs[0].load.bytes_loaded
        if runs[0].load.timings_ms:
            entry["reader"] = source.reader
            entry["load_timings_ms"] = median_timings([r.load.timings_ms for r in runs])
    return entry


def median_timings(timings: list[dict]) -> dict:
    """Median over repeats of each load timing (ms from start_load); per-group lists -> their max (the
    layer is complete when the last group has it)."""
    out = {}
    for key in timings[0]:
        vals = []
        for t in timings:
            v = t.get(key)
            if isinstance(v, list):
                v = max((x for x in v if x is not None), default=None)
            if v is not None:
                vals.append(v)
        if vals:
            out[key] = statistics.median(vals)
    return out


def check(args) -> dict:
    """Split-vs-recompute error at the real geometry, float32 and bf16 on the same weights.

    Per configuration and dtype: the prefix is prefilled alone first (as an earlier request would have),
    saved to the DRAM tier, then the whole prompt is prefilled on top of it (``split``) and compared with a
    full recompute (``full``).  float32 isolates the engine; bf16 adds rounding, which 32 layers of random
    weights amplify: ``bf16_full_vs_fp32_full`` is bf16's own error level, the yardstick for the bf16 split
    error.  The bf16 weights are the float32 weights rounded."""
    import torch

    from testbed.engine.dram import DramSource, DramTier
    from testbed.engine.kvload import LayerCopier
    from testbed.engine.model import build_model
    from testbed.engine.prefill import PrefillEngine, kv_rel_err, rel_err
    from testbed.engine.save import KVSaver

    dev, ct = torch.device(args.device), args.chunk_tokens
    model32 = build_model(
        args.model, device=dev, fast_init=True, seed=args.seed, dtype_override=torch.float32
    )
    model16 = build_model(
        args.model, device=dev, fast_init=True, seed=args.seed, dtype_override=torch.bfloat16
    )
    with torch.no_grad():
        for p16, p32 in zip(model16.parameters(), model32.parameters()):
            p16.copy_(p32)
    out: dict = {}
    gen = torch.Generator().manual_seed(args.seed + 1)
    for cached, new in parse_configs(args.configs):
        ids = torch.randint(0, model32.spec.vocab_size, (cached + new,), generator=gen)
        logits = {}
        for name, model in (("float32", model32), ("bfloat16", model16)):
            dtype = model.lm_head.weight.dtype
            tier = DramTier(model.spec, cached // ct, chunk_tokens=ct, device=dev)
            engine = PrefillEngine(model, chunk_tokens=ct, namespace="check", saver=KVSaver(tier))
            prefix = engine.prefill(ids[:cached])
            engine.saver = None
            copier = LayerCopier(model.spec, ct, dev, cached // ct, dtype)
            split = engine.prefill(ids, DramSource(tier, copier), max_cached_chunks=cached // ct)
            full = engine.prefill(ids)
            logits[name] = (split.logits, full.logits)
            res = {
                "cached_tokens_used": split.cached_tokens,
                "logits_rel_err": rel_err(split.logits, full.logits),
                "kv_rel_err_prefix_alone_vs_in_prompt": kv_rel_err(prefix.kv, full.kv, cached),
                "kv_rel_err_new_tokens": max(
                    rel_err(a[:, cached:], b[:, cached:]) for a, b in zip(split.kv, full.kv)
                ),
            }
            out[f"{name}/{cached}+{new}"] = res
            log(f"check {name} {cached}+{new}: {res}")
            del tier, engine, prefix, split, full, copier
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        out[f"cross/{cached}+{new}"] = {
            "bf16_full_vs_fp32_full": rel_err(logits["bfloat16"][1], logits["float32"][1]),
            "bf16_split_vs_fp32_full": rel_err(logits["bfloat16"][0], logits["float32"][1]),
        }
        log(f"check cross {cached}+{new}: {out[f'cross/{cached}+{new}']}")
    return out


def _client(cls, srv):
    return cls(
        srv.url,
        "objectcache-kv",
        srv.access_key,
        srv.secret_key,
        mode="gather",
        max_concurrency=16,
        timeout_s=120,
    )


def log(msg: str) -> None:
    print(f"[ttft {time.strftime('%H:%M:%S')}] {msg}", flush=True)
