"""One gather stream as the pacer sees it: its progress, its send deadline, and the client GPU it estimates.

``PacedStream`` keeps what the pacer needs per stream: bytes per layer and layers, the client's per-layer
compute hint, when each layer finished sending, the rate the policy gave it and the deadline of its next
piece (``next_send_s``).  ``view`` turns it into the ``scheduler.flows.FlowView`` a policy allocates on, on
the pacer's one link ``EGRESS``.  ``retime`` applies a new rate at once, also to a piece already waiting
for its slot (see ``testbed.objectstore.pacer`` for the pacing model).

A *pace group* is the set of gather streams one client request split its chunks into (parallel receivers):
the scheduler's unit is the request, so the group is one ``PacedStream`` (one flow for the policy, one send
deadline) and each stream of it is a ``PacedMember``.  Members draw on the group's deadline in turn, so a
member that falls behind (a busy receiver) leaves its share to the others instead of idling the link.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass, field

from scheduler.flows import FlowView
from scheduler.layerwise import layer_times

EGRESS = "egress"  # the pacer's one link: the server's egress


@dataclass
class PacedStream:
    """Pacer-side state of one gather stream.

    ``layer_sent_s`` holds when each layer finished sending; the estimated GPU schedule follows from it:
    layer ``l`` starts at ``max(sent_l, end_{l-1})`` and ends ``compute_per_layer_s`` later.
    """

    stream_id: str
    layer_bytes: int
    layers_total: int
    compute_per_layer_s: float
    arrival_s: float
    delivered_bytes: int = 0
    layer_sent_s: list[float] = field(default_factory=list)
    rate_Bps: float = math.inf
    next_send_s: float = 0.0
    # Bytes accounted to a piece whose slot was cut short by a rate of 0: sent once the stream has a rate.
    owed_bytes: float = 0.0
    # When the server started handling the request (pacer clock; nan if unknown): for the trace.
    request_s: float = math.nan
    # Bytes ever accounted to pieces (never decreases, unlike ``delivered_bytes`` when a member leaves): a
    # piece's slot ends when the deadline has passed every byte accounted after it (``slot_end_s``).
    accounted_bytes: float = 0.0
    slot_end_bytes: float = 0.0  # ``accounted_bytes`` after this handle's last piece (see ``PacedMember``)
    members: list[PacedMember] = field(default_factory=list)  # empty: a stream of its own
    group_key: tuple[str, str] | None = None
    changed: asyncio.Event | None = field(default=None, repr=False)
    # gpu_state's resumable recurrence: layers started, when the GPU is free, and the time last asked.
    _gpu_started: int = field(default=0, repr=False)
    _gpu_busy_s: float = field(default=math.nan, repr=False)
    _gpu_asked_s: float = field(default=-math.inf, repr=False)

    def __post_init__(self) -> None:
        self._gpu_busy_s = self.arrival_s

    @property
    def layers_sent(self) -> int:
        return len(self.layer_sent_s)

    @property
    def flow(self) -> PacedStream:
        """The flow a handle paces on: a stream of its own is its own flow."""
        return self

    def slot_end_s(self, position_bytes: float) -> float:
        """When the piece that ended at ``position_bytes`` (an ``accounted_bytes`` value) may leave: the
        deadline less the time of the bytes accounted after it, at the current rate (``-inf``: unpaced,
        ``inf``: it waits for a rate)."""
        rate = self.rate_Bps
        behind = self.accounted_bytes - position_bytes
        if math.isinf(rate):
            return -math.inf
        if rate <= 0:
            return math.inf if self.owed_bytes > behind else -math.inf
        return self.next_send_s - behind / rate

    def gpu_state(self, now_s: float) -> tuple[int, float]:
        """(layers whose compute has started by ``now_s``, when the GPU finishes those layers), by the
        layerwise recurrence (``scheduler.layerwise.layer_times``) over the layers' send times, the GPU
        free from the stream's arrival.

        The pacer asks at every event for every stream, always at a later time, and sent layers only grow:
        the recurrence resumes from the last answer instead of replaying every layer (a question about an
        earlier time replays from the start)."""
        if now_s < self._gpu_asked_s:
            self._gpu_started, self._gpu_busy_s = 0, self.arrival_s
        pending = itertools.islice(self.layer_sent_s, self._gpu_started, None)
        for _, end_s in layer_times(pending, self.compute_per_layer_s, self._gpu_busy_s, now_s):
            self._gpu_started, self._gpu_busy_s = self._gpu_started + 1, end_s
        self._gpu_asked_s = now_s
        return self._gpu_started, self._gpu_busy_s

    def pending_bytes(self, now_s: float) -> float:
        """Bytes accounted to pieces whose slot has not passed yet (at the current rate)."""
        if self.rate_Bps <= 0:
            return self.owed_bytes
        if math.isinf(self.rate_Bps):
            return 0.0
        return max(0.0, self.next_send_s - now_s) * self.rate_Bps

    def sent_bytes(self, now_s: float) -> float:
        """Bytes a fluid link at this stream's rates would have carried by ``now_s``."""
        return max(
            0.0, min(self.delivered_bytes - self.pending_bytes(now_s), self.layer_bytes * self.layers_total)
        )

    def retime(self, rate_Bps: float, now_s: float) -> None:
        """Switch to ``rate_Bps`` now: the unsent part of the current slot continues at the new rate."""
        if rate_Bps == self.rate_Bps:
            return
        owed = self.pending_bytes(now_s)
        self.rate_Bps = rate_Bps
        if rate_Bps <= 0:
            # A piece whose slot has passed may still leave (its sender has not woken yet): only bytes
            # still owed wait for a rate.  (Parking it would deadlock a stream whose last piece is in
            # flight: with nothing left the policy never gives it a rate again.)
            self.owed_bytes = owed
            self.next_send_s = math.inf if owed > 0 else min(self.next_send_s, now_s)
        elif math.isinf(rate_Bps):
            self.owed_bytes, self.next_send_s = 0.0, now_s
        else:
            self.owed_bytes = 0.0
            if owed > 0 or math.isinf(self.next_send_s):
                self.next_send_s = now_s + owed / rate_Bps
            # else: the deadline is in the past (credit of a late sender): keep it

    def view(self, now_s: float) -> FlowView:
        started, busy_until = self.gpu_state(now_s)
        return FlowView(
            flow_id=self.stream_id,
            path=(EGRESS,),
            layer_bytes=float(self.layer_bytes),
            layers_total=self.layers_total,
            delivered_bytes=float(self.sent_bytes(now_s)),
            compute_per_layer_s=self.compute_per_layer_s,
            gpu_busy_until_s=busy_until,
            layers_computed=started,
            arrival_s=self.arrival_s,
            start_s=self.arrival_s,
            first_layer_s=self.layer_sent_s[0] if self.layer_sent_s else math.nan,
        )


@dataclass(eq=False)
class PacedMember:
    """One stream of a pace group: the group's ``flow`` is what the policy allocates and the deadline it
    paces on; the member keeps its own layer count, its share of the bytes and where its last piece ended."""

    stream_id: str
    flow: PacedStream
    layer_bytes: int
    layers_sent: int = 0
    accounted_bytes: float = 0.0  # this member's bytes in ``flow.delivered_bytes``
    slot_end_bytes: float = 0.0
    request_s: float = math.nan
