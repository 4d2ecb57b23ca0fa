"""The simulator's side of the validation: the SimPy model run on what the testbed measured.

``simulate_ttft_ms`` predicts the GPU single-request sweep (``testbed.validation.gpu``) per storage path;
``simulate_batch`` / ``add_sim`` replay the testbed's batches (same requests, measured arrivals, same policy
and link); ``calibrated`` applies fitted storage and link parameters to a setup; ``ideal_ttft_s`` is the
infinite-bandwidth reference of the added TTFT.  This and the modules above it are the only part of the
testbed that runs the SimPy model (``sim.runner.simulate``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from sim.config import GpuConfig, ModelConfig, NetworkConfig, StorageConfig
from sim.runner import SimRequest, simulate
from sim.setup import Setup, overhead_time_s, setup_compute

# ---- summary with the simulator's prediction -----------------------------------------------------------------
SIM_PATH = {
    "recompute": "recompute",
    "dram": "dram",
    "dram_layerwise": "dram_layerwise",
    "objectcache_paced": "gather",
}


def gpu_setup(
    raw: dict,
    profile: str,
    storage: str = "fast",
    *,
    request_overhead_s: float = 2e-4,
    ttfb_s: float = 1e-4,
    gather_per_chunk_s: float = 0.0,
    efficiency: float = 1.0,
    rtt_s: float = 2e-5,
    gather_streams: int = 1,
    open_per_stream_s: float = 0.0,
    stream_ceiling_Bps: float = math.inf,
    handoff_per_layer_s: float = 0.0,
    h2d_efficiency: float = 1.0,
) -> Setup:
    """The simulator's setup of a measured GPU run: its model, the profile, the measured pinned host-to-device
    rate times ``h2d_efficiency``, the paced link at ``efficiency`` and the object path's parameters."""
    st = StorageConfig(
        name=storage,
        request_overhead_s=request_overhead_s,
        ttfb_s=ttfb_s,
        server_concurrency=256,
        client_concurrency=64,
        server_Gbps=800.0,
        gather_per_chunk_s=gather_per_chunk_s,
        gather_streams=gather_streams,
        open_per_stream_s=open_per_stream_s,
        stream_ceiling_Bps=stream_ceiling_Bps,
        handoff_per_layer_s=handoff_per_layer_s,
    )
    net = NetworkConfig(name="loopback-paced", link_Gbps=raw["link_Gbps"], efficiency=efficiency, rtt_s=rtt_s)
    pinned = (raw.get("pinned_h2d_GBps") or 53.0) * h2d_efficiency
    return Setup(
        model=ModelConfig(raw["model"], raw["chunk_tokens"]),
        gpu=GpuConfig(name="h100", profile=profile, pcie_pinned_GBps=pinned),
        network=net,
        storage=st,
    )


def simulate_records(setup: Setup, raw: dict, paths: dict[str, str] | None = None) -> dict:
    """Per measured (cached, new) key and source (``paths``: source -> simulator path, default ``SIM_PATH``):
    ``(ttft_ms, first_layer_wait_ms)`` of one request alone under ``setup``."""
    out = {}
    for row in raw["configs"]:
        c, n = row["cached_tokens"], row["new_tokens"]
        for src, path in (paths or SIM_PATH).items():
            recs, _ = simulate([SimRequest(f"{path}-{c}+{n}", 0.0, c, n, path)], setup, "h100_ttft", "", 0)
            out.setdefault(f"{c}+{n}", {})[src] = (recs[0].ttft_s * 1e3, recs[0].first_layer_wait_s * 1e3)
    return out


def simulate_ttft_ms(
    raw: dict, profile: str, storage: str = "fast", *, paths: dict[str, str] | None = None, **params
) -> dict:
    """The simulator's TTFT (ms) for each measured (cached, new) and path (``paths``: source -> simulator
    path, default ``SIM_PATH``), on this machine's measured profile and host-to-device bandwidth, with the
    paced link rate.  ``params``: those of ``gpu_setup`` (the storage and link parameters
    ``testbed.validation.gpu_validate.gpu_validation`` fits); the defaults are a fast server at the full link
    rate."""
    setup = gpu_setup(raw, profile, storage, **params)
    recs = simulate_records(setup, raw, paths)
    return {k: {s: v[0] for s, v in by.items()} for k, by in recs.items()}


def calibrated(
    setup: Setup, per_request_s: float, efficiency: float, per_chunk_s: float | None = None
) -> Setup:
    """The setup with the fitted per-request overhead, per-chunk gather cost and link efficiency (no
    separate TTFB or RTT)."""
    st = dataclasses.replace(setup.storage, request_overhead_s=max(0.0, per_request_s), ttfb_s=0.0)
    if per_chunk_s is not None:
        st = dataclasses.replace(st, gather_per_chunk_s=max(0.0, per_chunk_s))
    return dataclasses.replace(
        setup,
        storage=st,
        network=dataclasses.replace(setup.network, efficiency=min(1.0, efficiency), rtt_s=0.0),
    )


def simulate_batch(setup: Setup, df: pd.DataFrame) -> pd.Series:
    """Simulated TTFT of one testbed batch (same requests, measured arrivals, same policy and link)."""
    t_first = float(df.arrival_s.min())
    closed = df.concurrency.iloc[0] == 1 and len(df) > 1
    reqs = []
    for r in df.itertuples():
        arr = 0.0 if closed else float(r.arrival_s) - t_first
        reqs.append(SimRequest(str(r.request_id), arr, int(r.cached_tokens), int(r.new_tokens), "gather"))
    pol = str(df.policy.iloc[0])
    su = dataclasses.replace(setup, policy=dataclasses.replace(setup.policy, name=pol, kwargs={}))
    egress_Gbps = float(df.egress_Gbps.iloc[0]) if "egress_Gbps" in df.columns else 0.0
    # Paced runs: the simulated link carries exactly what the server's pacer shares out.
    net = egress_Gbps / setup.network.efficiency if egress_Gbps > 0 else float(df.link_Gbps.iloc[0])
    su = dataclasses.replace(su, net_Gbps=net)
    if closed:  # one request at a time: simulate each alone
        out = {}
        for q in reqs:
            (rec,), _ = simulate([q], su, "validation", "", 0)
            out[q.request_id] = rec.ttft_s
        return pd.Series(out)
    recs, _ = simulate(reqs, su, "validation", "", 0, concurrency=len(reqs))
    return pd.Series({r.request_id: r.ttft_s for r in recs})


def add_sim(setup: Setup, df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["sim_ttft_s"] = np.nan
    for _, g in df.groupby(["experiment", "policy", "concurrency", "note"], sort=False):
        s = simulate_batch(setup, g)
        df.loc[g.index, "sim_ttft_s"] = g.request_id.map(s).to_numpy()
    df["rel_err"] = (df.sim_ttft_s - df.ttft_s) / df.ttft_s
    return df


def ideal_ttft_s(setup: Setup, cached: int, new: int) -> float:
    """Infinite-bandwidth TTFT (the sim's shared-bandwidth reference): overhead, all layers, the tail."""
    comp = setup_compute(setup)
    extra = overhead_time_s(comp, cached, new)
    st, net = setup.storage, setup.network
    keys = math.ceil(cached / setup.model.chunk_tokens)
    return (
        st.gather_open_s(keys)
        + st.ttfb_s
        + net.rtt_s
        + setup.spec.num_layers * comp.layer_time_s(cached, new)
        + extra
    )
