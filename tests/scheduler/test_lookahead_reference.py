"""The fast lookahead (``scheduler.lookahead.lookahead_choice``) against the original
(``tests/scheduler/reference_lookahead.py``): at every decision of random runs, the same rates, exactly."""

from __future__ import annotations

import random

import pytest

from scheduler.bandwidth_aware import BandwidthAware
from scheduler.flows import Link
from scheduler.fluid import RequestSpec, run_fluid
from scheduler.lookahead import lookahead_choice
from tests.scheduler import reference_lookahead


class _Checked(BandwidthAware):
    """bandwidth_aware that also asks the reference at every decision and insists on the same answer."""

    decisions = 0

    def allocate(self, now_s, flows, links):
        rule = self._heuristic(now_s, flows, links)
        want = reference_lookahead.lookahead_choice(now_s, flows, links, dict(rule))
        got = lookahead_choice(now_s, flows, links, dict(rule))
        assert got == want, (now_s, flows)
        assert got == super().allocate(now_s, flows, links)
        type(self).decisions += 1
        return got


def _instance(rng: random.Random, n: int, together: bool, capped: bool):
    links = {"server": Link("server", 25e9), "net": Link("net", rng.choice([3e9, 12e9, 50e9]))}
    reqs = []
    for i in range(n):
        layers = rng.choice([1, 4, 32])
        reqs.append(
            RequestSpec(
                f"r{i}",
                0.0 if together else rng.uniform(0, 0.05),
                rng.choice([0.0, rng.uniform(1e5, 5e7)]) if i else rng.uniform(1e5, 5e7),
                layers,
                rng.uniform(0, 3e-3),
                ("server", "net") if not (capped and i % 3 == 2) else ("net",),
                rng.choice([0.0, 1e-3]),
                rng.uniform(0, 2e-3),
            )
        )
    return reqs, links


@pytest.mark.parametrize("seed", range(12))
def test_fast_lookahead_chooses_exactly_as_the_reference(seed):
    rng = random.Random(seed)
    for _ in range(6):
        reqs, links = _instance(rng, rng.randint(2, 9), rng.random() < 0.5, rng.random() < 0.2)
        fast = run_fluid(reqs, links, _Checked())
        plain = run_fluid(reqs, links, BandwidthAware())
        assert fast == plain
    assert _Checked.decisions > 0
