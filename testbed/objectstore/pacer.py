"""The server's egress pacer: concurrent gather streams share one egress link through a scheduler policy.

Every gather stream registers with the pacer (bytes per layer, layers, the client's per-layer compute hint).
Whenever a stream comes or goes, or crosses a layer boundary, the pacer builds a ``scheduler.flows.FlowView``
per stream on one link ``egress`` of capacity ``egress_Bps`` and asks the configured policy
(``scheduler.policies.get_policy``: ``equal``, ``bandwidth_aware``, ...) for per-stream rates.

Pacing is deadline based: each stream keeps ``next_send_s``, the earliest time its next piece may leave;
sending ``n`` bytes moves the deadline on by ``n / rate`` and the sender sleeps only until the deadline,
never ``n / rate`` after a send.  A sender that fell behind (a slow ``sendfile``, a late wake-up) gets credit
for up to ``burst_s`` of lost time, so the delivered rate converges to the configured one instead of losing
every overshoot.  Pieces scale with the rate (``piece_bytes``: about ``quantum_s`` = 1.5 ms of data, at
least the configured floor), so a 1.5 GB/s stream sends ~2 MiB per wake-up and a 2 MB/s one 64 KiB.  The
server's socket path paces inside its send thread (``pace_blocking``: one thread hop per stream, no hop per
piece); ``pace`` is the event-loop version for other sinks.

The server does not see the client's GPU, so it estimates it the way the policy's model defines it: the
client starts computing layer ``l`` when layer ``l`` has been sent and layer ``l-1`` is computed, and each
layer takes ``compute_per_layer_s``.  With ``egress_Bps=None`` (the default) nothing is paced.

Following the fluid model (``scheduler.fluid``).  The fluid model asks the policy again at every *event*: a
flow starts or ends, a layer finishes arriving, or a GPU finishes a layer while layers remain (that is when
an on-schedule flow that got nothing runs out of buffer and becomes late).  The pacer does the same: besides
open, close and layer boundaries it arms a timer (``call_later`` on the server's event loop) at the next
estimated GPU layer end (``next_gpu_event_s``).  A rate change takes effect at once, also for a piece that
is already waiting for its slot: the unsent part of the slot is re-timed at the new rate (``retime``; a
stream cut to 0 keeps the bytes it owes and resumes them when it gets a rate again), and senders sleep in
steps of at most ``recheck_s`` so they see it.  The policy sees the bytes whose slot has passed
(``PacedStream.sent_bytes``), not the ones merely accounted to a waiting piece.

The clock is injected (``clock``, seconds, monotonic) so tests can drive the pacer deterministically.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.flows import Link
from scheduler.policies import get_policy, policy_names
from testbed.objectstore.paced_stream import EGRESS, PacedMember, PacedStream

DEFAULT_PIECE_BYTES = 64 * 1024  # the smallest paced piece; faster streams send ~quantum_s of data a piece
MAX_PIECE_BYTES = 16 * 1024 * 1024
# How many layers a member of a pace group may run ahead of the group's slowest member.
GROUP_LEAD_LAYERS = 1


class Pacer:
    """Per-stream rates from a scheduler policy over one egress link, applied by ``pace``."""

    def __init__(
        self,
        policy: str = "equal",
        egress_Bps: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        burst_s: float = 0.005,
        starve_poll_s: float = 0.05,
        quantum_s: float = 0.0015,
        recheck_s: float = 0.002,
        *,
        policy_kwargs: dict | None = None,
    ) -> None:
        self.policy_name = policy
        self.policy_kwargs = dict(policy_kwargs or {})
        self.policy = get_policy(policy, **self.policy_kwargs)
        self.egress_Bps = egress_Bps if egress_Bps and egress_Bps > 0 else None
        self.clock = clock
        self._t0 = clock()
        self.burst_s = burst_s
        self.quantum_s = quantum_s
        self.starve_poll_s = starve_poll_s
        self.recheck_s = recheck_s
        self.streams: dict[str, PacedStream] = {}  # the flows: streams of their own and pace groups
        self._groups: dict[tuple[str, str], PacedStream] = {}
        self._ids = itertools.count()
        self.reallocations = 0
        self.timer_reallocations = 0
        self.changes = 0  # settings changed through ``configure`` (the server's admin operation)
        # Send threads account pieces while the event loop changes rates: both touch a stream's deadline.
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None
        # Debugging aid: OC_PACER_TRACE=<dir> writes every allocation (JSON lines) to <dir>/pacer-<pid>.jsonl.
        trace_dir = os.environ.get("OC_PACER_TRACE")
        self._trace = open(os.path.join(trace_dir, f"pacer-{os.getpid()}.jsonl"), "a") if trace_dir else None  # noqa: SIM115

    @property
    def limited(self) -> bool:
        return self.egress_Bps is not None

    def configure(self, policy: str, egress_Bps: float | None, policy_kwargs: dict | None = None) -> None:
        """Switch the policy (with its tunables ``policy_kwargs``) and the egress capacity (bytes/s; None or
        0: unpaced) of a running pacer.

        The server's admin operation (``POST /?objectcache-pacer``) calls this only while no stream is open,
        so one run never mixes two settings; with streams open the next reallocation uses the new ones.
        Raises ``KeyError`` for an unknown policy, ``TypeError`` / ``ValueError`` for tunables it does not
        take (nothing changes then)."""
        kwargs = dict(policy_kwargs or {})
        new_policy = get_policy(policy, **kwargs)
        self.policy_name, self.policy_kwargs, self.policy = policy, kwargs, new_policy
        self.egress_Bps = egress_Bps if egress_Bps and egress_Bps > 0 else None
        self.changes += 1
        self.reallocate()

    def settings(self) -> dict:
        """The current policy, its tunables (``policy_kwargs``, only when set) and the egress capacity
        (``egress_gbps``: Gbps, None when unpaced), as the admin operation and the health check show."""
        egress_Gbps = self.egress_Bps * 8 / 1e9 if self.egress_Bps else None
        doc = {"policy": self.policy_name, "egress_gbps": egress_Gbps, "active_streams": len(self.streams)}
        if self.policy_kwargs:
            doc["policy_kwargs"] = dict(self.policy_kwargs)
        return doc

    def now_s(self) -> float:
        return self.clock() - self._t0

    def open_stream(
        self,
        layer_bytes: int,
        layers_total: int,
        compute_per_layer_s: float | None = None,
        stream_id: str | None = None,
        *,
        group: str | None = None,
        tenant: str = "",
    ) -> PacedStream | PacedMember:
        """Register a stream and reallocate.  Stream ids are made unique (a counter suffix).

        ``group``: the client's pace group (the streams of one request, ``PacedMember``): the first stream
        of ``(tenant, group)`` opens the group's flow, later ones join it (their layer bytes add up; they
        must have as many layers, else ``ValueError``).  Tenants never share a group."""
        n = next(self._ids)
        sid = f"{stream_id}#{n}" if stream_id else f"s{n}"
        if not (compute_per_layer_s and compute_per_layer_s > 0):
            compute_per_layer_s = 0.0  # no hint: the policy sees a client that computes instantly
        flow = None if group is None else self._groups.get((tenant, group))
        if flow is not None and flow.layers_total != int(layers_total):
            raise ValueError(
                f"pace group {group!r} streams {flow.layers_total} layers; this stream has {layers_total}"
            )
        if flow is None:
            fid = sid if group is None else f"{group}#{n}"
            flow = PacedStream(fid, 0, int(layers_total), float(compute_per_layer_s), self.now_s())
            flow.next_send_s = flow.arrival_s
            flow.changed = asyncio.Event() if _in_loop() else None
            self.streams[fid] = flow
            if group is None:
                flow.layer_bytes = int(layer_bytes)
                self.reallocate()
                return flow
            flow.group_key = (tenant, group)
            self._groups[flow.group_key] = flow
        member = PacedMember(sid, flow, int(layer_bytes))
        with self._lock:
            flow.layer_bytes += member.layer_bytes
            flow.members.append(member)
        self.reallocate()
        return member

    def close_stream(self, stream: PacedStream | PacedMember) -> None:
        """A stream ended (done, failed or cancelled); a group's flow ends with its last member."""
        flow = stream.flow
        if isinstance(stream, PacedMember):
            with self._lock:
                if stream in flow.members:
                    flow.members.remove(stream)
                    # What it has not sent is no longer the group's to send.
                    flow.layer_bytes -= stream.layer_bytes
                    flow.delivered_bytes -= stream.accounted_bytes
                    self._record_group_layers(flow)
            if flow.members:
                self.reallocate()
                return
            self._groups.pop(flow.group_key, None)
        if self.streams.pop(flow.stream_id, None) is not None:
            self.reallocate()

    def layer_sent(self, stream: PacedStream | PacedMember) -> None:
        """A stream finished sending a layer: record it (for the GPU estimate) and reallocate.  A group's
        layer is sent when each of its members has sent it."""
        if isinstance(stream, PacedMember):
            with self._lock:
                stream.layers_sent += 1
                changed = self._record_group_layers(stream.flow)
            if changed:
                self.reallocate()
            return
        stream.layer_sent_s.append(self.now_s())
        self.reallocate()

    def _record_group_layers(self, flow: PacedStream) -> bool:
        """Stamp the group layers that every member has now sent; True if there were any."""
        if not flow.members:
            return False
        done = min(m.layers_sent for m in flow.members)
        now = self.now_s()
        added = done - flow.layers_sent
        flow.layer_sent_s.extend([now] * max(0, added))
        return added > 0

    def reallocate(self) -> dict[str, float]:
        """Ask the policy for new rates of all active streams (infinite when egress is unlimited), apply
        them at once (``PacedStream.retime``) and arm the timer for the next GPU event."""
        self.reallocations += 1
        if not self.streams:
            self._cancel_timer()
            return {}
        now = self.now_s()
        with self._lock:
            if self.egress_Bps is None:
                rates = {sid: math.inf for sid in self.streams}
            else:
                flows = [s.view(now) for s in sorted(self.streams.values(), key=lambda s: s.stream_id)]
                link = Link(EGRESS, self.egress_Bps)
                rates = self.policy.allocate(now, flows, {EGRESS: link})
            for sid, s in self.streams.items():
                s.retime(float(rates.get(sid, 0.0)), now)
        if self._trace is not None:
            self._write_trace(now)
        for s in self.streams.values():
            if s.changed is not None:
                s.changed.set()
        if self.egress_Bps is not None:
            self._arm_timer(now)
        return rates

    def _write_trace(self, now_s: float) -> None:
        rows = []
        for s in self.streams.values():
            started, busy = s.gpu_state(now_s)
            rows.append([s.stream_id, s.rate_Bps, s.sent_bytes(now_s), s.layers_sent, s.layers_total, started,
                         busy, s.arrival_s, s.request_s])  # fmt: skip
        self._trace.write(
            json.dumps({"t": now_s, "t_abs": now_s + self._t0, "policy": self.policy_name, "streams": rows})
            + "\n"
        )
        self._trace.flush()

    def next_gpu_event_s(self, now_s: float) -> float:
        """The next estimated GPU layer end after ``now_s`` of a stream with layers left to send (``inf`` if
        none): an event of the fluid model (``scheduler.fluid.next_event_s``) the sends do not mark."""
        t = math.inf
        for s in self.streams.values():
            if s.layers_sent >= s.layers_total or s.compute_per_layer_s <= 0:
                continue
            started, busy_until = s.gpu_state(now_s)
            if 0 < started < s.layers_total and busy_until > now_s:
                t = min(t, busy_until)
        return t

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_timer(self, now_s: float) -> None:
        """Re-ask the policy at the next GPU event (only on a running event loop: tests without one call
        ``reallocate`` themselves at ``next_gpu_event_s``)."""
        self._cancel_timer()
        t = self.next_gpu_event_s(now_s)
        if math.isinf(t):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # A little after the event, so the estimate counts that layer's compute as finished.
        self._timer = loop.call_later(max(0.0, t - now_s) + 5e-5, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.timer_reallocations += 1
        self.reallocate()

    def delay_for(self, stream: PacedStream | PacedMember, nbytes: int) -> float:
        """Account ``nbytes`` to the stream; return how long to wait before sending them.

        The piece occupies the link from the flow's deadline ``next_send_s`` (or from ``burst_s`` ago, if
        the sender is late: credit for time lost sending or oversleeping) for ``nbytes / rate``; it may
        leave once that slot has passed, as a link of that rate would have delivered it.  So ``n`` bytes
        never leave faster than ``n / rate`` (plus at most ``burst_s`` of credit), and a sender that sleeps
        only until each deadline delivers the rate exactly on average.  The members of a pace group take
        their slots one after another on the group's deadline."""
        now = self.now_s()
        flow = stream.flow
        with self._lock:
            flow.delivered_bytes += nbytes
            flow.accounted_bytes += nbytes
            stream.slot_end_bytes = flow.accounted_bytes
            if stream is not flow:
                stream.accounted_bytes += nbytes
            if math.isinf(flow.rate_Bps):
                flow.next_send_s = now
                return 0.0
            if flow.rate_Bps <= 0:  # no rate now: the bytes wait for the next one
                flow.owed_bytes += nbytes
                return math.inf
            start = max(flow.next_send_s, now - self.burst_s)
            flow.next_send_s = start + nbytes / flow.rate_Bps
            return max(0.0, flow.next_send_s - now)

    def piece_bytes(self, stream: PacedStream | PacedMember, floor_bytes: int = DEFAULT_PIECE_BYTES) -> int:
        """Bytes to send per pacing step: ``quantum_s`` of data at the stream's share of its flow's rate,
        within [``floor_bytes``, ``MAX_PIECE_BYTES``] (unpaced or starved: the largest piece)."""
        flow = stream.flow
        rate = flow.rate_Bps
        if not self.limited or math.isinf(rate) or rate <= 0:
            return MAX_PIECE_BYTES
        share = rate / max(1, len(flow.members))
        return int(min(MAX_PIECE_BYTES, max(floor_bytes, share * self.quantum_s)))

    def pace_blocking(
        self,
        stream: PacedStream | PacedMember,
        nbytes: int,
        wait: Callable[[float], object] = time.sleep,
        on_starved: Callable[[], None] | None = None,
    ) -> None:
        """``pace`` for a send thread: block (``wait(seconds)``, e.g. ``threading.Event.wait`` so a cancel
        wakes it; a true result means cancelled) until the stream may send ``nbytes``.  The sleep follows
        rate changes: it re-reads the deadline every ``recheck_s`` (a re-allocation may move it either
        way).  A starved stream (rate 0) polls every millisecond and calls ``on_starved`` (which should
        schedule ``reallocate`` on the event loop) every ``starve_poll_s``; rates only change on the loop."""
        flow = stream.flow
        if self.egress_Bps is None:
            self.delay_for(stream, nbytes)
            return
        self._wait_for_rate(flow, wait, on_starved)
        while self._ahead_of_group(stream):
            if wait(self.recheck_s):
                return
        self.delay_for(stream, nbytes)
        while True:
            left = flow.slot_end_s(stream.slot_end_bytes) - self.now_s()
            if left <= 0:
                return
            if math.isinf(left):  # cut to 0 while waiting: resume when it has a rate again
                if self._wait_for_rate(flow, wait, on_starved):
                    return
                continue
            if wait(min(left, self.recheck_s)):
                return  # cancelled: the caller checks its stop flag

    def _ahead_of_group(self, stream: PacedStream | PacedMember) -> bool:
        """A member ``GROUP_LEAD_LAYERS`` layers or more ahead of its group's slowest member waits: the client
        needs every member's layer ``l`` before it can compute layer ``l``, so the group's rate goes to the
        members that hold the earliest layer back (a member that joins late catches up first).  Progress is
        counted in payload bytes accounted by the send threads themselves (in layers of the member's own
        size), so it never lags behind an event loop that is busy."""
        if not isinstance(stream, PacedMember):
            return False
        members = stream.flow.members
        if len(members) < 2:
            return False
        slowest = min(m.accounted_bytes / m.layer_bytes for m in members if m.layer_bytes > 0)
        return stream.accounted_bytes / max(1, stream.layer_bytes) >= slowest + GROUP_LEAD_LAYERS

    def _wait_for_rate(self, flow: PacedStream, wait: Callable[[float], object], on_starved) -> bool:
        """Block while the flow's rate is 0; True if cancelled."""
        last = self.now_s()
        while flow.rate_Bps <= 0:
            if wait(0.001):
                return True
            if on_starved is not None and self.now_s() - last >= self.starve_poll_s:
                last = self.now_s()
                on_starved()
        return False

    async def pace(self, stream: PacedStream | PacedMember, nbytes: int) -> None:
        """Wait until the stream may send ``nbytes`` more bytes at its flow's current rate."""
        flow = stream.flow
        if self.egress_Bps is None:
            self.delay_for(stream, nbytes)
            return
        await self._await_rate(flow)
        while self._ahead_of_group(stream):
            await asyncio.sleep(self.recheck_s)
        self.delay_for(stream, nbytes)
        while True:
            left = flow.slot_end_s(stream.slot_end_bytes) - self.now_s()
            if left <= 0:
                return
            if math.isinf(left):
                await self._await_rate(flow)
                continue
            await asyncio.sleep(min(left, self.recheck_s))

    async def _await_rate(self, flow: PacedStream) -> None:
        while flow.rate_Bps <= 0:
            # The policy gave this flow nothing for now: wait for the next reallocation.
            if flow.changed is None:
                flow.changed = asyncio.Event()
            flow.changed.clear()
            try:
                await asyncio.wait_for(flow.changed.wait(), self.starve_poll_s)
            except TimeoutError:
                self.reallocate()

    def snapshot(self) -> list[dict]:
        return [
            {
                "stream_id": s.stream_id,
                "rate_Bps": s.rate_Bps,
                "delivered_bytes": s.delivered_bytes,
                "layers_sent": s.layers_sent,
                "layers_total": s.layers_total,
                "compute_per_layer_s": s.compute_per_layer_s,
            }
            for s in self.streams.values()
        ]


@dataclass(frozen=True)
class PacerSettings:
    """What the admin operation sets: a policy with its tunables, and the egress capacity (bytes/s; None:
    unpaced)."""

    policy: str
    policy_kwargs: dict
    egress_Bps: float | None


SETTINGS_KEYS = ("policy", "policy_kwargs", "egress_gbps")


def parse_settings(body: bytes, current: dict) -> PacerSettings:
    """Validate the admin operation's JSON body ``{"policy": name, "policy_kwargs": {...}, "egress_gbps":
    Gbps | 0 | null}`` against the ``current`` settings (``Pacer.settings``).  A key left out keeps its
    value, except ``policy_kwargs`` when the policy changes: a new policy starts from its own defaults.
    Raises ``ValueError`` with a message for the client (the server answers 400)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("pacer settings are not valid JSON") from None
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"pacer settings must be a JSON object with some of {', '.join(SETTINGS_KEYS)}")
    unknown = sorted(set(doc) - set(SETTINGS_KEYS))
    if unknown:
        raise ValueError(f"unknown pacer settings {unknown}: only {', '.join(SETTINGS_KEYS)}")
    policy = doc.get("policy", current["policy"])
    if not isinstance(policy, str) or policy not in policy_names():
        raise ValueError(f"unknown policy {policy!r}; known: {policy_names()}")
    kept_kwargs = current.get("policy_kwargs", {}) if policy == current["policy"] else {}
    kwargs = doc.get("policy_kwargs", kept_kwargs)
    if not isinstance(kwargs, dict):
        raise ValueError("policy_kwargs must be a JSON object of the policy's tunables")
    try:
        get_policy(policy, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"policy {policy!r} does not take policy_kwargs {kwargs}: {e}") from None
    egress_Gbps = doc.get("egress_gbps", current["egress_gbps"])
    if egress_Gbps is not None and (
        not isinstance(egress_Gbps, int | float)
        or isinstance(egress_Gbps, bool)
        or not math.isfinite(egress_Gbps)
        or egress_Gbps < 0
    ):
        raise ValueError("egress_gbps must be a non-negative number of Gbps (0 or null: unpaced)")
    return PacerSettings(policy, kwargs, egress_Gbps * 1e9 / 8 if egress_Gbps else None)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
