"""Storage paths on one request: orderings the physics dictates, and closed forms where they exist."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.units import gbps_to_Bps
from sim.config import PolicyConfig
from sim.paths import PATHS
from sim.runner import SimRequest, simulate
from sim.setup import Setup, dram_layerwise_ttft_s, setup_compute


def _ttft(setup, path, cached, new, **kw):
    recs, _ = simulate([SimRequest("r", 0.0, cached, new, path, **kw)], setup, "test", "h", 0)
    return recs[0]


@pytest.fixture(scope="module")
def setup():
    return Setup(policy=PolicyConfig(name="equal"))


@pytest.mark.parametrize("cached,new", [(4096, 128), (16384, 1024), (61440, 4096)])
def test_path_ordering_on_one_request(setup, cached, new):
    t = {p: _ttft(setup, p, cached, new).ttft_s for p in PATHS}
    assert t["gather"] < t["s3_ranged"]
    assert t["gather"] < t["s3_whole"]
    assert t["dram_layerwise"] <= t["dram"]
    assert t["dram_layerwise"] <= t["gather"]
    assert t["dram_layerwise"] < t["recompute"]


def test_dram_layerwise_record_is_its_own_baseline(setup):
    r = _ttft(setup, "dram_layerwise", 8192, 512)
    assert r.ttft_s == pytest.approx(r.baseline_ttft_s, rel=1e-12)
    assert r.ttft_s == pytest.approx(dram_layerwise_ttft_s(setup, 8192, 512), rel=1e-12)


def test_dram_whole_closed_form(setup):
    """Copy everything at the PCIe rate, then the whole prefill."""
    cached, new = 16384, 1024
    comp = setup_compute(setup)
    nbytes = setup.spec.kv_bytes(cached)
    r = _ttft(setup, "dram", cached, new)
    expected = nbytes / setup.gpu.pcie_Bps + comp.prefill_time_s(cached, new)
    assert r.ttft_s == pytest.approx(expected, rel=1e-9)
    assert r.bytes_fetched == nbytes


def test_gather_closed_form_when_bandwidth_bound(setup):
    """128 new tokens on 60K cached: the link is the bottleneck, so TTFT = control + L*B/R + c + extra."""
    cached, new = 61440, 128
    comp = setup_compute(setup)
    L = setup.spec.num_layers
    layer_bytes = setup.spec.kv_bytes_per_token_layer * cached
    rate = min(gbps_to_Bps(setup.network.link_Gbps) * setup.network.efficiency, setup.gpu.pcie_Bps)
    c = comp.layer_time_s(cached, new)
    assert layer_bytes / rate > c  # really bandwidth bound
    control = setup.storage.request_overhead_s + setup.storage.ttfb_s + setup.network.rtt_s
    expected = control + L * layer_bytes / rate + c + max(0.0, comp.prefill_time_s(cached, new) - L * c)
    assert _ttft(setup, "gather", cached, new).ttft_s == pytest.approx(expected, rel=1e-9)


def test_recompute_is_the_full_prefill(setup):
    comp = setup_compute(setup)
    r = _ttft(setup, "recompute", 4096, 128)
    assert r.ttft_s == pytest.approx(comp.prefill_time_s(0, 4224), rel=1e-12)
    assert r.bytes_fetched == 0 and r.cached_tokens == 0


def test_ranged_gets_pay_the_per_request_cost(setup):
    """Per-request overhead dominates small ranged GETs: a cheaper server helps ranged far more than gather."""
    fast = dataclasses.replace(
        setup, storage=dataclasses.replace(setup.storage, request_overhead_s=1e-5, ttfb_s=1e-5)
    )
    slow_r, fast_r = _ttft(setup, "s3_ranged", 16384, 128).ttft_s, _ttft(fast, "s3_ranged", 16384, 128).ttft_s
    slow_g, fast_g = _ttft(setup, "gather", 16384, 128).ttft_s, _ttft(fast, "gather", 16384, 128).ttft_s
    assert slow_r - fast_r > 10 * (slow_g - fast_g) > 0


def test_first_layers_in_dram_and_prefetch_cut_added_ttft(setup):
    base = _ttft(setup, "gather", 4096, 128)
    k2 = _ttft(setup, "gather", 4096, 128, dram_first_layers=2)
    pf = _ttft(setup, "gather", 4096, 128, prefetch_lead_s=0.005)
    assert k2.ttft_s < base.ttft_s
    assert pf.ttft_s < base.ttft_s
    # Prefetch cannot beat the GPU's own work.
    assert pf.ttft_s >= setup_compute(setup).prefill_time_s(4096, 128) - 1e-9


def test_contending_requests_share_the_link(setup):
    """Two identical bandwidth-bound gathers at once take about twice the transfer time of one."""
    one = _ttft(setup, "gather", 61440, 128).ttft_s
    recs, _ = simulate(
        [SimRequest(f"r{i}", 0.0, 61440, 128, "gather") for i in range(2)], setup, "test", "h", 0
    )
    assert all(r.ttft_s > 1.8 * (one - 0.01) for r in recs)


def test_closed_loop_client_waits_for_its_previous_request(setup):
    reqs = [
        SimRequest("a", 0.0, 4096, 128, "gather", client=0, think_s=0.0),
        SimRequest("b", 0.0, 4096, 128, "gather", client=0, think_s=0.5),
    ]
    recs, _ = simulate(reqs, setup, "test", "h", 0)
    a, b = recs
    assert b.arrival_s == pytest.approx(a.arrival_s + a.ttft_s + 0.5, rel=1e-12)
    assert b.ttft_s == pytest.approx(a.ttft_s, rel=1e-9)  # alone both times


def test_model_without_profile_uses_the_roofline(setup):
    from scheduler.compute import RooflineCompute
    from sim.config import ModelConfig

    big = dataclasses.replace(setup, model=ModelConfig(name="llama-3.1-70b"))
    assert isinstance(setup_compute(big), RooflineCompute)
    g, lw = _ttft(big, "gather", 8192, 512), _ttft(big, "dram_layerwise", 8192, 512)
    assert g.ttft_s > lw.ttft_s > 0
    assert g.bytes_fetched == big.spec.kv_bytes(8192)
