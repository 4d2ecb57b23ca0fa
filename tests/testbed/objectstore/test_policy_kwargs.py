"""A policy's tunables (``policy_kwargs``) reach the pacer: from the command line, from the admin operation."""

from __future__ import annotations

import json

import pytest

from testbed.objectstore.pacer import Pacer, parse_settings


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def on_schedule_stream_rate_Bps(policy_kwargs: dict | None) -> float:
    """The rate ``bandwidth_aware`` gives a stream that is on schedule (3 layers buffered ahead of its GPU)
    when a large new stream arrives that is still waiting for its first layer."""
    clock = FakeClock()
    p = Pacer("bandwidth_aware", 1e9, clock=clock, burst_s=0.0, policy_kwargs=policy_kwargs)
    a = p.open_stream(10**6, 32, compute_per_layer_s=0.01, stream_id="a")
    p.delay_for(a, 4 * 10**6)
    for _ in range(4):
        clock.t += 0.001
        p.layer_sent(a)
    clock.t += 0.006
    p.open_stream(50 * 10**6, 32, compute_per_layer_s=0.001, stream_id="b")
    return a.rate_Bps


def test_a_policy_kwarg_changes_the_pacers_rates():
    # The bare rule (no lookahead) keeps an on-schedule stream at its just-in-time rate; protect="never"
    # gives the late one all of the link.
    bare = {"lookahead": False}
    assert on_schedule_stream_rate_Bps(bare) > 0
    assert on_schedule_stream_rate_Bps({**bare, "protect": "always"}) > 0
    assert on_schedule_stream_rate_Bps({**bare, "protect": "never"}) == 0.0


def test_the_lookahead_kwarg_reaches_the_pacer():
    # With the lookahead the policy may overrule the bare rule's protect="never" (it compares the rule's
    # rates with the baselines' by their cost-to-go); without it the rule's rates stand.
    p = Pacer(
        "bandwidth_aware", 1e9, clock=FakeClock(), policy_kwargs={"lookahead": False, "protect": "never"}
    )
    assert p.policy.lookahead is False and p.policy.protect == "never"
    assert Pacer("bandwidth_aware", 1e9, clock=FakeClock()).policy.lookahead is True


def test_configure_switches_the_tunables_and_settings_show_them():
    p = Pacer("equal", None, clock=FakeClock())
    assert "policy_kwargs" not in p.settings()  # none set: the answer keeps its former shape
    p.configure("bandwidth_aware", 1e9, {"protect": "never"})
    assert p.policy.protect == "never"
    assert p.settings()["policy_kwargs"] == {"protect": "never"}
    with pytest.raises(ValueError):
        p.configure("bandwidth_aware", 1e9, {"protect": "sometimes"})
    assert p.policy.protect == "never" and p.changes == 1  # a refused change changes nothing


def test_parse_settings_keeps_or_resets_the_tunables():
    current = {"policy": "bandwidth_aware", "policy_kwargs": {"protect": "never"}, "egress_gbps": 8.0}

    def parse(doc):
        return parse_settings(json.dumps(doc).encode(), current)

    kept = parse({"egress_gbps": 16})
    assert (kept.policy, kept.policy_kwargs, kept.egress_Bps) == (
        "bandwidth_aware",
        {"protect": "never"},
        2e9,
    )
    assert parse({"policy": "equal"}).policy_kwargs == {}  # a new policy starts from its own defaults
    assert parse({"policy_kwargs": {"protect": "always"}}).policy_kwargs == {"protect": "always"}
    assert parse({"policy_kwargs": {}}).policy_kwargs == {}
    for bad in (
        {"policy_kwargs": [1]},
        {"policy_kwargs": {"protect": "x"}},
        {"policy": "equal", "policy_kwargs": {"a": 1}},
    ):
        with pytest.raises(ValueError):
            parse(bad)
