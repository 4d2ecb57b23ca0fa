"""Unit checks of the connector's pieces that need vLLM (run in the vLLM venv, by
``test_vllm_connector.py::test_connector_units_in_vllm_venv``; not collected by the project's pytest)."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from scheduler.geometry import ModelSpec
from scheduler.keys import chunk_keys

PKG = "testbed.engine.vllm"
layout = importlib.import_module(f"{PKG}.layout")
config = importlib.import_module(f"{PKG}.config")
stats = importlib.import_module(f"{PKG}.stats")
connector = importlib.import_module(f"{PKG}.connector")
metadata = importlib.import_module(f"{PKG}.metadata")
scheduler_side = importlib.import_module(f"{PKG}.scheduler_side")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_learned_layout_matches_cpu_attention_kernel(dtype, head_dim):
    heads, bs, n = 4, 32, 100
    write = layout.cpu_attn_write_fn(dtype, bs, head_dim, "auto")
    lay = layout.probe_block_layout(dtype, heads, bs, head_dim, write)
    key, value = torch.randn(n, heads, head_dim).to(dtype), torch.randn(n, heads, head_dim).to(dtype)
    b, t = layout.token_slots([5, 2, 4, 1], 0, n, bs)
    by_kernel = torch.zeros(6, heads, bs, 2 * head_dim, dtype=dtype)
    write(key, value, by_kernel, b * bs + t)
    index = lay.element_index(b, t)
    got = layout.gather_tokens(by_kernel, index)
    assert torch.equal(got[0], key) and torch.equal(got[1], value)
    by_us = torch.zeros_like(by_kernel)
    layout.scatter_tokens(by_us, index, torch.stack([key, value]))
    assert torch.equal(by_us, by_kernel)  # what attention reads is exactly what we wrote
    # Whole-block path: 3 blocks' worth of tokens permuted off-line, then block copies.
    kv = torch.stack([key[: 3 * bs], value[: 3 * bs]])
    blocks = layout.tokens_to_blocks(lay, kv)
    assert torch.equal(blocks, by_kernel.view(6, -1)[[5, 2, 4]])
    assert torch.equal(layout.blocks_to_tokens(lay, blocks), kv)


def test_probe_refuses_a_lossy_cache_write():
    def lossy(key, value, cache, slots):
        layout.plain_write_fn(key * 0.5, value, cache, slots)

    with pytest.raises(layout.LayoutUnsupported):
        layout.probe_block_layout(torch.float32, 2, 32, 64, lossy)


def test_chunk_span_and_payload_slicing():
    span = layout.ChunkSpan.of(96, 256, 64)  # tokens 96..255: chunks 1..3, skip 32 tokens of chunk 1
    assert (span.first_chunk, span.end_chunk, span.skip_tokens) == (1, 4, 32)
    H, D, c = 2, 4, 64
    kv = torch.arange(3 * 2 * c * H * D, dtype=torch.float32).view(3, 2, c, H, D)  # 3 slices
    out = layout.payload_tokens(memoryview(kv.numpy()).cast("B"), 3, c, H, D, torch.float32, span.skip_tokens)
    assert out.shape == (2, 3 * c - 32, H, D)
    assert torch.equal(out[0, 0], kv[0, 0, 32]) and torch.equal(out[1, -1], kv[2, 1, -1])


def test_stats_aggregate_and_reduce():
    a = stats.ObjectCacheConnectorStats()
    a.add("loaded_tokens", 256)
    a.add("stall_s", 0.002)
    a.note_stall_ms(1.5)
    b = stats.ObjectCacheConnectorStats(data={"loaded_tokens": 64, "max_layer_stall_ms": 3.0})
    r = a.aggregate(b).reduce()
    assert r["loaded_tokens"] == 320 and r["stall_ms"] == 2.0 and r["max_layer_stall_ms"] == 3.0
    assert stats.ObjectCacheConnectorStats().is_empty() and not a.is_empty()


def _scheduler_side(bandwidth_Bps: float, overhead_s: float):
    cfg = config.ConnectorConfig.from_extra(
        {
            "endpoint": "http://x",
            "bucket": "b",
            "chunk_tokens": 256,
            "object_bandwidth_Bps": bandwidth_Bps,
            "object_overhead_s": overhead_s,
        }
    )
    model = ModelSpec("t", 8, 8, 64, 2, 1024, 16, 2816, 8192)
    st = stats.ObjectCacheConnectorStats()
    return scheduler_side.SchedulerSide(cfg, model, lambda: st, lambda: None)


def test_planner_loads_a_fast_tier_and_skips_a_useless_one():
    state = metadata.RequestState(names=["n"] * 8, prompt_tokens=2100, hit_tokens=2048)
    assert _scheduler_side(2e9, 2e-3).plan(state, 0) == 2048
    assert state.predicted_ttft_ms < state.recompute_ttft_ms
    assert _scheduler_side(1e3, 2e-3).plan(state, 0) == 0  # 1 kB/s: recomputing is faster
    assert _scheduler_side(2e9, 2e-3).plan(state, 2048) == 0  # vLLM has it all locally


def test_work_orders_load_then_save_new_chunks_only():
    side = _scheduler_side(2e9, 0.0)
    st = side.on_new_request("r1", list(range(1, 1100)), None)  # 4 full chunks of 256
    st.looked_up, st.hit_tokens, st.next_save_chunk = True, 512, 2  # pretend 2 chunks were found
    st.load_end_token = 512
    assert side.matched_tokens(st, 0) == 512
    side.after_alloc(st, 512)
    new = SimpleNamespace(req_id="r1", block_ids=([7, 3, 9, 1, 4, 2, 8, 6, 5],), num_computed_tokens=512)
    cached = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    out = SimpleNamespace(
        scheduled_new_reqs=[new], scheduled_cached_reqs=cached, num_scheduled_tokens={"r1": 1099 - 512}
    )
    meta = side.build_meta(out)
    (load,) = meta.loads
    assert (load.start_token, load.end_token, load.names) == (0, 512, st.names[:2])
    (save,) = meta.saves
    assert save.chunk_indexes == [2, 3] and save.names == st.names[2:4]
    assert (
        side.build_meta(
            SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={})
        ).loads
        == []
    )


def test_cache_salt_scopes_keys_and_may_pick_a_namespace():
    cfg = config.ConnectorConfig.from_extra(
        {"endpoint": "http://x", "bucket": "b", "salt_namespaces": {"tenant-a-salt": "tenant-a"}}
    )
    tokens = list(range(600))
    plain = chunk_keys(tokens, cfg.scope("f" * 16, None), 256)
    salted = chunk_keys(tokens, cfg.scope("f" * 16, "other"), 256)
    assert len(plain) == 2 and not set(plain) & set(salted)
    assert cfg.scope("f" * 16, "tenant-a-salt").namespace == "tenant-a"
    assert cfg.scope("f" * 16, "other").namespace == "default"
