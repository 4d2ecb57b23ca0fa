"""The H100 measurements' command line: measure on the GPU, summarise with the simulator, validate.

    # on the GPU machine: measure (writes raw JSON)
    python -m testbed.validation.ttft measure --raw ttft_raw.json
    # anywhere with the simulator installed: add the simulator's prediction, write the results file
    python -m testbed.validation.ttft summarize --raw ttft_raw.json \\
        --profile sim/profiles/llama-3.1-8b_h100_measured.csv --out results/testbed/h100_ttft.json

``measure`` and ``check`` are ``testbed.validation.gpu`` (what is timed and how); ``summarize`` puts the best
of the default-stream paced (and max) variants in the headline keys and names it (``headline_sources``) and
adds the simulator's prediction (``testbed.validation.simulate``); ``validate`` is
``testbed.validation.gpu_validate.gpu_validation``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
from pathlib import Path

from scheduler.geometry import get_model
from testbed.validation.gpu import DEFAULT_CONFIGS, SOURCES, check, log, measure, source_reader
from testbed.validation.gpu_validate import gpu_validation, pooled_validation
from testbed.validation.simulate import simulate_ttft_ms

RESEARCH = {"ttft_ratio_64k": 1.056, "added_ms_4k": [56.0, 75.0]}


NOTES = [
    "TTFT: host time from token ids to last-token logits on the GPU (stream synchronised), median of repeats "
    "after a warm-up; random bf16 weights of the Llama-3.1-8B geometry (timing does not depend on values).",
    "objectcache_paced: our server on loopback with --egress-gbps = link_Gbps (pacer policy 'equal'); "
    "objectcache_max: unpaced; both with `streams` parallel gather requests per prefill (chunk groups), "
    "objectcache_max_1stream / _2streams: unpaced with one / two gather requests per prefill.",
    "reader: names without _thread/_process use raw.reader (process: the gather streams run in a reader "
    "process writing into shared pinned memory, off the engine's GIL; thread: reader threads in the engine "
    "process); load_timings_ms (ms from start_load, medians): ipc = request reached the reader process, "
    "first_layer = the last group's first layer verified in the host buffer, last_group_end = stream done.",
    "logits_rel_err: bf16 split (cached prefix from the tier) vs bf16 full recompute of the same prompt, with the "
    "tier's KV bitwise equal to the recompute's; it is bf16 rounding amplified by 32 random-weight layers, not an "
    "engine error: in float32 the same split is within correctness.float32 (<= 1e-4), and bf16 recompute itself "
    "differs from float32 by correctness.cross.bf16_full_vs_fp32_full.",
]


def select_configs(raw: dict, configs: str) -> dict:
    """``raw`` with only the configs named in ``configs`` (``"4096+128,61440+4096"``); ``ValueError`` names
    the ones it does not hold."""
    want = [c.strip() for c in configs.split(",") if c.strip()]
    held = {f"{r['cached_tokens']}+{r['new_tokens']}": r for r in raw["configs"]}
    missing = [c for c in want if c not in held]
    if missing:
        raise ValueError(f"raw file has no config {', '.join(missing)}; it holds {', '.join(held)}")
    return {**raw, "configs": [held[c] for c in want]}


def link_floor_ms(row: dict, source: str, link_Gbps: float, num_layers: int) -> float | None:
    """The fastest a paced object load of ``row`` can give its TTFT: the prefix's KV bytes at the link rate,
    then the last layer's compute (the layerwise DRAM run's mean per-layer time), in ms; None without the
    bytes or the layerwise DRAM run."""
    loaded = row["sources"].get(source, {}).get("bytes_loaded")
    layerwise = row["sources"].get("dram_layerwise", {}).get("ttft_ms")
    if not loaded or not layerwise or not link_Gbps:
        return None
    return loaded / (link_Gbps * 1e9 / 8) * 1e3 + layerwise / num_layers


def summarize(raw: dict, profile: str | None, command: str, extras: dict | None = None) -> dict:
    """A report builder: one table per section, in the order the report prints them."""
    rows = {f"{r['cached_tokens']}+{r['new_tokens']}": r for r in raw["configs"]}
    by_ctx = sorted(raw["configs"], key=lambda r: r["context_tokens"])
    big, small = by_ctx[-1], by_ctx[0]

    def t(row, src):
        return row["sources"][src]["ttft_ms"] if src in row["sources"] else float("nan")

    def best(prefix: str) -> str:
        """The default-stream variant of ``prefix`` (any reader) with the lowest TTFT summed over the
        configurations relative to DRAM layerwise: one configuration for every headline key."""
        names = [n for n in big["sources"] if re.fullmatch(prefix + r"(_thread|_process)?", n)]
        if not names:
            return prefix

        def score(n):
            return sum(t(r, n) / t(r, "dram_layerwise") for r in raw["configs"] if n in r["sources"])

        return min(names, key=score)

    paced, fast = best("objectcache_paced"), best("objectcache_max")
    num_layers = get_model(raw["model"]).num_layers
    floors = {key: link_floor_ms(r, paced, raw["link_Gbps"], num_layers) for key, r in rows.items()}
    default_reader = raw.get("reader", "thread")

    res = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "measured_at": raw.get("measured_at"),
        "machine": {k: raw.get(k) for k in ("gpu", "torch", "cpu_count", "pinned_h2d_GBps")},
        "model": raw["model"],
        "link_Gbps": raw["link_Gbps"],
        "headline_64k": {"cached_tokens": big["cached_tokens"], "new_tokens": big["new_tokens"]},
        "headline_sources": {
            "paced": paced,
            "max": fast,
            "paced_reader": source_reader(paced, default_reader),
            "max_reader": source_reader(fast, default_reader),
            "streams": raw.get("streams"),
            "note": "headline keys use these sources: the default-stream variant (any reader) with the lowest "
            "TTFT relative to DRAM layerwise summed over the configurations",
        },
        "ttft_ratio_64k_vs_dram": t(big, paced) / t(big, "dram"),
        "ttft_ratio_64k_vs_dram_layerwise": t(big, paced) / t(big, "dram_layerwise"),
        "ttft_ratio_64k_max_vs_dram": t(big, fast) / t(big, "dram"),
        "ttft_ratio_64k_max_vs_dram_layerwise": t(big, fast) / t(big, "dram_layerwise"),
        "headline_4k": {"cached_tokens": small["cached_tokens"], "new_tokens": small["new_tokens"]},
        "added_ms_4k_vs_dram_layerwise": t(small, paced) - t(small, "dram_layerwise"),
        "added_ms_4k_vs_dram": t(small, paced) - t(small, "dram"),
        "added_ms_4k_max_vs_dram_layerwise": t(small, fast) - t(small, "dram_layerwise"),
        "logits_rel_err": max(s["logits_rel_err"] for r in raw["configs"] for s in r["sources"].values()),
        "link_floor_ms": floors,
        "link_floor_note": "the prefix's KV bytes at link_Gbps, then the last layer's compute (DRAM layerwise "
        "TTFT / layers)",
        "ttft_ratio_vs_link_floor": {
            key: t(r, paced) / floors[key] for key, r in rows.items() if floors.get(key) is not None
        },
        "research": {
            "ttft_ratio_64k": RESEARCH["ttft_ratio_64k"],
            "added_ms_4k": RESEARCH["added_ms_4k"],
            "note": "research: +5.6% TTFT at 64K, +56-75 ms at 4K (over local DRAM)",
        },
        "ttft_ms": {key: {s: v["ttft_ms"] for s, v in r["sources"].items()} for key, r in rows.items()},
        "notes": NOTES,
        "raw": raw,
    }
    for key, value in (extras or {}).items():
        res[key] = value
    check = (extras or {}).get("correctness", {}).get("results", {})
    fp32 = [v["logits_rel_err"] for k, v in check.items() if k.startswith("float32/")]
    if fp32:
        res["logits_rel_err_fp32"] = max(fp32)
    if profile:
        try:
            sim = simulate_ttft_ms(raw, profile)
        except Exception as exc:  # the simulator is someone else's moving code: keep the measurement
            res["simulator"] = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            key = f"{big['cached_tokens']}+{big['new_tokens']}"
            key4 = f"{small['cached_tokens']}+{small['new_tokens']}"
            res["simulator"] = {
                "profile": profile,
                "ttft_ms": sim,
                "ttft_ratio_64k_vs_dram": sim[key]["objectcache_paced"] / sim[key]["dram"],
                "ttft_ratio_64k_vs_dram_layerwise": sim[key]["objectcache_paced"]
                / sim[key]["dram_layerwise"],
                "added_ms_4k_vs_dram_layerwise": sim[key4]["objectcache_paced"] - sim[key4]["dram_layerwise"],
                "setup": "sim.runner.simulate, one request alone; storage 'fast' (0.2 ms request overhead, 0.1 ms "
                "TTFB); network = the paced link rate at efficiency 1.0; GPU = the measured profile and H2D rate",
            }
    return res


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``measure``, ``check``, ``summarize`` and ``validate``."""
    ap = argparse.ArgumentParser(
        prog="python -m testbed.validation.ttft", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="run on the GPU machine")
    m.add_argument("--model", default="llama-3.1-8b")
    m.add_argument("--device", default="cuda")
    m.add_argument(
        "--configs", default=",".join(f"{c}+{n}" for c, n in DEFAULT_CONFIGS), help="cached+new,..."
    )
    m.add_argument("--sources", default=",".join(SOURCES))
    m.add_argument("--link-gbps", type=float, default=100.0, help="paced egress rate of the object server")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--chunk-tokens", type=int, default=256)
    m.add_argument("--io-threads", type=int, default=16)
    m.add_argument("--streams", type=int, default=4, help="parallel gather streams per request")
    m.add_argument(
        "--reader", default="process", choices=("process", "thread"), help="default reader of object sources"
    )
    m.add_argument("--piece-kib", type=int, default=64, help="the paced server's smallest pacing piece")
    m.add_argument(
        "--min-stream-mib",
        type=int,
        default=128,
        help="fewer streams for short prefixes: each carries at least this much (0: always --streams; names "
        "ending in _<k>streams always use k)",
    )
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--data-dir", default=None, help="object server data directory (default: a temp dir)")
    m.add_argument("--raw", required=True, help="raw JSON to write")
    m.add_argument(
        "--shared-prefix",
        action="store_true",
        help="every configuration uses a prefix of one prompt, saved to the tiers once (for grids: "
        "`testbed.validation.validate` on the GPU)",
    )
    c = sub.add_parser("check", help="split-vs-recompute error per dtype at the real geometry")
    c.add_argument("--model", default="llama-3.1-8b")
    c.add_argument("--device", default="cuda")
    c.add_argument("--configs", default="4096+128,16384+1024")
    c.add_argument("--chunk-tokens", type=int, default=256)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    s = sub.add_parser("summarize", help="add the simulator's prediction; write the results JSON")
    s.add_argument("--raw", required=True)
    s.add_argument("--profile", default=None, help="measured profile CSV for the simulator")
    s.add_argument("--out", required=True)
    s.add_argument("--check", default=None, help="JSON of `ttft check` to embed (float32/bf16 correctness)")
    s.add_argument("--hf", default=None, help="JSON of the HF transformers equivalence check to embed")
    s.add_argument(
        "--configs",
        default=None,
        help="'cached+new,...': summarize only these configs of the raw file (e.g. the headline ones of a "
        "grid: the smallest and the largest context give the 4K and 64K keys)",
    )
    v = sub.add_parser(
        "validate", help="simulator vs GPU on a measured grid: calibrate on half the configs, judge the rest"
    )
    v.add_argument(
        "--raw",
        required=True,
        action="append",
        help="raw JSON of `measure` (a grid, e.g. with --shared-prefix); repeat for several hosts: each is "
        "calibrated on its own half, the held-out errors are pooled",
    )
    v.add_argument("--profile", required=True, help="measured profile CSV of the same GPU")
    v.add_argument("--out", required=True)
    v.add_argument("--figure", default=None, help="PNG: predicted vs measured TTFT per config and host")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m testbed.validation.ttft <command>`` (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python -m testbed.validation.ttft " + " ".join(shlex.quote(a) for a in argv)
    if args.cmd == "measure":
        raw = measure(args)
        raw["command"] = command
        raw["measured_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        Path(args.raw).write_text(json.dumps(raw, indent=1))
        log(f"wrote {args.raw}")
    elif args.cmd == "check":
        res = check(args)
        Path(args.out).write_text(json.dumps({"command": command, "results": res}, indent=1))
    elif args.cmd == "validate":
        runs = {p: gpu_validation(json.loads(Path(p).read_text()), args.profile) for p in args.raw}
        if len(runs) == 1:
            (res,) = runs.values()
            res["raw"] = args.raw[0]
        else:
            res = pooled_validation(runs)
        res["command"] = command
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
        if args.figure:
            from testbed.validation.figures import plot_gpu_validation

            plot_gpu_validation(runs, args.figure)
        keys = ("gpu", "heldout_median_abs_err", "heldout_p90_abs_err", "by_host", "by_path", "calibration")
        print(json.dumps({k: res.get(k) for k in keys}, indent=1, default=float))
    else:
        raw = json.loads(Path(args.raw).read_text())
        if args.configs:
            raw = select_configs(raw, args.configs)
        extras = {}
        for key, path in (("correctness", args.check), ("hf_equivalence", args.hf)):
            if path:
                extras[key] = json.loads(Path(path).read_text())
        res = summarize(raw, args.profile, command, extras)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        keys = (
            "logits_rel_err_fp32",
            "ttft_ratio_64k_vs_dram",
            "ttft_ratio_64k_vs_dram_layerwise",
            "added_ms_4k_vs_dram_layerwise",
            "logits_rel_err",
        )
        print(json.dumps({k: res.get(k) for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
