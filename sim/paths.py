"""Storage paths: how one request's cached-prefix KV reaches the GPU, as SimPy processes.

Every path is a first-class option (``PATHS``):

``recompute``       no cache: prefill the whole context.
``dram``            local DRAM, non-layerwise: copy the whole prefix over PCIe, then prefill the new tokens.
``dram_layerwise``  local DRAM, layerwise (the "optimal local layerwise" baseline): layer l's copy
                    overlaps layer l-1's compute.
``s3_whole``        plain S3: one GET per chunk object (all layers), prefill after the last byte.
``s3_ranged``       plain S3: one ranged GET per (chunk, layer) slice, issued layer-major; layer l is
                    computed once all its slices are in.
``gather``          ObjectCache: one control round trip, then one layer-major stream.

Costs.  Every S3 request (GET, ranged GET, the gather's control request) takes one of the server's
``server_concurrency`` slots, pays ``request_overhead_s + ttfb_s`` plus one network RTT, then moves its bytes
as a fluid flow over ``server`` (the server's throughput cap), ``net`` (the storage network at its fitted
goodput, shared by all requests of the node) and ``pcie`` (host to GPU).  A client keeps at most
``client_concurrency`` GETs of one request in flight.  DRAM paths cross ``pcie`` only.  Layerwise paths use
the scheduler core's fluid model for byte movement *and* layer compute (``scheduler.fluid``); the GET paths
track their layer readiness here.

Each process returns a ``PathOutcome``: TTFT from ``arrival_s``, the wait for the first layer's KV, GPU stall
between layers, bytes fetched and GPU compute time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import simpy

from scheduler.fluid import FlowState, RequestSpec
from scheduler.geometry import ModelSpec
from scheduler.layerwise import layer_times
from sim.config import NetworkConfig, StorageConfig
from sim.network import FluidNetwork

PATHS = ("recompute", "dram", "dram_layerwise", "s3_whole", "s3_ranged", "gather")
OBJECT_PATHS = ("s3_whole", "s3_ranged", "gather")
OBJECT_LINKS = ("server", "net", "pcie")
DRAM_LINKS = ("pcie",)


@dataclass(frozen=True)
class PathOutcome:
    ttft_s: float
    first_layer_wait_s: float
    stall_s: float
    bytes_fetched: int
    compute_s: float


@dataclass
class Node:
    """What the path processes share: the SimPy clock, the links, the object server's slots, the models."""

    env: simpy.Environment
    network: FluidNetwork
    server: simpy.Resource
    model: ModelSpec
    compute: object  # scheduler.compute.ComputeModel
    storage: StorageConfig
    net: NetworkConfig
    chunk_tokens: int = 256

    def overhead_s(self, cached_tokens: int, new_tokens: int) -> float:
        f = getattr(self.compute, "overhead_time_s", None)
        return f(cached_tokens, new_tokens) if f is not None else 0.0


def _request_cost_s(node: Node) -> float:
    return node.storage.request_overhead_s + node.storage.ttfb_s + node.net.rtt_s


def _get(node: Node, flow_id, nbytes: float, window: simpy.Resource):
    """One S3 GET: a client window slot, a server slot, the per-request cost, then the bytes."""
    with window.request() as w:
        yield w
        with node.server.request() as slot:
            yield slot
            yield node.env.timeout(_request_cost_s(node))
            spec = RequestSpec(flow_id, node.env.now, float(nbytes), 1, 0.0, OBJECT_LINKS)
            _, done = node.network.add(spec)
            yield done


def _layerwise_outcome(st: FlowState, arrival_s: float, fetched: int, compute_s: float) -> PathOutcome:
    first = st.first_layer_s if not math.isnan(st.first_layer_s) else st.spec.start_s
    return PathOutcome(st.done_s - arrival_s, first - arrival_s, st.stall_s, fetched, compute_s)


def _run_gpu(ready_s: list[float], start_s: float, layer_s: float) -> tuple[float, float]:
    """The shared GPU recurrence (``scheduler.layerwise.layer_times``) over layer arrivals ``ready_s`` with
    the GPU free from ``start_s``: (end of the last layer, stall after layer 0), in seconds."""
    busy = start_s
    stall = 0.0
    for i, (begin, end) in enumerate(layer_times(ready_s, layer_s, start_s)):
        if i:
            stall += begin - busy
        busy = end
    return busy, stall


def _gather(
    node: Node,
    request_id,
    cached_tokens: int,
    arrival: float,
    layer_bytes: float,
    c: float,
    extra: float,
    dram_first_layers: int,
    gpu_free_s: float | None,
):
    """The ``gather`` path of ``serve`` (a SimPy sub-process): the first ``dram_first_layers`` layers from
    DRAM, the rest gathered layer-major from the object tier; ``c`` and ``extra`` are the per-layer compute and
    the non-layer tail (s), ``layer_bytes`` the KV bytes of one layer."""
    env = node.env
    L = node.model.num_layers
    total_bytes = layer_bytes * L
    compute_s = L * c + extra
    k = max(0, min(int(dram_first_layers), L))
    remote_layers = L - k
    gpu_start = arrival if gpu_free_s is None else max(arrival, gpu_free_s)
    if k:
        # The DRAM layers: layerwise PCIe copies back to back, each layer computing once its copy is in.
        dram_layer_s = layer_bytes / node.network.links["pcie"].capacity_Bps
        copies_s = (gpu_start + (i + 1) * dram_layer_s for i in range(k))
        dram_layers = list(layer_times(copies_s, c, gpu_start))
        local_first = dram_layers[0][0]
        gpu_busy = dram_layers[-1][1]
    else:
        local_first = math.nan
        gpu_busy = gpu_start
    if remote_layers == 0:
        yield env.timeout(max(0.0, gpu_busy + extra - env.now))
        return PathOutcome(env.now - arrival, local_first - arrival, 0.0, total_bytes, compute_s)
    with node.server.request() as slot:
        yield slot
        n_keys = math.ceil(cached_tokens / node.chunk_tokens)
        yield env.timeout(node.storage.gather_open_s(n_keys))
    spec = RequestSpec(
        request_id,
        env.now,
        float(layer_bytes),
        remote_layers,
        c,
        OBJECT_LINKS,
        node.storage.ttfb_s + node.net.rtt_s,
        extra,
        node.storage.gather_max_rate_Bps(layer_bytes, n_keys),
    )
    st = FlowState(spec=spec)
    if k or gpu_free_s is not None:
        # The GPU is busy with the DRAM layers (or another request) until gpu_busy: the fluid model
        # starts the first remote layer no earlier, and counts it as computed-after-k for stalls.
        st.gpu_busy_until_s = gpu_busy
    st, done = node.network.add(spec, st)
    yield done
    yield env.timeout(max(0.0, st.done_s - env.now))
    out = _layerwise_outcome(st, arrival, total_bytes, compute_s)
    if k:
        # Stall before the first remote layer (GPU idle after the DRAM layers) is stall, not first-wait.
        first_remote = st.first_layer_s
        extra_stall = max(0.0, first_remote - gpu_busy)
        return PathOutcome(
            out.ttft_s, local_first - arrival, out.stall_s + extra_stall, total_bytes, compute_s
        )
    if gpu_free_s is not None:
        return PathOutcome(
            out.ttft_s, max(0.0, st.first_layer_s - gpu_start), out.stall_s, total_bytes, compute_s
        )
    return out


def serve(
    node: Node,
    request_id,
    path: str,
    cached_tokens: int,
    new_tokens: int,
    dram_first_layers: int = 0,
    gpu_free_s: float | None = None,
    fetch_tokens: int | None = None,
):
    """SimPy process: serve one request over ``path``; returns a ``PathOutcome``.

    ``dram_first_layers`` (gather only): the first k layers of the prefix come from local DRAM, the rest
    from the object tier, so the object tier's first byte hides behind k layers of compute.
    ``gpu_free_s`` (gather only): the GPU is busy until then (the request was admitted early and its
    fetch started at admission: prefetch).  ``fetch_tokens``: tokens whose KV this path moves, when fewer
    than ``cached_tokens`` (the rest is already in HBM or comes from a faster tier in parallel); path
    ``hbm``: the whole prefix is already on the GPU, nothing moves.

    One SimPy process per request: each storage path is a few yields of the same generator, kept together so
    the paths read side by side.
    """
    env = node.env
    arrival = env.now
    m = node.model
    L = m.num_layers
    c = node.compute.layer_time_s(cached_tokens, new_tokens)
    extra = node.overhead_s(cached_tokens, new_tokens)
    layer_bytes = m.kv_bytes_per_token_layer * (cached_tokens if fetch_tokens is None else fetch_tokens)
    total_bytes = layer_bytes * L
    compute_s = L * c + extra

    if path == "hbm":
        yield env.timeout(compute_s)
        return PathOutcome(compute_s, 0.0, 0.0, 0, compute_s)

    if path == "recompute" or (cached_tokens <= 0 and path != "gather"):
        full = node.compute.prefill_time_s(0, cached_tokens + new_tokens)
        yield env.timeout(full)
        return PathOutcome(full, 0.0, 0.0, 0, full)

    if path == "dram":
        spec = RequestSpec((request_id, "dram"), arrival, float(total_bytes), 1, 0.0, DRAM_LINKS)
        _, done = node.network.add(spec)
        yield done
        wait = env.now - arrival
        yield env.timeout(compute_s)
        return PathOutcome(wait + compute_s, wait, 0.0, total_bytes, compute_s)

    if path == "dram_layerwise":
        spec = RequestSpec(request_id, arrival, float(layer_bytes), L, c, DRAM_LINKS, 0.0, extra)
        st, done = node.network.add(spec)
        yield done
        yield env.timeout(max(0.0, st.done_s - env.now))
        return _layerwise_outcome(st, arrival, total_bytes, compute_s)

    if path == "gather":
        return (
            yield from _gather(
                node, request_id, cached_tokens, arrival, layer_bytes, c, extra, dram_first_layers, gpu_free_s
            )
        )

    n_chunks = max(1, math.ceil(cached_tokens / node.chunk_tokens))
    window = simpy.Resource(env, capacity=max(1, node.storage.client_concurrency))

    if path == "s3_whole":
        per_chunk = total_bytes / n_chunks
        gets = [env.process(_get(node, (request_id, "c", i), per_chunk, window)) for i in range(n_chunks)]
        yield simpy.AllOf(env, gets)
        wait = env.now - arrival
        yield env.timeout(compute_s)
        return PathOutcome(wait + compute_s, wait, 0.0, total_bytes, compute_s)

    if path == "s3_ranged":
        per_slice = layer_bytes / n_chunks
        ready = [0.0] * L
        layer_procs = []
        for layer in range(L):
            gets = [
                env.process(_get(node, (request_id, layer, i), per_slice, window)) for i in range(n_chunks)
            ]
            layer_procs.append(simpy.AllOf(env, gets))
        for layer, ev in enumerate(layer_procs):
            yield ev
            ready[layer] = env.now
        end, stall = _run_gpu(ready, ready[0], c)
        yield env.timeout(max(0.0, end + extra - env.now))
        return PathOutcome(env.now - arrival, ready[0] - arrival, stall, total_bytes, compute_s)

    raise ValueError(f"unknown storage path {path!r}; known: {PATHS}")
