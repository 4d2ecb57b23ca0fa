"""Fetch-vs-recompute planning: how much cached prefix to fetch, from which tier, and what to recompute.

A request of ``context_tokens`` tokens finds its prefix cached in the tiers: ``cached_tokens[tier]`` leading
tokens reachable from ``tier`` or a faster one (``TierManager.longest_prefix`` times the chunk size), so
``hbm <= dram <= object``.  Fetching a prefix of ``p`` tokens means: tokens ``[0, hbm)`` are already on the
GPU, ``[hbm, min(p, dram))`` stream from DRAM over PCIe, ``[dram, p)`` stream from the object tier; the other
``context_tokens - p`` tokens are recomputed (prefilled) on top of the fetched prefix.

Predicted TTFT of a plan (layerwise retrieval of one request on uncontended links, the fluid model's
single-request case): every used tier first costs its overhead (control round trip, time to first byte);
then layer ``l``'s KV arrives after ``(l + 1) * tau`` where ``tau = max_tier(bytes_per_layer_tier /
bandwidth_tier)`` (tiers stream in parallel), layer compute takes ``c = layer_time_s(p, new)``, and the
non-layer part of the prefill (embedding, LM head) ``e`` follows the last layer:

    ttft(p) = delay + L c + e + max(tau, L tau - (L - 1) c)        (``scheduler.fluid`` derives it)

with ``delay`` the largest overhead among used tiers.  Recomputing everything is ``p = 0``:
``prefill_time_s(0, context_tokens)``.  The planner evaluates every chunk boundary up to the cached prefix
(cheap: one compute-model call each) and picks the fastest, so its prediction is never worse than
recomputing, however slow or congested the object tier is: if fetching does not pay, it does not fetch.
At least one token is always recomputed (the last prompt token's logits give the first output token).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.geometry import DEFAULT_CHUNK_TOKENS
from scheduler.tiers import TIERS

# Tiers that move bytes (HBM-resident KV needs no transfer).
TRANSFER_TIERS = ("dram", "object")


class LayerTimeModel(Protocol):
    """What the planner needs from a compute model (``scheduler.compute.ComputeModel`` fits)."""

    def layer_time_s(self, cached_tokens: int, new_tokens: int) -> float: ...


class KVGeometry(Protocol):
    """What the planner needs from a model's geometry (``scheduler.geometry.ModelSpec`` fits): the layer
    count and the KV bytes of ``tokens`` tokens over ``layers`` layers."""

    num_layers: int

    def kv_bytes(self, tokens: int, layers: int | None = None) -> int: ...


@dataclass(frozen=True)
class Plan:
    """The chosen plan and what each option was predicted to cost.

    ``hbm_tokens``/``dram_tokens``/``object_tokens``: prefix tokens taken from each tier (they add up to
    ``fetch_tokens``); ``recompute_tokens``: tokens prefilled.  ``predicted_ttft_s``: of the chosen plan.
    ``recompute_ttft_s``: recomputing everything.  ``options_s``: named options (``recompute``,
    ``hbm_only``, ``up_to_dram``, ``all_cached``, ``best``) to their predicted TTFT.
    """

    context_tokens: int
    hbm_tokens: int
    dram_tokens: int
    object_tokens: int
    recompute_tokens: int
    predicted_ttft_s: float
    recompute_ttft_s: float
    options_s: dict[str, float] = field(default_factory=dict)

    @property
    def fetch_tokens(self) -> int:
        return self.hbm_tokens + self.dram_tokens + self.object_tokens

    @property
    def source(self) -> str:
        """Slowest tier the plan fetches from, or ``none`` (recompute only)."""
        for name, n in (("object", self.object_tokens), ("dram", self.dram_tokens), ("hbm", self.hbm_tokens)):
            if n:
                return name
        return "none"


def _split(prefix_tokens: int, cached: Mapping[str, int]) -> dict[str, int]:
    """Tokens of a ``prefix_tokens`` prefix served by each tier (fastest tier that reaches each token)."""
    out, lo = {}, 0
    for name in TIERS:
        hi = min(prefix_tokens, max(lo, cached.get(name, 0)))
        out[name] = hi - lo
        lo = hi
    return out


def _ttft_s(
    prefix_tokens: int,
    dram_tokens: int,
    object_tokens: int,
    L: int,
    c: float,
    extra_s: float,
    model: KVGeometry,
    bandwidth_Bps: Mapping[str, float],
    overhead_s: Mapping[str, float],
) -> float:
    """The module doc's formula for a prefix whose transfer tiers carry ``dram_tokens`` / ``object_tokens``
    (``c``: per-layer compute, ``extra_s``: the non-layer tail).  ``predict_ttft_s`` and ``plan_fetch``'s
    scan both end here, so they agree bit for bit."""
    tau = 0.0
    delay = 0.0
    for name, tokens in (("dram", dram_tokens), ("object", object_tokens)):  # TRANSFER_TIERS
        if tokens > 0:
            bw = bandwidth_Bps.get(name, 0.0)
            if bw <= 0:
                return float("inf")
            tau = max(tau, model.kv_bytes(tokens, layers=1) / bw)
            delay = max(delay, overhead_s.get(name, 0.0))
    if prefix_tokens == 0:
        delay = 0.0
    return delay + L * c + extra_s + max(tau, L * tau - (L - 1) * c)


def predict_ttft_s(
    prefix_tokens: int,
    context_tokens: int,
    cached_tokens: Mapping[str, int],
    model: KVGeometry,
    compute: LayerTimeModel,
    bandwidth_Bps: Mapping[str, float],
    overhead_s: Mapping[str, float],
    extra_compute_s: float | None = None,
) -> float:
    """Predicted TTFT of fetching a ``prefix_tokens`` prefix and recomputing the rest (see module doc).

    ``extra_compute_s=None`` takes the non-layer work from the compute model's ``overhead_time_s`` when it
    has one (``scheduler.compute`` models do), else 0.
    """
    new = context_tokens - prefix_tokens
    if new < 1:
        raise ValueError("at least one token must be recomputed")
    c = compute.layer_time_s(prefix_tokens, new)
    if extra_compute_s is None:
        overhead_fn = getattr(compute, "overhead_time_s", None)
        extra_compute_s = float(overhead_fn(prefix_tokens, new)) if overhead_fn is not None else 0.0
    split = _split(prefix_tokens, cached_tokens)
    if sum(split.values()) != prefix_tokens:
        raise ValueError(f"prefix of {prefix_tokens} tokens is not cached (cached: {dict(cached_tokens)})")
    return _ttft_s(
        prefix_tokens, split["dram"], split["object"], model.num_layers, c, extra_compute_s, model,
        bandwidth_Bps, overhead_s,
    )  # fmt: skip


def plan_fetch(
    context_tokens: int,
    cached_tokens: Mapping[str, int],
    model: KVGeometry,
    compute: LayerTimeModel,
    bandwidth_Bps: Mapping[str, float],
    overhead_s: Mapping[str, float] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    extra_compute_s: float | None = None,
) -> Plan:
    """Choose the fastest prefix to fetch (a whole number of chunks) and recompute the rest.

    ``cached_tokens``: per tier, leading tokens reachable from that tier or a faster one (missing tiers
    count as 0; values are clipped to be non-decreasing in tier order).  ``bandwidth_Bps``: expected
    bandwidth per transfer tier (``dram``, ``object``) -- pass the congested share, not the line rate, when
    known.  ``overhead_s``: per-tier time before the first byte.  ``extra_compute_s``: non-layer prefill
    work (embedding, LM head); ``None`` asks the compute model's ``overhead_time_s`` if it has one.
    """
    if context_tokens < 1:
        raise ValueError("context_tokens must be >= 1")
    overhead_s = overhead_s or {}
    cached: dict[str, int] = {}
    running = 0
    for name in TIERS:
        running = max(running, min(context_tokens, int(cached_tokens.get(name, 0))))
        cached[name] = running
    # Whole chunks only, and at least one token left to compute.
    max_prefix = min(cached["object"], ((context_tokens - 1) // chunk_tokens) * chunk_tokens)
    max_prefix -= max_prefix % chunk_tokens

    # ``predict_ttft_s`` for every chunk boundary, without re-validating and re-splitting the cached
    # prefix each time (a trace replay scores hundreds of thousands of boundaries): ``cached`` is
    # non-decreasing, so a prefix of ``p`` tokens takes ``min(p, cached[t])`` from tier ``t`` or faster.
    L = model.num_layers
    layer_time_s = compute.layer_time_s
    overhead_fn = getattr(compute, "overhead_time_s", None) if extra_compute_s is None else None
    c_hbm, c_dram, c_obj = cached["hbm"], cached["dram"], cached["object"]

    def ttft(p: int) -> float:
        new = context_tokens - p
        if extra_compute_s is not None:
            extra = extra_compute_s
        else:
            extra = float(overhead_fn(p, new)) if overhead_fn is not None else 0.0
        upto_hbm, upto_dram = min(p, c_hbm), min(p, c_dram)
        return _ttft_s(
            p, upto_dram - upto_hbm, min(p, c_obj) - upto_dram, L, layer_time_s(p, new), extra, model,
            bandwidth_Bps, overhead_s,
        )  # fmt: skip

    candidates = range(0, max_prefix + 1, chunk_tokens)
    scored = [(ttft(p), p) for p in candidates]
    # Fastest; among equals, the shortest prefix (fewer bytes on shared links).
    best_s, best_p = min(scored, key=lambda t: (t[0], t[1]))
    recompute_s = scored[0][0]

    def at_most(limit: int) -> float:
        p = min(max_prefix, limit - limit % chunk_tokens)
        return ttft(p)

    split = _split(best_p, cached)
    options = {
        "recompute": recompute_s,
        "hbm_only": at_most(cached["hbm"]),
        "up_to_dram": at_most(cached["dram"]),
        "all_cached": at_most(cached["object"]),
        "best": best_s,
    }
    return Plan(
        context_tokens=context_tokens,
        hbm_tokens=split["hbm"],
        dram_tokens=split["dram"],
        object_tokens=split["object"],
        recompute_tokens=context_tokens - best_p,
        predicted_ttft_s=best_s,
        recompute_ttft_s=recompute_s,
        options_s=options,
    )
