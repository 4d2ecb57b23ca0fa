"""ObjectCacheConnector in real vLLM engines (CPU build), against ObjectCache's own server and Ceph RGW.

The tests run in the project's venv (no vLLM); each engine is a subprocess in the vLLM venv
(``vllm_engine_runner.py``: JSON spec in, JSON results out) serving its prompts one after another, with a
tiny Llama (random seeded weights, fp32, token-id prompts, no tokenizer, no hub).

* Engine A (connector, empty store) computes prompts P1..P3 in full and writes their chunks back: its
  tokens are the full-recompute reference.
* The test then tampers with the store: P2's chunks are replaced by P1's (valid checksums, wrong KV) and one
  payload byte of P3's first chunk is flipped (bad checksum).
* Engine B (a fresh process, local prefix caching off) serves P1, P2, P3, P1 under another cache_salt,
  and P3 again.  B must load P1's prefix and match A exactly; produce different tokens for P2 (the load
  is live: attention reads what was loaded); recompute P3 after the failed load and match A; get no hit
  for the other tenant; and load P3 cleanly the second time (the server quarantined the corrupt object
  and B's recompute wrote a good one back).

``OBJECTCACHE_VLLM_PYTHON`` names the vLLM venv's python (default ``.venv-vllm/bin/python`` of the repository,
which ``./dev test`` makes).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from testbed import REPO_ROOT

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "vllm_engine_runner.py"
VLLM_PYTHON = Path(os.environ.get("OBJECTCACHE_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
CONNECTOR_MODULE = "testbed.engine.vllm"

CHUNK_TOKENS = 64
BLOCK_SIZE = 32
PROMPT_TOKENS = 300  # 4 full chunks can be loaded (the last prompt token is always computed)
LOADABLE_TOKENS = (PROMPT_TOKENS - 1) // CHUNK_TOKENS * CHUNK_TOKENS
MAX_TOKENS = 8
TINY_LLAMA = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "initializer_range": 0.1,
    "seed": 0,
}

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"no vLLM venv at {VLLM_PYTHON}: ./dev test makes it (pyproject.toml's vllm-venv list)",
    ),
]


def prompt(seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, TINY_LLAMA["vocab_size"], PROMPT_TOKENS).tolist()


P1, P2, P3 = prompt(1), prompt(2), prompt(3)


def kv_config(endpoint: str, bucket: str, access_key: str, secret_key: str, **extra) -> dict:
    return {
        "kv_connector": "ObjectCacheConnector",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "endpoint": endpoint,
            "bucket": bucket,
            "credentials": {"access_key": access_key, "secret_key": secret_key},
            "chunk_tokens": CHUNK_TOKENS,
            # The planner decides; on loopback with no per-request overhead, loading the hit pays.
            "object_bandwidth_Bps": 1e10,
            "object_overhead_s": 0.0,
            "timeout_s": 5.0,
            **extra,
        },
    }


def run_engine(tmp_path: Path, name: str, kv: dict | None, requests: list[dict], **spec) -> dict:
    """Run one engine process over ``requests``; return its JSON results."""
    spec = {
        "model_dir": str(tmp_path / "tiny-llama"),
        "make_model": TINY_LLAMA,
        "dtype": "float32",
        "block_size": BLOCK_SIZE,
        "max_model_len": 1024,
        "enable_prefix_caching": False,
        "kv_transfer_config": kv,
        "requests": requests,
        **spec,
    }
    spec_path, out_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(RUNNER), str(spec_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"engine {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = json.loads(out_path.read_text())
    return {r["tag"]: r for r in out["requests"]} | {"_engine": out}


def req(tag: str, tokens: list[int], **kw) -> dict:
    return {"tag": tag, "prompt_token_ids": tokens, "max_tokens": MAX_TOKENS, **kw}


@pytest.fixture(scope="module")
def store(objectcache_server):
    """A fresh bucket on the session's ObjectCache server, and its admin S3 client."""
    s3 = objectcache_server.boto3_client()
    bucket = f"vllm-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)
    kv = kv_config(
        objectcache_server.url, bucket, objectcache_server.access_key, objectcache_server.secret_key
    )
    return {"s3": s3, "bucket": bucket, "kv": kv}


@pytest.fixture(scope="module")
def engine_a(store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    out = run_engine(tmp, "A", store["kv"], [req("P1", P1), req("P2", P2), req("P3", P3)], wait_saved_s=30)
    return tmp, out


@pytest.fixture(scope="module")
def engine_b(store, engine_a):
    tmp, a = engine_a
    s3, bucket = store["s3"], store["bucket"]
    for src, dst in zip(a["P1"]["names"], a["P2"]["names"]):  # P2 <- P1's KV: valid checksums, wrong KV
        blob = s3.get_object(Bucket=bucket, Key=src)["Body"].read()
        s3.delete_object(Bucket=bucket, Key=dst)
        s3.put_object(Bucket=bucket, Key=dst, Body=blob)
    corrupt = a["P3"]["names"][0]  # flip one payload byte (layer 0): its stored checksum no longer matches
    blob = bytearray(s3.get_object(Bucket=bucket, Key=corrupt)["Body"].read())
    blob[len(blob) // 4 + 100] ^= 0xFF
    s3.delete_object(Bucket=bucket, Key=corrupt)
    s3.put_object(Bucket=bucket, Key=corrupt, Body=bytes(blob))
    requests = [
        req("P1", P1),
        req("P2", P2),
        req("P3", P3),
        req("P1-other-tenant", P1, cache_salt="tenant-b-secret"),
        req("P3-again", P3),
    ]
    return run_engine(tmp, "B", store["kv"], requests, wait_saved_s=0, log_stats=True)


def oc(result: dict) -> dict:
    return result["objectcache"] or {}


def test_engine_a_writes_back_every_full_chunk(engine_a):
    _, a = engine_a
    names = [n for tag in ("P1", "P2", "P3") for n in a[tag]["names"]]
    assert len(names) == 3 * (PROMPT_TOKENS // CHUNK_TOKENS)
    assert sorted(a["_engine"]["saved"]) == sorted(names)
    assert all(oc(a[t])["hit_tokens"] == 0 for t in ("P1", "P2", "P3"))


def test_fresh_engine_loads_prefix_and_matches_full_recompute(engine_a, engine_b):
    _, a = engine_a
    b = engine_b["P1"]
    assert oc(b)["hit_tokens"] == LOADABLE_TOKENS
    assert oc(b)["loaded_tokens"] == LOADABLE_TOKENS
    assert oc(b)["path"] == "gather"
    assert "failed_tokens" not in oc(b)
    assert b["tokens"] == a["P1"]["tokens"]


def test_load_is_live_altered_kv_changes_tokens(engine_a, engine_b):
    _, a = engine_a
    b = engine_b["P2"]
    assert oc(b)["loaded_tokens"] == LOADABLE_TOKENS
    assert b["tokens"] != a["P2"]["tokens"]


def test_corrupt_object_is_recomputed_and_quarantined(engine_a, engine_b):
    _, a = engine_a
    b = engine_b["P3"]
    assert oc(b)["failed_tokens"] == LOADABLE_TOKENS
    assert "ChecksumMismatch" in oc(b)["error"]
    assert b["tokens"] == a["P3"]["tokens"]
    # The server re-verified and quarantined the bad object; B's recompute wrote the chunk back, so the
    # next request loads a healthy prefix.
    again = engine_b["P3-again"]
    assert oc(again)["loaded_tokens"] == LOADABLE_TOKENS
    assert "failed_tokens" not in oc(again)
    assert again["tokens"] == a["P3"]["tokens"]


def test_other_cache_salt_gets_no_hit(engine_a, engine_b):
    _, a = engine_a
    b = engine_b["P1-other-tenant"]
    assert oc(b)["hit_tokens"] == 0
    assert oc(b).get("loaded_tokens", 0) == 0
    assert b["tokens"] == a["P1"]["tokens"]


def test_connector_stats_reach_vllm(engine_b):
    """Counters and timings through vLLM's KVConnectorStats channel (scheduler and worker halves)."""
    st = engine_b["_engine"]["connector_stats"]
    assert st["lookup_tokens"] == 5 * PROMPT_TOKENS
    assert st["hit_tokens"] == 4 * LOADABLE_TOKENS  # all but the other tenant
    assert st["loaded_tokens"] == 3 * LOADABLE_TOKENS and st["failed_load_tokens"] == LOADABLE_TOKENS
    assert st["loads"] == 4 and st["load_ms"] > 0 and st["max_layer_stall_ms"] >= 0


def test_server_gone_means_recompute(engine_a):
    tmp, a = engine_a
    dead = kv_config("http://127.0.0.1:9", "nobucket", "k", "s", timeout_s=1.0)
    c = run_engine(tmp, "C", dead, [req("P1", P1)], wait_saved_s=0)["P1"]
    assert oc(c)["hit_tokens"] == 0
    assert "lookup_error" in oc(c)
    assert c["tokens"] == a["P1"]["tokens"]


@pytest.mark.rgw
def test_plain_s3_ceph_rgw_uses_ranged_fallback(rgw, rgw_bucket, tmp_path):
    kv = kv_config(rgw.endpoint_url, rgw_bucket, rgw.access_key, rgw.secret_key)
    a = run_engine(tmp_path, "rgw-A", kv, [req("P1", P1)], wait_saved_s=60)
    assert len(a["_engine"]["saved"]) == PROMPT_TOKENS // CHUNK_TOKENS
    b = run_engine(tmp_path, "rgw-B", kv, [req("P1", P1)], wait_saved_s=0)["P1"]
    assert oc(b)["loaded_tokens"] == LOADABLE_TOKENS
    assert oc(b)["path"] == "ranged"
    assert b["tokens"] == a["P1"]["tokens"]


def test_connector_units_in_vllm_venv():
    """The layout probe (against vLLM's CPU attention kernel, fp32/bf16/fp16), spans, stats, planner and
    key scoping, checked in the vLLM venv (``vllm_side_checks.py``)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        # --noconftest and an empty ini: the project's conftest and pytest settings need the main venv.
        [
            str(VLLM_PYTHON),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--noconftest",
            "-c",
            os.devnull,
            "--rootdir",
            str(HERE),
            str(HERE / "vllm_side_checks.py"),
        ],
        env=env,
        cwd=str(HERE),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
