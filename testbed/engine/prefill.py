"""The layerwise prefill engine: compute a prompt's new tokens on top of a cached prefix, layer by layer.

One request:

1. *Keys*: the prompt's full chunks get chained keys (``scheduler.keys.chunk_keys``, scoped by the model
   fingerprint and tenant namespace).
2. *Lookup and plan*: the KV source says how many leading chunks it holds; at least one token is always
   computed (the last token's logits need a forward pass), so a fully cached prompt recomputes its last
   chunk.  With a compute model (``compute``) the scheduler core decides how much of the held prefix to
   load and what to recompute (``testbed.engine.plan.decide_fetch``, from the rate the source expects):
   a prefix whose fetch is predicted slower than recomputing it is recomputed.  Without one, or when the
   source does not know its rate, the whole held prefix is loaded.
3. *Load + compute*: ``source.start_load`` starts moving the prefix KV into rows ``[0, cached)`` of the
   per-layer KV tensors; for each layer ``l`` the engine calls ``source.wait_for_layer(l)`` (the compute
   stream waits for layer ``l``'s copy event, the host never synchronises with the GPU) and queues layer
   ``l``'s compute for the new tokens, which attend to the cached rows and causally to each other, while
   layers ``l+1..`` are still arriving.
4. *Logits* of the last token; ``ttft_s`` is measured here, when they are ready on the host side.
5. *Save*: the new full chunks of every layer were queued for a device-to-host copy into the DRAM tier as
   the layers finished (``KVSaver.save_layer``); after the logits the saver registers them and uploads them
   to the object tier in the background.

Failure: if the source fails at any layer (missing or corrupt chunk, storage down), the engine discards the
partial work and recomputes the whole prompt, so the answer is the same; ``PrefillResult.fallback`` says
why.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from scheduler.geometry import DEFAULT_CHUNK_TOKENS
from scheduler.keys import KeyScope, chunk_keys
from scheduler.planner import LayerTimeModel
from testbed.engine.kvload import KVLoadError, KVSource, LoadRequest, LoadStats
from testbed.engine.model import LlamaModel
from testbed.engine.plan import FetchDecision, decide_fetch, take_cached
from testbed.engine.save import KVSaver
from testbed.wire.errors import ObjectCacheError


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [vocab] float32, last token
    kv: list[torch.Tensor]  # per layer [2, total_tokens, kv_heads, head_dim]
    total_tokens: int
    cached_tokens: int
    source: str
    ttft_s: float
    load: LoadStats | None = None
    fallback: str = ""  # why the source was abandoned for recompute ("" if it was not)
    saved_keys: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    plan: FetchDecision | None = None  # what the engine decided to load and recompute (None: no source)

    @property
    def new_tokens(self) -> int:
        return self.total_tokens - self.cached_tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class PrefillEngine:
    """Drives a ``LlamaModel`` layer by layer against a KV source (see the module docstring).

    ``compute``: per-layer prefill time of this model on this device (``LayerTimeModel``, e.g. a measured
    profile: ``testbed.engine.profile.as_compute`` or ``scheduler.compute.ProfileCompute.from_csv``); with
    it the engine plans fetch vs recompute and, when the caller gives no ``compute_per_layer_s``, tells the
    source the predicted per-layer compute time.  ``None``: the whole held prefix is always loaded.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        namespace: str = "default",
        saver: KVSaver | None = None,
        compute: LayerTimeModel | None = None,
    ):
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.scope = KeyScope(model.spec.fingerprint(), namespace)
        self.saver = saver
        self.compute = compute
        # A ``testbed.engine.timeline.Timeline`` to trace each request's phases into (None: off).
        self.timeline = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def keys(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[str]:
        ids = token_ids.cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
        return chunk_keys(ids, self.scope, self.chunk_tokens)

    def plan(
        self, total_tokens: int, keys: list[str], source: KVSource | None, limit: int | None
    ) -> FetchDecision:
        """What to take from the source: of the chunks it holds (capped by ``limit`` chunks and so that at
        least one token is computed), the prefix the planner predicts fastest (all of it without a compute
        model or a known rate); the rest is recomputed."""
        ct = self.chunk_tokens
        usable = min(len(keys), (total_tokens - 1) // ct)
        if limit is not None:
            usable = min(usable, limit)
        held = 0 if source is None or usable == 0 else min(usable, source.lookup(keys[:usable]))
        tier = source.tier_name if source is not None else "none"
        # Tokens reachable from each tier or a faster one: a DRAM hit is reachable from the object tier too
        # (a source of no known tier counts as the slowest).
        cached = {"dram_cached_tokens": held * ct if tier == "dram" else 0, "object_cached_tokens": held * ct}
        if self.compute is None or held == 0 or tier not in ("dram", "object"):
            return take_cached(total_tokens, chunk_tokens=ct, **cached)
        spec, rate_Bps, first_byte_s = self.model.spec, source.expected_Bps(), source.first_byte_s
        return decide_fetch(
            total_tokens,
            compute=self.compute,
            num_layers=spec.num_layers,
            kv_bytes_per_token_layer=spec.kv_bytes_per_token_layer,
            **cached,
            dram_Bps=rate_Bps if tier == "dram" else None,
            object_Bps=rate_Bps if tier == "object" else None,
            dram_first_byte_s=first_byte_s if tier == "dram" else 0.0,
            object_first_byte_s=first_byte_s if tier == "object" else 0.0,
            chunk_tokens=ct,
        )

    @torch.inference_mode()
    def prefill(
        self,
        token_ids,
        source: KVSource | None = None,
        *,
        max_cached_chunks: int | None = None,
        compute_per_layer_s: float | None = None,
        save: bool = True,
    ) -> PrefillResult:
        """Prefill ``token_ids`` using ``source`` for the cached prefix; falls back to recompute on failure."""
        ids = torch.as_tensor(
            np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids)
        )
        ids = ids.to(torch.long)
        t0 = time.perf_counter()
        tl = self.timeline
        if tl is not None:
            tl.start()
        if source is not None and hasattr(source, "timeline"):
            source.timeline = tl
        keys = self.keys(ids)
        decision = self.plan(len(ids), keys, source, max_cached_chunks)
        n_chunks = decision.prefix_tokens // self.chunk_tokens
        if n_chunks and compute_per_layer_s is None and self.compute is not None:
            compute_per_layer_s = self.compute.layer_time_s(decision.prefix_tokens, decision.recompute_tokens)
        dev_ids = ids.to(self.device, non_blocking=True)
        try:
            result = self._run(dev_ids, keys, source, n_chunks, compute_per_layer_s, t0)
        except (KVLoadError, ObjectCacheError) as exc:
            source.abort()
            if tl is not None:
                tl.mark("fallback")
                tl.fallback = f"{type(exc).__name__}: {exc}"
            result = self._run(dev_ids, keys, None, 0, None, t0)
            result.fallback = f"{type(exc).__name__}: {exc}"
        if tl is not None and result.load is not None:
            tl.load_timings(result.load.timings_ms)
        result.keys = keys
        result.plan = decision if source is not None else None
        if save and self.saver is not None:
            result.saved_keys = self.saver.wait_for_save()
        return result

    def _run(self, ids, keys, source, n_chunks, compute_per_layer_s, t0) -> PrefillResult:
        model, ct = self.model, self.chunk_tokens
        total = ids.shape[0]
        cached = n_chunks * ct
        new = total - cached
        kv = model.new_kv(total)
        tl = self.timeline
        if n_chunks:
            if tl is not None:
                tl.mark("load_start")
            source.start_load(LoadRequest(keys[:n_chunks], kv, compute_per_layer_s))
        saver = self.saver
        full_chunks = total // ct
        if saver is not None:
            saver.begin(keys[n_chunks:full_chunks], n_chunks, kv)
        cos, sin = model.rope(cached, new)
        h = model.embed(ids[cached:])
        for layer in range(model.spec.num_layers):
            if n_chunks:
                w0 = time.monotonic() if tl is not None else 0.0
                source.wait_for_layer(layer)
                if tl is not None:
                    tl.layer_wait(layer, w0, time.monotonic())
            if tl is not None:
                tl.compute_begin(layer)
            h = model.layer_forward(layer, h, cos, sin, kv[layer], cached)
            if tl is not None:
                tl.compute_end(layer)
            if saver is not None:
                saver.save_layer(layer)
        logits = model.head(h[-1:])[0]
        _sync(self.device)
        ttft_s = time.perf_counter() - t0
        if tl is not None:
            tl.mark("ttft")
        stats = source.finish_load() if n_chunks else None
        return PrefillResult(
            logits=logits,
            kv=kv,
            total_tokens=total,
            cached_tokens=cached,
            source=source.name if n_chunks else "recompute",
            ttft_s=ttft_s,
            load=stats,
        )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


def kv_rel_err(kv_a: list[torch.Tensor], kv_b: list[torch.Tensor], tokens: int | None = None) -> float:
    """Largest per-layer relative error between two KV caches (first ``tokens`` rows)."""
    return max(rel_err(a[:, :tokens], b[:, :tokens]) for a, b in zip(kv_a, kv_b))
