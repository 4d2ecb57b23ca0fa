"""Bandwidth-aware and strict-priority allocation policies.

The objective.  Request ``i``'s cached KV arrives layer by layer; layer ``l`` arrives at ``T_il``.  Its GPU
finishes at ``max_l (T_il + (L - l) c_i)`` (layers are released at ``T_il`` and take ``c_i`` each), and with
infinite bandwidth at ``s_i + L c_i`` (``s_i`` = when bytes start to flow).  So the TTFT a finite link adds is

    added_i = max_l (T_il - D_il),    D_il = s_i + l c_i,

the *maximum lateness* of the request's layers against the ideal deadlines ``D_il``.  The policy minimises
the mean over requests of this max-lateness.  At a decision time ``now`` the past is sunk and the same
structure holds for what is left: a flow whose GPU will need layer ``k`` (the first one not yet delivered)
at ``g`` (``now`` if the GPU already waits) needs layer ``k + m`` by ``g + m c``; any lateness against these
*current deadlines* adds to its TTFT one for one.

What is exact (single link of capacity ``C``):

1. *More than the pace rate is useless to a flow on schedule.*  A flow that meets every current deadline
   gains nothing from extra bytes unless it later falls behind; the least constant rate meeting all of them
   is its just-in-time (JIT) rate ``max_m need_m / slack_m`` (``need_m`` = bytes missing for layer ``k + m``,
   ``slack_m = g + m c - now``).  ``need_m`` and ``slack_m`` are linear in ``m``, so the ratio is monotone
   and the max sits at the first or the last layer: O(1) per flow.  In steady state it is the pace rate
   ``layer_bytes / c``.  Likewise the lateness at a constant rate is linear in ``m``: a flow is either
   *compute-bound* (the first missing layer is its bottleneck) or *transfer-bound* (the last one is).
2. *With no compute, the problem is preemptive sum of completion times.*  For ``c = 0`` the added TTFT is
   the transfer's completion time and SRPT is optimal (the exchange argument: swapping two pieces of service
   so the shorter job finishes first lowers one completion time by more than it raises the other).  The
   policy reduces to SRPT there (``tests/scheduler/test_policies.py`` checks it), and in the transfer-bound
   regime -- the usual one at 25-100 Gbps for Llama-3.1-8B, whose pace rates are 10-60 GB/s -- it serves
   late flows in SRPT order.
3. *EDF is optimal for meeting deadlines* (Horn): on-schedule flows' JIT rates are granted in order of least
   *laxity* (how long the flow could get nothing and still be on time at the full path rate).

What is heuristic (exchange arguments between two flows, applied greedily):

* *Priority among late flows* (stalled flows, new flows waiting for layer 0, flows behind their deadlines):
  a transfer-bound flow's work is its remaining bytes; a compute-bound flow stops accruing lateness after
  its first missing layer (``b`` bytes) but then holds its pace ``P`` of the link.  Against a
  transfer-bound flow of ``W`` bytes, serving it first wins iff ``b (C - P) / (C - 2P) < W`` when
  ``P < C/2`` and iff its remaining bytes are fewer otherwise; that effective work is the sort key.  Keys
  are re-derived against the capacity the protected flows leave (several compute-bound flows together can
  saturate a link), and each late flow in turn takes everything left on its path.
* *Protecting on-schedule flows.*  Granting an on-schedule flow its JIT rate ``P`` slows the head late flow
  (``w`` bytes of work, ``n`` late flows waiting behind it) by ``n (w / (C' - P) - w / C')`` in total
  (``C'``: what earlier protections left); not granting it stalls the flow for ``max(0, w / C' - F)``
  (``F``: its laxity).  It is protected when the first is smaller, or when it would outrank the head
  anyway once stalled (otherwise it would flip between stalled and protected every layer).
* *Leftovers* (only when no late flow can use them) build buffer for the least-laxity flows, so the policy
  is work conserving on every link a flow with bytes left crosses.

*The lookahead* (``scheduler.lookahead.lookahead_choice``) guards the rule: the rule alone can be much worse
  than both baselines (issue 14: it protected one flow at a pace that left the other 25 MB/s, so they stalled
  in turn every layer, 59.5 ms against equal's 39.1 ms).  At each decision the rule's rates, srtf's and equal
  sharing's are each scored by the exact added TTFT of "these rates until the next event, then the best of
  three closed-form schedules of the bytes left" (sequential in SRPT order = srtf, processor sharing = equal,
  and everyone at their JIT rate when those fit), and the least wins, ties to srtf then equal.  Since srtf and
  equal followed by their own schedule *are* those baselines, the choice is never estimated worse than either,
  and by the rollout argument the policy is no worse than the better baseline for the flows present
  (``tests/scheduler/test_bandwidth_aware_props.py`` searches for counterexamples; requests arriving later can
  still cost a few percent, measured there).  It applies when all live flows share one path (the simulator's
  gathers) and there are at most ``LOOKAHEAD_MAX_FLOWS``; cost O(n^2) per decision.

Multi-link paths: every grant is bounded by the residual capacity of every link on the path and the flow's
``max_rate_Bps``.  Decisions are made at events only (the fluid model re-asks at every layer boundary and
GPU layer end), so the O(n log n) allocation is re-derived as buffers change; ties break by ``flow_id``.
Measured against the offline bound (``scheduler.bound``) on contended Llama-3.1-8B mixes the policy is
within 0-3 % at 25-100 Gbps and within 8-10 % at 200-400 Gbps (``docs/scheduler.md`` has the table).

``srtf`` (shortest remaining transfer first) is the simple strict-priority reference: flows in order of
remaining bytes, each takes all the bandwidth left on its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from operator import itemgetter

from scheduler import lookahead as _lookahead
from scheduler.flows import BYTES_EPS, FlowId, FlowView, Link
from scheduler.urgency import Urgency, tie_key, urgency

# Sort key of the rule's (key, tie, urgency) triples: key, then tie (stable among equal pairs).
_by_key_and_tie = itemgetter(0, 1)


def path_residual_Bps(flow: FlowView, residual: Mapping[str, float]) -> float:
    r = math.inf  # min(residual over the path, default inf), without a generator: called per grant
    for n in flow.path:
        v = residual[n]
        if v < r:
            r = v
    return r


def grant(flow: FlowView, rate_Bps: float, residual: dict[str, float], rates: dict[FlowId, float]) -> float:
    """Give ``flow`` up to ``rate_Bps`` more, bounded by every link on its path and its own cap."""
    # Builtin ``min(a, b)`` / ``max(a, b)`` written ``b if b < a else a`` / ``b if b > a else a`` (what
    # they return on floats, without the call: this runs for every flow at every decision).
    path = flow.path
    fid = flow.flow_id
    r = math.inf
    for n in path:
        v = residual[n]
        if v < r:
            r = v
    had = rates.get(fid, 0.0)
    own = flow.max_rate_Bps - had
    room = own if own < r else r
    inc = room if room < rate_Bps else rate_Bps
    inc = inc if inc > 0.0 else 0.0
    if inc == math.inf:
        raise ValueError(f"flow {fid!r}: unbounded rate (no link on its path and no cap)")
    if inc > 0:
        rates[fid] = had + inc
        for n in path:
            v = residual[n] - inc
            residual[n] = v if v > 0.0 else 0.0
    return inc


def _fresh(flows: Sequence[FlowView], links: Mapping[str, Link]):
    residual = {n: link.capacity_Bps for n, link in links.items()}
    rates: dict[FlowId, float] = {f.flow_id: 0.0 for f in flows}
    live = []
    for f in flows:
        left = f.layer_bytes * f.layers_total - f.delivered_bytes  # f.remaining_bytes, inline
        if (left if left > 0.0 else 0.0) > BYTES_EPS:
            live.append(f)
    for f in live:
        for n in f.path:
            if n not in residual:
                raise ValueError(f"flow {f.flow_id!r} crosses unknown link {n!r}")
    return residual, rates, live


def lone_rate_Bps(
    now_s: float,
    path: Sequence[str],
    capacity_Bps: Mapping[str, float],
    max_rate_Bps: float,
    layer_bytes: float,
    layers_total: int,
    delivered_bytes: float,
    compute_per_layer_s: float,
    gpu_busy_until_s: float,
    layers_computed: int,
) -> float:
    """``bandwidth_aware``'s rate for a flow that is alone (the only one passed): bytes per second.

    Late (at its path's rate), it takes all of the path; on schedule it is granted its JIT rate and then the
    rest of the path (``jit + (c - jit)``, which need not round to ``c``).  The arguments are the
    ``FlowView`` fields it reads, ``capacity_Bps`` the links' capacities by name, so the simulator can ask
    without building a view (most of its decisions are a lone flow's).  The same float operations in the
    same order as ``urgency``, ``Urgency.lateness_s`` / ``jit_rate_Bps``, ``_fresh`` and ``grant`` (builtin
    ``max(a, b)`` / ``min(a, b)`` written as ``b if b > a else a`` / ``b if b < a else a``, which is what
    they return on floats); ``tests/scheduler/test_policies.py`` compares it with ``allocate`` bit for bit.
    """
    B, L, d = layer_bytes, layers_total, delivered_bytes
    total = B * L
    left = total - d
    if not (left if left > 0.0 else 0.0) > BYTES_EPS:  # not live: _fresh's zero rate
        return 0.0
    # urgency(f, now_s)
    c = compute_per_layer_s if compute_per_layer_s > 0.0 else 0.0
    if B <= 0:
        k = L
    else:
        k = int((d + BYTES_EPS) // B)
        if not k < L:
            k = L
    if layers_computed == 0 and k == 0:
        g = now_s
    else:
        behind = k - layers_computed
        g = (gpu_busy_until_s if gpu_busy_until_s > now_s else now_s) + (behind if behind > 0 else 0) * c
    need_first = (k + 1) * B - d
    need_first = need_first if need_first > 0.0 else 0.0
    slack_first = g - now_s
    need_last = left if left > 0.0 else 0.0
    more = L - k - 1
    slack_last = g + (more if more > 0 else 0) * c - now_s
    # The path's capacity (its least link), then the flow's own cap.
    r = math.inf
    for n in path:
        v = capacity_Bps[n]
        if v < r:
            r = v
    cap = max_rate_Bps if max_rate_Bps < r else r
    # lateness_s(cap) > 1e-12: late, it takes the path (grant(f, inf)).
    if cap <= 0:
        late = math.inf
    else:
        late, a, b = 0.0, need_first / cap - slack_first, need_last / cap - slack_last
        if a > late:
            late = a
        if b > late:
            late = b
    if late > 1e-12:
        inc = cap if cap < math.inf else math.inf
        inc = inc if inc > 0.0 else 0.0
        if inc == math.inf:
            raise ValueError("lone flow: unbounded rate (no link on its path and no cap)")
        return 0.0 + inc if inc > 0 else 0.0
    # On schedule: jit_rate_Bps(), then grant(f, jit) and grant(f, inf).
    jit = 0.0
    for need, slack in ((need_first, slack_first), (need_last, slack_last)):
        if need <= BYTES_EPS:
            continue
        if slack <= 0:
            jit = math.inf
            break
        q = need / slack
        if q > jit:
            jit = q
    inc = cap if cap < jit else jit
    inc = inc if inc > 0.0 else 0.0
    if inc == math.inf:
        raise ValueError("lone flow: unbounded rate (no link on its path and no cap)")
    rate = 0.0
    residual = {}
    for n in path:
        residual[n] = capacity_Bps[n]
    if inc > 0:
        rate = 0.0 + inc
        for n in path:
            v = residual[n] - inc
            residual[n] = v if v > 0.0 else 0.0
    r = math.inf
    for n in path:
        v = residual[n]
        if v < r:
            r = v
    own = max_rate_Bps - rate
    room = own if own < r else r
    inc = room if room < math.inf else math.inf
    inc = inc if inc > 0.0 else 0.0
    if inc == math.inf:
        raise ValueError("lone flow: unbounded rate (no link on its path and no cap)")
    if inc > 0:
        rate = rate + inc
    return rate


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


def late_key_bytes(u: Urgency, cap_Bps: float) -> float:
    """Priority key of a late flow: its *effective* work, from the two-flow exchange argument.

    A transfer-bound flow (its pace is above what the path can give) stops accruing lateness only when it
    is complete: its work is its remaining bytes (SRPT).  A compute-bound flow with pace ``P`` stops accruing
    lateness after its first missing layer (``b`` bytes) but then holds ``P`` of the link.  Against a
    transfer-bound flow of ``W`` bytes, serving it first wins iff ``b (C - P) / (C - 2P) < W`` when
    ``P < C / 2``, and iff its remaining bytes are fewer when ``P >= C / 2``; that is the key.
    """
    remaining = u.need_last_bytes
    if cap_Bps <= 0 or u.bottleneck_bytes(cap_Bps) >= remaining:
        return remaining
    pace = u.flow.pace_rate_Bps
    if pace >= cap_Bps / 2:
        return remaining
    key = u.need_first_bytes * (cap_Bps - pace) / (cap_Bps - 2 * pace)
    return key if key < remaining else remaining  # min(remaining, key)


class BandwidthAware:
    """Deadline-aware allocation minimising mean added TTFT (see the module docstring for why)."""

    name = "bandwidth_aware"
    # The answer for a lone flow from its fields (what ``allocate`` gives, without a ``FlowView``): the
    # simulator asks it directly for this exact class (``scheduler.fluid.lone_rate_function``).
    lone_rate_Bps = staticmethod(lone_rate_Bps)

    def __init__(self, protect: str = "exchange", lookahead: bool = True) -> None:
        # How on-schedule flows are protected from late ones: "exchange" (the test below), "always", "never".
        # ``lookahead``: choose between the rule's rates and the baselines' by their cost-to-go (see
        # ``lookahead_choice``); False is the bare rule (an ablation).
        if protect not in ("exchange", "always", "never"):
            raise ValueError(f"protect must be exchange, always or never, got {protect!r}")
        self.protect = protect
        self.lookahead = bool(lookahead)

    def allocate(
        self, now_s: float, flows: Sequence[FlowView], links: Mapping[str, Link]
    ) -> dict[FlowId, float]:
        # Urgencies are pure functions of (flow, now): the rule's are reused by the lookahead.
        us: dict[FlowId, Urgency] = {}
        rates = self._heuristic(now_s, flows, links, us)
        if not self.lookahead:
            return rates
        return _lookahead.lookahead_choice(now_s, flows, links, rates, us)

    def _heuristic(
        self,
        now_s: float,
        flows: Sequence[FlowView],
        links: Mapping[str, Link],
        us: dict[FlowId, Urgency] | None = None,
    ) -> dict[FlowId, float]:
        residual, rates, live = _fresh(flows, links)
        if not live:
            return rates
        if len(live) == 1:
            return self._lone(now_s, live[0], residual, rates, us)
        full = residual.copy()  # the capacities (``residual`` is not granted from yet)
        late: list[tuple[float, tuple, Urgency]] = []
        on_time: list[tuple[float, tuple, Urgency]] = []
        last_path, path_cap = None, 0.0  # the flows mostly share one path tuple: its capacity once
        for f in live:
            u = urgency(f, now_s)
            if us is not None:
                us[f.flow_id] = u
            if f.path is not last_path:
                last_path, path_cap = f.path, path_residual_Bps(f, full)
            m = f.max_rate_Bps
            cap = m if m < path_cap else path_cap  # min(path_cap, m)
            if u.lateness_s(cap) > 1e-12:
                late.append((late_key_bytes(u, cap), tie_key(f.flow_id), u))
            else:
                on_time.append((u.laxity_s(cap), tie_key(f.flow_id), u))
        late.sort(key=_by_key_and_tie)
        on_time.sort(key=_by_key_and_tie)

        # Late flows per link, in priority order: the exchange test needs the head and the count per path.
        late_on: dict[str, list[tuple[float, tuple, Urgency]]] = {}
        for t in late:
            for n in t[2].flow.path:
                late_on.setdefault(n, []).append(t)

        # Phase 1: JIT rates for on-schedule flows whose protection is worth it (EDF / least laxity first).
        for laxity, _, u in on_time:
            f = u.flow
            jit = u.jit_rate_Bps()
            if self.protect == "never" and late:
                continue
            if self.protect == "exchange" and not self._protect_worth_it(
                u, jit, laxity, late_on, full, residual
            ):
                continue
            grant(f, jit, residual, rates)
        # Phase 2: late flows, least effective work first, each takes what is left on its path.  The keys
        # are re-derived against what the protected flows left: a compute-bound flow whose pace is large
        # next to that residual is effectively transfer-bound.
        rekeyed = []
        for _, tie, u in late:
            r, m = path_residual_Bps(u.flow, residual), u.flow.max_rate_Bps
            left = m if m < r else r  # min(r, m)
            rekeyed.append((late_key_bytes(u, left) if left > 0 else u.need_last_bytes, tie, u))
        rekeyed.sort(key=_by_key_and_tie)
        for _, _, u in rekeyed:
            grant(u.flow, math.inf, residual, rates)
        # Phase 3: leftovers build buffer for the least-laxity flows (work conservation).
        for _, _, u in on_time:
            grant(u.flow, math.inf, residual, rates)
        return rates

    @staticmethod
    def _lone(
        now_s: float,
        f: FlowView,
        residual: dict[str, float],
        rates: dict[FlowId, float],
        us: dict[FlowId, Urgency] | None,
    ) -> dict[FlowId, float]:
        """``_heuristic`` with one live flow (about a third of a trace replay's decisions): ``lone_rate_Bps``
        on the full capacities (``residual`` is still those).  ``us`` stays empty: the lookahead needs two."""
        rates[f.flow_id] = lone_rate_Bps(
            now_s,
            f.path,
            residual,
            f.max_rate_Bps,
            f.layer_bytes,
            f.layers_total,
            f.delivered_bytes,
            f.compute_per_layer_s,
            f.gpu_busy_until_s,
            f.layers_computed,
        )
        return rates

    @staticmethod
    def _protect_worth_it(
        u: Urgency,
        jit_Bps: float,
        laxity_s: float,
        late_on: Mapping[str, list],
        full: Mapping[str, float],
        residual: Mapping[str, float],
    ) -> bool:
        """Exchange test: does granting this flow its JIT rate cost the late flows less than its stall?

        Evaluated against what is left after the flows already protected, so reservations add up.
        """
        lists = [late_on[n] for n in u.flow.path if n in late_on]
        if not lists:
            return True
        # The head: the least (key, tie) of the lists' heads (``min`` by that pair, the first on equality).
        head_key, head_tie, head = lists[0][0]
        for lst in lists:
            k, tie, h = lst[0]
            if (k, tie) < (head_key, head_tie):
                head_key, head_tie, head = k, tie, h
        if len(lists) == 1:
            n_sharing = len(lists[0])
        else:
            n_sharing = len({t[2].flow.flow_id for lst in lists for t in lst})
        # Consistency: a flow that would outrank the head once it stalls keeps its rate now.
        # Its key is taken against what the flows protected before it left, so reservations add up.
        r, m = path_residual_Bps(u.flow, residual), u.flow.max_rate_Bps
        own_cap = m if m < r else r  # min(r, m)
        if own_cap > 0 and (late_key_bytes(u, own_cap), tie_key(u.flow.flow_id)) <= (head_key, head_tie):
            return True
        r, m = path_residual_Bps(head.flow, residual), head.flow.max_rate_Bps
        cap = m if m < r else r
        if jit_Bps >= cap:
            return False
        r = path_residual_Bps(head.flow, full)
        work = head.bottleneck_bytes(m if m < r else r)
        # Protecting slows the head late flow from cap to cap - jit; every late flow waits for it.
        cost_protect = n_sharing * (work / (cap - jit_Bps) - work / cap)
        # Not protecting stalls this flow once its laxity is used up, for as long as the head is served.
        cost_preempt = work / cap - laxity_s
        if not cost_preempt > 0.0:  # max(0.0, cost_preempt)
            cost_preempt = 0.0
        return cost_protect <= cost_preempt
