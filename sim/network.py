"""Fluid-flow links in SimPy, driven by one central wake-up timer.

All byte movement is the scheduler core's fluid model (``scheduler.fluid``): flows have piecewise-constant
rates that the bandwidth policy sets, and ``fluid.advance`` / ``fluid.next_event_s`` move bytes and GPU
layer compute between events.  This module only decides *when* to call them.

One timer, a generation counter.  Whenever the set of flows changes (flows added at one instant are
batched into one zero-delay flush) or the pending timer fires (a layer boundary, a transfer end, a GPU layer end, a delayed start), the network advances every flow
to ``now``, asks the policy for new rates once, computes the next event time and schedules a single
``env.timeout`` tagged with a new generation number.  A timer whose generation is stale (a flow was added
after it was scheduled) does nothing when it fires.  So an event costs one policy call and O(flows) work,
never one interrupt per flow: 1,000 simultaneous transfers cost O(1,000) timer events, not O(1,000^2).

Termination.  ``fluid.next_event_s`` never returns ``now`` (boundaries are snapped with a tolerance), so the
clock always advances; a flow that gets no bandwidth and has no future event is an error, not a hang.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import simpy

from scheduler.flows import Link
from scheduler.fluid import (
    FlowState,
    RequestSpec,
    advance,
    next_event_s,
    single_flow_rates,
    single_flow_shortcut,
)


class FluidNetwork:
    """A set of links shared by fluid flows under one bandwidth policy.

    ``add(spec)`` starts a flow (``spec.arrival_s`` must be ``env.now``) and returns ``(state, done)``:
    ``done`` is a SimPy event that succeeds with the state when the transfer has completed; from then on
    ``state.done_s`` (end of the layerwise prefill the fluid model computes) is final.
    """

    def __init__(self, env: simpy.Environment, links: Mapping[str, Link], policy):
        self.env = env
        self.links = dict(links)
        self.policy = policy
        self.pending: list[FlowState] = []
        self._done: dict[object, simpy.Event] = {}
        self._rates: dict = {}
        self._last_s = env.now
        self._gen = 0
        self._flush_scheduled = False
        # Counters for the benchmark and the link-utilisation metric.
        self.timer_events = 0
        self.stale_timers = 0
        self.policy_calls = 0
        self.single_flow_skips = 0
        self._shortcut = single_flow_shortcut(policy)
        self.bytes_by_link: dict[str, float] = {name: 0.0 for name in self.links}
        self.busy_s_by_link: dict[str, float] = {name: 0.0 for name in self.links}

    # -- public -------------------------------------------------------------------------------------
    def add(self, spec: RequestSpec, state: FlowState | None = None) -> tuple[FlowState, simpy.Event]:
        for name in spec.path:
            if name not in self.links:
                raise ValueError(f"flow {spec.request_id!r} crosses unknown link {name!r}")
        if spec.request_id in self._done:
            raise ValueError(f"duplicate flow id {spec.request_id!r}")
        self._sync()
        st = state if state is not None else FlowState(spec=spec)
        done = self.env.event()
        self._done[spec.request_id] = done
        self.pending.append(st)
        # A zero-byte flow completes at its start: let advance() record that now.
        advance([st], {}, self.env.now, self.env.now)
        self._collect()
        # Flows added at the same instant are allocated together: invalidate the pending timer now and
        # recompute rates once, in a zero-delay flush after every add of this instant.
        self._gen += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.env.timeout(0.0).callbacks.append(self._flush)
        return st, done

    def utilisation(self, horizon_s: float) -> dict[str, float]:
        """Mean load / capacity of each link over ``[0, horizon_s]``."""
        if horizon_s <= 0:
            return {name: 0.0 for name in self.links}
        return {
            name: self.bytes_by_link[name] / (link.capacity_Bps * horizon_s)
            for name, link in self.links.items()
        }

    # -- the central timer --------------------------------------------------------------------------
    def _sync(self) -> None:
        """Advance every pending flow from the last sync to now under the current rates."""
        now = self.env.now
        if now > self._last_s:
            dt = now - self._last_s
            pending = self.pending
            rates = self._rates
            before = [st.delivered_bytes for st in pending]
            advance(pending, rates, self._last_s, now)
            bytes_by_link = self.bytes_by_link
            busy: set[str] = set()  # links with load: some flow on them has a positive rate
            for st, b in zip(pending, before, strict=True):
                spec = st.spec
                moved = st.delivered_bytes - b
                if moved > 0:
                    for name in spec.path:
                        bytes_by_link[name] += moved
                if rates.get(spec.request_id, 0.0) > 0:
                    busy.update(spec.path)
            busy_s_by_link = self.busy_s_by_link
            for name in busy:
                busy_s_by_link[name] += dt
            self._last_s = now
        self._collect()

    def _collect(self) -> None:
        """Complete the done-events of finished transfers and drop them from the pending set."""
        pending = self.pending
        done = [st for st in pending if len(st._layers_arrived) >= st.spec.num_layers]
        if done:
            for st in done:
                self._done.pop(st.spec.request_id).succeed(st)
            self.pending = [st for st in pending if len(st._layers_arrived) < st.spec.num_layers]

    def _reschedule(self) -> None:
        now = self.env.now
        active = [st for st in self.pending if st.spec._start_s <= now]
        one = None
        if len(active) == 1 and self._shortcut:
            # A lone flow under equal / srtf gets its path's capacity: no need to ask (same float result).
            one = single_flow_rates(active[0].view(now), self.links)
        if one is not None:
            self.single_flow_skips += 1
            self._rates = one
        elif active:
            self.policy_calls += 1
            self._rates = self.policy.allocate(now, [st.view(now) for st in active], self.links)
        else:
            self._rates = {}
        t_next = next_event_s(self.pending, self._rates, now)
        self._gen += 1
        if math.isinf(t_next):
            if self.pending:
                raise RuntimeError(
                    f"fluid network stuck at t={now}: pending flows get no bandwidth and no event"
                )
            return
        gen = self._gen
        timer = self.env.timeout(t_next - now)
        timer.callbacks.append(lambda _ev, gen=gen: self._on_timer(gen))

    def _flush(self, _ev) -> None:
        self._flush_scheduled = False
        self._sync()
        self._reschedule()

    def _on_timer(self, gen: int) -> None:
        if gen != self._gen:
            self.stale_timers += 1
            return
        self.timer_events += 1
        self._sync()
        self._reschedule()
