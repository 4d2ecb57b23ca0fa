"""TTFT of vLLM (CPU build) with ObjectCacheConnector on a prefix hit vs full recompute, and vs vLLM's own
CPU offloading connectors.

Runs in the vLLM venv (``./dev test`` makes ``.venv-vllm``), from the repository root::

    .venv-vllm/bin/python -m testbed.bench.vllm_cpu [--lengths 1024 2048 4096] [--reps 3]
    # -> results/bench/vllm_cpu.json

Starts ObjectCache's server on loopback, writes a Llama config (dummy weights: TTFT does not depend on the
values) and runs one engine process per configuration through ``tests/testbed/engine/vllm_engine_runner.py``; every
request is a greedy ``max_tokens=1`` call, so its wall time is the TTFT (scheduling + prefill + first
token).  Per prefix length ``n`` and repetition a fresh random prompt of ``n + 64`` tokens is served twice:

* ``recompute``: no connector (plain vLLM; local prefix caching off) -- the reference;
* ``objectcache``: first as a miss (full prefill plus write-back copies), then, once its chunks are stored,
  again as a hit (the prefix is loaded layer by layer from the object tier; the rest is prefilled);
* ``simple_cpu_offload`` / ``offloading``: vLLM's CPU offloading connectors, with local prefix caching on
  and ``reset_prefix_cache()`` before the repeat so the prefix must come back from the CPU tier.

Writes JSON: command, machine, date, model, per-configuration medians and ratios (recompute TTFT over hit
TTFT).  A configuration that fails to start is recorded with its error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from testbed import REPO_ROOT

RUNNER = REPO_ROOT / "tests" / "testbed" / "engine" / "vllm_engine_runner.py"
CONNECTOR_MODULE = "testbed.engine.vllm"

MODEL = {  # ~110M parameters, 8 layers, 16 KiB of bf16 KV per token
    "vocab_size": 8192,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 8192,
}
CHUNK_TOKENS = 256
BLOCK_SIZE = 128


def write_model_config(model_dir: Path) -> None:
    from transformers import LlamaConfig

    model_dir.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**MODEL, torch_dtype="bfloat16").save_pretrained(model_dir)


def run_engine(work: Path, name: str, kv: dict | None, requests: list[dict], prefix_caching: bool) -> dict:
    max_len = max(len(r["prompt_token_ids"]) for r in requests) + 64
    spec = {
        "model_dir": str(work / "model"),
        "load_format": "dummy",
        "dtype": "bfloat16",
        "block_size": BLOCK_SIZE,
        "max_model_len": max_len,
        "max_num_batched_tokens": max_len,
        "enable_prefix_caching": prefix_caching,
        "kv_transfer_config": kv,
        "requests": requests,
    }
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(spec_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": time.monotonic() - t0}
    return json.loads(out_path.read_text())


# Prompt = n cached-able tokens + this many more, so a hit covers exactly n tokens (whole chunks; the last
# prompt token is always computed).
SUFFIX_TOKENS = 64


def prompts(lengths: list[int], reps: int) -> dict[tuple[int, int], list[int]]:
    rng = np.random.default_rng(7)
    return {
        (n, r): rng.integers(1, MODEL["vocab_size"], n + SUFFIX_TOKENS).tolist()
        for n in lengths
        for r in range(reps)
    }


def requests_for(ps: dict, repeat: bool, **repeat_opts) -> list[dict]:
    """Per length, one unmeasured warm-up prompt (first-call kernel set-up), then the measured prompts."""
    lengths = sorted({n for n, _ in ps})
    rng = np.random.default_rng(1)
    out = [
        {
            "tag": f"warmup/{n}",
            "prompt_token_ids": rng.integers(1, MODEL["vocab_size"], n + SUFFIX_TOKENS).tolist(),
            "max_tokens": 1,
        }
        for n in lengths
    ]
    for (n, r), p in ps.items():
        out.append({"tag": f"{n}/{r}/first", "prompt_token_ids": p, "max_tokens": 1})
        if repeat:
            out.append({"tag": f"{n}/{r}/repeat", "prompt_token_ids": p, "max_tokens": 1, **repeat_opts})
    return out


def medians(result: dict, lengths: list[int], kind: str) -> dict[int, float]:
    by_tag = {r["tag"]: r for r in result.get("requests", [])}
    out = {}
    for n in lengths:
        vals = [r["wall_s"] for t, r in by_tag.items() if t.startswith(f"{n}/") and t.endswith(kind)]
        if vals:
            out[n] = statistics.median(vals)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m testbed.bench.vllm_cpu", description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "bench" / "vllm_cpu.json"))
    ap.add_argument("--skip-offload", action="store_true")
    args = ap.parse_args()

    from testbed.objectstore.launch import start_server  # runs the server with this python

    ps = prompts(args.lengths, args.reps)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        work = Path(tmp)
        write_model_config(work / "model")
        srv = start_server(work / "server")
        try:
            srv.boto3_client().create_bucket(Bucket="vllm-bench")
            kv = {
                "kv_connector": "ObjectCacheConnector",
                "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "endpoint": srv.url,
                    "bucket": "vllm-bench",
                    "chunk_tokens": CHUNK_TOKENS,
                    "credentials": {"access_key": srv.access_key, "secret_key": srv.secret_key},
                    "object_bandwidth_Bps": 2e9,
                    "object_overhead_s": 2e-3,
                },
            }
            oc_reqs = []
            for req in requests_for(ps, repeat=True):
                if req["tag"].endswith("/first"):
                    req["wait_saved_after_s"] = 60
                oc_reqs.append(req)
            results["recompute"] = run_engine(work, "recompute", None, requests_for(ps, repeat=False), False)
            results["objectcache"] = run_engine(work, "objectcache", kv, oc_reqs, False)
        finally:
            srv.stop()
        if not args.skip_offload:
            cpu_bytes = 2 << 30
            for name, connector, extra in (
                ("simple_cpu_offload", "SimpleCPUOffloadConnector", {"cpu_bytes_to_use": cpu_bytes}),
                ("offloading", "OffloadingConnector", {"cpu_bytes_to_use": cpu_bytes}),
            ):
                okv = {"kv_connector": connector, "kv_role": "kv_both", "kv_connector_extra_config": extra}
                reqs = requests_for(ps, repeat=True, reset_prefix_cache_before=True)
                results[name] = run_engine(work, name, okv, reqs, True)
    report(args, results)


def report(args, results: dict) -> None:
    lengths = args.lengths
    base = medians(results["recompute"], lengths, "/first")
    summary: dict[str, dict] = {"recompute": {"ttft_s": base}}
    if "requests" in results["recompute"]:
        summary["recompute"]["requests"] = [
            {k: r.get(k) for k in ("tag", "wall_s", "num_cached_tokens")}
            for r in results["recompute"]["requests"]
        ]
    for name in ("objectcache", "simple_cpu_offload", "offloading"):
        res = results.get(name)
        if res is None:
            continue
        if "error" in res:
            summary[name] = {"error": res["error"]}
            continue
        miss, hit = medians(res, lengths, "/first"), medians(res, lengths, "/repeat")
        by_tag = {r["tag"]: r for r in res["requests"]}
        summary[name] = {
            "requests": [
                {k: r.get(k) for k in ("tag", "wall_s", "num_cached_tokens", "objectcache")}
                for r in res["requests"]
            ],
            "miss_ttft_s": miss,
            "hit_ttft_s": hit,
            "speedup_vs_recompute": {n: round(base[n] / hit[n], 2) for n in hit if n in base},
            # Same engine, same prompt, adjacent in time: robust to load from other processes.
            "speedup_vs_own_miss": {n: round(miss[n] / hit[n], 2) for n in hit if n in miss},
            "miss_overhead_vs_recompute": {n: round(miss[n] / base[n], 3) for n in miss if n in base},
            "hit_cached_tokens": {
                t: r.get("num_cached_tokens") for t, r in by_tag.items() if t.endswith("/repeat")
            },
        }
        if name == "objectcache":
            summary[name]["hit_details"] = {
                t: r.get("objectcache") for t, r in by_tag.items() if t.endswith("/repeat")
            }
    doc = {
        "command": " ".join(["python -m testbed.bench.vllm_cpu", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": _cpu_name()},
        "vllm": _version("vllm"),
        "torch": _version("torch"),
        "model": {
            **MODEL,
            "dtype": "bfloat16",
            "weights": "dummy",
            "block_size": BLOCK_SIZE,
            "chunk_tokens": CHUNK_TOKENS,
        },
        "reps": args.reps,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "prompt_tokens": f"prefix length + {SUFFIX_TOKENS}",
        "results": summary,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(summary, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg if pkg != "vllm" else "vllm-cpu")
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
