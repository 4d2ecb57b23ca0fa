"""Run one vLLM engine (CPU build) with ObjectCacheConnector and serve prompts one after another.

Runs in the vLLM venv as a subprocess of the tests (which run in the project's venv, without vLLM)::

    python vllm_engine_runner.py SPEC.json OUT.json

SPEC: ``model_dir`` (a Llama checkpoint; created with random weights from ``make_model`` if missing),
``dtype``, ``block_size``, ``max_model_len``, ``kv_transfer_config`` (or null: no connector),
``requests``: a list of ``{"tag", "prompt_token_ids", "max_tokens", "cache_salt"?,
"reset_prefix_cache_before"?, "wait_saved_after_s"?}`` served sequentially (greedy), ``wait_saved_s``: after the last request, wait up to this long for every full prompt chunk
to exist in the object tier.
OUT: per request ``tokens`` (generated ids), ``wall_s`` (wall time of the generate call: the TTFT when
``max_tokens`` is 1), ``num_cached_tokens`` (vLLM's: local plus external hits), ``objectcache`` (the connector's kv_transfer_params), ``names`` (its chunk
objects); plus ``engine_start_s`` and ``saved`` (names found after waiting).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def make_model(model_dir: Path, cfg: dict) -> None:
    """A Llama checkpoint with seeded random weights (no hub, no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(int(cfg.pop("seed", 0)))
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).to(torch.float32)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("log_stats"):  # vLLM creates its logging stat logger (which keeps connector stats) at INFO
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"
    model_dir = Path(spec["model_dir"])
    if spec.get("make_model") and not (model_dir / "config.json").exists():
        make_model(model_dir, dict(spec["make_model"]))
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype=spec.get("dtype", "float32"),
        block_size=spec.get("block_size", 32),
        max_model_len=spec.get("max_model_len", 2048),
        enable_prefix_caching=spec.get("enable_prefix_caching", False),
        enforce_eager=True,
        seed=0,
        load_format=spec.get("load_format", "auto"),
        disable_log_stats=not spec.get("log_stats", False),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", spec.get("max_model_len", 2048)),
    )
    if spec.get("kv_transfer_config"):
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    t0 = time.monotonic()
    llm = LLM(**kwargs)
    out = {"engine_start_s": round(time.monotonic() - t0, 3), "requests": []}
    vllm_config = llm.llm_engine.vllm_config
    for req in spec["requests"]:
        prompt = {"prompt_token_ids": req["prompt_token_ids"]}
        if req.get("cache_salt"):
            prompt["cache_salt"] = req["cache_salt"]
        params = SamplingParams(temperature=0.0, max_tokens=req.get("max_tokens", 8), ignore_eos=True)
        if req.get("reset_prefix_cache_before"):
            llm.reset_prefix_cache()
        t1 = time.monotonic()
        res = llm.generate([prompt], params, use_tqdm=False)[0]
        wall_s = time.monotonic() - t1
        rec = {"tag": req.get("tag"), "tokens": list(res.outputs[0].token_ids), "wall_s": round(wall_s, 4)}
        rec["num_cached_tokens"] = res.num_cached_tokens
        rec["objectcache"] = (res.kv_transfer_params or {}).get("objectcache")
        if spec.get("kv_transfer_config"):
            from testbed.engine.vllm.config import object_names_for

            rec["names"] = object_names_for(vllm_config, req["prompt_token_ids"], req.get("cache_salt"))
        out["requests"].append(rec)
        if req.get("wait_saved_after_s"):
            rec["saved"] = len(wait_saved(spec, rec["names"], req["wait_saved_after_s"]))
    if spec.get("log_stats"):
        out["connector_stats"] = connector_stats(llm)
    if spec.get("wait_saved_s") and spec.get("kv_transfer_config"):
        out["saved"] = wait_saved(
            spec, [n for r in out["requests"] for n in r["names"]], spec["wait_saved_s"]
        )
    Path(out_path).write_text(json.dumps(out))
    print(json.dumps({k: v for k, v in out.items() if k != "requests"}))


def connector_stats(llm) -> dict | None:
    """The connector's KVConnectorStats as vLLM accumulated them since the last log (reduced), read from
    its logging stat logger; None if there is none."""
    manager = llm.llm_engine.logger_manager
    todo = list(getattr(manager, "stat_loggers", []))
    while todo:
        obj = todo.pop()
        if isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif hasattr(obj, "kv_connector_logging"):
            acc = obj.kv_connector_logging.transfer_stats_accumulator
            return acc.reduce() if acc is not None else None
        elif hasattr(obj, "per_engine_stat_loggers") or hasattr(obj, "stat_loggers"):
            todo.append(getattr(obj, "per_engine_stat_loggers", None) or obj.stat_loggers)
    return None


def wait_saved(spec: dict, names: list[str], timeout_s: float) -> list[str]:
    """Names among ``names`` that exist in the object tier, waiting up to ``timeout_s`` for all."""
    from testbed.client import ObjectCacheClient
    from testbed.engine.vllm.config import ConnectorConfig

    cfg = ConnectorConfig.from_extra(spec["kv_transfer_config"]["kv_connector_extra_config"])
    deadline = time.monotonic() + timeout_s
    with ObjectCacheClient(**cfg.client_kwargs()) as client:
        while True:
            present = client.exists(names) if names else []
            if all(present) or time.monotonic() > deadline:
                return [n for n, p in zip(names, present) if p]
            time.sleep(0.1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
