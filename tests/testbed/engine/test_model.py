"""The compact Llama: RoPE scaling, prefix attention, safetensors loading, and (GPU machine) equivalence with
Hugging Face transformers' LlamaModel."""

from __future__ import annotations

import json
import math

import pytest
import torch

from testbed.engine.model import (
    LLAMA3_SCALING,
    build_model,
    config_for,
    config_from_hf,
    load_pretrained,
    prefix_attention,
    rope_inv_freq,
)
from testbed.engine.prefill import rel_err


def test_llama3_rope_scaling_bends_only_low_frequencies():
    cfg = config_for("llama-3.1-8b")
    plain = 1.0 / (cfg.spec.rope_theta ** (torch.arange(0, 128, 2).float() / 128))
    scaled = rope_inv_freq(cfg)
    wavelen = 2 * math.pi / plain
    old = LLAMA3_SCALING["original_max_position_embeddings"]
    high = wavelen < old / LLAMA3_SCALING["high_freq_factor"]
    low = wavelen > old / LLAMA3_SCALING["low_freq_factor"]
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / LLAMA3_SCALING["factor"])
    mid = ~high & ~low
    assert mid.any() and torch.all(scaled[mid] < plain[mid]) and torch.all(scaled[mid] > plain[mid] / 8)


def _naive_attention(q, k, v):
    """Reference in float64 with an explicit lower-right causal mask and repeated KV heads."""
    n, hq, d = q.shape
    total, hkv, _ = k.shape
    g = hq // hkv
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q.double(), k) / math.sqrt(d)
    allowed = torch.arange(total)[None, :] <= (torch.arange(n)[:, None] + total - n)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hnt,thd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("n,total", [(1, 1), (5, 5), (3, 40), (17, 33)])
def test_prefix_attention_matches_explicit_mask(n, total):
    g = torch.Generator().manual_seed(n * 100 + total)
    q = torch.randn(n, 4, 16, generator=g)
    k = torch.randn(total, 2, 16, generator=g)
    v = torch.randn(total, 2, 16, generator=g)
    out = prefix_attention(q, k, v)
    assert rel_err(out, _naive_attention(q, k, v)) < 1e-5


def test_random_init_is_deterministic_and_seeded():
    a, b, c = build_model("tiny", seed=3), build_model("tiny", seed=3), build_model("tiny", seed=4)
    ids = torch.arange(40) % 512
    la, _ = a.forward_full(ids)
    lb, _ = b.forward_full(ids)
    lc, _ = c.forward_full(ids)
    assert torch.equal(la, lb)
    assert rel_err(la, lc) > 0.1


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = build_model("tiny", seed=5)
    s = model.spec
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    hf = {
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "vocab_size": s.vocab_size,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_theta": s.rope_theta,
        "rope_scaling": dict(LLAMA3_SCALING, factor=4.0, original_max_position_embeddings=64),
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = load_pretrained(tmp_path)
    assert loaded.spec.num_layers == s.num_layers and loaded.cfg.rope_scaling["rope_type"] == "llama3"
    ids = torch.arange(70) * 7 % 512
    assert torch.equal(model.forward_full(ids)[0], loaded.forward_full(ids)[0])
    # A checkpoint that lacks a tensor is refused, not silently half-random.
    sd = {k: v for k, v in model.state_dict().items() if "layers.1.mlp" not in k}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="lacks"):
        load_pretrained(tmp_path)


def test_config_from_hf_transformers5_rope_parameters():
    hf = {
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "rope_parameters": dict(LLAMA3_SCALING, rope_theta=500000.0),
        "dtype": "bfloat16",
    }
    cfg = config_from_hf(hf)
    assert cfg.spec.head_dim == 32 and cfg.spec.rope_theta == 500000.0 and cfg.dtype == torch.bfloat16
    assert cfg.rope_scaling["rope_type"] == "llama3"


# ---- GPU machine: equivalence with Hugging Face transformers -----------------------------------------------
def hf_equivalence(dtype: torch.dtype, seq_tokens: int = 300, device: str = "cuda") -> dict:
    """Build a random HF ``LlamaForCausalLM`` with Llama-3 RoPE scaling, save it as safetensors, load it into
    our model, and compare final hidden states and logits.  Returns the relative errors."""
    import inspect
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    rope = dict(LLAMA3_SCALING, original_max_position_embeddings=128)
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers 5.x
        rope_kwargs = {"rope_parameters": dict(rope, rope_theta=500000.0)}
    else:
        rope_kwargs = {"rope_scaling": rope, "rope_theta": 500000.0}
    hf_cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **rope_kwargs,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d, safe_serialization=True)
        ours = load_pretrained(d, device=device, dtype=dtype)
    ids = torch.randint(0, 1000, (seq_tokens,), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        hf_hidden = hf_model.model(input_ids=ids[None]).last_hidden_state[0]  # after the final norm
        hf_logits = hf_model(input_ids=ids[None]).logits[0, -1].float()
        logits, _, hidden = ours.forward_full(ids, return_hidden=True)
    return {"hidden_rel_err": rel_err(hidden, hf_hidden), "logits_rel_err": rel_err(logits, hf_logits)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_matches_hf_transformers(dtype, tol):
    pytest.importorskip("transformers", reason="the HF equivalence check needs transformers (GPU machine)")
    errs = hf_equivalence(dtype)
    assert errs["hidden_rel_err"] < tol and errs["logits_rel_err"] < tol, errs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n,total", [(300, 300), (128, 1280), (517, 2053)])
def test_gpu_prefix_attention_llama_heads(dtype, tol, n, total):
    """The CUDA kernels (flash for bf16, memory-efficient for float32) with Llama-3-8B's head layout (32 query
    heads over 8 KV heads, head dim 128) against a float64 reference with an explicit lower-right mask."""
    g = torch.Generator().manual_seed(n + total)
    q, k, v = (torch.randn(t, h, 128, generator=g) for t, h in ((n, 32), (total, 8), (total, 8)))
    out = prefix_attention(*(x.to("cuda", dtype) for x in (q, k, v)))
    ref = _naive_attention(*(x.to(dtype).double() for x in (q, k, v)))
    assert rel_err(out.cpu(), ref) < tol
