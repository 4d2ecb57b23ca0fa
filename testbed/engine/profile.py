"""GPU profiler: per-layer prefill time over a grid of (cached, new) tokens -> the simulator's profile table.

    python -m testbed.engine.profile --model llama-3.1-8b --out sim/profiles/llama-3.1-8b_h100_measured.csv

For every grid point the model (random weights of the model's geometry: timing does not depend on the
values, but they are random, never zeros) prefills ``new`` tokens on top of ``cached`` tokens of random KV
cache, exactly as the layerwise engine does (``LlamaModel.layer_forward`` with lower-right causal SDPA).
CUDA events around the embedding, every layer and the LM head give the whole prefill time and each layer's
time; after warm-ups the median over repeats is written.  The table format is ``scheduler.compute``'s:
``cached_tokens,new_tokens,prefill_ms,layer_ms`` after ``# key: value`` header lines.

On the CPU (``--device cpu``, tests) the same code times with ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from scheduler.compute import PROFILE_COLUMNS, ProfileCompute, ProfilePoint
from testbed.engine.model import build_model

K = 1024
DEFAULT_CACHED = (0, 1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K)
DEFAULT_NEW = (16, 128, 512, 2 * K, 8 * K, 32 * K)
FULL_PREFILL_NEW = (16, 128, 256, 512, 1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K)
DEFAULT_MAX_TOTAL = 96 * K


def default_grid(max_total: int = DEFAULT_MAX_TOTAL) -> list[tuple[int, int]]:
    """Full prefills over a wide range of lengths, plus cached x new combinations up to ``max_total``."""
    points = {(0, n) for n in FULL_PREFILL_NEW if n <= max_total}
    points |= {(c, n) for c in DEFAULT_CACHED for n in DEFAULT_NEW if c + n <= max_total}
    return sorted(points)


def parse_grid(text: str) -> list[tuple[int, int]]:
    """``"0:4096,2048:2048"`` -> [(0, 4096), (2048, 2048)]."""
    out = []
    for item in text.split(","):
        c, _, n = item.strip().partition(":")
        out.append((int(c), int(n)))
    return out


class _Timer:
    """Marks on the compute stream (CUDA events) or host clock reads (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


@torch.inference_mode()
def time_prefill(
    model, kv: list[torch.Tensor], cached: int, new: int, ids: torch.Tensor
) -> tuple[float, float]:
    """One prefill of ``new`` tokens over ``cached`` rows of ``kv``: (whole prefill ms, mean layer ms)."""
    timer = _Timer(model.device)
    timer.mark()
    cos, sin = model.rope(cached, new)
    h = model.embed(ids[:new])
    timer.mark()
    for layer in range(model.spec.num_layers):
        h = model.layer_forward(layer, h, cos, sin, kv[layer][:, : cached + new], cached)
        timer.mark()
    model.head(h[-1:])
    timer.mark()
    iv = timer.intervals_ms()
    layers = iv[1:-1]
    return sum(iv), sum(layers) / len(layers)


def profile(model, grid, *, warmup: int = 1, repeats: int = 5, seed: int = 0, log=print) -> list[dict]:
    """Measure every (cached, new) point of ``grid``; returns rows with ``PROFILE_COLUMNS`` (+ spread)."""
    dev = model.device
    s = model.spec
    max_total = max(c + n for c, n in grid)
    g = torch.Generator(device=dev).manual_seed(seed)
    dtype = model.lm_head.weight.dtype
    # Random KV cache for the largest point, shared by all points (values do not change the timing).
    kv = [
        torch.randn(2, max_total, s.num_kv_heads, s.head_dim, generator=g, device=dev, dtype=dtype)
        for _ in range(s.num_layers)
    ]
    ids = torch.randint(0, s.vocab_size, (max(n for _, n in grid),), generator=g, device=dev)
    rows = []
    for cached, new in grid:
        first_ms, _ = time_prefill(model, kv, cached, new, ids)
        # Long points get fewer repeats: their noise is small relative to their length.
        reps = repeats if first_ms < 1000 else max(2, repeats // 2)
        for _ in range(max(0, warmup - 1)):
            time_prefill(model, kv, cached, new, ids)
        samples = [time_prefill(model, kv, cached, new, ids) for _ in range(reps)]
        prefill = [p for p, _ in samples]
        layer = [lay for _, lay in samples]
        row = {
            "cached_tokens": cached,
            "new_tokens": new,
            "prefill_ms": statistics.median(prefill),
            "layer_ms": statistics.median(layer),
            "prefill_ms_min": min(prefill),
            "prefill_ms_max": max(prefill),
            "repeats": reps,
        }
        rows.append(row)
        log(
            f"cached={cached:>6} new={new:>6} prefill={row['prefill_ms']:10.3f} ms  layer={row['layer_ms']:8.4f} ms"
        )
    return rows


def as_compute(rows: list[dict], num_layers: int) -> ProfileCompute:
    """The compute model of measured ``profile`` rows (the same interpolation as a profile table read from
    CSV): what ``PrefillEngine(compute=...)`` plans fetch vs recompute with.  Needs at least 4 rows."""
    points = [
        ProfilePoint(
            int(r["cached_tokens"]), int(r["new_tokens"]), float(r["prefill_ms"]), float(r["layer_ms"])
        )
        for r in rows
    ]
    return ProfileCompute(points, num_layers, {"source": "testbed.engine.profile"})


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def write_profile(path: Path, rows: list[dict], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {k}: {v}" for k, v in meta.items()]
    cols = list(PROFILE_COLUMNS) + ["prefill_ms_min", "prefill_ms_max", "repeats"]
    lines.append(",".join(cols))
    for r in rows:
        lines.append(",".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m testbed.engine.profile", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--model", default="llama-3.1-8b", help="geometry preset (scheduler.geometry.PRESETS)")
    ap.add_argument("--weights", default=None, help="HF safetensors directory (default: random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--grid", default=None, help="'cached:new,...' (default: the built-in grid)")
    ap.add_argument(
        "--max-total", type=int, default=DEFAULT_MAX_TOTAL, help="cap of cached+new in the default grid"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True, help="CSV to write (scheduler.compute profile format)")
    ap.add_argument("--json", default=None, help="optional JSON copy of the rows and metadata")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.weights:
        from testbed.engine.model import load_pretrained

        model = load_pretrained(args.weights, device=device, dtype=dtype)
    else:
        model = build_model(args.model, device=device, fast_init=True, dtype_override=dtype)
    grid = parse_grid(args.grid) if args.grid else default_grid(args.max_total)
    t0 = time.time()
    rows = profile(model, grid, warmup=args.warmup, repeats=args.repeats)
    meta = {
        "model": model.spec.name,
        "gpu": gpu_name(device),
        "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m testbed.engine.profile "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__,
        "attention": "SDPA, causal_lower_right for cached>0 (flash/mem-efficient), random weights and KV",
        "timing": f"CUDA events per layer, median of repeats after {args.warmup} warm-up(s); wall {time.time() - t0:.0f} s",
    }
    write_profile(Path(args.out), rows, meta)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out} ({len(rows)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
