"""Run a list of requests through one simulated node and turn the outcomes into ``RequestRecord`` rows.

A *setup* (``sim.setup.Setup``) fixes the hardware and software (model, compute model, links, object
server, policy); a list of
``SimRequest`` fixes the load (arrival, cached and new tokens, storage path).  ``simulate`` runs them in one
SimPy environment (they share the links and the server's slots) and returns one ``RequestRecord`` per
request, with ``baseline_ttft_s`` = the same request alone on local DRAM layerwise, so ``added_ttft_s`` is the
TTFT the path and the contention add over the best local baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from scheduler.policies import get_policy
from scheduler.records import RequestRecord
from sim.network import FluidNetwork
from sim.paths import Node, serve
from sim.setup import Setup, dram_layerwise_ttft_s, setup_compute


@dataclass
class SimRequest:
    request_id: str
    arrival_s: float
    cached_tokens: int
    new_tokens: int
    path: str = "gather"
    tier: str = "object"
    dram_first_layers: int = 0
    prefetch_lead_s: float = 0.0  # fetch starts this long before the GPU is free (prefetch at admission)
    client: int | None = None  # closed loop: a client's requests run back to back, ``think_s`` apart
    think_s: float = 0.0
    fetch_tokens: int | None = None  # KV tokens the path moves (default: cached_tokens)

    @property
    def context_tokens(self) -> int:
        return self.cached_tokens + self.new_tokens


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts scheduled events (for the events-per-second benchmark)."""

    def __init__(self, initial_time: float = 0.0):
        super().__init__(initial_time)
        self.events_scheduled = 0

    def schedule(self, event, priority=1, delay=0):
        self.events_scheduled += 1
        super().schedule(event, priority, delay)


@dataclass
class SimStats:
    sim_end_s: float = 0.0
    timer_events: int = 0
    stale_timers: int = 0
    policy_calls: int = 0
    single_flow_skips: int = 0
    simpy_events: int = 0
    utilisation: dict = field(default_factory=dict)


def simulate(
    requests: list[SimRequest],
    setup: Setup,
    experiment: str,
    config_hash: str,
    seed: int,
    concurrency: int | None = None,
    note: str = "",
) -> tuple[list[RequestRecord], SimStats]:
    env = CountingEnvironment()
    policy = get_policy(setup.policy.name, **dict(setup.policy.kwargs))
    network = FluidNetwork(env, setup.links(), policy)
    node = Node(
        env=env,
        network=network,
        server=simpy.Resource(env, capacity=max(1, setup.storage.server_concurrency)),
        model=setup.spec,
        compute=setup_compute(setup),
        storage=setup.storage,
        net=setup.network,
        chunk_tokens=setup.model.chunk_tokens,
    )
    outcomes: dict[str, object] = {}

    def client(req: SimRequest):
        if req.arrival_s > env.now:
            yield env.timeout(req.arrival_s - env.now)
        gpu_free = env.now + req.prefetch_lead_s if req.prefetch_lead_s > 0 else None
        out = yield env.process(
            serve(
                node,
                req.request_id,
                req.path,
                req.cached_tokens,
                req.new_tokens,
                req.dram_first_layers,
                gpu_free,
                req.fetch_tokens,
            )  # fmt: skip
        )
        outcomes[req.request_id] = out

    def closed_loop(reqs: list[SimRequest]):
        for req in reqs:
            yield env.timeout(req.think_s)
            req.arrival_s = env.now
            yield env.process(client(req))

    by_client: dict[int, list[SimRequest]] = {}
    for req in requests:
        if req.client is None:
            env.process(client(req))
        else:
            by_client.setdefault(req.client, []).append(req)
    for cid in sorted(by_client):
        env.process(closed_loop(by_client[cid]))
    env.run()
    n_conc = concurrency if concurrency is not None else len(requests)
    records = [
        _record(req, outcomes[req.request_id], setup, experiment, config_hash, seed, n_conc, note)
        for req in requests
    ]
    stats = SimStats(
        sim_end_s=env.now,
        timer_events=network.timer_events,
        stale_timers=network.stale_timers,
        policy_calls=network.policy_calls,
        single_flow_skips=network.single_flow_skips,
        # Timer firings the network ran without SimPy's queue count as the events they replace.
        simpy_events=env.events_scheduled + network.inlined_timers,
        utilisation=network.utilisation(env.now),
    )
    return records, stats


def _record(
    req: SimRequest,
    out,
    setup: Setup,
    experiment: str,
    config_hash: str,
    seed: int,
    concurrency: int,
    note: str,
) -> RequestRecord:
    """The results row of one simulated request (``out``: its ``PathOutcome``)."""
    lead = req.prefetch_lead_s
    return RequestRecord(
        experiment=experiment,
        source="sim",
        config_hash=config_hash,
        seed=seed,
        request_id=req.request_id,
        model=setup.model.name,
        context_tokens=req.context_tokens,
        cached_tokens=req.cached_tokens if req.path != "recompute" else 0,
        new_tokens=req.new_tokens if req.path != "recompute" else req.context_tokens,
        path=req.path,
        policy=setup.policy.name,
        link_Gbps=setup.link_Gbps,
        concurrency=concurrency,
        arrival_s=req.arrival_s + lead,
        # With prefetch the TTFT counts from when the GPU is free (admission is ``lead`` earlier).
        ttft_s=out.ttft_s - lead,
        first_layer_wait_s=out.first_layer_wait_s,
        stall_s=out.stall_s,
        bytes_fetched=int(out.bytes_fetched),
        compute_s=out.compute_s,
        tier=req.tier if req.path != "recompute" else "none",
        baseline_ttft_s=dram_layerwise_ttft_s(setup, req.cached_tokens, req.new_tokens),
        note=note,
    )
