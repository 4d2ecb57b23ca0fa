"""Fetch or recompute: how much of a cached prefix a prefill loads, and from which tier, decided by the
scheduler core (``scheduler.planner.plan_fetch``, the same planner the simulator runs).

Loading a cached prefix is not always faster than recomputing it: over a starved or congested link the
prefix's bytes arrive later than the GPU could have recomputed them.  ``decide_fetch`` asks the planner,
given

* how many leading prompt tokens each tier can serve (whole chunks),
* a compute model (``LayerTimeModel``: ``layer_time_s(cached_tokens, new_tokens)``, e.g. a measured
  profile table ``scheduler.compute.ProfileCompute`` or ``testbed.engine.profile.as_compute``),
* the KV geometry (layers, KV bytes per token per layer) and
* the rate (bytes/s) and time to first byte (s) the caller expects from each tier's link,

and returns a ``FetchDecision``: prefix tokens to load from DRAM and from the object tier, tokens to
recompute, and the predicted TTFTs.  The interface is plain (ints, floats, a ``LayerTimeModel``) so that any
engine can call it: ``testbed.engine.prefill.PrefillEngine`` does, with the rate its KV source observes or
was configured with (``KVSource.expected_Bps``); a vLLM KV connector can do the same from its own lookups.

A tier whose expected rate is unknown (``None``) cannot be predicted: then the whole cached prefix is taken
(the behaviour without a planner) and ``FetchDecision.planned`` is False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.geometry import DEFAULT_CHUNK_TOKENS
from scheduler.planner import LayerTimeModel, plan_fetch


@dataclass(frozen=True)
class KVShape:
    """The KV geometry the planner needs: ``num_layers`` and ``kv_bytes_per_token_layer`` (K and V of one
    token in one layer, bytes).  ``scheduler.geometry.ModelSpec`` has the same two; this one is built from
    plain ints."""

    num_layers: int
    kv_bytes_per_token_layer: int

    def kv_bytes(self, tokens: int, layers: int | None = None) -> int:
        """KV bytes of ``tokens`` tokens over ``layers`` layers (all by default)."""
        layers = self.num_layers if layers is None else layers
        return self.kv_bytes_per_token_layer * tokens * layers


@dataclass(frozen=True)
class FetchDecision:
    """What to do with one prompt's cached prefix.

    ``hbm_tokens`` / ``dram_tokens`` / ``object_tokens``: prefix tokens taken from each tier, in prompt order
    (GPU memory (``hbm``) first, then DRAM, then the object tier); ``recompute_tokens``: the rest, prefilled.
    ``predicted_ttft_s`` / ``recompute_ttft_s``: the planner's TTFT of this plan and of recomputing the whole
    prompt (seconds; NaN when not ``planned``).  ``planned``: False when no prediction was possible (no
    compute model, or an unknown link rate) and the whole cached prefix was taken.
    """

    prompt_tokens: int
    hbm_tokens: int
    dram_tokens: int
    object_tokens: int
    recompute_tokens: int
    predicted_ttft_s: float = math.nan
    recompute_ttft_s: float = math.nan
    planned: bool = False

    @property
    def prefix_tokens(self) -> int:
        """Leading prompt tokens whose KV is taken from a cache (the rest is recomputed)."""
        return self.hbm_tokens + self.dram_tokens + self.object_tokens

    @property
    def tier(self) -> str:
        """Slowest tier the decision loads from (``object``, ``dram``, ``hbm``) or ``none``."""
        for name, tokens in (
            ("object", self.object_tokens),
            ("dram", self.dram_tokens),
            ("hbm", self.hbm_tokens),
        ):
            if tokens:
                return name
        return "none"


def take_cached(
    prompt_tokens: int,
    *,
    hbm_cached_tokens: int = 0,
    dram_cached_tokens: int = 0,
    object_cached_tokens: int = 0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> FetchDecision:
    """The decision without a planner: every cached token (counts as in ``decide_fetch``), up to the last
    whole chunk that leaves at least one token to compute."""
    limit = ((prompt_tokens - 1) // chunk_tokens) * chunk_tokens
    hbm = min(limit, hbm_cached_tokens)
    dram = min(limit, max(hbm, dram_cached_tokens))
    obj = min(limit, max(dram, object_cached_tokens))
    return FetchDecision(prompt_tokens, hbm, dram - hbm, obj - dram, prompt_tokens - obj)


def decide_fetch(
    prompt_tokens: int,
    *,
    compute: LayerTimeModel,
    num_layers: int,
    kv_bytes_per_token_layer: int,
    hbm_cached_tokens: int = 0,
    dram_cached_tokens: int = 0,
    object_cached_tokens: int = 0,
    dram_Bps: float | None = None,
    object_Bps: float | None = None,
    dram_first_byte_s: float = 0.0,
    object_first_byte_s: float = 0.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> FetchDecision:
    """How many prefix tokens to load from which tier, and how many to recompute, for one prompt.

    ``prompt_tokens``: the whole prompt (cached prefix + new tokens).  ``*_cached_tokens``: leading prompt
    tokens reachable from that tier *or a faster one* (so ``hbm <= dram <= object``; smaller later values are
    raised to the earlier ones), whole chunks of ``chunk_tokens`` (capped to leave a token to compute).
    ``compute``: per-layer prefill time (s) for ``new_tokens`` over ``cached_tokens``; its
    ``overhead_time_s`` (embedding, LM head), when it has one, counts too.  ``dram_Bps`` / ``object_Bps``:
    expected rate of that tier's transfer to this GPU (bytes/s; the congested share when known), ``None``
    when unknown.  ``*_first_byte_s``: time before the first byte of that tier arrives (s).

    The planner evaluates every chunk boundary of the cached prefix and picks the fastest predicted TTFT
    (ties: the shorter prefix), so a prefix whose fetch is predicted slower than recomputing it is
    recomputed.  At least one token is always recomputed.
    """
    if prompt_tokens < 1:
        raise ValueError("prompt_tokens must be >= 1")
    cached = take_cached(
        prompt_tokens,
        hbm_cached_tokens=hbm_cached_tokens,
        dram_cached_tokens=dram_cached_tokens,
        object_cached_tokens=object_cached_tokens,
        chunk_tokens=chunk_tokens,
    )
    rates = {"dram": dram_Bps, "object": object_Bps}
    used = {"dram": cached.dram_tokens, "object": cached.object_tokens}
    if any(used[t] and rates[t] is None for t in used):
        return cached
    plan = plan_fetch(
        prompt_tokens,
        {
            "hbm": cached.hbm_tokens,
            "dram": cached.hbm_tokens + cached.dram_tokens,
            "object": cached.prefix_tokens,
        },
        KVShape(num_layers, kv_bytes_per_token_layer),
        compute,
        {t: float(r) for t, r in rates.items() if r is not None},
        {"dram": dram_first_byte_s, "object": object_first_byte_s},
        chunk_tokens,
    )
    return FetchDecision(
        prompt_tokens,
        plan.hbm_tokens,
        plan.dram_tokens,
        plan.object_tokens,
        plan.recompute_tokens,
        predicted_ttft_s=plan.predicted_ttft_s,
        recompute_ttft_s=plan.recompute_ttft_s,
        planned=True,
    )
