"""Flows over links: the state every bandwidth policy sees.

A *flow* is the transfer of one request's cached-prefix KV, layer after layer, over a *path* of one or more
links (storage NIC, fabric, host NIC, PCIe).  The fluid model treats each flow as a rate ``r_Bps`` that is
constant between *events* (a flow arrives or finishes, a layer boundary is crossed, a GPU stall begins or
ends); policies are asked for new rates only at events, never per byte.

Layer timing.  Request ``i`` consumes its KV layer by layer.  Layer ``l`` can be computed once its KV has
arrived and layer ``l-1`` is computed; computing a layer takes ``compute_per_layer_s``.  A request whose next
layer has not arrived while its GPU is idle is *stalled*: every second of stall is a second of added TTFT.
A flow that delivers ``layer_bytes`` every ``compute_per_layer_s`` (its *pace rate*) never stalls after its
first layer, so more bandwidth than that is useless to it unless it is behind.

Everything here is plain data: the simulator builds ``FlowView`` objects from simulated state, the server's
pacer from real streams.  Times are passed in (``now_s``); nothing reads a clock.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

FlowId = Hashable

# Bytes below which a transfer counts as complete; avoids float dust keeping a flow alive forever.
BYTES_EPS = 1e-6


@dataclass(frozen=True)
class Link:
    """A shared link with a capacity in bytes per second."""

    name: str
    capacity_Bps: float

    def __post_init__(self) -> None:
        if not self.capacity_Bps > 0:
            raise ValueError(f"link {self.name!r}: capacity_Bps must be > 0, got {self.capacity_Bps}")


@dataclass(frozen=True)
class FlowView:
    """What a policy knows about one in-flight layerwise transfer at time ``now_s``.

    ``layer_bytes``: bytes of one layer of this request's cached prefix (all its chunks' layer-l slices).
    ``layers_total``: layers to deliver.  ``delivered_bytes``: bytes already received, layers in order, so
    ``delivered_bytes // layer_bytes`` layers are complete.  ``compute_per_layer_s``: GPU time of one layer of
    this request's prefill (its new tokens attending to the cached prefix).  ``gpu_busy_until_s``: when the
    GPU finishes the layers it can already compute (``<= now_s`` means it is waiting for data, i.e. stalled
    or not started).  ``layers_computed``: layers whose compute has *started* (their KV was consumed).
    """

    flow_id: FlowId
    path: tuple[str, ...]
    layer_bytes: float
    layers_total: int
    delivered_bytes: float = 0.0
    compute_per_layer_s: float = 0.0
    gpu_busy_until_s: float = 0.0
    layers_computed: int = 0
    arrival_s: float = 0.0
    weight: float = 1.0
    max_rate_Bps: float = float("inf")
    # When bytes started to flow (arrival plus the control round trip) and when layer 0 arrived (nan before):
    # Without further stalls, layer l >= layers_computed is needed at
    # max(now, gpu_busy_until_s) + (l - layers_computed) * compute_per_layer_s.
    start_s: float = 0.0
    first_layer_s: float = float("nan")

    @property
    def total_bytes(self) -> float:
        return self.layer_bytes * self.layers_total

    @property
    def remaining_bytes(self) -> float:
        return max(0.0, self.total_bytes - self.delivered_bytes)

    @property
    def layers_delivered(self) -> int:
        if self.layer_bytes <= 0:
            return self.layers_total
        return min(self.layers_total, int((self.delivered_bytes + BYTES_EPS) // self.layer_bytes))

    @property
    def pace_rate_Bps(self) -> float:
        """Rate that delivers one layer per layer of compute: the most bandwidth compute can hide."""
        if self.compute_per_layer_s <= 0:
            return float("inf")
        return self.layer_bytes / self.compute_per_layer_s

    def stalled(self, now_s: float) -> bool:
        """True when the GPU is idle waiting for this flow's next layer."""
        return (
            self.remaining_bytes > BYTES_EPS
            and self.gpu_busy_until_s <= now_s + 1e-12
            and (self.layers_delivered <= self.layers_computed)
        )


@dataclass
class Allocation:
    """A policy's decision: a rate per flow, in bytes per second."""

    rates_Bps: dict[FlowId, float] = field(default_factory=dict)

    def __getitem__(self, flow_id: FlowId) -> float:
        return self.rates_Bps[flow_id]


def link_load(flows: Sequence[FlowView], rates_Bps: Mapping[FlowId, float]) -> dict[str, float]:
    """Sum of the rates crossing each link."""
    load: dict[str, float] = {}
    for f in flows:
        for name in f.path:
            load[name] = load.get(name, 0.0) + rates_Bps.get(f.flow_id, 0.0)
    return load


def check_feasible(
    flows: Sequence[FlowView],
    links: Mapping[str, Link],
    rates_Bps: Mapping[FlowId, float],
    rtol: float = 1e-9,
) -> None:
    """Raise ``ValueError`` if any rate is negative or any link is over capacity."""
    for f in flows:
        r = rates_Bps.get(f.flow_id, 0.0)
        if r < 0:
            raise ValueError(f"flow {f.flow_id!r}: negative rate {r}")
        for name in f.path:
            if name not in links:
                raise ValueError(f"flow {f.flow_id!r} crosses unknown link {name!r}")
    for name, load in link_load(flows, rates_Bps).items():
        cap = links[name].capacity_Bps
        if load > cap * (1 + rtol) + 1e-6:
            raise ValueError(f"link {name!r} over capacity: {load} > {cap}")
