"""Mapping between ObjectCache chunk objects and vLLM's paged KV blocks.

Two coordinate systems meet here.

* **ObjectCache** stores a prompt's KV as *chunks* of ``chunk_tokens`` tokens; one layer of one chunk (a
  *slice*) is K then V, each ``[chunk_tokens, num_kv_heads, head_dim]`` row-major in the model dtype
  (``kvformat``).  A layer-major load yields, per layer, the slices of ``n`` chunks back to back.
* **vLLM** keeps KV in a per-layer paged cache: token ``s`` of a request lives in block
  ``block_ids[s // block_size]`` at offset ``s % block_size``.  How the elements of one block are laid out
  is the attention backend's business.  The CPU backend (``CPU_ATTN``) allocates
  ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` per layer but its ``cpu_attn_reshape_and_cache``
  kernel *packs* keys in an ISA-specific order (``vec``: not token-major; ``amx`` for bf16: neither K nor V
  token-major), so plain indexing of that shape reads the wrong elements.

``BlockLayout`` learns the backend's layout empirically: it writes labelled tokens through the backend's
own cache-write kernel into a scratch cache and records where every (token offset, head, dim) element of K
and of V landed inside a block (``k_offsets``/``v_offsets``: element offsets within one block); a layout
that is not a permutation (e.g. an fp8 cache that quantises) is refused by the probe.

Loads and saves cover whole blocks (a loaded range starts at vLLM's block-aligned local hit and ends on a
chunk boundary; chunks are whole blocks), so the hot path is a block copy (``index_copy_`` /
``index_select`` on the block axis) and the permutation to or from token-major runs off the forward's
critical path (``tokens_to_blocks`` in the loader thread, ``blocks_to_tokens`` in the write-back thread).
``element_index`` / ``scatter_tokens`` / ``gather_tokens`` handle any token range (the general fallback).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Labels are written in base 16: every digit 0..15 is exact in fp32, fp16 and bf16.
_LABEL_BASE = 16

# write_fn(key [n, H, D], value [n, H, D], cache [num_blocks, ...], slot_mapping [n]) -> None
CacheWriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class LayoutUnsupported(RuntimeError):
    """The backend's block layout is not a permutation of the token-major K/V elements."""


@dataclass(frozen=True)
class BlockLayout:
    """Where each K and V element of a block's tokens sits among the block's elements.

    ``k_offsets[t, h, d]`` / ``v_offsets[t, h, d]``: element offset, within one block of one layer's cache
    tensor viewed flat, of token offset ``t`` (0..block_size-1), KV head ``h``, dim ``d``.
    ``block_elems``: elements per block (``num_kv_heads * block_size * 2 * head_dim`` for CPU_ATTN).
    """

    block_size: int
    num_kv_heads: int
    head_dim: int
    block_elems: int
    k_offsets: torch.Tensor
    v_offsets: torch.Tensor

    def element_index(self, block_ids: torch.Tensor, token_offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flat indices (into a whole layer tensor) of K and of V of tokens given by block and offset.

        Returns two int64 tensors ``[n, num_kv_heads, head_dim]``.
        """
        base = (block_ids.to(torch.int64) * self.block_elems).view(-1, 1, 1)
        return base + self.k_offsets[token_offsets], base + self.v_offsets[token_offsets]


def tokens_to_blocks(layout: BlockLayout, kv: torch.Tensor) -> torch.Tensor:
    """Whole blocks ``[n_blocks, block_elems]`` in the backend's layout from token-major K/V
    ``[2, n_blocks * block_size, H, D]`` (every element of a block is a K or V element: the probe checked)."""
    n_blocks = kv.shape[1] // layout.block_size
    out = torch.empty(n_blocks, layout.block_elems, dtype=kv.dtype)
    out[:, layout.k_offsets.view(-1)] = kv[0].reshape(n_blocks, -1)
    out[:, layout.v_offsets.view(-1)] = kv[1].reshape(n_blocks, -1)
    return out


def blocks_to_tokens(layout: BlockLayout, blocks: torch.Tensor) -> torch.Tensor:
    """Token-major K/V ``[2, n_blocks * block_size, H, D]`` from whole blocks ``[n_blocks, block_elems]``."""
    shape = (-1, layout.num_kv_heads, layout.head_dim)
    return torch.stack(
        [blocks[:, layout.k_offsets.view(-1)].view(shape), blocks[:, layout.v_offsets.view(-1)].view(shape)]
    )


def token_slots(block_ids: Sequence[int], start_token: int, end_token: int, block_size: int):
    """Block id and in-block offset (int64 tensors) of each token in ``[start_token, end_token)``."""
    tokens = torch.arange(start_token, end_token, dtype=torch.int64)
    table = torch.as_tensor(list(block_ids), dtype=torch.int64)
    if end_token > len(block_ids) * block_size:
        raise ValueError(f"tokens up to {end_token} need more than {len(block_ids)} blocks of {block_size}")
    return table[tokens // block_size], tokens % block_size


def probe_block_layout(
    dtype: torch.dtype, num_kv_heads: int, block_size: int, head_dim: int, write_fn: CacheWriteFn
) -> BlockLayout:
    """Learn the block layout of a cache written by ``write_fn`` (see the module docstring).

    Writes block 1 of a 2-block scratch cache ``[2, H, block_size, 2 * head_dim]`` several times with
    base-16 digits of each element's label (``(t * H + h) * D + d``) and once with a K/V marker, then checks
    that the result is a permutation confined to block 1.
    """
    H, D, bs = num_kv_heads, head_dim, block_size
    n_labels = bs * H * D
    labels = torch.arange(n_labels, dtype=torch.int64).view(bs, H, D)
    slots = torch.arange(bs, 2 * bs, dtype=torch.int64)

    def write(k_vals: torch.Tensor, v_vals: torch.Tensor) -> torch.Tensor:
        cache = torch.full((2, H, bs, 2 * D), -1.0, dtype=dtype)
        write_fn(k_vals.to(dtype), v_vals.to(dtype), cache, slots)
        if not bool((cache[0] == -1).all()):
            raise LayoutUnsupported("writing block 1 touched block 0: layout is not block-local")
        return cache[1].reshape(-1).to(torch.float32)

    is_v = write(torch.zeros(bs, H, D), torch.ones(bs, H, D))
    if not bool(((is_v == 0) | (is_v == 1)).all()):
        raise LayoutUnsupported("cache write does not preserve values (quantised cache?)")
    label_at = torch.zeros_like(is_v, dtype=torch.int64)
    for p in range(max(1, math.ceil(math.log(n_labels, _LABEL_BASE)))):
        digit = ((labels // _LABEL_BASE**p) % _LABEL_BASE).to(torch.float32)
        got = write(digit, digit)
        if not bool(((got >= 0) & (got < _LABEL_BASE) & (got == got.round())).all()):
            raise LayoutUnsupported("cache write does not preserve values (quantised cache?)")
        label_at += got.to(torch.int64) * _LABEL_BASE**p
    k_offsets = _invert(label_at, is_v == 0, n_labels, "K").view(bs, H, D)
    v_offsets = _invert(label_at, is_v == 1, n_labels, "V").view(bs, H, D)
    return BlockLayout(bs, H, D, label_at.numel(), k_offsets, v_offsets)


def _invert(label_at: torch.Tensor, mask: torch.Tensor, n_labels: int, what: str) -> torch.Tensor:
    """Offsets indexed by label, for the positions selected by ``mask``; each label exactly once."""
    positions = torch.nonzero(mask).view(-1)
    found = label_at[positions]
    if positions.numel() != n_labels or not torch.equal(torch.sort(found).values, torch.arange(n_labels)):
        raise LayoutUnsupported(f"{what} elements are not a permutation of the block")
    out = torch.empty(n_labels, dtype=torch.int64)
    out[found] = positions
    return out


def cpu_attn_write_fn(
    dtype: torch.dtype, block_size: int, head_dim: int, kv_cache_dtype: str
) -> CacheWriteFn:
    """The CPU attention backend's own cache write (``cpu_attn_reshape_and_cache`` with the layer's ISA)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)

    def write(key, value, cache, slot_mapping) -> None:
        nb, H, bs, _ = cache.shape
        key_cache, value_cache = cache.view(nb, H, bs * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa)

    write.isa = isa  # type: ignore[attr-defined]
    return write


def plain_write_fn(key, value, cache, slot_mapping) -> None:
    """Token-major reference layout ``[num_blocks, H, block_size, 2 * D]`` (K in ``[..., :D]``)."""
    nb, H, bs, twice_d = cache.shape
    d = twice_d // 2
    b, t = slot_mapping // bs, slot_mapping % bs
    cache[b, :, t, :d] = key
    cache[b, :, t, d:] = value


def scatter_tokens(
    layer_cache: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor
) -> None:
    """Write K/V ``kv`` (``[2, n, H, D]``) into ``layer_cache`` at the flat indices ``index`` (K, V)."""
    flat = layer_cache.view(-1)
    flat.index_put_((index[0].view(-1),), kv[0].reshape(-1))
    flat.index_put_((index[1].view(-1),), kv[1].reshape(-1))


def gather_tokens(layer_cache: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """K/V (``[2, n, H, D]``) read from ``layer_cache`` at the flat indices ``index`` (K, V)."""
    flat = layer_cache.view(-1)
    return torch.stack([flat[index[0]], flat[index[1]]])


@dataclass(frozen=True)
class ChunkSpan:
    """The chunks covering a token range of a request: ``[first_chunk, end_chunk)`` of ``chunk_tokens``.

    ``skip_tokens``: tokens of ``first_chunk`` before the range (already in vLLM's cache, not written).
    """

    first_chunk: int
    end_chunk: int
    skip_tokens: int

    @classmethod
    def of(cls, start_token: int, end_token: int, chunk_tokens: int) -> ChunkSpan:
        if not 0 <= start_token < end_token:
            raise ValueError(f"empty or negative token range [{start_token}, {end_token})")
        first = start_token // chunk_tokens
        return cls(first, -(-end_token // chunk_tokens), start_token - first * chunk_tokens)


def payload_tokens(payload, n_chunks: int, chunk_tokens: int, H: int, D: int, dtype: torch.dtype, skip: int):
    """K/V ``[2, n_tokens, H, D]`` from one layer's payload of ``n_chunks`` slices, dropping ``skip`` tokens."""
    t = torch.frombuffer(payload, dtype=dtype)
    if t.numel() != n_chunks * 2 * chunk_tokens * H * D:
        raise ValueError(f"layer payload of {t.numel()} elements, expected {n_chunks} slices")
    t = t.view(n_chunks, 2, chunk_tokens, H, D).transpose(0, 1).reshape(2, n_chunks * chunk_tokens, H, D)
    return t[:, skip:]
