"""The fluid model of layerwise prefix-KV retrieval: pure math shared by the simulator and the tests.

A request ``i`` arrives at ``arrival_s``.  After ``start_delay_s`` (control round trip, time to first byte)
its cached-prefix KV starts to flow over its ``path`` of links, layer 0 first, ``layer_bytes`` per layer, at a
rate the bandwidth policy sets.  Rates are piecewise constant: the policy is asked again only at *events*
(a flow starts, a layer finishes arriving, a transfer completes, a GPU finishes a layer), which is all that
can change its decision.

Each request has its own GPU stream: layer ``l``'s compute starts at ``max(arrival of layer l, end of
layer l-1)`` and takes ``compute_per_layer_s``; after the last layer, ``extra_compute_s`` of
non-overlappable work (LM head, sampling) ends the prefill.  Hence

    ttft = first_layer_wait + L * c + stall + extra

where ``first_layer_wait`` is from arrival to the arrival of layer 0 (it includes ``start_delay_s``) and
``stall`` is the GPU idle time between layer 0's compute and the last layer's compute.  With infinite
bandwidth the TTFT is ``start_delay + L * c + extra``, so the *added TTFT* a finite link causes is
``(first_layer_wait - start_delay) + stall``.

Float hygiene.  Absolute times grow (hours of simulated time) while layer boundaries are tiny in bytes, so a
boundary counts as crossed when the bytes are within ``_snap_tol_bytes`` of it (``flows.BYTES_EPS`` plus the
bytes one picosecond-per-second of the current time moves): ``next_event_s`` never returns a time equal to
``now_s`` and the loop cannot spin on float dust.

``advance`` and ``next_event_s`` cost O(flows) per call plus O(1) per layer whose compute starts, so the
simulator can drive them from one central timer; ``run_fluid`` is the same loop without SimPy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from scheduler.flows import BYTES_EPS, FlowId, FlowView, Link, check_feasible
from scheduler.layerwise import layer_times

# Relative time resolution used to snap byte counts onto layer boundaries (see module docstring).
_TIME_RTOL = 1e-12


def _snap_tol_bytes(rate_Bps: float, t_s: float) -> float:
    return BYTES_EPS + rate_Bps * _TIME_RTOL * max(1.0, abs(t_s))


@dataclass(frozen=True)
class RequestSpec:
    """One request's layerwise retrieval: what the fluid model needs to know about it.

    ``layer_bytes``: bytes of one layer of the cached prefix (0 for a request with nothing to fetch).
    ``compute_per_layer_s``: GPU time of one layer of the prefill.  ``path``: names of the links the KV
    crosses.  ``start_delay_s``: time from arrival until bytes flow.  ``extra_compute_s``: non-overlappable
    compute after the last layer.
    """

    request_id: FlowId
    arrival_s: float
    layer_bytes: float
    num_layers: int
    compute_per_layer_s: float
    path: tuple[str, ...]
    start_delay_s: float = 0.0
    extra_compute_s: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 0 or self.layer_bytes < 0 or self.compute_per_layer_s < 0:
            raise ValueError(f"request {self.request_id!r}: negative size or time")
        if self.start_delay_s < 0 or self.extra_compute_s < 0:
            raise ValueError(f"request {self.request_id!r}: negative delay")
        if not isinstance(self.path, tuple):
            object.__setattr__(self, "path", tuple(self.path))

    @property
    def total_bytes(self) -> float:
        return self.layer_bytes * self.num_layers

    @property
    def start_s(self) -> float:
        """When bytes start to flow."""
        return self.arrival_s + self.start_delay_s

    @property
    def ideal_ttft_s(self) -> float:
        """TTFT with infinite bandwidth: the delay, all layers back to back, the tail."""
        return self.start_delay_s + self.num_layers * self.compute_per_layer_s + self.extra_compute_s

    def layer_deadlines_s(self, first_layer_s: float) -> list[float]:
        """Latest arrival of each layer that keeps the GPU busy once layer 0 arrived at ``first_layer_s``."""
        return [first_layer_s + layer * self.compute_per_layer_s for layer in range(self.num_layers)]


@dataclass
class FlowState:
    """Mutable progress of one request in the fluid model.

    ``layers_computed``: layers whose compute has started.  ``gpu_busy_until_s``: end of the last started
    layer's compute.  ``stall_s``: GPU idle time waiting for layers 1..L-1.  ``first_layer_s``: when layer 0
    arrived (nan before).  ``done_s``: end of the prefill (nan before it is known; it is set as soon as the
    transfer completes, since the remaining compute is then fixed).
    """

    spec: RequestSpec
    delivered_bytes: float = 0.0
    layers_computed: int = 0
    gpu_busy_until_s: float = 0.0
    stall_s: float = 0.0
    first_layer_s: float = math.nan
    done_s: float = math.nan
    _layers_arrived: list[float] = field(default_factory=list, repr=False)

    @property
    def flow_id(self) -> FlowId:
        return self.spec.request_id

    @property
    def layers_delivered(self) -> int:
        return len(self._layers_arrived)

    @property
    def transfer_done(self) -> bool:
        return self.layers_delivered >= self.spec.num_layers

    @property
    def finished(self) -> bool:
        return not math.isnan(self.done_s)

    def started(self, now_s: float) -> bool:
        return self.spec.start_s <= now_s

    def active(self, now_s: float) -> bool:
        """Started and still moving bytes: the flows a policy allocates."""
        return self.started(now_s) and not self.transfer_done

    def view(self, now_s: float) -> FlowView:
        s = self.spec
        return FlowView(
            flow_id=s.request_id,
            path=s.path,
            layer_bytes=s.layer_bytes,
            layers_total=s.num_layers,
            delivered_bytes=self.delivered_bytes,
            compute_per_layer_s=s.compute_per_layer_s,
            gpu_busy_until_s=self.gpu_busy_until_s,
            layers_computed=self.layers_computed,
            arrival_s=s.arrival_s,
            start_s=s.start_s,
            first_layer_s=self.first_layer_s,
        )


@dataclass(frozen=True)
class FluidResult:
    """Per-request outcome of the fluid model (all times in seconds, TTFTs from arrival)."""

    request_id: FlowId
    arrival_s: float
    ttft_s: float
    added_ttft_s: float
    first_layer_wait_s: float
    stall_s: float
    ideal_ttft_s: float
    done_s: float


def _start_layers(st: FlowState, now_s: float, until_s: float) -> None:
    """Start every layer compute that can start in ``(now_s, until_s]`` and accrue GPU stall time."""
    s = st.spec
    idle_from = max(st.gpu_busy_until_s, now_s)
    arrived = st._layers_arrived
    pending = arrived[st.layers_computed :]
    for start, end in layer_times(pending, s.compute_per_layer_s, st.gpu_busy_until_s, until_s):
        if st.layers_computed >= 1:
            st.stall_s += max(0.0, start - idle_from)
        st.layers_computed += 1
        st.gpu_busy_until_s = end
        idle_from = end
    if 1 <= st.layers_computed < s.num_layers and st.layers_computed == len(arrived):
        st.stall_s += max(0.0, until_s - idle_from)


def _finish_if_complete(st: FlowState) -> None:
    """Once every layer has arrived nothing can stall any more: the prefill end is fixed."""
    if st.transfer_done and not st.finished:
        s = st.spec
        t = st.gpu_busy_until_s
        pending = st._layers_arrived[st.layers_computed : s.num_layers]
        for _, t in layer_times(pending, s.compute_per_layer_s, st.gpu_busy_until_s):  # noqa: B007
            pass
        if s.num_layers == 0:
            t = s.start_s
        st.done_s = t + s.extra_compute_s


def advance(
    states: Iterable[FlowState], rates_Bps: Mapping[FlowId, float], now_s: float, until_s: float
) -> None:
    """Move bytes at ``rates_Bps`` and run GPU layer compute from ``now_s`` to ``until_s``.

    Rates are held constant over the interval; a flow that has not started by ``now_s`` moves bytes only
    from its start.  Layer arrival times inside the interval are exact (linear interpolation), so compute
    starts and stalls are exact too.  Call it with ``until_s`` no later than ``next_event_s`` for the same
    rates; calling it with a shorter step is always allowed.
    """
    if until_s < now_s:
        raise ValueError(f"advance backwards: {until_s} < {now_s}")
    for st in states:
        s = st.spec
        if st.finished and st.layers_computed >= s.num_layers:
            continue
        if s.start_s > until_s:
            continue
        t0 = max(now_s, s.start_s)
        if not st.transfer_done:
            if s.total_bytes <= 0:
                st._layers_arrived.extend([s.start_s] * s.num_layers)
            else:
                r = max(0.0, rates_Bps.get(s.request_id, 0.0))
                d0 = st.delivered_bytes
                d1 = min(s.total_bytes, d0 + r * (until_s - t0))
                tol = _snap_tol_bytes(r, until_s)
                B = s.layer_bytes
                # Record the exact arrival time of every layer boundary crossed (within tolerance).
                while st.layers_delivered < s.num_layers:
                    boundary = (st.layers_delivered + 1) * B
                    if d1 + tol < boundary:
                        break
                    t_arr = t0 + (boundary - d0) / r if r > 0 else until_s
                    st._layers_arrived.append(min(until_s, max(t0, t_arr)))
                    d1 = max(d1, boundary) if boundary - d1 <= tol else d1
                st.delivered_bytes = s.total_bytes if st.transfer_done else d1
            if st.layers_delivered and math.isnan(st.first_layer_s):
                st.first_layer_s = st._layers_arrived[0]
        _start_layers(st, now_s, until_s)
        _finish_if_complete(st)


def next_event_s(states: Iterable[FlowState], rates_Bps: Mapping[FlowId, float], now_s: float) -> float:
    """Earliest time after ``now_s`` at which rates may need recomputing (``inf`` if none).

    Events: a pending flow starts; a layer finishes arriving (the transfer completing is the last one); a
    GPU finishes a layer while layers remain (the next layer starts or a stall begins).  GPU work after a
    transfer completed is not an event (it cannot change rates); read ``FlowState.done_s`` for it.
    """
    t_next = math.inf
    for st in states:
        s = st.spec
        if st.transfer_done:
            continue
        if s.start_s > now_s:
            t_next = min(t_next, s.start_s)
            continue
        if 0 < st.layers_computed < s.num_layers and st.gpu_busy_until_s > now_s:
            t_next = min(t_next, st.gpu_busy_until_s)
        r = rates_Bps.get(s.request_id, 0.0)
        if r > 0:
            boundary = (st.layers_delivered + 1) * s.layer_bytes
            t_next = min(t_next, now_s + max(0.0, boundary - st.delivered_bytes) / r)
    if t_next <= now_s:
        # A boundary within float resolution of now: step by the smallest representable amount.
        t_next = math.nextafter(now_s, math.inf)
    return t_next


def as_link_map(links: Mapping[str, Link] | Sequence[Link]) -> dict[str, Link]:
    if isinstance(links, Mapping):
        return dict(links)
    return {link.name: link for link in links}


def result_of(st: FlowState) -> FluidResult:
    """Per-request metrics of a finished flow."""
    s = st.spec
    if not st.finished:
        raise ValueError(f"request {s.request_id!r} is not finished")
    first_wait = (st.first_layer_s if s.num_layers else s.start_s) - s.arrival_s
    ttft = st.done_s - s.arrival_s
    return FluidResult(
        request_id=s.request_id,
        arrival_s=s.arrival_s,
        ttft_s=ttft,
        added_ttft_s=max(0.0, ttft - s.ideal_ttft_s),
        first_layer_wait_s=first_wait,
        stall_s=st.stall_s,
        ideal_ttft_s=s.ideal_ttft_s,
        done_s=st.done_s,
    )


def run_fluid(
    requests: Sequence[RequestSpec],
    links: Mapping[str, Link] | Sequence[Link],
    policy,
    check: bool = False,
) -> list[FluidResult]:
    """Run the fluid model to completion; the policy is asked for rates only at events.

    ``policy`` is any object with ``allocate(now_s, flows, links)``.  ``check`` verifies every allocation
    against the link capacities (for tests).  Results come back in the order of ``requests``.
    """
    link_map = as_link_map(links)
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique")
    for r in requests:
        for name in r.path:
            if name not in link_map:
                raise ValueError(f"request {r.request_id!r} crosses unknown link {name!r}")
    states = [FlowState(spec=r) for r in requests]
    if not states:
        return []
    now = min(r.start_s for r in requests)
    advance(states, {}, now, now)
    # Each event is a flow start, a layer arrival or a layer compute end: at most 2L+1 per flow; the slack
    # covers boundaries that float rounding splits into two events.
    max_events = 4 * sum(r.num_layers + 2 for r in requests) + 16
    pending = [st for st in states if not st.transfer_done]
    for _ in range(max_events):
        if not pending:
            break
        active = [st for st in pending if st.started(now)]
        rates: dict[FlowId, float] = {}
        if active:
            views = [st.view(now) for st in active]
            rates = policy.allocate(now, views, link_map)
            if check:
                check_feasible(views, link_map, rates)
        t_next = next_event_s(pending, rates, now)
        if math.isinf(t_next):
            raise RuntimeError(f"fluid model stuck at t={now}: active flows get no bandwidth and no event")
        advance(pending, rates, now, t_next)
        now = t_next
        pending = [st for st in pending if not st.transfer_done]
    else:
        raise RuntimeError(f"fluid model did not finish within {max_events} events")
    return [result_of(st) for st in states]


def mean_added_ttft_s(results: Sequence[FluidResult]) -> float:
    return sum(r.added_ttft_s for r in results) / len(results) if results else 0.0
