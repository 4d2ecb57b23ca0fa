"""Instances shared by the scheduler tests and the bound demo: Llama-3.1-8B request mixes, a tiny compute model."""

from __future__ import annotations

import random
from dataclasses import dataclass

from scheduler.flows import Link
from scheduler.fluid import RequestSpec
from scheduler.geometry import get_model
from scheduler.units import gbps_to_Bps

LLAMA_8B = get_model("llama-3.1-8b")

# Per-layer prefill times (ms) of Llama-3.1-8B on one H100 for (cached_tokens, new_tokens): whole-prefill
# totals / 32 from sim/profiles/llama-3.1-8b_h100.csv, copied so these tests do not depend on sim/.
LAYER_MS = {
    (4096, 128): 1.425,
    (4096, 1024): 1.466,
    (4096, 4096): 5.594,
    (16384, 128): 1.725,
    (16384, 1024): 2.378,
    (16384, 4096): 8.531,
    (32768, 128): 2.191,
    (32768, 1024): 3.688,
    (32768, 4096): 12.656,
}


def llama_mix(seed: int, n: int, gbps: float, spread_s: float, start_delay_s: float = 0.001):
    """``n`` requests of mixed cached/new token counts arriving uniformly in ``[0, spread_s]`` on one link."""
    rng = random.Random(seed)
    shapes = sorted(LAYER_MS)
    reqs = []
    for i in range(n):
        cached, new = rng.choice(shapes)
        reqs.append(
            RequestSpec(
                request_id=i,
                arrival_s=rng.uniform(0.0, spread_s),
                layer_bytes=LLAMA_8B.kv_bytes(cached, layers=1),
                num_layers=LLAMA_8B.num_layers,
                compute_per_layer_s=LAYER_MS[cached, new] * 1e-3,
                path=("link",),
                start_delay_s=start_delay_s,
            )
        )
    return reqs, {"link": Link("link", gbps_to_Bps(gbps))}


@dataclass
class TinyCompute:
    """A hand-written compute model: a constant plus linear-in-new-tokens plus attention over the context."""

    num_layers: int = 32
    base_s: float = 50e-6
    per_new_token_s: float = 0.8e-6
    per_attention_pair_s: float = 2e-12

    def layer_time_s(self, cached_tokens: int, new_tokens: int) -> float:
        attn = new_tokens * (cached_tokens + new_tokens / 2)
        return self.base_s + self.per_new_token_s * new_tokens + self.per_attention_pair_s * attn

    def prefill_time_s(self, cached_tokens: int, new_tokens: int) -> float:
        return self.num_layers * self.layer_time_s(cached_tokens, new_tokens)
