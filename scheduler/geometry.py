"""Model geometry: how many bytes of KV cache a token, a layer and a chunk occupy.

The KV cache of a decoder holds, per layer and per token, one key and one value vector for each KV head:
``2 * num_kv_heads * head_dim * dtype_bytes`` bytes.  Llama-3.1-8B (32 layers, 8 KV heads, head dim 128,
bf16) therefore stores 4096 bytes per token per layer and 128 KiB per token; a 256-token chunk is 32 MiB,
1 MiB per layer.  The object tier stores one object per chunk with the layers back to back, so a
*layer slice* (one layer of one chunk) is ``kv_bytes_per_chunk_layer`` bytes.

The extra fields (hidden size, heads, FFN size, vocabulary) feed the analytic roofline compute model and the
torch engine; they are irrelevant to the byte counts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

DEFAULT_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class ModelSpec:
    """Geometry of a Llama-family decoder (GQA attention, SwiGLU MLP)."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    hidden_size: int = 4096
    num_heads: int = 32
    intermediate_size: int = 14336
    vocab_size: int = 128256
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes", "hidden_size", "num_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSpec.{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads (grouped-query attention)")

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.num_layers

    def kv_bytes_per_chunk_layer(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
        """One layer slice of one chunk object."""
        return self.kv_bytes_per_token_layer * chunk_tokens

    def kv_bytes_per_chunk(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
        return self.kv_bytes_per_token * chunk_tokens

    def kv_bytes(self, tokens: int, layers: int | None = None) -> int:
        """KV bytes of ``tokens`` tokens over ``layers`` layers (all layers by default)."""
        layers = self.num_layers if layers is None else layers
        return self.kv_bytes_per_token_layer * tokens * layers

    @property
    def params_per_layer(self) -> int:
        """Weights of one decoder layer (attention projections + SwiGLU MLP), for the roofline model."""
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads * d) + 2 * h * (self.num_kv_heads * d) + (self.num_heads * d) * h
        mlp = 3 * h * self.intermediate_size
        return attn + mlp

    def fingerprint(self) -> str:
        """Stable 16-hex-digit id of the geometry; scopes chunk keys so two models never share KV."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PRESETS: dict[str, ModelSpec] = {
    "llama-3.1-8b": ModelSpec("llama-3.1-8b", 32, 8, 128, 2, 4096, 32, 14336, 128256, 500000.0),
    "llama-3.1-70b": ModelSpec("llama-3.1-70b", 80, 8, 128, 2, 8192, 64, 28672, 128256, 500000.0),
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", 28, 4, 128, 2, 3584, 28, 18944, 152064, 1000000.0, 1e-6),
    "mistral-7b": ModelSpec("mistral-7b", 32, 8, 128, 2, 4096, 32, 14336, 32768, 1000000.0),
    # A tiny Llama for CPU tests of the engine and the object tier (float32).
    "tiny": ModelSpec("tiny", 4, 2, 16, 4, 64, 4, 128, 512, 10000.0),
    # Testbed scaling: Llama-3.1-8B's layers with a KV cache 64x smaller (1 KV head of dim 16, 64 B per token
    # per layer), for shaped links 64x slower than 100 Gbps; compute comes from the 8B profile (gpu config).
    "llama-3.1-8b-kvdiv64": ModelSpec(
        "llama-3.1-8b-kvdiv64", 32, 1, 16, 2, 4096, 32, 14336, 128256, 500000.0
    ),
}


def get_model(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; presets: {sorted(PRESETS)}") from None
