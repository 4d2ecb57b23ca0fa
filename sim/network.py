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
    lone_rate_function,
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

    # Run a timer's firing in place when nothing else is due before it (see ``_reschedule``); False for tests.
    inline_timers = True

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
        # A policy may answer for a lone flow from its fields (``lone_rate_Bps``, same floats as asking it).
        self._lone = lone_rate_function(policy)
        self._capacity_Bps = {name: link.capacity_Bps for name, link in self.links.items()}
        # Timer firings run without SimPy's queue (nothing else due before them); added to SimPy's count.
        self.inlined_timers = 0
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
        """New rates at ``env.now`` and the timer for the next event; see ``_plan``."""
        delay = self._plan()
        while delay is not None:
            env = self.env
            t = env.now + delay  # the time SimPy's ``timeout(delay)`` would fire at
            queue = env._queue
            if not self.inline_timers or (queue and not t < queue[0][0]):
                gen = self._gen
                timer = env.timeout(delay)
                timer.callbacks.append(lambda _ev, gen=gen: self._on_timer(gen))
                return
            # Nothing else is scheduled before the timer: no process runs, no flow can be added, so its
            # firing is run here instead of through SimPy's queue (the same calls at the same times; a
            # timer event per layer boundary and GPU layer end made SimPy a large part of a run).
            # SimPy has no public way to move its clock; ``_now`` is what ``step`` sets.
            env._now = t
            self.inlined_timers += 1
            self.timer_events += 1
            self._sync()
            delay = self._plan()

    def _plan(self) -> float | None:
        """Rates at ``env.now`` and the delay to the next event (``None``: no flow left)."""
        now = self.env.now
        active = [st for st in self.pending if st.spec._start_s <= now]
        one = None
        if len(active) == 1 and self._shortcut:
            # A lone flow under equal / srtf gets its path's capacity: no need to ask (same float result).
            one = single_flow_rates(active[0].view(now), self.links)
        if one is not None:
            self.single_flow_skips += 1
            self._rates = one
        elif len(active) == 1 and self._lone is not None:
            # The policy's own answer for one flow (bandwidth_aware's), without building its view.
            st = active[0]
            s = st.spec
            self.policy_calls += 1
            self._rates = {
                s.request_id: self._lone(
                    now,
                    s.path,
                    self._capacity_Bps,
                    s.max_rate_Bps,
                    s.layer_bytes,
                    s.num_layers,
                    st.delivered_bytes,
                    s.compute_per_layer_s,
                    st.gpu_busy_until_s,
                    st.layers_computed,
                )
            }
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
            return None
        return t_next - now

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
