"""The bandwidth_aware lookahead as it was before the trace-hour speed-up (commit 0c61bfd), kept verbatim as
the reference ``tests/scheduler/test_lookahead_reference.py`` checks the fast version against: the same
choice at every decision, bit for bit."""

# ruff: noqa: E501

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scheduler.flows import BYTES_EPS, FlowId, FlowView, Link
from scheduler.lookahead import LOOKAHEAD_MAX_FLOWS
from scheduler.urgency import Urgency, tie_key, urgency


def lookahead_choice(
    now_s: float, flows: Sequence[FlowView], links: Mapping[str, Link], rule_Bps: dict[FlowId, float]
) -> dict[FlowId, float]:
    """Pick, among the rule's rates, srtf's and equal sharing's, the one with the least estimated cost-to-go.

    The estimate of a candidate is the exact total added TTFT (from ``now_s``) of: the candidate's rates until
    the next event they cause, then the better of two *base schedules* of the bytes left, both in closed
    form on one bottleneck: *sequential* service in order of remaining bytes (what srtf does) and *processor
    sharing* (what equal sharing does).  Each flow's lateness under a piecewise-linear delivery curve is the
    max over its layers of arrival minus current deadline, linear in the layer on every piece, so only the
    layers next to the curve's breakpoints are evaluated.

    Why it bounds the baselines: srtf's rates followed by sequential service *are* srtf, and equal's rates
    followed by processor sharing *are* equal sharing, so the chosen candidate's estimate is never above
    either baseline's true cost-to-go; the next decision can always continue the base schedule it was
    estimated with, so (the rollout argument) the policy's total added TTFT is at most the better baseline's
    for the flows present, and new arrivals only re-open the choice.  The rule's rates win only when pacing
    on-schedule flows is estimated to pay strictly (ties go to the baselines, see below).

    Applies when every live flow crosses the same links with no rate cap below the path (the shared
    bottleneck is then one resource, of the path's smallest capacity) and there are at most
    ``LOOKAHEAD_MAX_FLOWS`` of them; otherwise the rule's rates stand.
    """
    live = [f for f in flows if f.remaining_bytes > BYTES_EPS]
    if len(live) < 2 or len(live) > LOOKAHEAD_MAX_FLOWS:
        return rule_Bps
    path = frozenset(live[0].path)
    if not path or any(frozenset(f.path) != path for f in live):
        return rule_Bps
    cap_Bps = min(links[n].capacity_Bps for n in path)
    if any(f.max_rate_Bps < cap_Bps for f in live):
        return rule_Bps
    live.sort(key=lambda f: tie_key(f.flow_id))
    srtf_head = min(live, key=lambda f: (f.remaining_bytes, tie_key(f.flow_id)))
    srtf = {f.flow_id: 0.0 for f in flows}
    srtf[srtf_head.flow_id] = cap_Bps
    equal = {f.flow_id: 0.0 for f in flows}
    for f in live:
        equal[f.flow_id] = cap_Bps / len(live)
    us = [urgency(f, now_s) for f in live]
    # Ties go to srtf, then equal, then the rule: among equally good futures for the flows present, the one
    # that finishes bytes soonest leaves the link freest for requests that have not arrived yet.
    best, best_cost = None, math.inf
    for cand in (srtf, equal, rule_Bps):
        cost = _cost_to_go_s(now_s, us, cand, cap_Bps)
        if best is None or cost < best_cost * (1 - 1e-9) - 1e-12:
            best, best_cost = cand, cost
    return best


def _step_s(now_s: float, us: Sequence[Urgency], rates: Mapping[FlowId, float]) -> float:
    """Time to the next event under ``rates``: a layer completes or a GPU finishes a layer."""
    step = math.inf
    for u in us:
        f = u.flow
        r = rates.get(f.flow_id, 0.0)
        if r > 0:
            step = min(step, u.need_first_bytes / r)
        if 0 < f.layers_computed < f.layers_total and f.gpu_busy_until_s > now_s:
            step = min(step, f.gpu_busy_until_s - now_s)
    return step


def _lateness_on_curve_s(u: Urgency, pieces: Sequence[tuple[float, float, float, float]]) -> float:
    """Added TTFT from now of a flow whose bytes arrive along ``pieces``.

    ``pieces``: ``(x_from, x_to, t_from, rate)``, bytes from now in ``(x_from, x_to]`` arrive at
    ``t_from + (x - x_from) / rate`` seconds from now; together they cover ``(0, need_last]``.
    """
    B = u.flow.layer_bytes
    c = max(0.0, u.flow.compute_per_layer_s)
    if B <= 0 or u.need_last_bytes <= BYTES_EPS:
        return 0.0
    last = max(0, round((u.need_last_bytes - u.need_first_bytes) / B))
    worst = 0.0
    for x_from, x_to, t_from, rate in pieces:
        if x_to <= x_from or rate <= 0:
            continue
        # Layers whose bytes complete inside this piece: lateness is linear in m there, check both ends.
        # (A piece may hold no layer's end; layers are matched to pieces within a byte-level tolerance.)
        m_lo = max(0, math.floor((x_from - u.need_first_bytes) / B + 1e-9) + 1)
        m_hi = min(last, math.floor((x_to - u.need_first_bytes) / B + 1e-9))
        if m_lo > m_hi:
            continue
        for m in (m_lo, m_hi):
            x = min(max(u.need_first_bytes + m * B, x_from), x_to)
            t = t_from + (x - x_from) / rate
            worst = max(worst, t - (u.slack_first_s + m * c))
    return worst


def _cost_to_go_s(
    now_s: float, us: Sequence[Urgency], rates: Mapping[FlowId, float], cap_Bps: float
) -> float:
    """Sum of the flows' added TTFT from now: ``rates`` until the next event, then the better base schedule."""
    step = _step_s(now_s, us, rates)
    if not math.isfinite(step):
        return math.inf
    first = []  # (flow, bytes in the step, bytes after it)
    for u in us:
        got = min(u.need_last_bytes, rates.get(u.flow.flow_id, 0.0) * step)
        first.append((u, got, max(0.0, u.need_last_bytes - got)))
    order = sorted(first, key=lambda t: (t[2], tie_key(t[0].flow.flow_id)))
    # Sequential (srtf) after the step.
    seq = 0.0
    t = step
    for u, got, left in order:
        pieces = [(0.0, got, 0.0, got / step)] if got > 0 else []
        if left > BYTES_EPS:
            pieces.append((got, u.need_last_bytes, t, cap_Bps))
            t += left / cap_Bps
        seq += _lateness_on_curve_s(u, pieces)
    # Processor sharing (equal) after the step: flows finish in order of bytes left.
    ps = 0.0
    n = len(order)
    t = step
    done_left = 0.0  # bytes every unfinished flow has received since the step
    phase_ends: list[
        tuple[float, float, int]
    ] = []  # (time, bytes each since step at that time, flows active)
    for j, (_, _, left) in enumerate(order):
        active = n - j
        if left > done_left:
            t += (left - done_left) * active / cap_Bps
            done_left = left
        phase_ends.append((t, done_left, active))
    for j, (u, got, left) in enumerate(order):
        pieces = [(0.0, got, 0.0, got / step)] if got > 0 else []
        t_prev, x_prev = step, 0.0
        for t_end, x_end, active in phase_ends[: j + 1]:
            if x_end > x_prev:
                pieces.append((got + x_prev, got + min(x_end, left), t_prev, cap_Bps / active))
            t_prev, x_prev = t_end, x_end
            if x_prev >= left:
                break
        ps += _lateness_on_curve_s(u, pieces)
    return min(seq, ps, _paced_cost_s(first, step, cap_Bps))


def _paced_cost_s(first: Sequence[tuple[Urgency, float, float]], step_s: float, cap_Bps: float) -> float:
    """Third base schedule: after the step every flow gets its just-in-time rate, if those fit in the link.

    A flow late during the step (by ``d``) has every later deadline ``d`` later (lateness is a max over
    layers), so its JIT rate is taken against the shifted deadlines; at JIT rates nothing is late again, and
    the cost is what the step itself made late.  ``inf`` when the JIT rates do not fit (or a flow cannot be
    on time at any rate).
    """
    total_s, jit_sum = 0.0, 0.0
    for u, got, left in first:
        late_s = _lateness_on_curve_s(u, [(0.0, got, 0.0, got / step_s)]) if got > 0 else 0.0
        if left <= BYTES_EPS:
            total_s += late_s
            continue
        if got <= 0:
            late_s = 0.0  # nothing arrived: the first missing layer's lateness is counted below
        B = u.flow.layer_bytes
        c = max(0.0, u.flow.compute_per_layer_s)
        last = max(0, round((u.need_last_bytes - u.need_first_bytes) / B))
        m_next = min(last, max(0, math.floor((got - u.need_first_bytes) / B + 1e-9) + 1))
        jit_Bps = 0.0  # need / slack is monotone in the layer: the max is at one end
        for m in (m_next, last):
            need = u.need_first_bytes + m * B - got
            slack = u.slack_first_s + m * c + late_s - step_s
            if need <= BYTES_EPS:
                continue
            if slack <= 0:
                return math.inf
            jit_Bps = max(jit_Bps, need / slack)
        jit_sum += jit_Bps
        total_s += late_s
    return total_s if jit_sum <= cap_Bps else math.inf
