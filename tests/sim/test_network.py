"""Closed-form checks of the SimPy fluid network (one central timer driving scheduler.fluid)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import simpy

from scheduler.flows import Link
from scheduler.fluid import RequestSpec, run_fluid
from scheduler.policies import get_policy
from sim.network import FluidNetwork


def _run(specs, links, policy="equal"):
    """Start each spec at its arrival on one FluidNetwork; return {id: (state, transfer_end_s)}."""
    env = simpy.Environment()
    net = FluidNetwork(env, {link.name: link for link in links}, get_policy(policy))
    out = {}

    def client(spec):
        yield env.timeout(spec.arrival_s)
        st, done = net.add(spec)
        yield done
        out[spec.request_id] = (st, env.now)

    for s in specs:
        env.process(client(s))
    env.run()
    return out, net


def test_single_flow_transfer_time_is_bytes_over_capacity():
    link = Link("net", 1e9)
    out, _ = _run([RequestSpec("a", 0.0, 2e8, 5, 0.0, ("net",))], [link])
    st, end = out["a"]
    assert end == pytest.approx(1.0, rel=1e-12)
    assert st.done_s == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("compute_s", [0.01, 0.5])
def test_layerwise_ttft_closed_form(compute_s):
    """One flow, L layers of B bytes at rate C, c per layer: TTFT = B/C + c + (L-1) * max(B/C, c) + extra."""
    L, B, C, extra = 8, 1e8, 1e9, 0.003
    spec = RequestSpec("a", 0.0, B, L, compute_s, ("net",), 0.0, extra)
    out, _ = _run([spec], [Link("net", C)])
    st, _ = out["a"]
    fetch = B / C
    expected = fetch + compute_s + (L - 1) * max(fetch, compute_s) + extra
    assert st.done_s == pytest.approx(expected, rel=1e-9)
    assert st.first_layer_s == pytest.approx(fetch, rel=1e-9)
    assert st.stall_s == pytest.approx((L - 1) * max(0.0, fetch - compute_s), rel=1e-9, abs=1e-12)


def test_equal_share_n_flows_finish_together():
    n, nbytes, C = 7, 3e8, 1e9
    specs = [RequestSpec(i, 0.0, nbytes, 1, 0.0, ("net",)) for i in range(n)]
    out, _ = _run(specs, [Link("net", C)])
    for i in range(n):
        assert out[i][1] == pytest.approx(n * nbytes / C, rel=1e-12)


def test_staggered_flows_max_min_closed_form():
    """a (1 GB) alone for 0.5 s at 1 GB/s, then shares with b (0.2 GB) at 0.5 GB/s each."""
    specs = [RequestSpec("a", 0.0, 1e9, 1, 0.0, ("net",)), RequestSpec("b", 0.5, 2e8, 1, 0.0, ("net",))]
    out, _ = _run(specs, [Link("net", 1e9)])
    assert out["b"][1] == pytest.approx(0.5 + 0.2 / 0.5, rel=1e-12)  # b: 0.2 GB at 0.5 GB/s
    # a: 0.5 GB by 0.5 s, 0.2 GB more by 0.9 s, last 0.3 GB alone.
    assert out["a"][1] == pytest.approx(0.9 + 0.3, rel=1e-12)


def test_bottleneck_is_the_slowest_link_on_the_path():
    spec = RequestSpec("a", 0.0, 1e9, 1, 0.0, ("server", "net", "pcie"))
    out, _ = _run([spec], [Link("server", 5e9), Link("net", 1.25e9), Link("pcie", 53e9)])
    assert out["a"][1] == pytest.approx(1e9 / 1.25e9, rel=1e-12)


@pytest.mark.parametrize("policy", ["equal", "bandwidth_aware", "srtf"])
def test_simpy_network_matches_run_fluid(policy):
    """The SimPy driver and the pure loop are the same fluid model: identical prefill ends."""
    rng = np.random.default_rng(7)
    specs = [
        RequestSpec(
            f"r{i}",
            float(rng.uniform(0, 0.2)),
            float(rng.uniform(1e6, 5e7)),
            32,
            float(rng.uniform(1e-3, 5e-3)),
            ("net",),
            1e-3,
            1e-3,
        )  # fmt: skip
        for i in range(12)
    ]
    links = [Link("net", 2e9)]
    out, _ = _run(specs, links, policy)
    ref = {r.request_id: r for r in run_fluid(specs, links, get_policy(policy))}
    for s in specs:
        assert out[s.request_id][0].done_s == pytest.approx(ref[s.request_id].done_s, rel=1e-9)


def test_one_timer_event_per_change_not_per_flow_pair():
    """1,000 simultaneous transfers: O(n) timer events (not n^2 interrupts), all finishing together."""
    n = 1000
    specs = [RequestSpec(i, 0.0, 1e6, 1, 0.0, ("net",)) for i in range(n)]
    out, net = _run(specs, [Link("net", 1e9)])
    assert len(out) == n
    assert net.timer_events <= 4
    assert net.timer_events + net.stale_timers <= 2 * n
    assert all(end == pytest.approx(n * 1e6 / 1e9, rel=1e-9) for _, end in out.values())


def test_terminates_at_large_times():
    """Float dust at t ~ 1e7 s must not keep a flow alive (completion tolerance)."""
    t0 = 1e7
    specs = [RequestSpec(i, t0 + i * 1e-3, 1e8 / 3, 32, 1e-4, ("net",)) for i in range(5)]
    out, net = _run(specs, [Link("net", 1e9 / 3)])
    assert len(out) == 5
    assert all(math.isfinite(st.done_s) for st, _ in out.values())
    assert net.timer_events < 5 * 4 * 33


def test_unknown_link_is_rejected():
    env = simpy.Environment()
    net = FluidNetwork(env, {"net": Link("net", 1e9)}, get_policy("equal"))
    with pytest.raises(ValueError, match="unknown link"):
        net.add(RequestSpec("a", 0.0, 1.0, 1, 0.0, ("nope",)))


def _staggered_requests(seed: int) -> tuple[list[Link], list[RequestSpec]]:
    """40 requests of 8 layers arriving ~50 ms apart, alternating a one-link and a two-link path: lone
    flows and contended stretches both occur."""
    rng = np.random.default_rng(seed)
    links = [Link("a", 1e9), Link("b", 4e8)]
    specs = [
        RequestSpec(i, float(t), float(rng.uniform(1e6, 5e7)), 8, float(rng.uniform(0, 0.01)), p)
        for i, (t, p) in enumerate(zip(np.cumsum(rng.exponential(0.05, 40)), [("a",), ("a", "b")] * 20))
    ]
    return links, specs


@pytest.mark.parametrize("policy", ["equal", "srtf"])
def test_single_flow_shortcut_changes_no_result(policy, monkeypatch):
    """Skipping the policy call for a lone flow (equal, srtf) gives the same floats as asking it."""
    links, specs = _staggered_requests(3)
    fast, net = _run(specs, links, policy)
    assert net.single_flow_skips > 0
    monkeypatch.setattr("sim.network.single_flow_shortcut", lambda _policy: False)
    slow, net = _run(specs, links, policy)
    assert net.single_flow_skips == 0
    for i in fast:
        a, b = fast[i][0], slow[i][0]
        assert (fast[i][1], a.done_s, a.stall_s, a.first_layer_s) == (
            slow[i][1],
            b.done_s,
            b.stall_s,
            b.first_layer_s,
        )


@pytest.mark.parametrize("policy", ["equal", "bandwidth_aware"])
def test_timers_run_in_place_change_no_result(policy, monkeypatch):
    """Timer firings run without SimPy's queue (nothing else due first) give the same floats and counts."""
    links, specs = _staggered_requests(5)
    fast, net = _run(specs, links, policy)
    assert net.inlined_timers > 0
    monkeypatch.setattr(FluidNetwork, "inline_timers", False)
    slow, ref = _run(specs, links, policy)
    assert ref.inlined_timers == 0
    counts = ("timer_events", "stale_timers", "policy_calls", "single_flow_skips", "bytes_by_link")
    assert [getattr(net, k) for k in counts] == [getattr(ref, k) for k in counts]
    for i in fast:
        a, b = fast[i][0], slow[i][0]
        assert repr((fast[i][1], a.done_s, a.stall_s, a.first_layer_s, a.delivered_bytes)) == repr(
            (slow[i][1], b.done_s, b.stall_s, b.first_layer_s, b.delivered_bytes)
        )
