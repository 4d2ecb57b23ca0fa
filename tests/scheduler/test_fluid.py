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
from scheduler.policies import get_policy, policy_names

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


@pytest.mark.parametrize(
    "field, value",
    [
        ("arrival_s", math.nan),
        ("arrival_s", math.inf),
        ("compute_per_layer_s", math.nan),
        ("compute_per_layer_s", math.inf),
        ("layer_bytes", math.nan),
        ("layer_bytes", math.inf),
        ("start_delay_s", math.nan),
        ("extra_compute_s", math.inf),
    ],
)
def test_non_finite_inputs_are_rejected_by_name(field, value):
    kw = dict(
        request_id=0, arrival_s=0.0, layer_bytes=1.0, num_layers=2, compute_per_layer_s=0.1, path=("l",)
    )
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        RequestSpec(**kw)


@pytest.mark.parametrize(
    "field, value",
    [("layer_bytes", -1.0), ("num_layers", -1), ("compute_per_layer_s", -0.1), ("start_delay_s", -1e-3)],
)
def test_negative_inputs_are_rejected(field, value):
    kw = dict(
        request_id=0, arrival_s=0.0, layer_bytes=1.0, num_layers=2, compute_per_layer_s=0.1, path=("l",)
    )
    kw[field] = value
    with pytest.raises(ValueError, match="negative"):
        RequestSpec(**kw)


def test_overflowing_totals_and_non_int_layers_are_rejected():
    with pytest.raises(ValueError, match="overflow"):
        RequestSpec(0, 0.0, 1e308, 10, 0.0, ("l",))
    with pytest.raises(ValueError, match="num_layers"):
        RequestSpec(0, 0.0, 1.0, 2.5, 0.0, ("l",))


def test_a_zero_layer_request_that_starts_later_finishes():
    # It used to be dropped as "transfer done" before it had started, and never got a done time.
    reqs = [RequestSpec(0, 0.0, 10.0, 2, 0.1, ("l",)), RequestSpec(1, 0.5, 10.0, 0, 0.0, ("l",), 0.1, 0.2)]
    r0, r1 = run_fluid(reqs, LINK, get_policy("equal"))
    assert r1.ttft_s == pytest.approx(0.1 + 0.2)


# -- the fast event loop equals a straightforward one, bit for bit ----------------------------------------


def _reference_advance(states, rates, now_s, until_s):
    """``advance`` as first written (before it was specialised for speed): kept as the test's reference."""
    from scheduler.fluid import _snap_tol_bytes
    from scheduler.layerwise import layer_times

    for s_ in states:
        s = s_.spec
        if s_.finished and s_.layers_computed >= s.num_layers:
            continue
        if s.start_s > until_s:
            continue
        t0 = max(now_s, s.start_s)
        if not s_.transfer_done:
            if s.total_bytes <= 0:
                s_._layers_arrived.extend([s.start_s] * s.num_layers)
            else:
                r = max(0.0, rates.get(s.request_id, 0.0))
                d0 = s_.delivered_bytes
                d1 = min(s.total_bytes, d0 + r * (until_s - t0))
                tol = _snap_tol_bytes(r, until_s)
                while s_.layers_delivered < s.num_layers:
                    boundary = (s_.layers_delivered + 1) * s.layer_bytes
                    if d1 + tol < boundary:
                        break
                    t_arr = t0 + (boundary - d0) / r if r > 0 else until_s
                    s_._layers_arrived.append(min(until_s, max(t0, t_arr)))
                    d1 = max(d1, boundary) if boundary - d1 <= tol else d1
                s_.delivered_bytes = s.total_bytes if s_.transfer_done else d1
            if s_.layers_delivered and math.isnan(s_.first_layer_s):
                s_.first_layer_s = s_._layers_arrived[0]
        idle_from = max(s_.gpu_busy_until_s, now_s)
        pending = s_._layers_arrived[s_.layers_computed :]
        for start, end in layer_times(pending, s.compute_per_layer_s, s_.gpu_busy_until_s, until_s):
            if s_.layers_computed >= 1:
                s_.stall_s += max(0.0, start - idle_from)
            s_.layers_computed += 1
            s_.gpu_busy_until_s = end
            idle_from = end
        if 1 <= s_.layers_computed < s.num_layers and s_.layers_computed == len(s_._layers_arrived):
            s_.stall_s += max(0.0, until_s - idle_from)
        if s_.transfer_done and not s_.finished:
            t = s_.gpu_busy_until_s
            rest = s_._layers_arrived[s_.layers_computed : s.num_layers]
            for _, t in layer_times(rest, s.compute_per_layer_s, s_.gpu_busy_until_s):  # noqa: B007
                pass
            s_.done_s = (s.start_s if s.num_layers == 0 else t) + s.extra_compute_s


def _reference_next_event_s(states, rates, now_s):
    t_next = math.inf
    for s_ in states:
        s = s_.spec
        if s_.transfer_done:
            continue
        if s.start_s > now_s:
            t_next = min(t_next, s.start_s)
            continue
        if 0 < s_.layers_computed < s.num_layers and s_.gpu_busy_until_s > now_s:
            t_next = min(t_next, s_.gpu_busy_until_s)
        r = rates.get(s.request_id, 0.0)
        if r > 0:
            boundary = (s_.layers_delivered + 1) * s.layer_bytes
            t_next = min(t_next, now_s + max(0.0, boundary - s_.delivered_bytes) / r)
    return math.nextafter(now_s, math.inf) if t_next <= now_s else t_next


def _reference_run(reqs, links, policy):
    """Scan every flow at every event (quadratic in requests): the plain loop ``run_fluid`` must equal."""
    states = [FlowState(spec=r) for r in reqs]
    now = min(r.start_s for r in reqs)
    _reference_advance(states, {}, now, now)
    for _ in range(100_000):
        if all(s.finished for s in states):
            break
        active = [s for s in states if s.active(now)]
        rates = policy.allocate(now, [s.view(now) for s in active], links) if active else {}
        t = _reference_next_event_s(states, rates, now)
        _reference_advance(states, rates, now, t)
        now = t
    return [result_of(s) for s in states]


mixed_requests = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.integers(0, 2).map(float)),  # arrival (with ties)
        st.one_of(st.just(0.0), st.floats(0.5, 30.0)),  # layer bytes (some zero-byte requests)
        st.integers(0, 5),  # layers
        st.one_of(st.just(0.0), st.floats(0.0, 0.3)),  # compute per layer
        st.one_of(st.just(0.0), st.floats(0.0, 0.2)),  # start delay
        st.floats(0.0, 0.2),  # extra compute
        st.sampled_from([("a",), ("b",), ("a", "b")]),  # path
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(mixed_requests, st.sampled_from(["equal", "srtf", "bandwidth_aware"]))
def test_run_fluid_equals_the_straightforward_loop_exactly(raw, policy):
    links = {"a": Link("a", 40.0), "b": Link("b", 25.0)}
    # Request ids in reverse order: the policy's tie-breaking must not depend on the loop's bookkeeping.
    reqs = [
        RequestSpec(len(raw) - i, a, b, n, c, path, d, e) for i, (a, b, n, c, d, e, path) in enumerate(raw)
    ]
    got = run_fluid(reqs, links, get_policy(policy))
    want = _reference_run(reqs, links, get_policy(policy))
    assert got == want  # dataclass equality: every float bit for bit (no nan in finished results)


def test_the_shortcut_covers_equal_and_srtf_but_not_bandwidth_aware():
    from scheduler.fluid import single_flow_shortcut

    assert single_flow_shortcut(get_policy("equal")) and single_flow_shortcut(get_policy("srtf"))
    assert not single_flow_shortcut(get_policy("bandwidth_aware"))


@settings(max_examples=120, deadline=None)
@given(
    st.sampled_from(policy_names()),
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True),
    st.floats(1e-3, 1e12),
    st.integers(1, 80),
    st.floats(0.0, 1.0),
    st.floats(0.0, 0.1),
    st.floats(0.0, 1.0),
    st.integers(0, 80),
)
def test_single_flow_shortcut_is_what_the_policy_answers(
    name, path, layer_bytes, layers, done, c, busy, computed
):
    """The simulator skips the call for a lone flow where the policy allows it: it must be its answer."""
    from scheduler.flows import FlowView
    from scheduler.fluid import single_flow_rates, single_flow_shortcut

    links = {"a": Link("a", 1.25e10), "b": Link("b", 3.3e9 / 7), "c": Link("c", 0.1)}
    view = FlowView(
        flow_id="f",
        path=tuple(path),
        layer_bytes=layer_bytes,
        layers_total=layers,
        delivered_bytes=layer_bytes * layers * done * 0.999,
        compute_per_layer_s=c,
        gpu_busy_until_s=busy,
        layers_computed=min(computed, layers),
    )
    policy = get_policy(name)
    if single_flow_shortcut(policy):  # every registered policy that claims it
        assert single_flow_rates(view, links) == policy.allocate(0.5, [view], links)


def _original_lone(now_s, f, links):
    """bandwidth_aware's answer for one live flow as it was written with ``urgency`` and ``grant``."""
    import math

    from scheduler.bandwidth_aware import grant, path_residual_Bps
    from scheduler.urgency import urgency

    residual = {n: link.capacity_Bps for n, link in links.items()}
    rates = {f.flow_id: 0.0}
    if not f.remaining_bytes > 1e-6:
        return rates
    u = urgency(f, now_s)
    cap = min(path_residual_Bps(f, residual), f.max_rate_Bps)
    if u.lateness_s(cap) > 1e-12:
        grant(f, math.inf, residual, rates)
    else:
        grant(f, u.jit_rate_Bps(), residual, rates)
        grant(f, math.inf, residual, rates)
    return rates


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4),
    st.sampled_from([0.0, 1.0, 1e-3, 4.0e5, 3.3e7 / 7]) | st.floats(1e-3, 1e12),
    st.integers(1, 80),
    st.sampled_from([0.0, 0.5, 1.0, 1 / 3]) | st.floats(0.0, 1.0),
    st.sampled_from([0.0, 0.02]) | st.floats(0.0, 0.1),
    st.floats(0.0, 1.0),
    st.integers(0, 80),
    st.sampled_from([float("inf"), 1e8, 0.0]),
)
def test_lone_rate_is_what_bandwidth_aware_answers(path, layer_bytes, layers, done, c, busy, computed, cap):
    """The simulator asks ``lone_rate_Bps`` for a lone flow: the original rule's float result, bit for bit."""
    from scheduler.flows import FlowView
    from scheduler.fluid import lone_rate_function

    links = {"a": Link("a", 1.25e10), "b": Link("b", 3.3e9 / 7), "c": Link("c", 0.1)}
    for delivered in (layer_bytes * layers * done, layer_bytes * round(layers * done), layer_bytes * layers):
        view = FlowView(
            flow_id="f",
            path=tuple(path),
            layer_bytes=layer_bytes,
            layers_total=layers,
            delivered_bytes=delivered,
            compute_per_layer_s=c,
            gpu_busy_until_s=busy,
            layers_computed=min(computed, layers),
            max_rate_Bps=cap,
        )
        policy = get_policy("bandwidth_aware")
        lone = lone_rate_function(policy)
        capacity = {n: link.capacity_Bps for n, link in links.items()}
        fields = (view.path, capacity, cap, layer_bytes, layers, delivered, c, busy, view.layers_computed)
        want = _original_lone(0.5, view, links)
        # repr: bit for bit (0.0 and -0.0 differ there)
        assert repr({"f": lone(0.5, *fields)}) == repr(want) == repr(policy.allocate(0.5, [view], links))
    assert lone_rate_function(get_policy("equal")) is None
