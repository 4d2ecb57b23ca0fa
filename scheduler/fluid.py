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
simulator can drive them from one central timer; ``run_fluid`` is the same loop without SimPy.  Both pass
them only the flows that have started (``run_fluid`` keeps the others in start order), so a run costs
O(events x concurrent flows), linear in the number of requests at a given load.

Inputs are checked where they enter: a ``RequestSpec`` with a NaN or infinite time or size, or a negative
one, is a ``ValueError`` naming the field, not a "not finished" or "stuck" error deep in the loop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from scheduler.flows import BYTES_EPS, FlowId, FlowView, Link, check_feasible

_new_object = object.__new__

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
    compute after the last layer.  ``max_rate_Bps``: the request's own rate ceiling (bytes/s; ``inf``: none),
    e.g. what its receiver can take (``sim.config.StorageConfig.gather_max_rate_Bps``).
    """

    request_id: FlowId
    arrival_s: float
    layer_bytes: float
    num_layers: int
    compute_per_layer_s: float
    path: tuple[str, ...]
    start_delay_s: float = 0.0
    extra_compute_s: float = 0.0
    max_rate_Bps: float = math.inf

    def __post_init__(self) -> None:
        # NaN passes every ``< 0`` test and infinity never finishes: reject both here, with the field's name,
        # rather than as "not finished" / "stuck" deep inside the event loop.
        for name in ("arrival_s", "layer_bytes", "compute_per_layer_s", "start_delay_s", "extra_compute_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(
                    f"request {self.request_id!r}: {name} must be a finite number, got {value!r}"
                )
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, numbers.Integral):
            raise ValueError(
                f"request {self.request_id!r}: num_layers must be an int, got {self.num_layers!r}"
            )
        if self.num_layers < 0 or self.layer_bytes < 0 or self.compute_per_layer_s < 0:
            raise ValueError(f"request {self.request_id!r}: negative size or time")
        if self.start_delay_s < 0 or self.extra_compute_s < 0:
            raise ValueError(f"request {self.request_id!r}: negative delay")
        cap = self.max_rate_Bps
        if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not cap > 0:
            raise ValueError(
                f"request {self.request_id!r}: max_rate_Bps must be > 0 (inf: none), got {cap!r}"
            )
        # Cached: the event loop reads them for every flow at every event.
        object.__setattr__(self, "_start_s", self.arrival_s + self.start_delay_s)
        object.__setattr__(self, "_total_bytes", self.layer_bytes * self.num_layers)
        if not (math.isfinite(self._start_s) and math.isfinite(self._total_bytes)):
            raise ValueError(f"request {self.request_id!r}: start time or total bytes overflow")
        if not isinstance(self.path, tuple):
            object.__setattr__(self, "path", tuple(self.path))

    @property
    def total_bytes(self) -> float:
        return self._total_bytes

    @property
    def start_s(self) -> float:
        """When bytes start to flow."""
        return self._start_s

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
        # ``FlowView(...)`` with every field given: a frozen dataclass's ``__init__`` sets each field through
        # ``object.__setattr__``, about 8x the cost of filling its ``__dict__`` at once, and the network
        # builds a view of every active flow at every event.
        v = _new_object(FlowView)
        v.__dict__.update(
            flow_id=s.request_id,
            path=s.path,
            layer_bytes=s.layer_bytes,
            layers_total=s.num_layers,
            delivered_bytes=self.delivered_bytes,
            compute_per_layer_s=s.compute_per_layer_s,
            gpu_busy_until_s=self.gpu_busy_until_s,
            layers_computed=self.layers_computed,
            arrival_s=s.arrival_s,
            weight=1.0,
            max_rate_Bps=s.max_rate_Bps,
            start_s=s._start_s,
            first_layer_s=self.first_layer_s,
        )
        return v


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
    """Start every layer compute that can start in ``(now_s, until_s]`` and accrue GPU stall time.

    ``layerwise.layer_times`` written out (this runs for every flow at every event); the float operations
    are the same, in the same order (``max(a, b)`` is ``b if b > a else a``).
    """
    c = st.spec.compute_per_layer_s
    end = st.gpu_busy_until_s
    idle_from = now_s if now_s > end else end
    arrived = st._layers_arrived
    n = len(arrived)
    k = st.layers_computed
    stall = st.stall_s
    while k < n:
        a = arrived[k]
        start = end if end > a else a
        if start > until_s:
            break
        if k >= 1:
            gap = start - idle_from
            stall += gap if gap > 0.0 else 0.0
        end = start + c
        k += 1
        idle_from = end
    if 1 <= k < st.spec.num_layers and k == n:
        gap = until_s - idle_from
        stall += gap if gap > 0.0 else 0.0
    st.layers_computed = k
    st.gpu_busy_until_s = end
    st.stall_s = stall


def _finish_if_complete(st: FlowState) -> None:
    """Once every layer has arrived nothing can stall any more: the prefill end is fixed."""
    s = st.spec
    arrived = st._layers_arrived
    if len(arrived) >= s.num_layers and math.isnan(st.done_s):
        c = s.compute_per_layer_s
        t = st.gpu_busy_until_s
        for k in range(st.layers_computed, s.num_layers):
            a = arrived[k]
            t = (t if t > a else a) + c
        if s.num_layers == 0:
            t = s._start_s
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
    t_scale = max(1.0, abs(until_s))
    for st in states:
        s = st.spec
        L = s.num_layers
        if st.layers_computed >= L and not math.isnan(st.done_s):
            continue
        start = s._start_s
        if start > until_s:
            continue
        t0 = start if start > now_s else now_s
        arrived = st._layers_arrived
        n = len(arrived)
        if n < L:
            total = s._total_bytes
            if total <= 0:
                arrived.extend([start] * L)
            else:
                r = rates_Bps.get(s.request_id, 0.0)
                if not r > 0.0:
                    r = 0.0
                d0 = st.delivered_bytes
                d1 = d0 + r * (until_s - t0)
                if not d1 < total:
                    d1 = total
                tol = BYTES_EPS + r * _TIME_RTOL * t_scale  # _snap_tol_bytes(r, until_s)
                B = s.layer_bytes
                # Record the exact arrival time of every layer boundary crossed (within tolerance).
                while n < L:
                    boundary = (n + 1) * B
                    if d1 + tol < boundary:
                        break
                    t_arr = t0 + (boundary - d0) / r if r > 0 else until_s
                    if not t_arr > t0:
                        t_arr = t0
                    arrived.append(t_arr if t_arr < until_s else until_s)
                    if boundary - d1 <= tol and boundary > d1:
                        d1 = boundary
                    n += 1
                st.delivered_bytes = total if n >= L else d1
            if arrived and math.isnan(st.first_layer_s):
                st.first_layer_s = arrived[0]
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
        L = s.num_layers
        n = len(st._layers_arrived)
        if n >= L:
            continue
        start = s._start_s
        if start > now_s:
            if start < t_next:
                t_next = start
            continue
        busy = st.gpu_busy_until_s
        if 0 < st.layers_computed < L and busy > now_s and busy < t_next:
            t_next = busy
        r = rates_Bps.get(s.request_id, 0.0)
        if r > 0:
            gap = (n + 1) * s.layer_bytes - st.delivered_bytes
            t = now_s + (gap if gap > 0.0 else 0.0) / r
            if t < t_next:
                t_next = t
    if t_next <= now_s:
        # A boundary within float resolution of now: step by the smallest representable amount.
        t_next = math.nextafter(now_s, math.inf)
    return t_next


def single_flow_shortcut(policy) -> bool:
    """Whether ``policy`` gives a lone flow exactly ``single_flow_rates`` (so the call can be skipped).

    True for the exact classes of the ``equal`` and ``srtf`` policies: on one flow their float arithmetic
    reduces to ``min(path capacities)`` bit for bit (``x / 1.0``, ``0.0 + x``, ``inf - 0.0``).
    ``bandwidth_aware`` reserves a JIT rate and then the rest (``jit + (c - jit)`` need not round to
    ``c``), so it is asked.  Another policy opts in with a class attribute ``single_flow_is_path_capacity
    = True``; tests/scheduler/test_fluid.py checks every registered policy that says yes on random flows.
    """
    from scheduler.policies import EqualShare, ShortestRemainingTransferFirst

    if type(policy) in (EqualShare, ShortestRemainingTransferFirst):
        return True
    return getattr(policy, "single_flow_is_path_capacity", False) is True


def lone_rate_function(policy):
    """``policy.lone_rate_Bps`` where it answers exactly as ``allocate`` on one flow, else None.

    True of ``bandwidth_aware``'s exact class (``scheduler.bandwidth_aware.lone_rate_Bps``; a subclass may
    change ``allocate``, so it is not trusted).  Another policy opts in with a class attribute
    ``lone_rate_is_allocate = True``; tests/scheduler/test_policies.py checks the registered ones.
    """
    from scheduler.bandwidth_aware import BandwidthAware

    if type(policy) is BandwidthAware or getattr(policy, "lone_rate_is_allocate", False) is True:
        return policy.lone_rate_Bps
    return None


def single_flow_rates(view: FlowView, links: Mapping[str, Link]) -> dict[FlowId, float] | None:
    """The lone flow's rate under a ``single_flow_shortcut`` policy, or None where the shortcut's
    preconditions fail (no or repeated links on its path, a rate cap, nothing left to move)."""
    path = view.path
    if not path or view.max_rate_Bps != math.inf or view.remaining_bytes <= BYTES_EPS:
        return None
    if len(path) > 1 and len(set(path)) != len(path):
        return None
    return {view.flow_id: min(links[n].capacity_Bps for n in path)}


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
    against the link capacities (for tests).  Results come back in the order of ``requests``.  The policy
    sees the started flows in the order of ``requests``; a lone flow under ``equal`` or ``srtf`` gets its
    path's capacity without a call (``single_flow_shortcut``).
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
    # Flows that have not started wait in start order (ties in request order) and join ``running`` when
    # the clock reaches their start, so an event costs O(running flows), not O(requests): the whole run is
    # linear in the number of requests for a bounded number of concurrent flows.  ``running`` keeps request
    # order, which is the order the policy sees (its float sums depend on it).
    # A request with no layers has nothing to transfer and is no event: its prefill end is fixed now.
    for st in states:
        if st.spec.num_layers == 0:
            _finish_if_complete(st)
    waiting = sorted(
        (i for i, st in enumerate(states) if st.spec.num_layers), key=lambda i: states[i].spec.start_s
    )
    if not waiting:
        return [result_of(st) for st in states]
    next_wait = 0
    now = states[waiting[0]].spec.start_s
    running: list[tuple[int, FlowState]] = []

    def admit(until_s: float) -> None:
        nonlocal next_wait, running
        n0 = len(running)
        while next_wait < len(waiting) and states[waiting[next_wait]].spec.start_s <= until_s:
            i = waiting[next_wait]
            running.append((i, states[i]))
            next_wait += 1
        if n0 and len(running) > n0:
            running.sort(key=lambda t: t[0])  # two sorted runs: linear

    admit(now)
    advance([st for _, st in running], {}, now, now)
    running = [t for t in running if not t[1].transfer_done]
    # Each event is a flow start, a layer arrival or a layer compute end: at most 2L+1 per flow; the slack
    # covers boundaries that float rounding splits into two events.
    max_events = 4 * sum(r.num_layers + 2 for r in requests) + 16
    shortcut = single_flow_shortcut(policy)
    # A lone flow's shortcut rates depend on its state only through "bytes left > BYTES_EPS"; they are
    # kept while it stays alone (the simulator's per-request baseline is one flow, ~64 events).
    lone: FlowState | None = None
    lone_rates: dict[FlowId, float] | None = None
    for _ in range(max_events):
        if not running and next_wait >= len(waiting):
            break
        pending = [st for _, st in running]
        rates: dict[FlowId, float] = {}
        if pending:
            one = None
            if shortcut and len(pending) == 1:
                st = pending[0]
                if st is not lone:
                    lone, lone_rates = st, single_flow_rates(st.view(now), link_map)
                if lone_rates is not None and max(0.0, st.spec._total_bytes - st.delivered_bytes) > BYTES_EPS:
                    one = lone_rates
            if one is not None and not check:
                rates = one
            else:
                views = [st.view(now) for st in pending]
                rates = one if one is not None else policy.allocate(now, views, link_map)
                if check:
                    check_feasible(views, link_map, rates)
        t_next = next_event_s(pending, rates, now)
        if next_wait < len(waiting):
            t_start = states[waiting[next_wait]].spec.start_s
            if t_start > now:
                t_next = min(t_next, t_start)
        if math.isinf(t_next):
            raise RuntimeError(f"fluid model stuck at t={now}: active flows get no bandwidth and no event")
        # Flows starting by ``t_next`` join before the step: ``advance`` starts them at their start time
        # (a zero-byte flow completes there), exactly as if they had been pending all along.
        admit(t_next)
        advance([st for _, st in running], rates, now, t_next)
        now = t_next
        running = [t for t in running if not t[1].transfer_done]
    else:
        raise RuntimeError(f"fluid model did not finish within {max_events} events")
    return [result_of(st) for st in states]


def mean_added_ttft_s(results: Sequence[FluidResult]) -> float:
    return sum(r.added_ttft_s for r in results) / len(results) if results else 0.0
