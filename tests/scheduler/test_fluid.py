"""The fluid model: closed forms, the TTFT identity, float robustness, stepping equals the event loop."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.bound import alone_added_ttft_s
from scheduler.flows import Link
from scheduler.fluid import (
    FlowState,
    RequestSpec,
    advance,
    mean_added_ttft_s,
    next_event_s,
    result_of,
    run_fluid,
)
from scheduler.policies import get_policy

LINK = {"l": Link("l", 100.0)}


def test_n_equal_flows_finish_together_at_n_S_over_C():
    n, layers, layer_bytes = 5, 8, 10.0
    reqs = [RequestSpec(i, 0.0, layer_bytes, layers, 0.0, ("l",)) for i in range(n)]
    for r in run_fluid(reqs, LINK, get_policy("equal"), check=True):
        # c = 0: the last layer's arrival is the TTFT; all finish at n * S / C.
        assert r.ttft_s == pytest.approx(n * layers * layer_bytes / 100.0, rel=1e-12)
        assert r.first_layer_wait_s == pytest.approx(n * layer_bytes / 100.0, rel=1e-12)


def test_srtf_on_equal_flows_serves_them_one_after_another():
    reqs = [RequestSpec(i, 0.0, 10.0, 4, 0.0, ("l",)) for i in range(3)]
    ttfts = sorted(r.ttft_s for r in run_fluid(reqs, LINK, get_policy("srtf"), check=True))
    assert ttfts == pytest.approx([0.4, 0.8, 1.2], rel=1e-12)


@pytest.mark.parametrize("c", [0.0, 0.05, 0.1, 0.5])
def test_single_flow_matches_the_alone_closed_form(c):
    spec = RequestSpec("a", 1.0, 10.0, 6, c, ("l",), start_delay_s=0.2, extra_compute_s=0.3)
    for policy in ("equal", "srtf", "bandwidth_aware"):
        (r,) = run_fluid([spec], LINK, get_policy(policy), check=True)
        assert r.added_ttft_s == pytest.approx(alone_added_ttft_s(spec, 100.0), abs=1e-12)
        assert r.ttft_s == pytest.approx(spec.ideal_ttft_s + alone_added_ttft_s(spec, 100.0), abs=1e-12)


def test_pace_rate_flow_never_stalls_after_its_first_layer():
    # Link exactly at the pace rate: each layer arrives as the previous one finishes computing.
    spec = RequestSpec("a", 0.0, 10.0, 5, 0.1, ("l",))
    (r,) = run_fluid([spec], LINK, get_policy("equal"))
    assert r.stall_s == pytest.approx(0.0, abs=1e-12)
    assert r.first_layer_wait_s == pytest.approx(0.1)
    assert r.added_ttft_s == pytest.approx(0.1)


def test_zero_byte_request_is_pure_compute():
    spec = RequestSpec("r", 2.0, 0.0, 4, 0.25, ("l",), start_delay_s=0.5, extra_compute_s=0.1)
    (r,) = run_fluid([spec], LINK, get_policy("equal"))
    assert r.added_ttft_s == 0.0
    assert r.ttft_s == pytest.approx(0.5 + 1.0 + 0.1)


requests_strategy = st.lists(
    st.tuples(
        st.floats(0.0, 2.0),  # arrival
        st.floats(1.0, 50.0),  # layer bytes
        st.integers(1, 6),  # layers
        st.floats(0.0, 0.3),  # compute per layer
        st.floats(0.0, 0.2),  # start delay
        st.floats(0.0, 0.2),  # extra compute
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(requests_strategy, st.sampled_from(["equal", "srtf", "bandwidth_aware"]))
def test_ttft_identity_and_feasibility(raw, policy):
    reqs = [RequestSpec(i, a, b, n, c, ("l",), d, e) for i, (a, b, n, c, d, e) in enumerate(raw)]
    results = run_fluid(reqs, LINK, get_policy(policy), check=True)
    for spec, r in zip(reqs, results):
        # ttft = first-layer wait + L c + stall + extra, and nothing beats infinite bandwidth.
        recomposed = r.first_layer_wait_s + spec.num_layers * spec.compute_per_layer_s + r.stall_s
        assert r.ttft_s == pytest.approx(recomposed + spec.extra_compute_s, rel=1e-9, abs=1e-9)
        assert r.ttft_s >= spec.ideal_ttft_s - 1e-9
        assert r.added_ttft_s >= alone_added_ttft_s(spec, 100.0) - 1e-9
        assert r.first_layer_wait_s >= spec.start_delay_s + spec.layer_bytes / 100.0 - 1e-9


def test_manual_stepping_matches_run_fluid():
    """Driving advance/next_event_s by hand (as the simulator does) gives the event loop's results."""
    reqs = [RequestSpec(i, 0.3 * i, 20.0 + 5 * i, 5, 0.04 * (i + 1), ("l",), 0.01) for i in range(4)]
    policy = get_policy("bandwidth_aware")
    expected = run_fluid(reqs, LINK, policy)
    states = [FlowState(spec=r) for r in reqs]
    now = 0.0
    for _ in range(1000):
        active = [s for s in states if s.active(now)]
        rates = policy.allocate(now, [s.view(now) for s in active], LINK) if active else {}
        t = next_event_s(states, rates, now)
        if math.isinf(t):
            break
        # Step in two halves: advancing less than to the next event is always allowed.
        mid = now + (t - now) / 2
        advance(states, rates, now, mid)
        advance(states, rates, mid, t)
        now = t
    got = [result_of(s) for s in states]
    for a, b in zip(got, expected):
        assert a.ttft_s == pytest.approx(b.ttft_s, rel=1e-9)
        assert a.stall_s == pytest.approx(b.stall_s, rel=1e-9, abs=1e-12)


def test_large_absolute_times_do_not_spin():
    """Hours into a run, float dust at layer boundaries must not create endless tiny events."""
    link = {"l": Link("l", 1.23e10)}
    reqs = [RequestSpec(i, 7200.0 + 0.0037 * i, 16 * 2**20, 32, 0.0014, ("l",)) for i in range(12)]
    results = run_fluid(reqs, link, get_policy("bandwidth_aware"), check=True)
    early = run_fluid(
        [RequestSpec(r.request_id, r.arrival_s - 7200.0, r.layer_bytes, 32, 0.0014, ("l",)) for r in reqs],
        link,
        get_policy("bandwidth_aware"),
    )
    assert mean_added_ttft_s(results) == pytest.approx(mean_added_ttft_s(early), rel=1e-6)


def test_unknown_link_and_duplicate_ids_are_rejected():
    with pytest.raises(ValueError):
        run_fluid([RequestSpec(1, 0.0, 1.0, 1, 0.0, ("nope",))], LINK, get_policy("equal"))
    with pytest.raises(ValueError):
        run_fluid([RequestSpec(1, 0.0, 1.0, 1, 0.0, ("l",))] * 2, LINK, get_policy("equal"))
