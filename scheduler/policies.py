"""Bandwidth allocation policies: flows in, per-flow rates out.

Every policy implements ``allocate(now_s, flows, links) -> {flow_id: rate_Bps}`` and must return rates that
never exceed any link's capacity (``flows.check_feasible``).  Policies are pure and deterministic: the same
inputs give the same rates, and ties are broken by ``flow_id`` order, never by dict or set iteration order of
unhashed state.

``equal`` is max-min fair sharing by progressive filling, the baseline the research compares against: all
unfrozen flows grow at the same rate until a link saturates (or a flow hits its own ``max_rate_Bps``); the
flows through that link freeze, and filling continues with the rest.  On one link this is ``C / n`` each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from scheduler.bandwidth_aware import BandwidthAware, ShortestRemainingTransferFirst
from scheduler.flows import BYTES_EPS, FlowId, FlowView, Link


class Policy(Protocol):
    name: str

    def allocate(
        self, now_s: float, flows: Sequence[FlowView], links: Mapping[str, Link]
    ) -> dict[FlowId, float]: ...


def max_min_fill(
    flows: Sequence[FlowView],
    links: Mapping[str, Link],
    caps_Bps: Mapping[FlowId, float] | None = None,
    residual_Bps: Mapping[str, float] | None = None,
    weights: Mapping[FlowId, float] | None = None,
) -> dict[FlowId, float]:
    """Weighted max-min fair rates by progressive filling.

    ``caps_Bps`` bounds each flow (default its ``max_rate_Bps``); ``residual_Bps`` is the capacity left on
    each link (default the full capacity), so the function can also share out leftovers.
    """
    if caps_Bps is None and residual_Bps is None and weights is None:
        shared = _one_path_fill(flows, links)
        if shared is not None:
            return shared
    residual = {n: links[n].capacity_Bps for n in links} if residual_Bps is None else dict(residual_Bps)
    caps = {f.flow_id: f.max_rate_Bps for f in flows} if caps_Bps is None else dict(caps_Bps)
    w = {f.flow_id: (f.weight if weights is None else weights.get(f.flow_id, 1.0)) for f in flows}
    rates = {f.flow_id: 0.0 for f in flows}
    active = [f for f in flows if caps.get(f.flow_id, 0.0) > BYTES_EPS and f.remaining_bytes > BYTES_EPS]
    # At most one freeze per link or per flow per round: the loop is bounded by len(flows) + len(links).
    for _ in range(len(flows) + len(links) + 1):
        if not active:
            break
        weight_on: dict[str, float] = {}
        for f in active:
            for n in f.path:
                weight_on[n] = weight_on.get(n, 0.0) + w[f.flow_id]
        # Largest common increment (per unit weight) before a link saturates or a flow hits its cap.
        step = float("inf")
        for n, wsum in weight_on.items():
            step = min(step, max(0.0, residual[n]) / wsum)
        for f in active:
            step = min(step, (caps[f.flow_id] - rates[f.flow_id]) / w[f.flow_id])
        if step == float("inf"):
            raise ValueError("unbounded allocation: a flow crosses no link and has no rate cap")
        for f in active:
            inc = step * w[f.flow_id]
            rates[f.flow_id] += inc
            for n in f.path:
                residual[n] -= inc
        saturated = {n for n in weight_on if residual[n] <= 1e-9 * max(1.0, links[n].capacity_Bps)}
        active = [
            f
            for f in active
            if not (set(f.path) & saturated) and _below_cap(rates[f.flow_id], caps[f.flow_id])
        ]
    return rates


def _one_path_fill(flows: Sequence[FlowView], links: Mapping[str, Link]) -> dict[FlowId, float] | None:
    """``max_min_fill``'s answer when every flow with bytes left crosses the same links, uncapped and
    unweighted (the simulator's gathers): its first round gives each the same share and saturates a link
    of the path, so it is the last.  The round's float operations are replayed in the same order (shares,
    residuals, the saturation test); None, for the general loop, wherever that does not hold."""
    rates = {f.flow_id: 0.0 for f in flows}
    active = [f for f in flows if f.remaining_bytes > BYTES_EPS]
    if not active or len(rates) != len(flows):
        return rates if not active else None
    path = active[0].path
    if not path or len(set(path)) != len(path):
        return None
    for f in active:
        if f.path != path or f.weight != 1.0 or f.max_rate_Bps != float("inf"):
            return None
    wsum = 0.0
    for _ in active:
        wsum += 1.0
    step = float("inf")
    for n in path:
        step = min(step, max(0.0, links[n].capacity_Bps) / wsum)
    if step == float("inf"):
        return None
    saturated = False
    for n in path:
        cap = links[n].capacity_Bps
        residual = cap
        for _ in active:
            residual -= step
        saturated = saturated or residual <= 1e-9 * max(1.0, cap)
    if not saturated:
        return None
    for f in active:
        rates[f.flow_id] += step
    return rates


def _below_cap(rate: float, cap: float) -> bool:
    """Whether a flow can still grow (an infinite cap never binds)."""
    return cap == float("inf") or cap - rate > 1e-9 * max(1.0, cap)


class EqualShare:
    """Max-min fair sharing: the equal-share baseline."""

    name = "equal"

    def allocate(
        self, now_s: float, flows: Sequence[FlowView], links: Mapping[str, Link]
    ) -> dict[FlowId, float]:
        return max_min_fill(flows, links)


_REGISTRY: dict[str, type] = {"equal": EqualShare}


def register_policy(cls: type) -> type:
    """Class decorator: make a policy available to ``get_policy`` under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def get_policy(name: str, **kwargs) -> Policy:
    """A new policy object by name; ``kwargs`` go to its constructor (a policy's tunables)."""
    try:
        return _REGISTRY[name](**kwargs)
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {sorted(_REGISTRY)}") from None


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


# The priority policies live in their own module (they share its urgency machinery); registered here so that
# the registry is complete as soon as this module is imported.
register_policy(ShortestRemainingTransferFirst)
register_policy(BandwidthAware)
