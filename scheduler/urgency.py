"""A flow's urgency: how many bytes it needs by when, seen from now (``urgency``), and the total order on
flow ids that breaks ties (``tie_key``).  Shared by the bandwidth-aware rule (``scheduler.bandwidth_aware``)
and its lookahead (``scheduler.lookahead``).  Bytes and seconds throughout."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.flows import BYTES_EPS, FlowId, FlowView

_new_object = object.__new__


def tie_key(flow_id: FlowId) -> tuple:
    """A total order on flow ids of mixed types: numbers, then strings, then anything by ``repr``."""
    if type(flow_id) is str:  # the simulator's ids: skip the isinstance chain (several calls per event)
        return (1, flow_id)
    if isinstance(flow_id, bool):
        return (2, repr(flow_id))
    if isinstance(flow_id, int | float):
        return (0, float(flow_id), "")
    if isinstance(flow_id, str):
        return (1, flow_id)
    if isinstance(flow_id, tuple):
        return (3, tuple(tie_key(x) for x in flow_id))
    return (4, repr(flow_id))


@dataclass(frozen=True)
class Urgency:
    """A flow's deadlines seen from ``now``, reduced to the two endpoints that matter (see ``scheduler.bandwidth_aware``).

    ``need_first_bytes`` / ``slack_first_s``: bytes missing for the first undelivered layer and the time until
    the GPU needs it; ``need_last_bytes`` / ``slack_last_s``: the same for the last layer.
    """

    flow: FlowView
    need_first_bytes: float
    slack_first_s: float
    need_last_bytes: float
    slack_last_s: float

    def lateness_s(self, rate_Bps: float) -> float:
        """Added TTFT from now on if the flow got ``rate_Bps`` constantly."""
        if rate_Bps <= 0:
            return math.inf
        # ``max(0.0, a, b)`` as comparisons (the same float; the rule asks it per flow per decision).
        late = 0.0
        a = self.need_first_bytes / rate_Bps - self.slack_first_s
        if a > late:
            late = a
        b = self.need_last_bytes / rate_Bps - self.slack_last_s
        if b > late:
            late = b
        return late

    def bottleneck_bytes(self, rate_Bps: float) -> float:
        """Bytes the flow must receive before it stops accruing lateness at ``rate_Bps``."""
        if rate_Bps <= 0:
            return self.need_last_bytes
        first = self.need_first_bytes / rate_Bps - self.slack_first_s
        last = self.need_last_bytes / rate_Bps - self.slack_last_s
        return self.need_last_bytes if last > first else self.need_first_bytes

    def jit_rate_Bps(self) -> float:
        """Least constant rate meeting every current deadline (inf when the first is due now)."""
        r = 0.0
        for need, slack in (
            (self.need_first_bytes, self.slack_first_s),
            (self.need_last_bytes, self.slack_last_s),
        ):
            if need <= BYTES_EPS:
                continue
            if slack <= 0:
                return math.inf
            q = need / slack
            if q > r:  # max(r, q)
                r = q
        return r

    def laxity_s(self, rate_Bps: float) -> float:
        """How long the flow can get nothing and still meet its deadlines at ``rate_Bps`` afterwards."""
        if rate_Bps <= 0:
            return -math.inf
        a = self.slack_first_s - self.need_first_bytes / rate_Bps
        b = self.slack_last_s - self.need_last_bytes / rate_Bps
        return b if b < a else a  # min(a, b)


def urgency(flow: FlowView, now_s: float) -> Urgency:
    # Builtin ``max(a, b)`` is written ``b if b > a else a`` (what it returns), and ``FlowView``'s
    # ``layers_delivered`` / ``total_bytes`` inline: this runs for every flow at every decision.
    B = flow.layer_bytes
    L = flow.layers_total
    d = flow.delivered_bytes
    c = flow.compute_per_layer_s
    if not c > 0.0:
        c = 0.0
    if B <= 0:
        k = L
    else:
        k = int((d + BYTES_EPS) // B)
        if not k < L:
            k = L
    computed = flow.layers_computed
    # When the GPU needs layer k: it first finishes what is running and the delivered layers not started.
    if computed == 0 and k == 0:
        g = now_s
    else:
        busy = flow.gpu_busy_until_s
        behind = k - computed
        g = (busy if busy > now_s else now_s) + (behind if behind > 0 else 0) * c
    need_first = (k + 1) * B - d
    need_last = B * L - d
    more = L - k - 1
    # ``Urgency(...)`` without the frozen dataclass's per-field ``object.__setattr__`` (several per event).
    u = _new_object(Urgency)
    u.__dict__.update(
        flow=flow,
        need_first_bytes=need_first if need_first > 0.0 else 0.0,
        slack_first_s=g - now_s,
        need_last_bytes=need_last if need_last > 0.0 else 0.0,
        slack_last_s=g + (more if more > 0 else 0) * c - now_s,
    )
    return u
