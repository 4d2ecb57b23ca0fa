"""Allocation policies: textbook max-min rates, feasibility, work conservation, determinism, quality."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.bound import offline_bound
from scheduler.flows import FlowView, Link, check_feasible, link_load
from scheduler.fluid import RequestSpec, mean_added_ttft_s, run_fluid
from scheduler.policies import get_policy, policy_names
from tests.scheduler.instances import llama_mix

POLICIES = ["equal", "srtf", "bandwidth_aware"]


def test_registry_lists_the_policies():
    assert set(POLICIES) <= set(policy_names())
    with pytest.raises(KeyError):
        get_policy("nope")


def test_parking_lot_max_min_rates():
    # Classic parking lot: a long flow over n links, one short flow per link; all get C/2.
    n = 4
    links = {f"l{k}": Link(f"l{k}", 10.0) for k in range(n)}
    flows = [FlowView("long", tuple(links), 1.0, 100)]
    flows += [FlowView(f"short{k}", (f"l{k}",), 1.0, 100) for k in range(n)]
    rates = get_policy("equal").allocate(0.0, flows, links)
    assert rates == pytest.approx({f.flow_id: 5.0 for f in flows})
    # Unequal capacities: the 4-unit link is the long flow's bottleneck (2 each), the short flow on the
    # 10-unit link then takes the remaining 8.
    links = {"a": Link("a", 10.0), "b": Link("b", 4.0)}
    flows = [FlowView(0, ("a", "b"), 1.0, 100), FlowView(1, ("a",), 1.0, 100), FlowView(2, ("b",), 1.0, 100)]
    assert get_policy("equal").allocate(0.0, flows, links) == pytest.approx({0: 2.0, 1: 8.0, 2: 2.0})


def _random_flows(rng: random.Random, now: float):
    links = {f"l{k}": Link(f"l{k}", rng.uniform(1.0, 100.0)) for k in range(rng.randint(1, 4))}
    names = sorted(links)
    flows = []
    for i in range(rng.randint(1, 8)):
        path = tuple(rng.sample(names, rng.randint(1, len(names))))
        layers = rng.randint(1, 8)
        layer_bytes = rng.uniform(1.0, 50.0)
        delivered = rng.uniform(0, layers * layer_bytes) if rng.random() < 0.7 else 0.0
        got = int(delivered // layer_bytes)
        computed = rng.randint(0, got) if got else 0
        flows.append(
            FlowView(
                flow_id=i,
                path=path,
                layer_bytes=layer_bytes,
                layers_total=layers,
                delivered_bytes=delivered,
                compute_per_layer_s=rng.choice([0.0, rng.uniform(0.01, 1.0)]),
                gpu_busy_until_s=now + rng.choice([0.0, rng.uniform(-1.0, 1.0)]),
                layers_computed=computed,
                max_rate_Bps=rng.choice([float("inf"), rng.uniform(1.0, 50.0)]),
            )
        )
    return flows, links


@pytest.mark.parametrize("seed", range(20))
def test_one_path_fill_is_the_general_progressive_filling_bit_for_bit(seed):
    """``max_min_fill``'s shortcut for flows sharing one path returns exactly what its general loop does."""
    from scheduler.policies import max_min_fill

    rng = random.Random(seed)
    for _ in range(50):
        names = rng.sample(["a", "b", "c"], rng.randint(1, 3))
        links = {n: Link(n, rng.choice([1e9, 3.3e9, 12.5e9, rng.uniform(1, 1e11)])) for n in names}
        flows = [
            FlowView(i, tuple(names), rng.uniform(1, 1e8), 32, rng.choice([0.0, rng.uniform(0, 3.2e9)]))
            for i in range(rng.randint(1, 40))
        ]
        general = max_min_fill(flows, links, caps_Bps={f.flow_id: f.max_rate_Bps for f in flows})
        fast = max_min_fill(flows, links)
        assert fast == general and list(fast) == list(general)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**9), st.sampled_from(POLICIES))
def test_rates_are_feasible_non_wasteful_and_deterministic(seed, policy_name):
    rng = random.Random(seed)
    now = 5.0
    flows, links = _random_flows(rng, now)
    policy = get_policy(policy_name)
    rates = policy.allocate(now, flows, links)
    check_feasible(flows, links, rates)
    for f in flows:
        assert rates[f.flow_id] <= f.max_rate_Bps * (1 + 1e-9)
    # Non-wasteful: every flow with bytes left is held back by a saturated link or its own cap.
    load = link_load(flows, rates)
    for f in flows:
        if f.remaining_bytes <= 1e-6:
            continue
        saturated = any(load.get(n, 0.0) >= links[n].capacity_Bps * (1 - 1e-6) for n in f.path)
        capped = rates[f.flow_id] >= f.max_rate_Bps * (1 - 1e-6)
        assert saturated or capped, (policy_name, f.flow_id, rates)
    # Deterministic, whatever the order the flows come in.
    shuffled = list(flows)
    random.Random(seed + 1).shuffle(shuffled)
    assert policy.allocate(now, shuffled, links) == rates
    assert get_policy(policy_name).allocate(now, flows, links) == rates


def test_single_link_policies_are_work_conserving():
    rng = random.Random(7)
    for _ in range(50):
        flows, links = _random_flows(rng, 1.0)
        links = {"l0": Link("l0", 50.0)}
        flows = [
            FlowView(
                f.flow_id,
                ("l0",),
                f.layer_bytes,
                f.layers_total,
                f.delivered_bytes,
                f.compute_per_layer_s,
                f.gpu_busy_until_s,
                f.layers_computed,
            )
            for f in flows
        ]
        for name in POLICIES:
            rates = get_policy(name).allocate(1.0, flows, links)
            if any(f.remaining_bytes > 1e-6 for f in flows):
                assert sum(rates.values()) == pytest.approx(50.0, rel=1e-9)


def test_srtf_is_strict_priority_by_remaining_bytes():
    links = {"l": Link("l", 10.0)}
    flows = [FlowView("b", ("l",), 5.0, 4), FlowView("a", ("l",), 5.0, 4), FlowView("c", ("l",), 1.0, 4)]
    # c has the least left; a and b tie and a wins by id.
    assert get_policy("srtf").allocate(0.0, flows, links) == {"c": 10.0, "a": 0.0, "b": 0.0}


def test_bandwidth_aware_gives_a_buffered_flow_only_its_jit_rate():
    links = {"l": Link("l", 100.0)}
    # "slow": 10 bytes per layer, 1 s per layer of compute, two layers delivered and one computing: it needs
    # layer 2 at t = 1 + 1 = 2 (JIT 10/2 = 5 B/s... over all remaining layers the pace, 10 B/s, binds).
    slow = FlowView("slow", ("l",), 10.0, 10, 20.0, 1.0, gpu_busy_until_s=1.0, layers_computed=1)
    new = FlowView("new", ("l",), 1000.0, 10)  # waiting for its first layer: every second is added TTFT
    # The rule itself (lookahead=False): with the lookahead, srtf's rates tie here (new has no compute, so
    # only its completion counts) and ties go to srtf.
    rates = get_policy("bandwidth_aware", lookahead=False).allocate(0.0, [slow, new], links)
    assert rates["new"] >= 90.0
    assert rates["slow"] == pytest.approx(100.0 - rates["new"])
    assert rates["slow"] >= 80.0 / 9.0 - 1e-9  # 80 bytes left over 9 s of compute ahead


@pytest.mark.parametrize("seed", range(4))
def test_with_no_compute_bandwidth_aware_is_srpt_and_beats_equal(seed):
    # c = 0: added TTFT is the transfer completion time, and SRPT minimises its sum (a theorem), so
    # bandwidth_aware (which reduces to SRPT) must equal srtf and never lose to equal sharing.
    rng = random.Random(seed)
    reqs = [
        RequestSpec(i, rng.uniform(0, 1.0), rng.uniform(1, 20), rng.randint(1, 8), 0.0, ("l",))
        for i in range(rng.randint(2, 10))
    ]
    links = {"l": Link("l", 50.0)}
    ba = mean_added_ttft_s(run_fluid(reqs, links, get_policy("bandwidth_aware")))
    srtf = mean_added_ttft_s(run_fluid(reqs, links, get_policy("srtf")))
    equal = mean_added_ttft_s(run_fluid(reqs, links, get_policy("equal")))
    assert ba == pytest.approx(srtf, rel=1e-9)
    assert ba <= equal * (1 + 1e-9)


def _small_instance(seed: int):
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    links = {"a": Link("a", 40.0), "b": Link("b", 25.0)}
    reqs = [
        RequestSpec(
            i,
            rng.uniform(0, 0.5),
            rng.uniform(2, 10),
            rng.randint(1, 6),
            rng.choice([0.0, rng.uniform(0.01, 0.3)]),
            rng.choice([("a",), ("a", "b"), ("b",)]),
            start_delay_s=rng.choice([0.0, 0.01]),
        )
        for i in range(n)
    ]
    return reqs, links


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**9))
def test_every_policy_is_above_the_lp_bound(seed):
    reqs, links = _small_instance(seed)
    bound = offline_bound(reqs, links, num_slots=40, num_buckets=12, mip=False)
    for name in POLICIES:
        value = mean_added_ttft_s(run_fluid(reqs, links, get_policy(name), check=True))
        assert value >= bound.mean_added_ttft_s - 1e-12, (name, value, bound)


@pytest.mark.parametrize("seed", [1, 3, 4, 5])
def test_milp_bound_is_below_every_policy_and_tight_on_small_instances(seed):
    reqs, links = _small_instance(seed)
    bound = offline_bound(reqs, links, num_slots=40, num_buckets=12, time_limit_s=10)
    assert bound.status == "optimal"
    best = min(mean_added_ttft_s(run_fluid(reqs, links, get_policy(name), check=True)) for name in POLICIES)
    assert bound.mean_added_ttft_s <= best + 1e-12
    # Measured: within 1e-4 on these; a loose bound would show up here.
    assert bound.mean_added_ttft_s >= 0.99 * best


def test_bound_of_two_equal_transfers_is_close_to_the_srpt_optimum():
    # c = 0, both start at 0: the optimum serves one then the other: mean (S/C + 2S/C) / 2.
    reqs = [RequestSpec(i, 0.0, 10.0, 4, 0.0, ("l",)) for i in range(2)]
    links = {"l": Link("l", 20.0)}
    optimum = (2.0 + 4.0) / 2
    bound = offline_bound(reqs, links, num_slots=40, num_buckets=20)
    assert 0.95 * optimum <= bound.mean_added_ttft_s <= optimum
    assert bound.per_request_alone_s == pytest.approx({0: 2.0, 1: 2.0})


def test_bandwidth_aware_close_to_the_bound_on_a_contended_llama_mix():
    """A regression guard on quality: 6 mixed Llama-3.1-8B requests on 200 Gbps (measured 1.06x the LP bound)."""
    reqs, links = llama_mix(seed=1, n=6, gbps=200, spread_s=0.1)
    ba = mean_added_ttft_s(run_fluid(reqs, links, get_policy("bandwidth_aware"), check=True))
    equal = mean_added_ttft_s(run_fluid(reqs, links, get_policy("equal"), check=True))
    bound = offline_bound(reqs, links, num_slots=60, num_buckets=24, mip=False).mean_added_ttft_s
    assert bound <= ba <= 1.12 * bound
    assert ba < equal
