"""Workloads: prompts as chains of prefix blocks, with arrival times.

A prompt is described the way the public Mooncake trace describes it: ``input_length`` tokens cut into
blocks of ``block_tokens`` (512 in Mooncake), each full block named by a ``hash_id`` that identifies the
*whole prefix* up to it (two prompts share block ``i`` only if they share everything before it, like our
chained chunk keys).  The tier manager caches blocks; a request's reusable prefix is its longest run of
leading blocks found in a tier.

Sources:

* ``load_mooncake(path)``: the Mooncake trace format, one JSON object a line with ``timestamp`` (ms),
  ``input_length``, ``output_length`` and ``hash_ids``.
* ``synthetic(cfg, rng)``: a shared-prefix generator -- a few popular system prompts (Zipf popularity), multi-
  turn chat sessions that grow their own context turn by turn, and agentic sessions that append tool output
  step after step.  Sessions start as a Poisson process (``arrival: poisson``) or are run back to back by a
  fixed set of clients (``arrival: closed``; think time between turns in both cases).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim.config import WorkloadConfig


@dataclass
class TraceRequest:
    request_id: str
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: list[int]
    client: int | None = None  # closed loop: requests of one client run back to back
    think_s: float = 0.0
    kind: str = ""
    meta: dict = field(default_factory=dict)


def load_mooncake(path: str | Path, time_scale: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """Read a Mooncake-format JSONL trace (``timestamp`` in milliseconds)."""
    out: list[TraceRequest] = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                req = TraceRequest(
                    request_id=f"t{len(out)}",
                    arrival_s=float(row["timestamp"]) / 1e3 * time_scale,
                    input_length=int(row["input_length"]),
                    output_length=int(row.get("output_length", 0)),
                    hash_ids=[int(h) for h in row.get("hash_ids", [])],
                    kind="trace",
                )
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace line: {exc}") from None
            out.append(req)
            if limit is not None and len(out) >= limit:
                break
    out.sort(key=lambda r: (r.arrival_s, r.request_id))
    return out


def write_mooncake(requests: list[TraceRequest], path: str | Path) -> None:
    with open(path, "w") as fh:
        for r in requests:
            row = {
                "timestamp": round(r.arrival_s * 1e3, 3),
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": r.hash_ids,
            }
            fh.write(json.dumps(row) + "\n")


class _BlockIds:
    """Allocates fresh block hash ids; a prefix's ids are a chain, so extending a context appends ids."""

    def __init__(self) -> None:
        self.next_id = 0

    def fresh(self, n: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids


def _blocks(tokens: int, block_tokens: int) -> int:
    return -(-tokens // block_tokens)


def synthetic(cfg: WorkloadConfig, rng: np.random.Generator) -> list[TraceRequest]:
    """Shared-prefix sessions; ``cfg.num_requests`` requests in total, sorted by arrival."""
    bt = cfg.block_tokens
    ids = _BlockIds()
    # System prompts are whole blocks so sessions that share one share its blocks exactly.
    sys_blocks = max(1, cfg.system_prompt_tokens // bt)
    prompts = [ids.fresh(sys_blocks) for _ in range(max(1, cfg.system_prompts))]
    popularity = 1.0 / np.arange(1, len(prompts) + 1)
    popularity /= popularity.sum()

    sessions: list[list[TraceRequest]] = []
    n_total = 0
    s_idx = 0
    while n_total < cfg.num_requests:
        agentic = rng.random() < cfg.agentic_fraction
        p = int(rng.choice(len(prompts), p=popularity))
        context_blocks = list(prompts[p])
        steps = cfg.agent_steps if agentic else cfg.turns
        step_tokens = cfg.tool_tokens if agentic else cfg.user_tokens + cfg.answer_tokens
        session: list[TraceRequest] = []
        for t in range(steps):
            if n_total >= cfg.num_requests:
                break
            # Each turn appends the previous answer and the new user message (or the tool output) to the
            # context; the new tail is fresh blocks, everything before it is this session's own prefix.
            context_blocks = context_blocks + ids.fresh(_blocks(step_tokens, bt))
            input_len = len(context_blocks) * bt
            think = 0.0 if t == 0 else float(rng.exponential(cfg.think_s * (0.2 if agentic else 1.0)))
            session.append(
                TraceRequest(
                    request_id=f"s{s_idx}.{t}",
                    arrival_s=0.0,
                    input_length=input_len,
                    output_length=cfg.output_tokens,
                    hash_ids=list(context_blocks),
                    think_s=think,
                    kind="agent" if agentic else "chat",
                    meta={"system_prompt": p},
                )
            )
            n_total += 1
        sessions.append(session)
        s_idx += 1

    if cfg.arrival == "poisson":
        start = 0.0
        for session in sessions:
            start += float(rng.exponential(1.0 / cfg.rate_per_s)) * len(session)
            t = start
            for r in session:
                t += r.think_s
                r.arrival_s = t
    elif cfg.arrival == "closed":
        for i, session in enumerate(sessions):
            for r in session:
                r.client = i % max(1, cfg.clients)
    else:
        raise ValueError(f"unknown arrival process {cfg.arrival!r}: poisson or closed")
    out = [r for s in sessions for r in s]
    out.sort(key=lambda r: (r.arrival_s, r.client if r.client is not None else -1, r.request_id))
    return out


def make_workload(cfg: WorkloadConfig, rng: np.random.Generator) -> list[TraceRequest]:
    if cfg.kind == "trace":
        if not cfg.trace_path:
            raise ValueError("workload.kind=trace needs workload.trace_path")
        return load_mooncake(cfg.trace_path, cfg.time_scale, cfg.num_requests or None)
    if cfg.kind == "synthetic":
        return synthetic(cfg, rng)
    raise ValueError(f"unknown workload kind {cfg.kind!r}: synthetic or trace")
