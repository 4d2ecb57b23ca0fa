"""The gather path's short-prefix terms (``StorageConfig``: streams, open per stream, per-stream receive
ceiling, reader handoff per layer): each moves the simulated request by what it says, and the defaults
change nothing."""

from __future__ import annotations

import dataclasses
import math

import pytest

from scheduler.fluid import RequestSpec
from scheduler.geometry import get_model
from sim.config import NetworkConfig, StorageConfig
from sim.runner import SimRequest, simulate
from sim.setup import Setup

M = get_model("llama-3.1-8b")


def _setup(**storage) -> Setup:
    st = StorageConfig(name="t", request_overhead_s=1e-3, ttfb_s=0.0, server_concurrency=64,
                       server_Gbps=1e4, **storage)  # fmt: skip
    return Setup(storage=st, network=NetworkConfig(link_Gbps=100.0, efficiency=1.0, rtt_s=0.0))


def _one(setup: Setup, cached: int = 4096, new: int = 128):
    (rec,), _ = simulate([SimRequest("r", 0.0, cached, new, "gather")], setup, "t", "", 0)
    return rec


def test_defaults_leave_the_model_unchanged():
    st = StorageConfig()
    assert st.gather_max_rate_Bps(1e6, 16) == math.inf
    assert st.gather_open_s(16) == st.request_overhead_s + 16 * st.gather_per_chunk_s
    spec = RequestSpec("r", 0.0, 1.0, 1, 0.0, ("net",))
    assert spec.max_rate_Bps == math.inf


def test_open_cost_delays_the_first_layer_by_streams_and_keys():
    base = _setup()
    keys = 4096 // 256
    slow = _setup(gather_streams=8, open_per_stream_s=5e-3, gather_per_chunk_s=2e-4)
    d_first = _one(slow).first_layer_wait_s - _one(base).first_layer_wait_s
    assert d_first == pytest.approx(8 * 5e-3 + keys * 2e-4, rel=1e-9, abs=1e-12)
    # At most one stream per key: a 2-key prefix opens 2 streams, not 8.
    assert slow.storage.gather_stream_count(2) == 2
    assert slow.storage.gather_open_s(2) == pytest.approx(1e-3 + 2 * 5e-3 + 2 * 2e-4)


def test_stream_ceiling_caps_a_lone_stream():
    cached = 16384
    total = M.kv_bytes_per_token_layer * cached * M.num_layers
    ceil = 1e9  # 1 GB/s, far below the 12.5 GB/s link
    one = _one(_setup(gather_streams=1, stream_ceiling_Bps=ceil), cached)
    # Transfer-bound: the last layer arrives after total / ceiling of streaming.
    assert one.ttft_s >= total / ceil
    assert one.ttft_s == pytest.approx(total / ceil, rel=0.05)
    # Eight streams of the same ceiling: 8 GB/s, still under the link.
    eight = _one(_setup(gather_streams=8, stream_ceiling_Bps=ceil), cached)
    assert eight.ttft_s == pytest.approx(total / (8 * ceil), rel=0.1)
    # A ceiling above the link changes nothing.
    assert _one(_setup(stream_ceiling_Bps=1e12), cached).ttft_s == pytest.approx(
        _one(_setup(), cached).ttft_s
    )


def test_handoff_puts_a_floor_under_every_layer():
    h = 3e-3
    base = _one(_setup(), 2048)
    slow = _one(_setup(handoff_per_layer_s=h), 2048)
    # A 2K prefix moves a layer in ~0.7 ms at 12.5 GB/s: with the handoff each layer takes >= 3 ms.
    lb = M.kv_bytes_per_token_layer * 2048
    # The receiver (handoff + receive at the streams' ceiling, here none) runs beside the link: a layer takes
    # max(link time, handoff) = 3 ms, not their sum.
    per_layer = max(h, lb / 12.5e9)
    assert slow.ttft_s >= 1e-3 + M.num_layers * per_layer
    assert slow.ttft_s == pytest.approx(1e-3 + M.num_layers * per_layer, rel=0.05)
    assert slow.ttft_s > 1.8 * base.ttft_s
    # The first layer waits for its own handoff too.
    assert slow.first_layer_wait_s == pytest.approx(1e-3 + per_layer, rel=1e-6)


def test_terms_reach_the_fluid_bound_specs():
    from sim.draws import MixedDraw
    from sim.experiments import fluid_specs

    s = _setup(gather_streams=4, open_per_stream_s=2e-3, stream_ceiling_Bps=1e9, handoff_per_layer_s=1e-3)
    s = dataclasses.replace(s)
    (spec,) = fluid_specs(s, [MixedDraw(0.0, 4096, 128)], ["r"])
    assert spec.arrival_s == pytest.approx(s.storage.gather_open_s(16))
    lb = M.kv_bytes_per_token_layer * 4096
    assert spec.max_rate_Bps == pytest.approx(1 / (1 / 4e9 + 1e-3 / lb))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_request_spec_rejects_a_bad_rate_cap(bad):
    with pytest.raises(ValueError, match="max_rate_Bps"):
        RequestSpec("r", 0.0, 1.0, 1, 0.0, ("net",), max_rate_Bps=bad)
