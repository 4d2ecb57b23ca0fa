"""The connector's worker half: layer-major loads into vLLM's paged blocks, and write-back of new chunks.

``register`` learns the attention backend's block layout from the KV cache tensors vLLM allocated
(``layout.py``).  Per step: ``start_loads`` starts one ``LayerLoad`` per ``LoadSpec`` (a thread running one
gather request, or ranged GETs against plain S3, and scattering each verified layer into the blocks);
``wait_layer`` blocks the forward at layer ``l`` only until layer ``l`` is in place (the stall is
measured); ``save_layer`` copies the KV of chunks completed in this step out of the blocks into host
buffers (whole blocks); ``finish_step`` joins the loads, collects the blocks of failed loads (reported to vLLM as
invalid so it recomputes them) and queues complete chunks for the write-back thread.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from scheduler.geometry import ModelSpec
from testbed.client import ObjectCacheClient
from testbed.engine.vllm.config import ConnectorConfig, torch_dtype_name
from testbed.engine.vllm.layout import (
    BlockLayout,
    blocks_to_tokens,
    cpu_attn_write_fn,
    payload_tokens,
    plain_write_fn,
    probe_block_layout,
    scatter_tokens,
    token_slots,
    tokens_to_blocks,
)
from testbed.engine.vllm.metadata import LoadSpec, ObjectCacheMetadata
from testbed.engine.vllm.stats import ObjectCacheConnectorStats
from testbed.engine.vllm.transfer import ChunkSaver, LayerLoad

log = logging.getLogger(__name__)


@dataclass
class _PendingChunk:
    """One chunk being copied out of its blocks this step: buffer ``[L, n_blocks, block_elems]`` holding
    the blocks as the backend lays them out (converted to the object format on the write-back thread)."""

    req_id: str
    name: str
    blocks: torch.Tensor
    buf: torch.Tensor
    layers_done: set[int] = field(default_factory=set)


class WorkerSide:
    def __init__(
        self,
        cfg: ConnectorConfig,
        model: ModelSpec,
        dtype: torch.dtype,
        block_size: int,
        stats: Callable[[], ObjectCacheConnectorStats],
        client: Callable[[], ObjectCacheClient],
    ) -> None:
        self.cfg, self.model, self.dtype, self.block_size = cfg, model, dtype, block_size
        self._stats, self._client = stats, client
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.layer_index: dict[str, int] = {}
        self.layout: BlockLayout | None = None
        self.saver: ChunkSaver | None = None
        self._loads: list[tuple[LoadSpec, LayerLoad]] = []
        self._chunks: list[_PendingChunk] | None = None  # built at the step's first save_layer
        self._failed_blocks: set[int] = set()
        self._free_buffers: deque[torch.Tensor] = deque()
        self.max_free_buffers = 64
        self.results: dict[str, dict[str, Any]] = {}

    def register(
        self, kv_caches: dict[str, torch.Tensor], cache_dtype: str, layout_kind: str = "cpu_attn"
    ) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        self.kv_caches = kv_caches
        self.layer_index = {name: extract_layer_index(name) for name in kv_caches}
        first = next(iter(kv_caches.values()))
        log.info("ObjectCache: %d KV layers of %s %s", len(kv_caches), tuple(first.shape), first.dtype)
        if first.dim() != 4 or first.shape[-1] != 2 * self.model.head_dim or not first.is_contiguous():
            raise RuntimeError(
                f"unsupported KV cache tensor {tuple(first.shape)}: expected CPU_ATTN's layout"
            )
        _, heads, block_size, _ = first.shape
        write = (
            plain_write_fn
            if layout_kind == "plain"
            else cpu_attn_write_fn(first.dtype, block_size, self.model.head_dim, cache_dtype)
        )
        self.layout = probe_block_layout(first.dtype, heads, block_size, self.model.head_dim, write)
        if self.cfg.save:
            self.saver = ChunkSaver(
                ObjectCacheClient(**self.cfg.client_kwargs()),
                self.model,
                self.cfg.chunk_tokens,
                torch_dtype_name(first.dtype),
            )

    # --- loads ---------------------------------------------------------------------------------------------
    def start_loads(self, meta: ObjectCacheMetadata) -> None:
        for spec in meta.loads:
            self._loads.append((spec, self._start_load(spec)))
            self._stats().add("loads", 1)

    def _start_load(self, spec: LoadSpec) -> LayerLoad:
        """A LayerLoad whose callback writes each layer into the request's blocks (on the loader thread)."""
        bs, n_tokens = self.block_size, spec.end_token - spec.start_token
        layer_names = sorted(self.kv_caches, key=self.layer_index.__getitem__)
        m, chunk_tokens = self.model, self.cfg.chunk_tokens
        if spec.start_token % bs == 0 and spec.end_token % bs == 0:  # whole blocks: permute, then block copy
            blocks = torch.as_tensor(spec.block_ids[spec.start_token // bs : spec.end_token // bs])

            def write(cache: torch.Tensor, kv: torch.Tensor) -> None:
                cache.view(cache.shape[0], -1).index_copy_(0, blocks, tokens_to_blocks(self.layout, kv))
        else:  # any token range: element-wise
            index = self.layout.element_index(
                *token_slots(spec.block_ids, spec.start_token, spec.end_token, bs)
            )

            def write(cache: torch.Tensor, kv: torch.Tensor) -> None:
                scatter_tokens(cache, index, kv)

        def scatter(layer: int, payload) -> None:
            kv = payload_tokens(
                payload,
                len(spec.names),
                chunk_tokens,
                m.num_kv_heads,
                m.head_dim,
                self.dtype,
                spec.skip_tokens,
            )
            write(self.kv_caches[layer_names[layer]], kv[:, :n_tokens])

        return LayerLoad(self._client(), spec.names, m.num_layers, scatter).start()

    def wait_layer(self, layer_name: str) -> None:
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        for spec, load in self._loads:
            stall_s = load.wait(layer)
            self._stats().add("stall_s", stall_s)
            self._stats().note_stall_ms(1e3 * stall_s)
            res = self.results.setdefault(spec.req_id, {})
            res["stall_ms"] = round(res.get("stall_ms", 0.0) + 1e3 * stall_s, 3)

    def _finish_loads(self) -> set[str]:
        """Join this step's loads; record results; collect the blocks of failed loads."""
        failed: set[str] = set()
        for spec, load in self._loads:
            load.join()
            n = spec.end_token - spec.start_token
            res = self.results.setdefault(spec.req_id, {})
            res.update(load_ms=round(1e3 * load.load_s, 3), path=load.path, chunks=len(spec.names))
            self._stats().add("load_s", load.load_s)
            if load.ok:
                res["loaded_tokens"] = res.get("loaded_tokens", 0) + n
                self._stats().add("loaded_tokens", n)
                continue
            failed.add(spec.req_id)
            blocks = spec.block_ids[
                spec.start_token // self.block_size : math.ceil(spec.end_token / self.block_size)
            ]
            self._failed_blocks.update(blocks)
            res["failed_tokens"] = res.get("failed_tokens", 0) + n
            res["error"] = f"{type(load.error).__name__}: {load.error}"[:300]
            self._stats().add("failed_load_tokens", n)
        self._loads = []
        return failed

    def take_failed_blocks(self) -> set[int]:
        self._finish_loads()
        out, self._failed_blocks = self._failed_blocks, set()
        return out

    # --- saves ---------------------------------------------------------------------------------------------
    def save_layer(self, meta: ObjectCacheMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        if self._chunks is None:
            self._chunks = self._prepare_chunks(meta)
        blocks_view = kv_layer.view(kv_layer.shape[0], -1)
        for chunk in self._chunks:
            torch.index_select(blocks_view, 0, chunk.blocks, out=chunk.buf[layer])  # whole-block copy
            chunk.layers_done.add(layer)

    def _prepare_chunks(self, meta: ObjectCacheMetadata) -> list[_PendingChunk]:
        """Built at the first ``save_layer`` of a step, not in ``start_load_kv``: vLLM calls that *after*
        the forward when the step has no synchronous load."""
        out = []
        c, bs = self.cfg.chunk_tokens, self.block_size  # c is a multiple of bs: a chunk is whole blocks
        for spec in meta.saves:
            for j, name in zip(spec.chunk_indexes, spec.names):
                blocks = torch.as_tensor(spec.block_ids[j * c // bs : (j + 1) * c // bs])
                out.append(_PendingChunk(spec.req_id, name, blocks, self._take_buffer(len(blocks))))
        return out

    def _take_buffer(self, n_blocks: int) -> torch.Tensor:
        """A chunk buffer ``[L, n_blocks, block_elems]``: reused when possible (fresh pages cost page faults
        on the forward's path), else new."""
        try:
            buf = self._free_buffers.pop()
        except IndexError:
            buf = None
        if buf is None or buf.shape[1] != n_blocks:
            buf = torch.empty(self.model.num_layers, n_blocks, self.layout.block_elems, dtype=self.dtype)
        return buf

    def finish_step(self) -> None:
        """End of the step's forward: settle loads, queue the complete chunks of healthy requests."""
        failed_reqs = self._finish_loads()
        L = self.model.num_layers
        for chunk in self._chunks or ():
            if chunk.req_id in failed_reqs or self.saver is None or len(chunk.layers_done) != L:
                continue  # computed on top of a failed load (vLLM recomputes and it is saved then)
            self.saver.submit(chunk.name, self._slices_fn(chunk.buf))
        self._chunks = None

    def _slices_fn(self, buf: torch.Tensor):
        """For the write-back thread: each layer's blocks -> token-major K then V bytes (one slice)."""

        def slices() -> list:
            out = [
                blocks_to_tokens(self.layout, buf[layer]).view(torch.uint8).numpy()
                for layer in range(len(buf))
            ]
            if len(self._free_buffers) < self.max_free_buffers:
                self._free_buffers.append(buf)  # deque: thread-safe append/pop
            return out

        return slices

    def take_results(self) -> dict[str, dict[str, Any]]:
        out, self.results = self.results, {}
        return out

    def close(self) -> None:
        if self.saver is not None:
            self.saver.close()
            self.saver = None
