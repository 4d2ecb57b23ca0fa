"""A worker's *plan* and the chunk objects its requests read: what the harness hands each GPU-client host.

A plan (JSON, written by ``testbed.harness.runner.Harness.plan``) names the endpoint and credentials, the model
geometry, the chunk and prompt-block sizes, the compute mode and the requests (``PlannedRequest``: arrival
offset in seconds, cached and new tokens, the prompt's block ids, the emulated compute per layer and the
per-request overhead in seconds).

Token ids are derived from block ids (``block_token_ids``), so two requests that share leading blocks share
chunk keys, exactly like the workload generators' ``hash_ids``; ``synthetic_chunk`` makes a chunk object's
bytes from its name, so every host writes the same objects for the same prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.geometry import ModelSpec
from scheduler.keys import KeyScope, chunk_keys, object_key

NAMESPACE = "testbed"


# --- prompts and chunk objects ---------------------------------------------------------------------------------


def block_token_ids(block_ids: list[int], block_tokens: int, vocab_size: int) -> np.ndarray:
    """Deterministic token ids of a prompt made of ``block_ids`` (each ``block_tokens`` tokens)."""
    out = np.empty(len(block_ids) * block_tokens, dtype=np.int64)
    for i, b in enumerate(block_ids):
        rng = np.random.default_rng(0x5EED0000 + int(b))
        out[i * block_tokens : (i + 1) * block_tokens] = rng.integers(1, vocab_size, size=block_tokens)
    return out


def prompt_keys(spec: ModelSpec, block_ids: list[int], block_tokens: int, chunk_tokens: int) -> list[str]:
    """The chained chunk keys of a prompt's full chunks."""
    scope = KeyScope(spec.fingerprint(), NAMESPACE)
    return chunk_keys(block_token_ids(block_ids, block_tokens, spec.vocab_size), scope, chunk_tokens)


def object_names(spec: ModelSpec, keys: list[str]) -> list[str]:
    """The object names of chunk keys (scoped by the model and the testbed's namespace)."""
    scope = KeyScope(spec.fingerprint(), NAMESPACE)
    return [object_key(scope, k) for k in keys]


def synthetic_chunk(spec: ModelSpec, chunk_tokens: int, name: str) -> bytes:
    """A chunk object with deterministic, finite KV values (small normals in the model's dtype)."""
    from testbed.wire import kvformat

    rng = np.random.default_rng(int(name[-16:], 16))
    n = spec.kv_bytes_per_chunk_layer(chunk_tokens) // spec.dtype_bytes
    layers = []
    for _ in range(spec.num_layers):
        x = (rng.standard_normal(n, dtype=np.float32) * 0.1).astype(np.float32)
        if spec.dtype_bytes == 4:
            layers.append(x.tobytes())
        elif spec.dtype_bytes == 2:  # bf16: the high half of each float32
            layers.append((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
        else:
            layers.append(x.view(np.uint8)[: n * spec.dtype_bytes].tobytes())
    return kvformat.encode_chunk(spec, layers, chunk_tokens)


# --- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class PlannedRequest:
    """One request of a plan.  ``compute_per_layer_s`` and ``overhead_s`` are the emulated GPU's time per
    decoder layer and for the rest of the prefill (seconds); ``client`` set: closed loop, ``think_s`` apart."""

    request_id: str
    arrival_s: float
    cached_tokens: int
    new_tokens: int
    block_ids: list[int]
    compute_per_layer_s: float
    overhead_s: float
    client: int | None = None
    think_s: float = 0.0


def load_plan(path: str | Path) -> dict:
    """Read a plan; ``spec`` becomes a ``ModelSpec`` and ``requests`` ``PlannedRequest``s."""
    plan = json.loads(Path(path).read_text())
    plan["spec"] = ModelSpec(**plan["model"])
    plan["requests"] = [PlannedRequest(**r) for r in plan["requests"]]
    return plan


def make_client(plan: dict, concurrency: int = 16):
    """An ``ObjectCacheClient`` for the plan's endpoint, with at least ``concurrency`` connections."""
    from testbed.client.core import ObjectCacheClient

    return ObjectCacheClient(
        plan["endpoint"],
        plan["bucket"],
        plan["access_key"],
        plan["secret_key"],
        mode=plan.get("client_mode", "auto"),
        max_concurrency=max(4, concurrency),
        timeout_s=float(plan.get("timeout_s", 60.0)),
    )


def request_names(plan: dict, req: PlannedRequest) -> list[str]:
    """The object names of the cached prefix ``req`` reads (its first ``cached_tokens // chunk_tokens``)."""
    spec, ct = plan["spec"], int(plan["chunk_tokens"])
    keys = prompt_keys(spec, req.block_ids, int(plan["block_tokens"]), ct)
    n = req.cached_tokens // ct
    if len(keys) < n:
        raise ValueError(f"{req.request_id}: prompt has {len(keys)} full chunks, plan caches {n}")
    return object_names(spec, keys[:n])


def warmup(plan: dict) -> int:
    """PUT every chunk a request of the plan reads (idempotent); returns the number written."""
    names: dict[str, None] = {}
    for req in plan["requests"]:
        for n in request_names(plan, req):
            names.setdefault(n, None)
    client = make_client(plan)
    try:
        client.ensure_bucket()
        todo = [n for n, present in zip(names, client.exists(list(names))) if not present]
        written = 0
        for i in range(0, len(todo), 16):
            batch = todo[i : i + 16]
            items = [(n, synthetic_chunk(plan["spec"], int(plan["chunk_tokens"]), n)) for n in batch]
            written += client.put_chunks(items)
        return written
    finally:
        client.close()
