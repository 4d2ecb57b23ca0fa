"""Bandwidth-aware and strict-priority allocation policies.

The objective.  Request ``i``'s cached KV arrives layer by layer; layer ``l`` arrives at ``T_il``.  Its GPU
finishes at ``max_l (T_il + (L - l) c_i)`` (layers are released at ``T_il`` and take ``c_i`` each), and with
infinite bandwidth at ``s_i + L c_i`` (``s_i`` = when bytes start to flow).  So the TTFT a finite link adds is

    added_i = max_l (T_il - D_il),    D_il = s_i + l c_i,

the *maximum lateness* of the request's layers against the ideal deadlines ``D_il``.  The policy minimises
the mean over requests of this max-lateness.  At a decision time ``now`` the past is sunk, and the same
structure holds for what is left: a flow whose GPU will need layer ``k`` (the first one not yet delivered) at
``g`` (``now`` if the GPU already waits) needs layer ``k + m`` by ``g + m c``; any lateness against these
*current deadlines* adds to its TTFT one for one.

Facts the policy is built on (single link of capacity ``C``):

1. *More than the pace rate is useless to a flow on schedule.*  A flow that meets every current deadline
   gains nothing from extra bytes unless it later falls behind; the least constant rate that meets all of
   them is its just-in-time (JIT) rate ``max_m need_m / slack_m`` (``need_m`` = bytes still missing for layer
   ``k + m``, ``slack_m = g + m c - now``).  Because ``need_m`` and ``slack_m`` are both linear in ``m`` the
   ratio is monotone in ``m``, so the max sits at the first or the last layer: O(1) per flow.  In steady
   state this is the pace rate ``layer_bytes / c``.
2. *Late flows are a preemptive single-machine problem.*  A flow that cannot meet its deadlines even with the
   whole link (a stalled flow, a new flow waiting for layer 0, or one whose pace exceeds what is left)
   accrues added TTFT at rate 1 until it has received its *bottleneck bytes*: the bytes of the first missing
   layer when the link outruns its compute, or all its remaining bytes when it does not (again one of the
   two endpoints, since lateness at a constant rate is linear in ``m``).  Among such jobs, serving the one
   with the least work first is optimal for the sum of completion times (the SRPT exchange argument: swapping
   two adjacent pieces of service so the shorter job finishes first lowers one completion time by more than
   it raises the other).  Hence late flows are served one at a time in order of bottleneck bytes, each
   taking all the bandwidth left on its path.
3. *EDF for feasibility.*  For on-schedule flows, earliest-deadline-first is optimal for meeting deadlines
   (Horn), so their JIT rates are granted in order of least *laxity* (time the flow could go without any
   bandwidth and still be on time, at the path's full capacity).

What is heuristic: the split between (2) and (3).  Granting on-schedule flows their JIT rate first keeps
them from stalling but slows the late flows; letting the head late flow preempt them is better when the
on-schedule flows have enough buffer to ride it out.  The exchange argument for one late flow ``A`` (needs
``b`` bytes) and one on-schedule flow at JIT rate ``P`` with laxity ``F``: protecting costs ``A`` about
``b/(C-P) - b/C``; preempting costs ``max(0, b/C - F)``.  The policy protects a flow when the first is
smaller, evaluated with ``n_late`` waiting late flows all delayed by ``A``'s service (they accrue lateness
too).  Leftover capacity (no late flow left on a path) goes to on-schedule flows in laxity order, so the
policy is work conserving on every link that a flow with bytes left crosses.  Multi-link paths: every grant
is bounded by the residual capacity of every link on the path.  Decisions are made at events only, so the
JIT rates are re-derived at each layer boundary; deterministic tie-breaking by ``flow_id``.

``srtf`` (shortest remaining transfer first) is the simple strict-priority reference: flows in order of
remaining bytes, each takes all the bandwidth left on its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scheduler.flows import BYTES_EPS, FlowId, FlowView, Link
from scheduler.policies import register_policy


def tie_key(flow_id: FlowId) -> tuple:
    """A total order on flow ids of mixed types: numbers, then strings, then anything by ``repr``."""
    if isinstance(flow_id, bool):
        return (2, repr(flow_id))
    if isinstance(flow_id, int | float):
        return (0, float(flow_id), "")
    if isinstance(flow_id, str):
        return (1, flow_id)
    if isinstance(flow_id, tuple):
        return (3, tuple(tie_key(x) for x in flow_id))
    return (4, repr(flow_id))


def path_residual_Bps(flow: FlowView, residual: Mapping[str, float]) -> float:
    return min((residual[n] for n in flow.path), default=math.inf)


def grant(flow: FlowView, rate_Bps: float, residual: dict[str, float], rates: dict[FlowId, float]) -> float:
    """Give ``flow`` up to ``rate_Bps`` more, bounded by every link on its path and its own cap."""
    room = min(path_residual_Bps(flow, residual), flow.max_rate_Bps - rates.get(flow.flow_id, 0.0))
    inc = max(0.0, min(rate_Bps, room))
    if inc == math.inf:
        raise ValueError(f"flow {flow.flow_id!r}: unbounded rate (no link on its path and no cap)")
    if inc > 0:
        rates[flow.flow_id] = rates.get(flow.flow_id, 0.0) + inc
        for n in flow.path:
            residual[n] = max(0.0, residual[n] - inc)
    return inc


def _fresh(flows: Sequence[FlowView], links: Mapping[str, Link]):
    residual = {n: link.capacity_Bps for n, link in links.items()}
    rates: dict[FlowId, float] = {f.flow_id: 0.0 for f in flows}
    live = [f for f in flows if f.remaining_bytes > BYTES_EPS]
    for f in live:
        for n in f.path:
            if n not in residual:
                raise ValueError(f"flow {f.flow_id!r} crosses unknown link {n!r}")
    return residual, rates, live


@register_policy
class ShortestRemainingTransferFirst:
    """Strict priority by remaining bytes (ties by flow id); each flow takes what is left on its path."""

    name = "srtf"

    def allocate(
        self, now_s: float, flows: Sequence[FlowView], links: Mapping[str, Link]
    ) -> dict[FlowId, float]:
        residual, rates, live = _fresh(flows, links)
        for f in sorted(live, key=lambda f: (f.remaining_bytes, tie_key(f.flow_id))):
            grant(f, math.inf, residual, rates)
        return rates


@dataclass(frozen=True)
class Urgency:
    """A flow's deadlines seen from ``now``, reduced to the two endpoints that matter (see module doc).

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
    return Urgency(
        flow=flow,
        need_first_bytes=max(0.0, need_first),
        slack_first_s=g - now_s,
        need_last_bytes=max(0.0, need_last),
        slack_last_s=g + max(0, remaining_layers - 1) * c - now_s,
    )


def late_key_bytes(u: Urgency, cap_Bps: float) -> float:
    """Priority key of a late flow: its *effective* work, from the two-flow exchange argument.

    A transfer-bound flow (its pace is above what the path can give) stops accruing lateness only when it
    is complete: its work is its remaining bytes (SRPT).  A compute-bound flow with pace ``P`` stops accruing
    lateness after its first missing layer (``b`` bytes) but then holds ``P`` of the link.  Against a
    transfer-bound flow of ``W`` bytes, serving it first wins iff ``b (C - P) / (C - 2P) < W`` when
    ``P < C / 2``, and iff its remaining bytes are fewer when ``P >= C / 2``; that is the key.
    """
    remaining = u.need_last_bytes
    if u.bottleneck_bytes(cap_Bps) >= remaining:
        return remaining
    pace = u.flow.pace_rate_Bps
    if pace >= cap_Bps / 2:
        return remaining
    return min(remaining, u.need_first_bytes * (cap_Bps - pace) / (cap_Bps - 2 * pace))


@register_policy
class BandwidthAware:
    """Deadline-aware allocation minimising mean added TTFT (see the module docstring for why)."""

    name = "bandwidth_aware"

    def __init__(self, protect: str = "exchange") -> None:
        # How on-schedule flows are protected from late ones: "exchange" (the test below), "always", "never".
        if protect not in ("exchange", "always", "never"):
            raise ValueError(f"protect must be exchange, always or never, got {protect!r}")
        self.protect = protect

    def allocate(
        self, now_s: float, flows: Sequence[FlowView], links: Mapping[str, Link]
    ) -> dict[FlowId, float]:
        residual, rates, live = _fresh(flows, links)
        if not live:
            return rates
        full = {n: link.capacity_Bps for n, link in links.items()}
        late: list[tuple[float, tuple, Urgency]] = []
        on_time: list[tuple[float, tuple, Urgency]] = []
        for f in live:
            u = urgency(f, now_s)
            cap = min(path_residual_Bps(f, full), f.max_rate_Bps)
            if u.lateness_s(cap) > 1e-12:
                late.append((late_key_bytes(u, cap), tie_key(f.flow_id), u))
            else:
                on_time.append((u.laxity_s(cap), tie_key(f.flow_id), u))
        late.sort(key=lambda t: (t[0], t[1]))
        on_time.sort(key=lambda t: (t[0], t[1]))

        # Phase 1: JIT rates for on-schedule flows whose protection is worth it (EDF / least laxity first).
        for laxity, _, u in on_time:
            f = u.flow
            jit = u.jit_rate_Bps()
            if self.protect == "never" and late:
                continue
            if self.protect == "exchange" and not self._protect_worth_it(
                u, jit, laxity, late, full, residual
            ):
                continue
            grant(f, jit, residual, rates)
        # Phase 2: late flows, least effective work first, each takes what is left on its path.  The keys
        # are re-derived against what the protected flows left: a compute-bound flow whose pace is large
        # next to that residual is effectively transfer-bound.
        rekeyed = []
        for _, tie, u in late:
            left = min(path_residual_Bps(u.flow, residual), u.flow.max_rate_Bps)
            rekeyed.append((late_key_bytes(u, left) if left > 0 else u.need_last_bytes, tie, u))
        rekeyed.sort(key=lambda t: (t[0], t[1]))
        for _, _, u in rekeyed:
            grant(u.flow, math.inf, residual, rates)
        # Phase 3: leftovers build buffer for the least-laxity flows (work conservation).
        for _, _, u in on_time:
            grant(u.flow, math.inf, residual, rates)
        return rates

    @staticmethod
    def _protect_worth_it(
        u: Urgency,
        jit_Bps: float,
        laxity_s: float,
        late: list,
        full: Mapping[str, float],
        residual: Mapping[str, float],
    ) -> bool:
        """Exchange test: does granting this flow its JIT rate cost the late flows less than its stall?

        Evaluated against what is left after the flows already protected, so reservations add up.
        """
        sharing = [t for t in late if set(t[2].flow.path) & set(u.flow.path)]
        if not sharing:
            return True
        head_key, head_tie, head = sharing[0]
        # Consistency: a flow that would outrank the head once it stalls keeps its rate now.
        # Its key is taken against what the flows protected before it left, so reservations add up.
        own_cap = min(path_residual_Bps(u.flow, residual), u.flow.max_rate_Bps)
        if own_cap > 0 and (late_key_bytes(u, own_cap), tie_key(u.flow.flow_id)) <= (head_key, head_tie):
            return True
        cap = min(path_residual_Bps(head.flow, residual), head.flow.max_rate_Bps)
        if jit_Bps >= cap:
            return False
        work = head.bottleneck_bytes(min(path_residual_Bps(head.flow, full), head.flow.max_rate_Bps))
        # Protecting slows the head late flow from cap to cap - jit; every late flow waits for it.
        cost_protect = len(sharing) * (work / (cap - jit_Bps) - work / cap)
        # Not protecting stalls this flow once its laxity is used up, for as long as the head is served.
        cost_preempt = max(0.0, work / cap - laxity_s)
        return cost_protect <= cost_preempt
