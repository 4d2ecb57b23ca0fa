"""Property tests of bandwidth_aware against both baselines and the offline bound (issue 14).

Hypothesis searches for instances where bandwidth_aware loses to the better of equal sharing and srtf by more
than 2 % (more when requests arrive later, see ``REL_TOL_STAGGERED``), and where a policy beats the bound: tiny two-to-four-flow instances on a 1 GB/s link (the size of the counterexample the issue
reports) and Llama-3.1-8B request mixes at 25-400 Gbps.  In CI hypothesis is derandomized (a fixed set of
examples); locally ``BA_SEARCH=1`` explores many more.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.bound import offline_bound
from scheduler.flows import Link
from scheduler.fluid import RequestSpec, mean_added_ttft_s, run_fluid
from scheduler.policies import get_policy
from scheduler.units import gbps_to_Bps
from tests.scheduler.instances import LAYER_MS, LLAMA_8B

# Allowed loss against the better baseline: relative, plus a microsecond for float dust.  With every request
# present from the start the lookahead's rollout argument bounds the loss (2 % covers its event-by-event
# approximations); requests arriving later can re-open a choice made for the flows present (a paced flow has
# no buffer when a shorter one arrives), measured up to 9.8 % worse than srtf on 12 of 3000 staggered tiny
# instances and 2.9 % on 2 of 600 staggered Llama mixes: that is what REL_TOL_STAGGERED guards.
REL_TOL = 0.02
REL_TOL_STAGGERED = 0.12
ABS_TOL_S = 1e-6
# More examples on demand: BA_SEARCH=1 (property tests stay a few seconds each otherwise).
SEARCH = os.environ.get("BA_SEARCH") == "1"
TINY_EXAMPLES = 2000 if SEARCH else 60
LLAMA_EXAMPLES = 600 if SEARCH else 25


def _means(reqs, links) -> dict[str, float]:
    return {
        name: mean_added_ttft_s(run_fluid(reqs, links, get_policy(name), check=True))
        for name in ("equal", "srtf", "bandwidth_aware")
    }


def _assert_not_worse_than_baselines(reqs, links) -> dict[str, float]:
    m = _means(reqs, links)
    best = min(m["equal"], m["srtf"])
    together = len({r.start_s for r in reqs}) == 1
    tol = REL_TOL if together else REL_TOL_STAGGERED
    assert m["bandwidth_aware"] <= best * (1 + tol) + ABS_TOL_S, (m, reqs)
    return m


def test_issue_14_two_flow_counterexample():
    """A protected at its pace with B left 25 MB/s used to give 59.5 ms against equal's 39.1 ms (optimum ~38)."""
    links = {"l": Link("l", 1e9)}
    reqs = [
        RequestSpec("A", 39.99e-3, 6.15e6, 12, 20.3e-3, ("l",)),
        RequestSpec("B", 49.26e-3, 9.165e6, 24, 9.40e-3, ("l",)),
    ]
    m = _assert_not_worse_than_baselines(reqs, links)
    assert m["equal"] == pytest.approx(39.1e-3, rel=1e-3)
    assert m["bandwidth_aware"] <= 39.0e-3  # measured 38.75 ms
    # The bare rule still shows the failure (an ablation, kept to document it).
    bare = mean_added_ttft_s(run_fluid(reqs, links, get_policy("bandwidth_aware", lookahead=False)))
    assert bare > 1.4 * m["equal"]


@st.composite
def tiny_instances(draw, together: bool = False):
    """2-4 flows on a 1 GB/s link, sizes and paces around the issue's counterexample.

    ``together``: every request starts at once (no arrivals after the first decision)."""
    n = draw(st.integers(2, 4))
    reqs = []
    for i in range(n):
        layer_bytes = draw(st.floats(1e6, 2e7))
        # Pace from 0.2x to 5x the link: compute from far too short to hide the transfer to hiding it easily.
        compute_s = layer_bytes / 1e9 * draw(st.floats(0.0, 5.0))
        reqs.append(
            RequestSpec(
                i,
                0.0 if together else draw(st.floats(0.0, 0.1)),
                layer_bytes,
                draw(st.integers(1, 24)),
                compute_s,
                ("l",),
                start_delay_s=1e-3 if together else draw(st.sampled_from([0.0, 1e-3])),
            )
        )
    return reqs, {"l": Link("l", 1e9)}


@st.composite
def llama_instances(draw):
    """2-8 Llama-3.1-8B requests of mixed shapes on one 25-400 Gbps link (the simulator's gather path)."""
    n = draw(st.integers(2, 8))
    gbps = draw(st.sampled_from([25, 50, 100, 200, 400]))
    spread_s = draw(st.sampled_from([0.0, 0.0, 0.02, 0.1, 0.3]))
    shapes = sorted(LAYER_MS)
    reqs = []
    for i in range(n):
        cached, new = draw(st.sampled_from(shapes))
        reqs.append(
            RequestSpec(
                i,
                draw(st.floats(0.0, spread_s)) if spread_s else 0.0,
                LLAMA_8B.kv_bytes(cached, layers=1),
                LLAMA_8B.num_layers,
                LAYER_MS[cached, new] * 1e-3,
                ("server", "net", "pcie"),
                start_delay_s=1e-3,
            )
        )
    cap = gbps_to_Bps(gbps)
    links = {"server": Link("server", 2 * cap), "net": Link("net", cap), "pcie": Link("pcie", 4 * cap)}
    return reqs, links


@settings(max_examples=TINY_EXAMPLES, deadline=None)
@given(tiny_instances())
def test_never_worse_than_the_better_baseline_on_tiny_instances(inst):
    _assert_not_worse_than_baselines(*inst)


@settings(max_examples=TINY_EXAMPLES, deadline=None)
@given(tiny_instances(together=True))
def test_never_worse_than_the_better_baseline_when_requests_start_together(inst):
    _assert_not_worse_than_baselines(*inst)


@settings(max_examples=LLAMA_EXAMPLES, deadline=None)
@given(llama_instances())
def test_never_worse_than_the_better_baseline_on_llama_mixes(inst):
    _assert_not_worse_than_baselines(*inst)


@settings(max_examples=8, deadline=None)
@given(tiny_instances())
def test_the_bound_is_below_every_policy_on_tiny_instances(inst):
    reqs, links = inst
    m = _means(reqs, links)
    bound = offline_bound(reqs, links, num_slots=30, num_buckets=10, mip=False).mean_added_ttft_s
    assert bound <= min(m.values()) + 1e-12, (bound, m)


def _hideable_instance(seed: int):
    """2-8 requests over 0.3 s on 1 GB/s, each with compute per layer 0.5-6x its layer's transfer time."""
    rng = random.Random(seed)
    reqs = []
    for i in range(rng.randint(2, 8)):
        layer_bytes = rng.uniform(1e6, 2e7)
        compute_s = layer_bytes / 1e9 * rng.uniform(0.5, 6.0)
        reqs.append(RequestSpec(i, rng.uniform(0.0, 0.3), layer_bytes, rng.randint(4, 32), compute_s, ("l",)))
    return reqs, {"l": Link("l", 1e9)}


def test_bandwidth_aware_earns_its_name_where_compute_can_hide_transfers():
    """Mean added TTFT at least 1.10x below srtf's, P99 no worse (measured over 30 instances: 1.64x,
    P99 892 ms against srtf's 1343 ms and equal's 1055 ms)."""
    added = {"srtf": [], "bandwidth_aware": []}
    for seed in range(30):
        reqs, links = _hideable_instance(seed)
        for name, values in added.items():
            values += [r.added_ttft_s for r in run_fluid(reqs, links, get_policy(name))]
    ba, srtf = np.array(added["bandwidth_aware"]), np.array(added["srtf"])
    assert srtf.mean() >= 1.10 * ba.mean()
    assert np.percentile(ba, 99) <= np.percentile(srtf, 99)


def _two_or_three(seed: int):
    rng = random.Random(seed)
    reqs = [
        RequestSpec(
            i, rng.uniform(0, 0.05), rng.uniform(1e6, 2e7), rng.randint(2, 8), rng.uniform(0, 2e-2), ("l",)
        )
        for i in range(rng.randint(2, 3))
    ]
    return reqs, {"l": Link("l", 1e9)}


@pytest.mark.parametrize("seed", [14, 20])
def test_the_bound_is_exact_where_the_overflow_bucket_used_to_cheat(seed):
    """theta_max from the instance: these were 11 % and 16 % below the best policy (a request paid theta_max
    and skipped its bytes); now the bound meets the best policy's value."""
    reqs, links = _two_or_three(seed)
    best = min(_means(reqs, links).values())
    bound = offline_bound(reqs, links, num_slots=60, num_buckets=20).mean_added_ttft_s
    assert 0.995 * best <= bound <= best + 1e-12
