"""The requests of a testbed run: prompts as block ids, how much of each is cached, when each arrives.

Every builder draws from the simulator's own definitions (``sim.draws``, ``sim.workloads``), so a testbed
run issues the load the simulator models.  A prompt is a list of block ids of ``block_tokens`` tokens each
(``testbed.harness.plan.block_token_ids``); requests that share leading blocks share chunk objects.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from sim.config import WorkloadConfig
from sim.draws import draw_mixed
from sim.workloads import make_workload

BLOCK_TOKENS = 256  # prompt blocks of the sweep experiments (one chunk each)


@dataclass
class Req:
    """One request of a run: the prompt (block ids of ``block_tokens`` tokens) and how much of it is cached.
    ``arrival_s`` is the offset from the run's start (s); ``client`` set: closed loop, ``think_s`` apart."""

    request_id: str
    arrival_s: float
    cached_tokens: int
    new_tokens: int
    block_ids: list[int]
    client: int | None = None
    think_s: float = 0.0


_prompt_ids = itertools.count(1, 1 << 20)


def fresh_prompt(tokens: int, block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """Block ids of a prompt no other request shares (its own block-id range)."""
    base = next(_prompt_ids)
    return list(range(base, base + -(-tokens // block_tokens)))


def sweep_requests(prefix_tokens, new_tokens, repeats: int = 1, gap_s: float = 0.05) -> list[Req]:
    """One closed-loop client: every (cached, new) pair in turn, ``gap_s`` apart (no overlap)."""
    reqs = []
    for rep in range(int(repeats)):
        for c in prefix_tokens:
            for n in new_tokens:
                blocks = fresh_prompt(int(c) + int(n))
                reqs.append(
                    Req(f"sweep-{c}+{n}-r{rep}", 0.0, int(c), int(n), blocks, client=0, think_s=gap_s)
                )
    return reqs


def mixed_requests(rng: np.random.Generator, n: int, p: dict, tag: str) -> list[Req]:
    """The simulator's shared-bandwidth draw (``sim.draws.draw_mixed``) as testbed requests."""
    return [
        Req(
            f"{tag}-{i}",
            d.arrival_s,
            d.cached_tokens,
            d.new_tokens,
            fresh_prompt(d.cached_tokens + d.new_tokens),
        )
        for i, d in enumerate(draw_mixed(rng, n, p))
    ]


def workload_requests(
    chunk_tokens: int, wl: WorkloadConfig, rng: np.random.Generator, limit: int | None = None
) -> list[Req]:
    """The simulator's workload (synthetic or trace) with object-tier hits from earlier requests' blocks: a
    request's cached prefix is its longest run of leading blocks seen before, in whole chunks of
    ``chunk_tokens``, leaving at least one new token."""
    trace = make_workload(wl, rng)
    if limit:
        trace = trace[: int(limit)]
    bt = int(wl.block_tokens)
    seen: set[tuple[int, ...]] = set()
    out = []
    for r in trace:
        hit = 0
        for i in range(len(r.hash_ids)):
            if tuple(r.hash_ids[: i + 1]) in seen:
                hit = i + 1
            else:
                break
        for i in range(len(r.hash_ids)):
            seen.add(tuple(r.hash_ids[: i + 1]))
        total = min(int(r.input_length), len(r.hash_ids) * bt)
        cached = min(hit * bt, total - 1) // chunk_tokens * chunk_tokens
        out.append(
            Req(
                r.request_id,
                float(r.arrival_s),
                cached,
                total - cached,
                list(r.hash_ids),
                r.client,
                r.think_s,
            )
        )
    return out
