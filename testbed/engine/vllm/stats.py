"""Connector statistics, through vLLM's ``KVConnectorStats``.

Counters (summed over workers and intervals): ``lookup_tokens`` (prompt tokens whose chunk keys were
looked up), ``hit_tokens`` (leading tokens found in the object tier), ``planned_load_tokens`` (what the
planner chose to load), ``loaded_tokens`` (written into vLLM's blocks), ``failed_load_tokens`` (reported as
invalid blocks for recompute), ``saved_chunks`` / ``saved_tokens`` (new objects written),
``skipped_chunks`` (already present), ``save_errors``, ``lookup_errors``.
Timings: ``lookup_s`` (bulk existence checks), ``load_s`` (first layer requested to last layer in
blocks, summed over loads) and ``stall_s``
(time the forward waited in ``wait_for_layer_load``, summed over layers and loads); ``max_layer_stall_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

COUNTERS = (
    "lookup_tokens",
    "hit_tokens",
    "planned_load_tokens",
    "loaded_tokens",
    "failed_load_tokens",
    "saved_chunks",
    "saved_tokens",
    "skipped_chunks",
    "save_errors",
    "lookup_errors",
    "loads",
)
TIMERS = ("lookup_s", "load_s", "stall_s")


def empty_data() -> dict[str, Any]:
    data: dict[str, Any] = {k: 0 for k in COUNTERS}
    data.update({k: 0.0 for k in TIMERS})
    data["max_layer_stall_ms"] = 0.0
    return data


@dataclass
class ObjectCacheConnectorStats(KVConnectorStats):
    """Counters and timings of one interval (see the module docstring); ``data`` is a flat dict."""

    def __post_init__(self) -> None:
        base = empty_data()
        base.update(self.data or {})
        self.data = base

    def add(self, key: str, value: float) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def note_stall_ms(self, stall_ms: float) -> None:
        self.data["max_layer_stall_ms"] = max(self.data["max_layer_stall_ms"], stall_ms)

    def reset(self) -> None:
        self.data = empty_data()

    def aggregate(self, other: KVConnectorStats) -> ObjectCacheConnectorStats:
        for key, value in (other.data or {}).items():
            if key == "max_layer_stall_ms":
                self.note_stall_ms(value)
            elif isinstance(value, (int, float)):
                self.add(key, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {k: self.data[k] for k in COUNTERS}
        out["lookup_ms"] = round(1e3 * self.data["lookup_s"], 3)
        out["load_ms"] = round(1e3 * self.data["load_s"], 3)
        out["stall_ms"] = round(1e3 * self.data["stall_s"], 3)
        out["max_layer_stall_ms"] = round(self.data["max_layer_stall_ms"], 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in (*COUNTERS, *TIMERS))
