"""Fetch vs recompute decided by the scheduler core (``testbed.engine.plan``) and obeyed by the real engine
(tiny float32 model on the CPU): over a starved link the cached prefix is recomputed (nothing is loaded, the
logits are a full recompute's), over a fast link it is loaded, and without a known rate it is taken whole."""

from __future__ import annotations

import math
import time

import pytest
import torch

from scheduler.compute import ProfileCompute, ProfilePoint
from testbed.engine.dram import DramSource
from testbed.engine.objectsource import ObjectCacheSource
from testbed.engine.plan import decide_fetch, take_cached
from testbed.engine.prefill import PrefillEngine
from testbed.engine.profile import as_compute, profile
from tests.testbed.engine.test_kvsource import MemoryObjectClient
from tests.testbed.engine.test_prefill import CT, MODEL, SPEC, check_same, make, prompt, reference

STARVED_Bps = 4e3  # a few KB/s: any prefix takes seconds
FAST_Bps = 10e9

# A compute profile in the scheduler.compute table format where recomputing costs what its tokens cost
# (1 ms per 16 new tokens per layer, plus a little for attention to the cached rows).
LINEAR = ProfileCompute(
    [
        ProfilePoint(c, n, SPEC.num_layers * (n / 16 + c / 256) + 0.5, n / 16 + c / 256)
        for c in (0, 64, 256)
        for n in (16, 64, 256)
    ],
    SPEC.num_layers,
)


@pytest.fixture(scope="module")
def measured():
    """The tiny model's compute profile, measured here on the CPU (``testbed.engine.profile``)."""
    grid = [(c, n) for c in (0, 64) for n in (16, 128)]
    return as_compute(profile(MODEL, grid, warmup=1, repeats=3, log=lambda *_: None), SPEC.num_layers)


def geometry():
    return {"num_layers": SPEC.num_layers, "kv_bytes_per_token_layer": SPEC.kv_bytes_per_token_layer}


def test_decide_fetch_recomputes_over_a_starved_link_and_fetches_over_a_fast_one():
    slow = decide_fetch(
        117, compute=LINEAR, object_cached_tokens=96, object_Bps=STARVED_Bps, chunk_tokens=CT, **geometry()
    )
    assert slow.planned and slow.prefix_tokens == 0 and slow.recompute_tokens == 117 and slow.tier == "none"
    assert slow.predicted_ttft_s == slow.recompute_ttft_s
    fast = decide_fetch(
        117, compute=LINEAR, object_cached_tokens=96, object_Bps=FAST_Bps, chunk_tokens=CT, **geometry()
    )
    assert fast.object_tokens == 96 and fast.recompute_tokens == 21 and fast.tier == "object"
    assert fast.predicted_ttft_s < fast.recompute_ttft_s


def test_decide_fetch_splits_tiers_and_takes_all_when_a_rate_is_unknown():
    both = decide_fetch(
        117,
        compute=LINEAR,
        dram_cached_tokens=32,
        object_cached_tokens=96,
        dram_Bps=FAST_Bps,
        object_Bps=FAST_Bps,
        chunk_tokens=CT,
        **geometry(),
    )
    assert (both.hbm_tokens, both.dram_tokens, both.object_tokens) == (0, 32, 64)
    unknown = decide_fetch(117, compute=LINEAR, object_cached_tokens=96, chunk_tokens=CT, **geometry())
    assert not unknown.planned and unknown.object_tokens == 96 and math.isnan(unknown.predicted_ttft_s)
    # A fully cached prompt still computes its last chunk; later tiers never count less than earlier ones.
    full = take_cached(64, dram_cached_tokens=64, object_cached_tokens=0, chunk_tokens=CT)
    assert (full.dram_tokens, full.object_tokens, full.recompute_tokens) == (48, 0, 16)


def object_tier_with_prefix(chunks: int = 6, seed: int = 4):
    """An object tier holding a ``chunks``-chunk prefix, written by the engine's own save path."""
    client = MemoryObjectClient()
    writer, _, _ = make(client=client)
    first = prompt(chunks * CT, seed)
    writer.prefill(first)
    writer.saver.flush()
    return client, first


def test_engine_recomputes_a_prefix_whose_fetch_is_slower_and_loads_it_over_a_fast_link(measured):
    client, first = object_tier_with_prefix()
    ids = torch.cat([first, prompt(21, 5)])
    ref = reference(ids)
    _, _, cp = make(client=None)
    engine = PrefillEngine(MODEL, chunk_tokens=CT, namespace="t1", compute=measured)
    starved = ObjectCacheSource(client, engine.scope, cp, link_Bps=STARVED_Bps)
    calls = client.calls
    slow = engine.prefill(ids, starved)
    assert slow.source == "recompute" and slow.cached_tokens == 0 and slow.load is None and not slow.fallback
    assert client.calls == calls  # no load was even started
    assert slow.plan.planned and slow.plan.recompute_tokens == len(ids)
    check_same(slow, ref)

    engine = PrefillEngine(MODEL, chunk_tokens=CT, namespace="t1", compute=LINEAR)
    fast = engine.prefill(ids, ObjectCacheSource(client, engine.scope, cp, link_Bps=FAST_Bps))
    assert fast.source == "objectcache" and fast.cached_tokens == 6 * CT
    assert fast.load.bytes_loaded == 6 * SPEC.kv_bytes_per_chunk(CT) and fast.plan.object_tokens == 6 * CT
    check_same(fast, ref)


class SlowClient(MemoryObjectClient):
    """Delivers each layer ``delay_s`` late: a slow link the source can only learn about by loading."""

    delay_s = 0.05

    def load_layers(self, names, **kwargs):
        for item in super().load_layers(names, **kwargs):
            time.sleep(self.delay_s)
            yield item


def test_the_rate_a_source_observes_decides_the_next_request():
    client, first = object_tier_with_prefix()
    slow_client = SlowClient()
    slow_client.objects = client.objects
    ids = torch.cat([first, prompt(21, 6)])
    ref = reference(ids)
    _, _, cp = make(client=None)
    engine = PrefillEngine(MODEL, chunk_tokens=CT, namespace="t1", compute=LINEAR)
    src = ObjectCacheSource(slow_client, engine.scope, cp)
    assert src.expected_Bps() is None
    first_res = engine.prefill(ids, src, save=False)  # rate unknown: the cached prefix is loaded
    assert first_res.source == "objectcache" and not first_res.plan.planned
    achieved = first_res.load.achieved_Bps
    assert achieved is not None and achieved < 6 * SPEC.kv_bytes_per_chunk(CT) / (SPEC.num_layers * 0.05)
    assert src.expected_Bps() == src.observed_Bps == achieved
    calls = slow_client.calls
    second = engine.prefill(ids, src, save=False)
    assert second.source == "recompute" and second.load is None and slow_client.calls == calls
    check_same(second, ref)


def test_dram_source_with_a_configured_rate_is_planned_too():
    engine, tier, cp = make()
    first = prompt(4 * CT, 7)
    engine.prefill(first)
    ids = torch.cat([first, prompt(9, 8)])
    engine.compute = LINEAR
    slow = engine.prefill(ids, DramSource(tier, cp, link_Bps=STARVED_Bps), save=False)
    assert slow.source == "recompute" and slow.plan.planned and slow.plan.dram_tokens == 0
    fast = engine.prefill(ids, DramSource(tier, cp, link_Bps=FAST_Bps), save=False)
    assert (
        fast.source == "dram_layerwise" and fast.cached_tokens == 4 * CT and fast.plan.dram_tokens == 4 * CT
    )
    unknown = engine.prefill(ids, DramSource(tier, cp), save=False)  # no rate: as without a planner
    assert unknown.cached_tokens == 4 * CT and not unknown.plan.planned
    check_same(slow, reference(ids))
    check_same(fast, reference(ids))
