"""An offline lower bound on the mean added TTFT of a set of requests sharing links.

Why a bound.  The bandwidth-aware policy is an online heuristic; to say how good it is we compare it with
what *any* schedule -- knowing all arrivals in advance, splitting bandwidth arbitrarily in time -- could
achieve.  The exact optimum is a hard scheduling problem (it contains preemptive total tardiness), so we
solve a relaxation whose optimum is provably no larger than the true one.

The model (``scheduler.bandwidth_aware`` derives it): request ``i`` starts receiving at ``s_i``; its added
TTFT is ``x_i = max_l (T_il - s_i - l c_i)`` where ``T_il`` is when layer ``l`` has fully arrived.  So
``x_i <= theta`` iff its cumulative bytes satisfy ``S_i(s_i + l c_i + theta) >= (l + 1) B_i`` for every
layer.  The relaxation (a MILP, or its LP relaxation):

* Time grid ``t_0 < ... < t_K`` (uniform, plus every ``s_i``).  Variables ``S_ik`` = bytes of request ``i``
  received by ``t_k`` (0 while ``t_k <= s_i``), non-decreasing, at most its total; per slot and link
  ``sum_{i on link} (S_ik - S_i,k-1) <= C_link (t_k - t_k-1)``.  Any real schedule, read at the grid
  points, is feasible here: the grid loses nothing but the order of bytes inside a slot.
* Buckets per request: ``x_i = a_i`` (bucket 0), ``x_i in [theta_j-1, theta_j]`` (buckets 1..J-1, equal
  widths up to ``theta_max``) or ``x_i in [theta_max, top_i]`` (the last, one wide bucket).  ``top_i = n m -
  sum_{j != i} a_j`` with ``m`` the best mean of equal, srtf and bandwidth_aware: an optimal schedule has
  ``sum_j x_j <= n m`` and ``x_j >= a_j``, so no request of it exceeds ``top_i``; every bucket, the last one
  included, must deliver its bytes by its deadlines (before, the overflow bucket paid ``theta_max`` and
  delivered nothing, which made the bound up to 24 % loose on 2-3 requests).  Binary ``v_ij`` picks the
  bucket; ``x_ij`` (= ``x_i`` in the chosen bucket, 0 elsewhere; the convex-hull formulation of the
  disjunction) carries the cost ``sum_ij x_ij / n``, so the added TTFT is charged exactly, not rounded.
* Deadlines, checked at grid points: for any layer ``l``, ``S_i(t_k) >= g_l(x) = (l + 1) B_i - R_i max(0,
  s_i + l c_i + x - t_k)`` where ``R_i`` is the smallest capacity on the path (a flow cannot receive
  faster, so what is missing at ``t_k`` cannot arrive in time otherwise).  ``g_l`` is concave in ``x``, so
  its chord over a bucket lies below it: ``S_ik >= sum_j (alpha_ijk v_ij + gamma_ijk x_ij)`` with the chord
  of the layer whose chord is highest.  A real schedule satisfies every such row for the bucket its
  ``x_i`` falls in; hence the relaxation's optimum is ``<=`` the true optimum: a lower bound.
* ``a_i = max_l ((l + 1) B_i / R_i - l c_i)`` (the request alone on its path) bounds ``x_i`` below.

Tightness.  Losses come from the chords (one bucket width of slack in the deadline rows, shrinking with
``num_buckets``), the within-slot order of bytes (``num_slots``), the LP relaxation of ``v`` (``mip``) and
the wide last bucket: ``theta_max`` defaults to ``top_i`` itself for up to ``EXACT_THETA_MAX_REQUESTS`` (8)
requests, so the buckets cover every provable value at equal widths; above, to 1.25 x bandwidth_aware's worst
added TTFT (narrower buckets where requests actually land), the last bucket's chord covering the rest.  The LP relaxation is solved first (about a second for 16 requests x 32 layers); with
``mip=True`` the MILP (binary buckets) follows with HiGHS and can only raise the bound: the larger of the LP
value and the MILP's *dual* bound is returned, valid even when ``time_limit_s`` stops the MILP (``status``
says so).  Measured on the contended Llama-3.1-8B mixes of ``tests/scheduler/bound_demo.py`` the MILP adds
well under 1 % to the LP there; on tiny instances (<= 4 requests) both match the best policy to 1e-4.

``.venv/bin/python -m tests.scheduler.bound_demo`` prints the policies and the bound side by side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from scheduler.flows import FlowId, Link
from scheduler.fluid import RequestSpec, as_link_map, run_fluid

# Relative safety margin taken off the solver's value for its numerical tolerances.
BOUND_RTOL = 1e-5
# Up to this many requests the buckets span the whole provable range of added TTFT by default (see
# ``offline_bound``); above it they stop at 1.25 x bandwidth_aware's worst and one wide bucket covers the rest.
EXACT_THETA_MAX_REQUESTS = 8


@dataclass(frozen=True)
class BoundResult:
    """``mean_added_ttft_s``: the lower bound.  ``per_request_alone_s``: each request alone on its path (a
    per-request lower bound).  ``per_request_s``: the relaxation's charge per request (its split of the
    bound, not a per-request bound).  ``status``: optimal, time_limit (dual bound used), lp, or trivial."""

    mean_added_ttft_s: float
    per_request_alone_s: dict[FlowId, float]
    per_request_s: dict[FlowId, float]
    status: str
    solve_s: float
    num_vars: int
    num_constraints: int
    mip_gap: float = math.nan
    # The relaxation's own schedule replayed exactly: a feasible schedule, so an upper bound on the optimum
    # (nan when the solver returned no schedule).  bound <= optimum <= schedule_added_ttft_s.
    schedule_added_ttft_s: float = math.nan


def alone_added_ttft_s(spec: RequestSpec, rate_Bps: float) -> float:
    """Added TTFT of a request that has a path of ``rate_Bps`` to itself: ``max_l ((l+1) B / R - l c)``.

    Linear in ``l``, so the max is at the first or the last layer.
    """
    if spec.num_layers == 0 or spec.layer_bytes <= 0:
        return 0.0
    L, B, c = spec.num_layers, spec.layer_bytes, spec.compute_per_layer_s
    return max(B / rate_Bps, L * B / rate_Bps - (L - 1) * c)


def _path_rate_Bps(spec: RequestSpec, links: Mapping[str, Link]) -> float:
    return min(links[n].capacity_Bps for n in spec.path)


def offline_bound(
    requests: Sequence[RequestSpec],
    links: Mapping[str, Link] | Sequence[Link],
    *,
    num_slots: int = 120,
    num_buckets: int = 40,
    theta_max_s: float | None = None,
    mip: bool = True,
    time_limit_s: float = 20.0,
    mip_rel_gap: float = 1e-3,
    lp_time_limit_s: float = 300.0,
    clock: Callable[[], float] | None = None,
) -> BoundResult:
    """Lower bound on the mean added TTFT over all schedules (see the module docstring).

    ``num_slots``: time slots of the grid; ``num_buckets``: added-TTFT buckets per request;
    ``theta_max_s``: top of the equal-width buckets (default: the provable cap ``top_i`` for up to 8
    requests, else 1.25 x the worst added TTFT bandwidth_aware achieves; it only affects tightness, the last
    bucket covers the rest up to ``top_i``).  ``time_limit_s`` limits the MILP only; the LP relaxation, which the
    bound cannot do without, gets ``lp_time_limit_s``.  ``clock``: a callable returning seconds (e.g. ``time.perf_counter``)
    used only to report ``solve_s``; the scheduler never reads the clock itself (``solve_s`` is nan without).

    One function on purpose: the LP is assembled over one variable layout (grid, buckets, columns) whose index
    arithmetic every block below shares; split, each piece would need it all passed in.
    """
    from scheduler.policies import get_policy

    link_map = as_link_map(links)
    reqs = [r for r in requests]
    n = len(reqs)
    if n == 0:
        return BoundResult(0.0, {}, {}, "trivial", 0.0, 0, 0)
    rate = np.array([_path_rate_Bps(r, link_map) for r in reqs])
    alone = np.array([alone_added_ttft_s(r, rate[i]) for i, r in enumerate(reqs)])
    per_alone = {r.request_id: float(alone[i]) for i, r in enumerate(reqs)}
    movers = [i for i, r in enumerate(reqs) if r.total_bytes > 0 and r.num_layers > 0]
    if not movers:
        return BoundResult(0.0, per_alone, dict.fromkeys(per_alone, 0.0), "trivial", 0.0, 0, 0)
    # A provable cap on each request's added TTFT in an optimal schedule: x_i = n * mean - sum_{j != i} x_j
    # <= n * (best policy's mean) - sum_{j != i} alone_j.  The last bucket ends there (and must deliver its
    # bytes like the others), so no request can buy its way out of its deadlines by paying theta_max.
    runs = {
        name: run_fluid(reqs, link_map, get_policy(name)) for name in ("equal", "srtf", "bandwidth_aware")
    }
    best_mean_s = min(float(np.mean([r.added_ttft_s for r in res])) for res in runs.values())
    theta_top = np.maximum(n * best_mean_s - (alone.sum() - alone), alone) * (1 + 1e-9) + 1e-9
    if theta_max_s is None:
        if n <= EXACT_THETA_MAX_REQUESTS:
            theta_max_s = float(theta_top.max())
        else:
            theta_max_s = 1.25 * max(r.added_ttft_s for r in runs["bandwidth_aware"]) + 1e-9
    theta_max_s = max(theta_max_s, float(alone.max()) + 1e-9)

    # Time grid: uniform over [min start, last deadline a bucket can impose], plus every start.
    starts = np.array([r.start_s for r in reqs])
    t0 = float(starts[movers].min())
    horizon = max(
        reqs[i].start_s + theta_max_s + (reqs[i].num_layers - 1) * reqs[i].compute_per_layer_s for i in movers
    )
    grid = np.unique(np.concatenate([np.linspace(t0, horizon, num_slots + 1), starts[movers]]))
    K = len(grid)

    # Variable layout: S[i, k] for movers and grid points after their start, then per request J + 1 bucket
    # indicators v[i, j] and J + 1 disaggregated added TTFTs x[i, j] (x[i, j] = x_i if bucket j, else 0).
    J = num_buckets
    s_index: dict[tuple[int, int], int] = {}
    for i in movers:
        for k in range(K):
            if grid[k] > reqs[i].start_s:
                s_index[i, k] = len(s_index)
    n_s = len(s_index)
    v_base = n_s
    nb = J + 1
    nvar = n_s + 2 * len(movers) * nb
    cost = np.zeros(nvar)
    lb = np.zeros(nvar)
    ub = np.full(nvar, np.inf)
    integrality = np.zeros(nvar)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lo: list[float] = []
    hi: list[float] = []

    def add_row(entries: list[tuple[int, float]], low: float, high: float) -> None:
        r = len(lo)
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        lo.append(low)
        hi.append(high)

    for m_idx, i in enumerate(movers):
        r = reqs[i]
        for k in range(K):
            if (i, k) in s_index:
                ub[s_index[i, k]] = r.total_bytes
                if (i, k - 1) in s_index:  # non-decreasing
                    add_row([(s_index[i, k], 1.0), (s_index[i, k - 1], -1.0)], 0.0, np.inf)
        # Buckets: [a, a], then J - 1 equal widths up to theta_max, then the overflow [theta_max, inf).
        top = min(max(theta_max_s, alone[i]), theta_top[i])
        theta = np.linspace(alone[i], top, J)
        b_lo = np.concatenate([[alone[i]], theta[:-1], [theta[-1]]])
        b_hi = np.concatenate([[alone[i]], theta[1:], [max(theta_top[i], theta[-1])]])
        vb = v_base + m_idx * 2 * nb  # v columns
        xb = vb + nb  # x columns
        cost[xb : xb + nb] = 1.0 / n
        ub[vb : vb + nb] = 1.0
        integrality[vb : vb + nb] = 1 if mip else 0
        add_row([(vb + j, 1.0) for j in range(nb)], 1.0, 1.0)
        for j in range(nb):
            add_row([(xb + j, 1.0), (vb + j, -b_lo[j])], 0.0, np.inf)
            if math.isfinite(b_hi[j]):
                add_row([(xb + j, 1.0), (vb + j, -b_hi[j])], -np.inf, 0.0)
        # Deadline constraints at each grid point: S_ik >= sum_j (alpha_j v_ij + gamma_j x_ij), where
        # alpha + gamma x is the chord, over bucket j, of one layer's concave need
        # g_l(x) = (l + 1) B - R max(0, s + l c + x - t_k): below g_l on the bucket, hence valid.
        layers = np.arange(r.num_layers)
        need_bytes = (layers + 1) * r.layer_bytes
        d0 = r.start_s + layers * r.compute_per_layer_s
        blo, bhi = b_lo, b_hi
        width = bhi - blo
        for k in range(K):
            tk = grid[k]
            g_lo = need_bytes[None, :] - rate[i] * np.maximum(0.0, d0[None, :] + blo[:, None] - tk)  # (J, L)
            g_hi = need_bytes[None, :] - rate[i] * np.maximum(0.0, d0[None, :] + bhi[:, None] - tk)
            best = np.argmax(g_lo + g_hi, axis=1)
            v_lo = g_lo[np.arange(nb), best]
            v_hi = g_hi[np.arange(nb), best]
            gamma = np.where(width > 0, (v_hi - v_lo) / np.where(width > 0, width, 1.0), 0.0)
            alpha = v_lo - gamma * blo
            # Float guard: never demand more than a real schedule must deliver.
            alpha = alpha - 1e-9 * np.abs(v_lo) - 1e-6
            active = np.nonzero(np.maximum(v_lo, v_hi) > 1e-6)[0]
            if len(active) == 0:
                continue
            if (i, k) not in s_index and len(active):
                # Nothing has arrived by t_k: a bucket whose need is positive throughout is impossible.
                for j in active:
                    if v_hi[j] > 1e-6 and v_lo[j] > 1e-6:
                        ub[vb + j] = 0.0
            entries = [(s_index[i, k], 1.0)] if (i, k) in s_index else []
            for j in active:
                entries.append((vb + int(j), -float(alpha[j])))
                if gamma[j] != 0.0:
                    entries.append((xb + int(j), -float(gamma[j])))
            add_row(entries, 0.0, np.inf)
    # Link capacity per slot.
    for name, link in link_map.items():
        users = [i for i in movers if name in reqs[i].path]
        if not users:
            continue
        for k in range(1, K):
            entries = []
            for i in users:
                if (i, k) in s_index:
                    entries.append((s_index[i, k], 1.0))
                    if (i, k - 1) in s_index:
                        entries.append((s_index[i, k - 1], -1.0))
            if entries:
                add_row(entries, -np.inf, link.capacity_Bps * (grid[k] - grid[k - 1]) * (1 + 1e-9) + 1e-6)

    A = coo_matrix((vals, (rows, cols)), shape=(len(lo), nvar)).tocsr()
    # Scale bytes to keep HiGHS well conditioned: each request's S columns in units of its own total bytes
    # (one global unit made a small request's bytes vanish below the solver's tolerances next to a huge one).
    col_scale = np.ones(nvar)
    for (i, _), col in s_index.items():
        col_scale[col] = reqs[i].total_bytes
    A = A.multiply(col_scale[None, :]).tocsr()
    row_scale = 1.0 / np.maximum(1e-30, abs(A).max(axis=1).toarray().ravel())
    A = A.multiply(row_scale[:, None]).tocsr()
    lo_arr = np.array(lo) * row_scale
    hi_arr = np.array(hi) * row_scale
    ub_scaled = ub / col_scale
    # The LP relaxation first: cheap, and a valid bound on its own.  The MILP (if asked) can only raise it;
    # when its time limit stops it early its dual bound may still be below the LP's, so keep the larger.
    options = {"disp": False, "time_limit": lp_time_limit_s}
    res = _solve(cost, A, lo_arr, hi_arr, lb, ub_scaled, np.zeros(nvar), options, clock)
    solve_s = res.pop("solve_s")
    status = res["status"]
    value = float(res["fun"]) if status == "lp" else -math.inf
    if mip and status == "lp" and np.any(integrality):
        options["mip_rel_gap"] = mip_rel_gap
        options["time_limit"] = time_limit_s
        mres = _solve(cost, A, lo_arr, hi_arr, lb, ub_scaled, integrality, options, clock)
        solve_s += mres.pop("solve_s")
        if mres["status"] in ("optimal", "time_limit") and math.isfinite(mres.get("dual_bound", math.nan)):
            # The MILP's primal value may exceed its optimum by the relative gap; its dual bound may not.
            value = max(value, float(mres["dual_bound"]))
            status = mres["status"]
            if mres.get("x") is not None:
                res = mres
            res["gap"] = mres.get("gap")
        else:
            status = f"lp (milp {mres['status']})"
    if not math.isfinite(value):
        value = float(alone.mean())
        status = f"failed ({status}); alone bound"
        warnings.warn(f"offline_bound: solver {status}", RuntimeWarning, stacklevel=2)
    # Margin for the solver's feasibility tolerances (1e-7 on scaled rows): keep the bound a bound.
    value = max(value * (1 - BOUND_RTOL), float(alone.mean()))
    per_req = dict.fromkeys(per_alone, 0.0)
    x = res.get("x")
    if x is not None:
        for m_idx, i in enumerate(movers):
            xb = v_base + m_idx * 2 * nb + nb
            per_req[reqs[i].request_id] = float(np.sum(x[xb : xb + nb]))
    replay = math.nan
    if x is not None:
        curves = {}
        for i in movers:
            scale = reqs[i].total_bytes
            cum = np.array([x[s_index[i, k]] * scale if (i, k) in s_index else 0.0 for k in range(K)])
            curves[i] = np.minimum(np.maximum.accumulate(cum), reqs[i].total_bytes)
        # Leftovers at the horizon are sent one request after another at its path rate: still feasible.
        tail_start, added = {}, []
        offset = 0.0
        for i in movers:
            tail_start[i] = offset
            offset += max(0.0, reqs[i].total_bytes - curves[i][-1]) / rate[i]
        for i in range(n):
            added.append(_replay_added_s(reqs[i], grid, curves.get(i), rate[i], tail_start.get(i, 0.0)))
        replay = float(np.mean(added))
    return BoundResult(
        mean_added_ttft_s=value,
        per_request_alone_s=per_alone,
        per_request_s=per_req,
        status=status,
        solve_s=solve_s,
        num_vars=nvar,
        num_constraints=len(lo),
        mip_gap=float(res.get("gap") if res.get("gap") is not None else math.nan),
        schedule_added_ttft_s=replay,
    )


def _replay_added_s(
    spec: RequestSpec, grid: np.ndarray, cum: np.ndarray | None, rate_Bps: float, tail_wait_s: float
) -> float:
    """True added TTFT of a request whose cumulative bytes follow ``cum`` (piecewise linear on ``grid``).

    Bytes the relaxation left undelivered at the horizon are sent after ``tail_wait_s`` more at the path
    rate (the caller serialises the requests' tails, a feasible continuation).
    """
    if cum is None or spec.total_bytes <= 0 or spec.num_layers == 0:
        return 0.0
    t, c = list(grid), list(cum)
    left = spec.total_bytes - c[-1]
    if left > 1e-6:
        t += [t[-1] + tail_wait_s, t[-1] + tail_wait_s + left / rate_Bps]
        c += [c[-1], spec.total_bytes]
    t_arr, c_arr = np.array(t), np.array(c)
    arrivals = []
    for layer in range(spec.num_layers):
        target = (layer + 1) * spec.layer_bytes * (1 - 1e-9)
        k = int(np.searchsorted(c_arr, target))
        k = min(max(k, 1), len(c_arr) - 1)
        seg = c_arr[k] - c_arr[k - 1]
        frac = 1.0 if seg <= 0 else min(1.0, max(0.0, (target - c_arr[k - 1]) / seg))
        arrivals.append(t_arr[k - 1] + frac * (t_arr[k] - t_arr[k - 1]))
    return max(
        0.0, max(a - spec.start_s - layer * spec.compute_per_layer_s for layer, a in enumerate(arrivals))
    )


def _solve(cost, A, lo, hi, lb, ub, integrality, options, clock) -> dict:
    """Run HiGHS through ``scipy.optimize.milp``; time it with the caller's ``clock`` if one is given."""
    t_start = clock() if clock is not None else math.nan
    res = milp(
        c=cost,
        constraints=LinearConstraint(A, lo, hi),
        integrality=integrality,
        bounds=Bounds(lb, ub),
        options=options,
    )
    solve_s = clock() - t_start if clock is not None else math.nan
    is_mip = bool(np.any(integrality))
    out = {"solve_s": solve_s, "x": res.x, "gap": getattr(res, "mip_gap", math.nan)}
    if res.status == 0:
        out["status"] = "optimal" if is_mip else "lp"
        out["fun"] = res.fun
        out["dual_bound"] = getattr(res, "mip_dual_bound", math.nan) if is_mip else res.fun
    elif res.status == 1:
        out["status"] = "time_limit"
        out["dual_bound"] = getattr(res, "mip_dual_bound", math.nan)
        out["x"] = None
    else:
        out["status"] = f"highs status {res.status}: {res.message}"
        out["x"] = None
    return out
