"""The bandwidth_aware policy's lookahead: score the rule's rates against srtf's and equal sharing's.

At a decision, each candidate's rates are scored by the total added TTFT (from now) of "these rates until the
next event, then the best of three closed-form schedules of the bytes left" on the flows' shared bottleneck;
``lookahead_choice`` explains why that keeps ``bandwidth_aware`` no worse than either baseline for the flows
present.  Split from ``scheduler.bandwidth_aware`` (the rule and the urgency it scores) to keep each module
readable; ``tests/scheduler/test_lookahead_reference.py`` holds it to the original implementation
(``tests/scheduler/reference_lookahead.py``) decision by decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scheduler.flows import BYTES_EPS, FlowId, FlowView, Link
from scheduler.urgency import Urgency, tie_key, urgency

# Above this many live flows the lookahead (O(n^2) per candidate) is skipped and the rule's rates are used.
LOOKAHEAD_MAX_FLOWS = 24


def lookahead_choice(
    now_s: float,
    flows: Sequence[FlowView],
    links: Mapping[str, Link],
    rule_Bps: dict[FlowId, float],
    urgencies: Mapping[FlowId, Urgency] | None = None,
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
    ``LOOKAHEAD_MAX_FLOWS`` of them; otherwise the rule's rates stand.  ``urgencies``: the flows'
    ``urgency(f, now_s)`` if the caller has them.
    """
    if urgencies is not None:  # the rule's: one per live flow, in flow order
        live = [u.flow for u in urgencies.values()]
    else:
        live = [f for f in flows if f.remaining_bytes > BYTES_EPS]
    if len(live) < 2 or len(live) > LOOKAHEAD_MAX_FLOWS:
        return rule_Bps
    # Plain loops, comparisons and decorated sorts instead of generators, ``min``/``any`` and key lambdas:
    # this runs at every decision with two or more flows.  The results are the same (``min`` of positive
    # capacities does not depend on their order; a sort by (key, position) is the stable sort by key).
    first_path = live[0].path
    path = None
    for f in live:
        if f.path is not first_path and f.path != first_path:  # equal tuples are equal sets
            if path is None:
                path = frozenset(first_path)
            if frozenset(f.path) != path:
                return rule_Bps
    if not first_path:
        return rule_Bps
    cap_Bps = math.inf
    for n in first_path:
        v = links[n].capacity_Bps
        if v < cap_Bps:
            cap_Bps = v
    for f in live:
        if f.max_rate_Bps < cap_Bps:
            return rule_Bps
    # Flows in tie order (the order of every sum below); equal tie keys keep the flows' order (stable).
    ranked = [(tie_key(f.flow_id), i, f) for i, f in enumerate(live)]
    ranked.sort()
    live = [f for _, _, f in ranked]
    head, head_key = 0, None
    for i, (tie, _, f) in enumerate(ranked):
        left = f.layer_bytes * f.layers_total - f.delivered_bytes  # f.remaining_bytes
        key = (left if left > 0.0 else 0.0, tie)
        if head_key is None or key < head_key:
            head, head_key = i, key
    srtf = dict.fromkeys([f.flow_id for f in flows], 0.0)
    srtf[live[head].flow_id] = cap_Bps
    equal = srtf.copy()
    share = cap_Bps / len(live)
    for f in live:
        equal[f.flow_id] = share
    us = [urgencies[f.flow_id] if urgencies is not None else urgency(f, now_s) for f in live]
    state = _LookaheadState(now_s, us)
    # Ties go to srtf, then equal, then the rule: among equally good futures for the flows present, the one
    # that finishes bytes soonest leaves the link freest for requests that have not arrived yet.  A
    # candidate must beat ``bound``; one equal to a candidate already scored has its cost and cannot.
    best, best_cost = srtf, _cost_to_go_s(state, srtf, cap_Bps, math.inf)
    for cand in (equal, rule_Bps):
        if cand == srtf or (cand is rule_Bps and cand == equal):
            continue
        bound = best_cost * (1 - 1e-9) - 1e-12
        if bound < 0.0:  # a cost is a sum of latenesses, each at least 0: none can beat a zero
            break
        cost = _cost_to_go_s(state, cand, cap_Bps, bound)
        if cost < bound:
            best, best_cost = cand, cost
    return best


class _LookaheadState:
    """What every candidate's cost-to-go shares: per flow ``(flow_id, curve, need_first, need_last)`` (bytes
    missing for its next and its last layer) where ``curve``
    is ``(layer_bytes, compute_s, need_first, slack_first, last)`` for ``_late_on_piece_s`` (None when the
    flow has nothing left to be late with), and the time to the next GPU layer end (the part of the step that
    does not depend on rates)."""

    def __init__(self, now_s: float, us: Sequence[Urgency]) -> None:
        flows = self.flows = []
        idle = self.idle = []
        flow_ids = self.flow_ids = []
        gpu_step = math.inf
        for i, u in enumerate(us):
            f = u.flow
            B = f.layer_bytes
            nf, nl = u.need_first_bytes, u.need_last_bytes
            curve = None
            if B > 0 and nl > BYTES_EPS:
                c = f.compute_per_layer_s
                if not c > 0.0:  # max(0.0, c)
                    c = 0.0
                last = round((nl - nf) / B)
                if not last > 0:  # max(0, last)
                    last = 0
                curve = (B, c, nf, u.slack_first_s, last)
            fid = f.flow_id
            flow_ids.append(fid)
            flows.append((fid, curve, nf, nl))
            # ``_cost_to_go_s``'s per-flow tuple for a rate of zero (nothing in the step): most of srtf's.
            idle.append((nl, i, 0.0, 0.0, curve, nl))
            if 0 < f.layers_computed < f.layers_total:
                wait = f.gpu_busy_until_s - now_s
                if f.gpu_busy_until_s > now_s and wait < gpu_step:  # min(gpu_step, wait)
                    gpu_step = wait
        self.gpu_step_s = gpu_step


def _late_on_piece_s(
    curve: tuple, x_from: float, x_to: float, t_from: float, rate: float, worst: float
) -> float:
    """``max(worst, lateness of the layers completing on one piece of a delivery curve)``.

    A piece: bytes from now in ``(x_from, x_to]`` arrive at ``t_from + (x - x_from) / rate`` seconds from
    now.  A flow's added TTFT from now on a curve (pieces covering ``(0, need_last]``) is this folded over
    its pieces from ``worst = 0``.  Lateness is linear in the layer on a piece, so its two end layers are
    checked (layers are matched to pieces within a byte-level tolerance; a piece may hold no layer's end).
    """
    if x_to <= x_from or rate <= 0:
        return worst
    B, c, need_first, slack_first, last = curve
    m_lo = math.floor((x_from - need_first) / B + 1e-9) + 1
    if m_lo < 0:
        m_lo = 0
    m_hi = math.floor((x_to - need_first) / B + 1e-9)
    if last < m_hi:
        m_hi = last
    if m_lo > m_hi:
        return worst
    for m in (m_lo, m_hi):
        x = need_first + m * B
        if x_from > x:
            x = x_from
        if x_to < x:
            x = x_to
        late = t_from + (x - x_from) / rate - (slack_first + m * c)
        if late > worst:
            worst = late
    return worst


def _cost_to_go_s(
    state: _LookaheadState, rates: Mapping[FlowId, float], cap_Bps: float, bound: float
) -> float:
    """Sum of the flows' added TTFT from now: ``rates`` until the next event, then the best base schedule.

    Exact when below ``bound``; otherwise some value ``>= bound`` (a sum of non-negative terms that reaches
    ``bound`` cannot fall back under it, so a schedule is abandoned there).

    The base schedules after the step: *sequential* service in order of bytes left, *processor sharing*,
    and *paced*: every flow gets its just-in-time rate, if those fit in the link.  A flow late during the
    step (by ``d``) has every later deadline ``d`` later (lateness is a max over layers), so its JIT rate is
    taken against the shifted deadlines; at JIT rates nothing is late again, and the paced cost is what the
    step itself made late (``inf`` when the JIT rates do not fit or a flow cannot be on time at any rate).
    The paced sums are taken in the same pass as the step's pieces, processor sharing's phases in the same
    pass as its lower bound (the same float operations in the same order as separate loops).
    """
    # ``min(a, b)`` / ``max(a, b)`` are written ``b if b < a else a`` / ``b if b > a else a`` in this
    # function (the same result on floats, without a builtin call: it runs ~20 of them per candidate).
    flows = state.flows
    step = state.gpu_step_s  # the next event: a layer completes or a GPU finishes a layer
    flow_rates = [rates.get(fid, 0.0) for fid in state.flow_ids]
    for (_, _, need_first, _), r in zip(flows, flow_rates):
        if r > 0:
            v = need_first / r
            if v < step:
                step = v
    if not math.isfinite(step):
        return math.inf
    # Per flow: bytes in the step, bytes after it, and the lateness of the step's piece (every schedule's
    # curve starts with it); and the paced schedule's sums (``_paced_cost_s``, in flow order).
    first = []
    idle = state.idle
    paced, jit_sum = 0.0, 0.0  # paced is None once a flow cannot be on time at any rate
    for i, ((_, curve, _, need_last), r) in enumerate(zip(flows, flow_rates)):
        if r == 0.0:  # got 0.0 (or -0.0, the same in every later use), no lateness yet
            tup = idle[i]
            left, got, late = tup[0], 0.0, 0.0
        else:
            got = r * step
            if not got < need_last:
                got = need_last
            late = _late_on_piece_s(curve, 0.0, got, 0.0, got / step, 0.0) if got > 0 and curve else 0.0
            left = need_last - got
            if not left > 0.0:
                left = 0.0
            tup = (left, i, got, late, curve, need_last)
        first.append(tup)
        if paced is None:
            continue
        if left <= BYTES_EPS:
            paced += late
            continue
        B, c, need_first, slack_first, last = curve
        m_next = math.floor((got - need_first) / B + 1e-9) + 1
        if not m_next > 0:
            m_next = 0
        if last < m_next:
            m_next = last
        jit_Bps = 0.0  # need / slack is monotone in the layer: the max is at one end
        for m in (m_next, last):
            need = need_first + m * B - got
            slack = slack_first + m * c + late - step
            if need <= BYTES_EPS:
                continue
            if slack <= 0:
                paced = None
                break
            q = need / slack
            if q > jit_Bps:
                jit_Bps = q
        if paced is not None:
            jit_sum += jit_Bps
            paced += late
    paced = paced if paced is not None and jit_sum <= cap_Bps else math.inf
    if paced < bound:
        bound = paced
    order = sorted(first)  # by (left, i): the flow index is unique, so no further field is compared
    # Sequential (srtf) after the step.
    seq = 0.0
    t = step
    for left, _, got, late, curve, need_last in order:
        if left > BYTES_EPS:
            # late = _late_on_piece_s(curve, got, need_last, t, cap_Bps, late), inline
            if curve and need_last > got and cap_Bps > 0:
                B, c, need_first, slack_first, last = curve
                m_lo = math.floor((got - need_first) / B + 1e-9) + 1
                if m_lo < 0:
                    m_lo = 0
                m_hi = math.floor((need_last - need_first) / B + 1e-9)
                if last < m_hi:
                    m_hi = last
                if m_lo <= m_hi:
                    for m in (m_lo, m_hi):
                        x = need_first + m * B
                        if got > x:
                            x = got
                        if need_last < x:
                            x = need_last
                        w = t + (x - got) / cap_Bps - (slack_first + m * c)
                        if w > late:
                            late = w
            t += left / cap_Bps
        seq += late
        if seq >= bound:
            seq = math.inf
            break
    if seq < bound:
        bound = seq
    # Processor sharing (equal) after the step: flows finish in order of bytes left.  Each phase ends when
    # the next flow's bytes are in.  A lower bound in the same pass: each flow's lateness is at least its
    # step piece's and its last layer's on its last piece (which starts where the phase that brings its
    # bytes left starts: with ties, an earlier flow's) -- the very term ``_late_on_piece_s`` takes there,
    # computed the same way, when that piece holds the last layer.  Summed in the same order as ``ps``
    # (rounded sums of larger terms are not smaller), reaching ``bound`` means ``ps`` would too, so its
    # O(n^2) pieces are skipped.
    n = len(order)
    t = step
    done_left = 0.0  # bytes every unfinished flow has received since the step
    phase_ends = []  # (time, bytes each since step at that time, flows active)
    t_from, x_from_step, rate = step, 0.0, 0.0  # the current phase's start and per-flow rate
    low = 0.0
    for j, (left, _, got, late, curve, _) in enumerate(order):
        active = n - j
        if left > done_left:
            t_from, x_from_step, rate = t, done_left, cap_Bps / active
            t += (left - done_left) * active / cap_Bps
            done_left = left
        phase_ends.append((t, done_left, active))
        if curve and left > 0.0:
            B, c, need_first, slack_first, last = curve
            x_from = got + x_from_step
            x_to = got + (left if left < done_left else done_left)
            if (
                math.floor((x_from - need_first) / B + 1e-9) + 1 <= last
                and math.floor((x_to - need_first) / B + 1e-9) >= last
            ):
                x = need_first + last * B
                if x_from > x:
                    x = x_from
                if x_to < x:
                    x = x_to
                w = t_from + (x - x_from) / rate - (slack_first + last * c)
                if w > late:
                    late = w
        low += late
    if low >= bound:
        return min(seq, paced)
    ps = 0.0
    for j, (left, _, got, late, curve, _) in enumerate(order):
        if curve:
            t_prev, x_prev = step, 0.0
            for t_end, x_end, active in phase_ends[: j + 1]:
                if x_end > x_prev:
                    x_to = got + (left if left < x_end else x_end)
                    late = _late_on_piece_s(curve, got + x_prev, x_to, t_prev, cap_Bps / active, late)
                t_prev, x_prev = t_end, x_end
                if x_prev >= left:
                    break
        ps += late
        if ps >= bound:
            ps = math.inf
            break
    return min(seq, ps, paced)
