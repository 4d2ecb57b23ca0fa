"""The load-regime sweep: its request draws hit the offered load they claim, and its intervals and ratios
are computed over paired seeds."""

import dataclasses
import math

import numpy as np
import pytest

from sim.config import WorkloadConfig
from sim.experiments import Context
from sim.metrics import mean_ci95, ratio_ci95
from sim.regimes import load_sweep, log_uniform_tokens, regime_requests, request_moments
from sim.setup import Setup

P = {
    "links_Gbps": [400],
    "arrivals": ["poisson", "closed"],
    "loads": [0.7],
    "seeds": 2,
    "requests": 16,
    "closed_clients": 4,
    "cached_tokens": [2048, 65536],
    "new_tokens": [128, 8192],
    "policies": ["equal", "srtf", "bandwidth_aware"],
    "contention_min_added_ms": 0.0,
}


def test_log_uniform_tokens_stay_in_bounds_and_whole_chunks():
    x = log_uniform_tokens(np.random.default_rng(0), 5000, [2048, 65536], 256)
    assert x.min() >= 2048 and x.max() <= 65536 and (x % 256 == 0).all()
    # Log-uniform: as many draws below the geometric midpoint (~11.6K) as above it.
    assert abs(np.mean(x < math.sqrt(2048 * 65536)) - 0.5) < 0.03
    with pytest.raises(ValueError, match="lo <= hi"):
        log_uniform_tokens(np.random.default_rng(0), 3, [4096, 1024])


def test_poisson_requests_offer_the_load_they_claim():
    setup = dataclasses.replace(Setup(), net_Gbps=100.0)
    p = {**P, "requests": 4000}
    moments = request_moments(setup, p, seed=0)
    reqs = regime_requests(np.random.default_rng(1), setup, p, "poisson", 0.6, moments)
    m = setup.spec
    offered_Bps = (
        sum(m.kv_bytes_per_token_layer * m.num_layers * r.cached_tokens for r in reqs) / reqs[-1].arrival_s
    )
    assert offered_Bps / setup.links()["net"].capacity_Bps == pytest.approx(0.6, rel=0.08)


def test_closed_loop_requests_cycle_through_their_clients_with_think_times():
    setup = dataclasses.replace(Setup(), net_Gbps=100.0)
    p = {**P, "requests": 400, "closed_clients": 8}
    moments = request_moments(setup, p, seed=0)
    low = regime_requests(np.random.default_rng(1), setup, p, "closed", 0.3, moments)
    high = regime_requests(np.random.default_rng(1), setup, p, "closed", 0.9, moments)
    assert sorted({r.client for r in low}) == list(range(8))
    # A lower offered load means longer thinking between a client's requests.
    assert np.mean([r.think_s for r in low]) > 2 * np.mean([r.think_s for r in high]) > 0
    with pytest.raises(ValueError, match="unknown arrival"):
        regime_requests(np.random.default_rng(1), setup, p, "bursty", 0.5, moments)


def test_intervals_cover_their_estimates():
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(2.484, rel=1e-3)  # t(0.975, 2) * 1 / sqrt(3)
    assert math.isnan(mean_ci95([5.0])[1])
    r, lo, hi = ratio_ci95([2.0, 4.0, 6.0, 9.0], [1.0, 2.0, 3.0, 4.0])
    assert lo <= r <= hi and r == pytest.approx(21 / 10)
    # Identical samples: the ratio is exactly one with no spread.
    assert ratio_ci95([3.0, 5.0], [3.0, 5.0]) == (1.0, 1.0, 1.0)


def test_load_sweep_summarises_every_point_and_is_deterministic():
    ctx = Context(setup=Setup(), workload=WorkloadConfig(), seed=0, config_hash="t")
    res = load_sweep(ctx, P)
    s = res.summary
    assert len(s) == 2 and set(s.arrival) == {"poisson", "closed"}
    assert len(res.requests) == 2 * 2 * 3 * 16  # arrivals x seeds x policies x requests
    for base in ("srtf", "equal"):
        assert (s[f"{base}_over_bw_aware_lo"] <= s[f"{base}_over_bw_aware"] + 1e-12).all()
        assert (s[f"{base}_over_bw_aware"] <= s[f"{base}_over_bw_aware_hi"] + 1e-12).all()
        assert np.allclose(s[f"{base}_over_bw_aware"], s[f"{base}_added_ms"] / s["bandwidth_aware_added_ms"])
    h = res.headline["load_sweep"]
    assert h["points"] == 2 and h["bw_aware_vs_srtf_min"] <= h["bw_aware_vs_srtf_best"]
    again = load_sweep(Context(setup=Setup(), workload=WorkloadConfig(), seed=0, config_hash="t"), P)
    assert np.array_equal(again.requests.ttft_s.to_numpy(), res.requests.ttft_s.to_numpy())


def test_load_sweep_needs_the_policy_it_compares_against():
    ctx = Context(setup=Setup(), workload=WorkloadConfig(), seed=0, config_hash="t")
    with pytest.raises(ValueError, match="bandwidth_aware"):
        load_sweep(ctx, {**P, "policies": ["equal", "srtf"]})
