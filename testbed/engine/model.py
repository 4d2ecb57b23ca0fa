"""A compact Llama-family decoder in torch, built for layerwise prefix prefill.

The model is the Llama architecture as Hugging Face ``transformers`` implements it (``LlamaForCausalLM``):
token embedding, ``num_layers`` decoder layers of (RMSNorm -> grouped-query attention with rotary position
embedding -> residual, RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and the LM head.  RoPE supports
the plain variant and Llama-3's frequency scaling (``rope_type: llama3``).  Parameter names equal HF's, so
a directory of HF safetensors loads directly; without one the weights are drawn from a seed.

What differs from HF is the calling convention: the prefill engine drives the model *one layer at a time*
(``embed`` -> ``layer_forward`` for each layer -> ``head``), passing each layer the KV cache tensors of that
layer.  The cache of a layer is one tensor ``kv[2, T, num_kv_heads, head_dim]`` (K then V, token-major) for
the whole context: the first ``cached_tokens`` rows come from a KV source (DRAM, object tier), the layer
writes its new tokens' K (after RoPE) and V into the rows after them.  Token-major K and V are exactly the
``[batch, seq, heads, dim]`` layout the flash-attention kernel reads, so no copy is made for attention.

Prefix attention: the new tokens attend to every cached token and causally to each other, i.e. a causal
mask aligned to the *lower right* corner of the (new x total) score matrix.  ``torch.nn.attention.bias.
causal_lower_right`` tells SDPA exactly that, so the fused kernels run without materialising a mask (an
explicit mask at 32K x 64K would be 4 GiB and falls off the fast path).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from scheduler.geometry import ModelSpec, get_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LlamaConfig:
    """Everything the torch model needs: the shared geometry plus RoPE scaling, tying and dtype."""

    spec: ModelSpec
    rope_scaling: dict | None = None  # HF's rope_scaling / rope_parameters (rope_type "llama3" or default)
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.bfloat16
    extra: dict = field(default_factory=dict)

    @property
    def num_kv_groups(self) -> int:
        return self.spec.num_heads // self.spec.num_kv_heads


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def config_for(spec: ModelSpec | str, dtype: torch.dtype | None = None) -> LlamaConfig:
    """Config of a geometry preset: Llama-3 RoPE scaling for Llama-3.x and for ``tiny`` (so CPU tests
    exercise it, with a short original context so the scaling actually bends frequencies)."""
    spec = get_model(spec) if isinstance(spec, str) else spec
    if dtype is None:
        dtype = torch.float32 if spec.dtype_bytes == 4 else torch.bfloat16
    elif torch.tensor([], dtype=dtype).element_size() != spec.dtype_bytes:
        # Same architecture, other KV dtype: the geometry (and so the key scope) changes with it.
        spec = replace(spec, dtype_bytes=torch.tensor([], dtype=dtype).element_size())
    scaling = None
    if spec.name.startswith("llama-3"):
        scaling = dict(LLAMA3_SCALING)
    elif spec.name == "tiny":
        scaling = dict(LLAMA3_SCALING, factor=4.0, original_max_position_embeddings=64)
    return LlamaConfig(spec=spec, rope_scaling=scaling, dtype=dtype)


def config_from_hf(hf: dict, name: str = "hf-llama", dtype: torch.dtype | None = None) -> LlamaConfig:
    """Build a config from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x spelling)."""
    if dtype is None:
        dtype = DTYPES.get(str(hf.get("torch_dtype", hf.get("dtype", "bfloat16"))), torch.bfloat16)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    spec = ModelSpec(
        name=name,
        num_layers=int(hf["num_hidden_layers"]),
        num_kv_heads=int(hf.get("num_key_value_heads", heads)),
        head_dim=head_dim,
        dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
        hidden_size=int(hf["hidden_size"]),
        num_heads=heads,
        intermediate_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
    )
    rtype = rope.get("rope_type", rope.get("type", "default"))
    scaling = dict(rope) if rtype not in (None, "default") else None
    return LlamaConfig(spec, scaling, bool(hf.get("tie_word_embeddings", False)), dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (float32, ``head_dim/2``), with Llama-3 scaling when configured.

    Llama-3 scaling keeps high frequencies (wavelength below ``original/high_freq_factor``), divides low
    frequencies (wavelength above ``original/low_freq_factor``) by ``factor``, and blends in between.
    """
    d = cfg.spec.head_dim
    inv_freq = 1.0 / (cfg.spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    if not sc or sc.get("rope_type", sc.get("type")) != "llama3":
        return inv_freq
    factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like HF, then scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim] in x's dtype."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        s = cfg.spec
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, cached: int):
        """x: [new, hidden]; kv: [2, cached+new, kv_heads, head_dim] whose first ``cached`` rows hold the
        prefix.  Writes the new tokens' K (rotated) and V into ``kv[:, cached:]``."""
        n = x.shape[0]
        q = apply_rope(self.q_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        kv[0, cached : cached + n] = apply_rope(
            self.k_proj(x).view(n, self.num_kv_heads, self.head_dim), cos, sin
        )
        kv[1, cached : cached + n] = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        total = cached + n
        out = prefix_attention(q, kv[0, :total], kv[1, :total])
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


_GQA_NATIVE: dict[tuple, bool] = {}


def _gqa_native(q: torch.Tensor) -> bool:
    """Whether SDPA's fast kernel for this input takes fewer KV heads than query heads (``enable_gqa``).
    Flash attention does (CUDA, fp16/bf16); the memory-efficient kernel (CUDA float32) does not, and SDPA
    would fall back to the math kernel, which materialises the whole score matrix (32 GiB at 16K tokens):
    there the KV heads are expanded instead.  The CPU kernels take GQA."""
    if q.device.type != "cuda":
        return True
    return _GQA_NATIVE.get((q.device.type, q.dtype), q.dtype in (torch.float16, torch.bfloat16))


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of ``q`` [n, Hq, D] over ``k``/``v`` [T, Hkv, D] (T >= n; the last n keys are the queries'
    own tokens): every cached key is visible, the new ones causally.  Returns [n, Hq, D]."""
    n, total = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and _gqa_native(q):
        try:
            return _sdpa(qh, kh, vh, n, total, gqa=True)
        except (RuntimeError, TypeError):
            # The memory-efficient kernel behind the lower-right bias has no GQA: expand KV heads instead.
            _GQA_NATIVE[(q.device.type, q.dtype)] = False
    if groups > 1:
        kh = kh.repeat_interleave(groups, dim=1)
        vh = vh.repeat_interleave(groups, dim=1)
    return _sdpa(qh, kh, vh, n, total, gqa=False)


def _sdpa(qh, kh, vh, n: int, total: int, gqa: bool) -> torch.Tensor:
    if n == total:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=causal_lower_right(n, total), enable_gqa=gqa
        )
    return out[0].transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, i = cfg.spec.hidden_size, cfg.spec.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.spec.hidden_size, cfg.spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.spec.hidden_size, cfg.spec.rms_norm_eps)

    def forward(self, h, cos, sin, kv, cached):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv, cached)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        s = cfg.spec
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class LlamaModel(nn.Module):
    """Llama decoder with HF parameter names (``model.layers.N...``, ``lm_head``), driven layer by layer."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.spec.hidden_size, cfg.spec.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def spec(self) -> ModelSpec:
        return self.cfg.spec

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ---- phases of a prefill -------------------------------------------------------------------------
    def rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions ``start .. start+n-1`` ([n, head_dim], model dtype), computed in float32."""
        pos = torch.arange(start, start + n, device=self.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(self.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        dt = self.lm_head.weight.dtype
        return emb.cos().to(dt), emb.sin().to(dt)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def layer_forward(self, layer: int, h, cos, sin, kv: torch.Tensor, cached_tokens: int) -> torch.Tensor:
        return self.model.layers[layer](h, cos, sin, kv, cached_tokens)

    def head(self, h_last: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of the given hidden states ([n, hidden] -> [n, vocab])."""
        return self.lm_head(self.model.norm(h_last)).float()

    def new_kv(self, total_tokens: int) -> list[torch.Tensor]:
        """Empty per-layer KV cache tensors ``[2, total_tokens, kv_heads, head_dim]``."""
        s = self.spec
        dt = self.lm_head.weight.dtype
        return [
            torch.empty(2, total_tokens, s.num_kv_heads, s.head_dim, dtype=dt, device=self.device)
            for _ in range(s.num_layers)
        ]

    @torch.inference_mode()
    def forward_full(self, token_ids: torch.Tensor, return_hidden: bool = False):
        """Plain full prefill (reference path): ``(last-token logits, kv list[, final hidden states])``."""
        n = token_ids.shape[0]
        kv = self.new_kv(n)
        cos, sin = self.rope(0, n)
        h = self.embed(token_ids)
        for layer in range(self.spec.num_layers):
            h = self.layer_forward(layer, h, cos, sin, kv[layer], 0)
        logits = self.head(h[-1:])[0]
        if return_hidden:
            return logits, kv, self.model.norm(h)
        return logits, kv


# ---- construction --------------------------------------------------------------------------------------
def init_random(model: LlamaModel, seed: int) -> LlamaModel:
    """Deterministic random weights: N(0, 0.02) linears/embeddings, RMSNorm weights near 1."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                vals = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                vals = 0.02 * torch.randn(p.shape, generator=gen)
            p.copy_(vals.to(p.dtype))
    return model


def init_random_fast(model: LlamaModel, seed: int) -> LlamaModel:
    """Random weights drawn on the model's device (for 8B-sized timing runs; not bit-equal to
    ``init_random`` but deterministic per device)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def build_model(
    cfg: LlamaConfig | str,
    *,
    weights_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    fast_init: bool = False,
    dtype_override: torch.dtype | None = None,
) -> LlamaModel:
    """A ready-to-run model in eval mode: HF safetensors from ``weights_dir`` when given, else random
    weights from ``seed``.  ``cfg`` may be a preset name; ``dtype_override`` changes its dtype (and KV
    geometry)."""
    if isinstance(cfg, str):
        cfg = config_for(cfg, dtype_override)
    elif dtype_override is not None and dtype_override != cfg.dtype:
        cfg = with_dtype(cfg, dtype_override)
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device).to(cfg.dtype)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    if weights_dir is not None:
        load_safetensors(model, weights_dir)
    elif fast_init:
        init_random_fast(model, seed)
    else:
        init_random(model, seed)
    return model.eval()


def load_safetensors(model: LlamaModel, weights_dir: str | Path) -> None:
    """Load every ``*.safetensors`` file of an HF checkpoint directory (strict: names and shapes must match;
    a tied LM head may be absent)."""
    from safetensors.torch import load_file

    files = sorted(Path(weights_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {weights_dir}")
    params = dict(model.named_parameters())
    seen: set[str] = set()
    with torch.no_grad():
        for f in files:
            for name, tensor in load_file(str(f), device="cpu").items():
                if name not in params:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise KeyError(f"{f.name}: unexpected tensor {name!r}")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}")
                params[name].copy_(tensor.to(params[name].dtype))
                seen.add(name)
    missing = set(params) - seen
    if model.cfg.tie_word_embeddings and missing == {"lm_head.weight"}:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        missing = set()
    if missing:
        raise KeyError(f"checkpoint {weights_dir} lacks {sorted(missing)[:5]}")


def load_pretrained(weights_dir: str | Path, *, device="cpu", dtype: torch.dtype | None = None) -> LlamaModel:
    """Model from an HF directory (``config.json`` + safetensors)."""
    hf = json.loads((Path(weights_dir) / "config.json").read_text())
    cfg = config_from_hf(hf, name=Path(weights_dir).name.lower() or "hf-llama", dtype=dtype)
    return build_model(cfg, weights_dir=weights_dir, device=device)


def with_dtype(cfg: LlamaConfig, dtype: torch.dtype) -> LlamaConfig:
    spec = replace(cfg.spec, dtype_bytes=torch.tensor([], dtype=dtype).element_size())
    return replace(cfg, spec=spec, dtype=dtype)
