"""Config dataclasses of the component config groups (model, gpu, network, storage, workload, policy).

Each dataclass is the schema of one Hydra config group under ``configs/<group>/``; ``register_configs``
stores them in Hydra's ConfigStore as ``base_<group>`` so every YAML file of the group starts from the schema
(``defaults: [base_<group>, _self_]``) and a typo in an override is an error, not a silently ignored key.
Nothing here imports SimPy: the testbed harness reuses the same groups.

Units are in the names.  ``Gbps`` is 1e9 bits per second, ``GBps`` 1e9 bytes per second.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from scheduler.units import gbps_to_Bps


@dataclass
class ModelConfig:
    """A model preset of ``scheduler.geometry.PRESETS`` and the chunk size of its object tier."""

    name: str = "llama-3.1-8b"
    chunk_tokens: int = 256


@dataclass
class GpuConfig:
    """The GPU: a measured profile (``profile``: a CSV path, or empty for ``sim/profiles/<model>_<name>.csv``)
    with the roofline as fallback, and the host-to-GPU copy bandwidth."""

    name: str = "h100"
    profile: str = ""
    pcie_pinned_GBps: float = 53.0
    pcie_pageable_GBps: float = 15.5
    pinned: bool = True
    peak_tflops: float = 989.0
    hbm_TBps: float = 3.35
    mfu: float = 0.5

    @property
    def pcie_Bps(self) -> float:
        return (self.pcie_pinned_GBps if self.pinned else self.pcie_pageable_GBps) * 1e9


@dataclass
class NetworkConfig:
    """The storage network: line rate times a fitted efficiency (RoCE goodput / line rate), and the
    round-trip time of one control message."""

    name: str = "roce100"
    link_Gbps: float = 100.0
    efficiency: float = 0.92
    rtt_s: float = 20e-6

    @property
    def goodput_Bps(self) -> float:
        return gbps_to_Bps(self.link_Gbps) * self.efficiency


@dataclass
class StorageConfig:
    """The object store and the local tiers.

    Every S3 request (a GET, a ranged GET, the gather's control request) holds one of
    ``server_concurrency`` server slots for ``request_overhead_s`` of server work and then waits
    ``ttfb_s`` before its first byte; a client keeps at most ``client_concurrency`` GETs of one request in
    flight.  ``server_Gbps`` caps the server's total throughput.  The ``rgw`` preset's overhead and TTFB come from
    Ceph RGW measurements (``docs/sim.md``).  Tier capacities feed ``scheduler.tiers``.
    """

    name: str = "rgw"
    request_overhead_s: float = 2.5e-3
    ttfb_s: float = 0.5e-3
    server_concurrency: int = 64
    client_concurrency: int = 16
    server_Gbps: float = 400.0
    hbm_capacity_GiB: float = 20.0
    dram_capacity_GiB: float = 256.0
    object_capacity_GiB: float = 1.0e6
    write_back: bool = True
    # Gather only: extra server work per chunk key before the first byte (open + header check of each object;
    # fitted on the testbed by testbed.validation.calibrate: docs/harness.md).  0: not modelled.
    gather_per_chunk_s: float = 0.0
    # Gather only, what dominates short prefixes on the GPU engine (docs/sim.md, "The object path's
    # short-prefix terms"; fitted from GPU runs by testbed.validation.gpu_validate).  The defaults (one stream,
    # 0, inf) leave the model as it was.
    # Parallel gather requests ("streams") per prefill, at most one per chunk key (the engine's ``streams``).
    gather_streams: int = 1
    # Server work per stream before the first byte, in series (the server takes the streams' gathers one after
    # another): the open costs ``request_overhead_s + keys * gather_per_chunk_s + streams * open_per_stream_s``.
    open_per_stream_s: float = 0.0
    # Receive ceiling of one stream (bytes/s): the client's receive + verify loop, ~3.2-3.7 GB/s per stream on
    # the H100 host.  inf: not modelled.
    stream_ceiling_Bps: float = math.inf
    # Reader handoff per layer (s): the reader hands each complete layer to the engine (shared pinned memory,
    # a message), in series with the receive, so a layer takes at least this long.  0: not modelled.
    handoff_per_layer_s: float = 0.0

    @property
    def per_request_s(self) -> float:
        return self.request_overhead_s + self.ttfb_s

    def gather_stream_count(self, n_keys: int) -> int:
        """Streams of one gather of ``n_keys`` chunk keys: ``gather_streams``, at most one per key."""
        return max(1, min(int(self.gather_streams), int(n_keys)))

    def gather_open_s(self, n_keys: int) -> float:
        """Server time (s) of one gather of ``n_keys`` keys before its first byte: the request overhead, every
        key opened and checked, every stream's request handled, one after another."""
        t = self.request_overhead_s + n_keys * self.gather_per_chunk_s
        if self.open_per_stream_s:
            t += self.gather_stream_count(n_keys) * self.open_per_stream_s
        return t

    def gather_max_rate_Bps(self, layer_bytes: float, n_keys: int) -> float:
        """The rate (bytes/s) one gather can take at most, whatever the link gives it: a layer of
        ``layer_bytes`` takes ``layer_bytes / (streams * stream_ceiling_Bps) + handoff_per_layer_s`` at the
        receiver (inf when neither is modelled)."""
        per_byte = 1.0 / (self.gather_stream_count(n_keys) * self.stream_ceiling_Bps)
        if layer_bytes > 0:
            per_byte += self.handoff_per_layer_s / layer_bytes
        return 1.0 / per_byte if per_byte > 0 else math.inf


@dataclass
class WorkloadConfig:
    """Request arrivals and prompts.

    ``kind``: ``synthetic`` (shared-prefix generator: system prompts, multi-turn sessions, agentic loops) or
    ``trace`` (a Mooncake-format JSONL at ``trace_path``).  ``arrival``: ``poisson`` at ``rate_per_s`` or
    ``closed`` with ``clients`` clients and ``think_s`` of think time.
    """

    name: str = "synthetic"
    kind: str = "synthetic"
    num_requests: int = 200
    arrival: str = "poisson"
    rate_per_s: float = 2.0
    clients: int = 8
    think_s: float = 1.0
    system_prompts: int = 8
    system_prompt_tokens: int = 4096
    sessions: int = 32
    turns: int = 4
    user_tokens: int = 512
    answer_tokens: int = 256
    agentic_fraction: float = 0.25
    agent_steps: int = 8
    tool_tokens: int = 1024
    output_tokens: int = 128
    trace_path: str = ""
    block_tokens: int = 512
    time_scale: float = 1.0


@dataclass
class PolicyConfig:
    """The bandwidth policy (``scheduler.policies.get_policy``) and the planner switch."""

    name: str = "bandwidth_aware"
    kwargs: dict[str, Any] = field(default_factory=dict)
    plan_recompute: bool = True


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "gpu": GpuConfig,
    "network": NetworkConfig,
    "storage": StorageConfig,
    "workload": WorkloadConfig,
    "policy": PolicyConfig,
}


def register_configs() -> None:
    """Store each group's schema as ``base_<group>`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, cls in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=cls)


def to_dataclass(cls: type, node: Any):
    """Build a group dataclass from a DictConfig / dict, rejecting unknown keys."""
    if isinstance(node, cls):
        return node
    if node is None:
        return cls()
    try:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    except ImportError:  # pragma: no cover - hydra is a pinned dependency
        data = dict(node)
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    return cls(**data)


def config_hash(obj: Any) -> str:
    """Stable 12-hex-digit hash of a JSON-able config (dicts sorted), carried by every results row."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
