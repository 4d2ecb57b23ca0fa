"""The connector's scheduler half: lookup, fetch-vs-recompute planning, and the per-step work orders.

Per request: ``on_new_request`` derives the chained chunk keys of the prompt (model fingerprint, tenant
namespace, the request's ``cache_salt`` as secret salt).  ``matched_tokens`` (vLLM's
``get_num_new_matched_tokens``) checks them in bulk (parallel HEADs) once, takes the longest present prefix,
and asks the scheduler core's planner (``testbed.engine.plan.decide_fetch`` -> ``scheduler.planner``) how much of it is worth loading rather than recomputing; loads are
synchronous (they feed the same step's forward).  ``build_meta`` turns the step's scheduled requests into
``LoadSpec``s (new or resumed requests with a planned load) and ``SaveSpec``s (full prompt chunks whose KV
becomes complete in this step and that the object tier does not hold yet).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from scheduler.compute import RooflineCompute
from scheduler.geometry import ModelSpec
from scheduler.keys import chunk_keys, longest_prefix, object_key
from testbed.client import ObjectCacheClient
from testbed.engine.plan import decide_fetch
from testbed.engine.vllm.config import ConnectorConfig
from testbed.engine.vllm.layout import ChunkSpan
from testbed.engine.vllm.metadata import LoadSpec, ObjectCacheMetadata, RequestState, SaveSpec
from testbed.engine.vllm.stats import ObjectCacheConnectorStats

log = logging.getLogger(__name__)


class SchedulerSide:
    def __init__(
        self,
        cfg: ConnectorConfig,
        model: ModelSpec,
        stats: Callable[[], ObjectCacheConnectorStats],
        client: Callable[[], ObjectCacheClient],
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.fingerprint = model.fingerprint()
        self._stats = stats
        self._client = client
        self._compute = RooflineCompute(model, peak_flops=cfg.cpu_peak_flops, hbm_Bps=cfg.cpu_mem_Bps)
        self.requests: dict[str, RequestState] = {}

    def on_new_request(self, req_id: str, prompt_token_ids, cache_salt: str | None) -> RequestState:
        tokens = list(prompt_token_ids or [])
        scope = self.cfg.scope(self.fingerprint, cache_salt)
        keys = chunk_keys(tokens, scope, self.cfg.chunk_tokens) if tokens else []
        st = RequestState([object_key(scope, k) for k in keys], len(tokens))
        self.requests[req_id] = st
        return st

    def matched_tokens(self, st: RequestState, num_computed_tokens: int) -> int:
        """Tokens beyond vLLM's ``num_computed_tokens`` that the connector will load."""
        if not self.cfg.load:
            return 0
        if not st.looked_up:
            self._lookup(st, num_computed_tokens)
        st.local_tokens = st.load_start_token = num_computed_tokens
        return max(0, st.load_end_token - num_computed_tokens)

    def _lookup(self, st: RequestState, num_computed_tokens: int) -> None:
        st.looked_up = True
        # Never load the last prompt token: its logits give the first output token.
        max_chunks = min(len(st.names), max(0, (st.prompt_tokens - 1) // self.cfg.chunk_tokens))
        self._stats().add("lookup_tokens", st.prompt_tokens)
        if max_chunks == 0:
            return
        t0 = time.monotonic()
        try:
            present = self._exists_prefix(st.names[:max_chunks])
        except Exception as e:  # noqa: BLE001 - the object tier is optional: no hit, recompute
            log.warning("ObjectCache lookup failed, recomputing: %r", e)
            self._stats().add("lookup_errors", 1)
            st.result["lookup_error"] = repr(e)[:300]
            return
        finally:
            lookup_s = time.monotonic() - t0
            st.result["lookup_ms"] = round(1e3 * lookup_s, 3)
            self._stats().add("lookup_s", lookup_s)
        hit_chunks = longest_prefix(range(max_chunks), lambda i: present[i])
        st.hit_tokens = hit_chunks * self.cfg.chunk_tokens
        st.next_save_chunk = hit_chunks  # stored already
        self._stats().add("hit_tokens", st.hit_tokens)
        st.load_end_token = self.plan(st, num_computed_tokens)

    def _exists_prefix(self, names: list[str]) -> list[bool]:
        """Existence of ``names`` as far as the prefix goes: the first chunk alone (a miss costs one round
        trip), then the rest in parallel (a hit costs two)."""
        first = self._client().exists(names[:1])
        if not first[0] or len(names) == 1:
            return first + [False] * (len(names) - 1)
        return first + self._client().exists(names[1:])

    def plan(self, st: RequestState, local_tokens: int) -> int:
        """End (token index) of the prefix worth having after the load: the planner's choice, or the hit."""
        if st.hit_tokens <= local_tokens:
            return 0
        if self.cfg.planner == "all":
            return st.hit_tokens
        decision = decide_fetch(
            st.prompt_tokens,
            compute=self._compute,
            num_layers=self.model.num_layers,
            kv_bytes_per_token_layer=self.model.kv_bytes_per_token_layer,
            hbm_cached_tokens=local_tokens,
            object_cached_tokens=st.hit_tokens,
            object_Bps=self.cfg.object_bandwidth_Bps,
            object_first_byte_s=self.cfg.object_overhead_s,
            chunk_tokens=self.cfg.chunk_tokens,
        )
        st.predicted_ttft_ms = 1e3 * decision.predicted_ttft_s
        st.recompute_ttft_ms = 1e3 * decision.recompute_ttft_s
        return decision.prefix_tokens if decision.object_tokens > 0 else 0

    def after_alloc(self, st: RequestState, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            st.load_end_token = st.load_start_token
            return
        st.load_end_token = st.load_start_token + num_external_tokens
        st.pending_load = True
        self._stats().add("planned_load_tokens", num_external_tokens)

    def build_meta(self, scheduler_output) -> ObjectCacheMetadata:
        meta = ObjectCacheMetadata()
        n_sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self.requests.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            st.computed_tokens = new.num_computed_tokens + n_sched.get(new.req_id, 0)
            self._add_work(meta, new.req_id, st)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.requests.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:  # a resumed request gets its whole (new) block table
                st.block_ids = (
                    list(new_ids[0]) if req_id in cached.resumed_req_ids else st.block_ids + list(new_ids[0])
                )
            st.computed_tokens = cached.num_computed_tokens[i] + n_sched.get(req_id, 0)
            self._add_work(meta, req_id, st)
        return meta

    def _add_work(self, meta: ObjectCacheMetadata, req_id: str, st: RequestState) -> None:
        if st.pending_load:
            st.pending_load = False
            span = ChunkSpan.of(st.load_start_token, st.load_end_token, self.cfg.chunk_tokens)
            names = st.names[span.first_chunk : span.end_chunk]
            meta.loads.append(
                LoadSpec(
                    req_id,
                    names,
                    st.load_start_token,
                    st.load_end_token,
                    span.skip_tokens,
                    list(st.block_ids),
                )
            )
        done_chunks = min(len(st.names), st.computed_tokens // self.cfg.chunk_tokens)
        if self.cfg.save and done_chunks > st.next_save_chunk:
            idx = list(range(st.next_save_chunk, done_chunks))
            meta.saves.append(SaveSpec(req_id, idx, [st.names[i] for i in idx], list(st.block_ids)))
            st.next_save_chunk = done_chunks
            st.queued_save_chunks += len(idx)

    def on_worker_results(self, results: dict[str, dict[str, Any]]) -> None:
        for req_id, res in results.items():
            st = self.requests.get(req_id)
            if st is None:
                continue
            st.result.update(res)
            if res.get("failed_tokens"):  # vLLM recomputes from the load start: write those chunks back then
                st.next_save_chunk = min(st.next_save_chunk, st.load_start_token // self.cfg.chunk_tokens)

    def finished(self, req_id: str) -> dict[str, Any] | None:
        st = self.requests.pop(req_id, None)
        return None if st is None else st.summary()
