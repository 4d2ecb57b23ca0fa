"""The experiment setup the simulator and the testbed share, free of SimPy.

A *setup* fixes the hardware and software of one node (model, GPU compute model, storage network, object
server, bandwidth policy); the load is given separately.  Everything here is what the testbed harness needs
to run the simulator's experiments for real: the ``Setup`` dataclass, the compute model it implies (a
measured profile from ``PROFILE_DIR`` or the roofline), the local-DRAM-layerwise baseline TTFT
(``baseline_ttft_s`` of every results row), and building a setup and a config hash from a composed Hydra
config.  ``sim.runner`` (the SimPy model) and ``sim.experiments`` import these from here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.compute import ComputeModel, get_compute
from scheduler.flows import Link
from scheduler.fluid import RequestSpec, run_fluid
from scheduler.geometry import ModelSpec, get_model
from scheduler.policies import get_policy
from scheduler.units import gbps_to_Bps
from sim.config import (
    GROUPS,
    GpuConfig,
    ModelConfig,
    NetworkConfig,
    PolicyConfig,
    StorageConfig,
    WorkloadConfig,
    config_hash,
    to_dataclass,
)

# The shipped GPU profiles (``<model>_<gpu>.csv``, written by ``python -m testbed.engine.profile``).
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

# The config keys a results row's ``config_hash`` covers.
HASHED_KEYS = (*GROUPS, "experiment", "seed")


@dataclass
class Setup:
    """Everything but the load.  ``net_Gbps`` overrides the storage network's line rate (a shared cap)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    net_Gbps: float | None = None

    @property
    def spec(self) -> ModelSpec:
        return get_model(self.model.name)

    @property
    def link_Gbps(self) -> float:
        return self.network.link_Gbps if self.net_Gbps is None else self.net_Gbps

    def links(self) -> dict[str, Link]:
        net_Bps = gbps_to_Bps(self.link_Gbps) * self.network.efficiency
        return {
            "server": Link("server", gbps_to_Bps(self.storage.server_Gbps)),
            "net": Link("net", net_Bps),
            "pcie": Link("pcie", self.gpu.pcie_Bps),
        }


@functools.lru_cache(maxsize=16)
def compute_model(
    model_name: str, gpu_name: str, profile: str, peak_tflops: float, hbm_TBps: float, mfu: float
) -> ComputeModel:
    """The compute model of a model on a GPU: ``profile`` (a CSV path) if given, else the shipped profile
    ``<model>_<gpu>.csv`` of ``PROFILE_DIR`` if there is one, else the roofline (TFLOP/s, TB/s, MFU)."""
    return get_compute(
        get_model(model_name),
        gpu_name,
        profile or None,
        profile_dir=PROFILE_DIR,
        peak_flops=peak_tflops * 1e12,
        hbm_Bps=hbm_TBps * 1e12,
        mfu=mfu,
    )


def setup_compute(setup: Setup) -> ComputeModel:
    """The compute model of ``setup``'s model on its GPU (memoised)."""
    g = setup.gpu
    return compute_model(setup.model.name, g.name, g.profile, g.peak_tflops, g.hbm_TBps, g.mfu)


def overhead_time_s(compute: ComputeModel, cached_tokens: int, new_tokens: int) -> float:
    """The part of a prefill that is not per-layer work (embedding, LM head), in seconds; 0 for compute
    models without one."""
    over = getattr(compute, "overhead_time_s", None)
    return over(cached_tokens, new_tokens) if over is not None else 0.0


def dram_layerwise_ttft_s(setup: Setup, cached_tokens: int, new_tokens: int) -> float:
    """TTFT (s) of one request alone on local DRAM layerwise: the baseline of ``added_ttft_s``."""
    return _dram_layerwise_cached(
        setup.model.name, setup.gpu.name, setup.gpu.profile, setup.gpu.peak_tflops, setup.gpu.hbm_TBps,
        setup.gpu.mfu, setup.gpu.pcie_Bps, int(cached_tokens), int(new_tokens),
    )  # fmt: skip


@functools.lru_cache(maxsize=65536)
def _dram_layerwise_cached(model_name, gpu_name, profile, tflops, hbm, mfu, pcie_Bps, cached, new) -> float:
    m = get_model(model_name)
    comp = compute_model(model_name, gpu_name, profile, tflops, hbm, mfu)
    if cached <= 0:
        return comp.prefill_time_s(0, new)
    c = comp.layer_time_s(cached, new)
    extra = overhead_time_s(comp, cached, new)
    spec = RequestSpec(
        "baseline", 0.0, float(m.kv_bytes_per_token_layer * cached), m.num_layers, c, ("pcie",), 0.0, extra
    )
    (res,) = run_fluid([spec], {"pcie": Link("pcie", pcie_Bps)}, get_policy("equal"))
    return res.ttft_s


def setup_from_cfg(cfg) -> tuple[Setup, WorkloadConfig]:
    """The setup and the workload of a composed Hydra config (unknown keys are errors)."""
    parts = {g: to_dataclass(cls, cfg.get(g)) for g, cls in GROUPS.items()}
    setup = Setup(
        model=parts["model"],
        gpu=parts["gpu"],
        network=parts["network"],
        storage=parts["storage"],
        policy=parts["policy"],
    )
    return setup, parts["workload"]


def cfg_hash(cfg) -> str:
    """The 12-hex-digit hash of a composed config's groups, experiment and seed (``HASHED_KEYS``)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True)
    return config_hash({k: data.get(k) for k in HASHED_KEYS})
