"""The per-request results table shared by the simulator and the testbed.

One row per request.  Both sides build ``RequestRecord`` objects and write them with the same columns, so one
metrics function (``sim.metrics``) serves both and a sim row can be joined to a testbed row on
(experiment, config_hash, seed, request_id).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class RequestRecord:
    experiment: str
    source: str  # "sim" or "testbed"
    config_hash: str
    seed: int
    request_id: str
    model: str
    context_tokens: int
    cached_tokens: int
    new_tokens: int
    path: str  # storage path: recompute, dram, dram_layerwise, s3_whole, s3_ranged, gather
    policy: str
    link_Gbps: float
    concurrency: int
    arrival_s: float
    ttft_s: float
    first_layer_wait_s: float
    stall_s: float
    bytes_fetched: int
    compute_s: float
    compute_mode: str = "sim"  # sim, gpu, cpu, emulated
    tier: str = ""  # where the prefix came from: hbm, dram, object, none
    baseline_ttft_s: float = float("nan")  # TTFT of the same request on local DRAM layerwise
    note: str = ""

    @property
    def added_ttft_s(self) -> float:
        return self.ttft_s - self.baseline_ttft_s

    def as_dict(self) -> dict:
        return asdict(self)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RequestRecord))
