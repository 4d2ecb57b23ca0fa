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
        return max(
            0.0,
            self.need_first_bytes / rate_Bps - self.slack_first_s,
            self.need_last_bytes / rate_Bps - self.slack_last_s,
        )

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
            r = max(r, need / slack)
        return r

    def laxity_s(self, rate_Bps: float) -> float:
        """How long the flow can get nothing and still meet its deadlines at ``rate_Bps`` afterwards."""
        if rate_Bps <= 0:
            return -math.inf
        return min(
            self.slack_first_s - self.need_first_bytes / rate_Bps,
            self.slack_last_s - self.need_last_bytes / rate_Bps,
        )


def urgency(flow: FlowView, now_s: float) -> Urgency:
    B = flow.layer_bytes
    c = max(0.0, flow.compute_per_layer_s)
    k = flow.layers_delivered
    remaining_layers = flow.layers_total - k
    # When the GPU needs layer k: it first finishes what is running and the delivered layers not started.
    if flow.layers_computed == 0 and k == 0:
        g = now_s
    else:
        g = max(now_s, flow.gpu_busy_until_s) + max(0, k - flow.layers_computed) * c
    need_first = (k + 1) * B - flow.delivered_bytes
    need_last = flow.total_bytes - flow.delivered_bytes
    # ``Urgency(...)`` without the frozen dataclass's per-field ``object.__setattr__`` (several per event).
    u = _new_object(Urgency)
    u.__dict__.update(
        flow=flow,
        need_first_bytes=max(0.0, need_first),
        slack_first_s=g - now_s,
        need_last_bytes=max(0.0, need_last),
        slack_last_s=g + max(0, remaining_layers - 1) * c - now_s,
    )
    return u
