"""``ObjectCacheConnector``: vLLM v1 KV connector that loads prefix KV layer by layer from ObjectCache.

Load it out of tree::

    --kv-transfer-config '{"kv_connector": "ObjectCacheConnector",
        "kv_connector_module_path": "testbed.engine.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"endpoint": "http://127.0.0.1:9000", "bucket": "kv",
                                      "credentials": {"access_key": "...", "secret_key": "..."}}}'

``kv_load_failure_policy: recompute`` makes vLLM recompute blocks that failed to load instead of failing
the request (its default is ``fail``); ``config.py`` lists the extra-config keys.

The class only adapts vLLM's interface: the scheduler half (lookup, planner, work orders) is
``scheduler_side.SchedulerSide``, the worker half (loads into blocks, write-back) ``worker_side.WorkerSide``;
vLLM builds one instance per role, each uses its half.  What the caller sees:

* per request, ``RequestOutput.kv_transfer_params["objectcache"]``: hit, planned and loaded tokens, load
  and stall time, read path, error (load figures arrive one step after the load, so a request needs at
  least two output tokens to carry them);
* per interval, ``ObjectCacheConnectorStats`` through vLLM's connector-stats channel (logged by vLLM with
  ``disable_log_stats=False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from testbed.client import ObjectCacheClient
from testbed.engine.vllm.config import ConnectorConfig, model_spec_from_vllm
from testbed.engine.vllm.metadata import ObjectCacheMetadata, ObjectCacheWorkerMeta
from testbed.engine.vllm.scheduler_side import SchedulerSide
from testbed.engine.vllm.stats import ObjectCacheConnectorStats
from testbed.engine.vllm.worker_side import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class ObjectCacheConnector(KVConnectorBase_V1):
    """See the module docstring."""

    _cache_hit_source = CacheHitSource.DISK  # vLLM's nearest label for a remote object tier

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        block_size = vllm_config.cache_config.block_size
        if self.cfg.chunk_tokens % block_size:
            raise ValueError(
                f"chunk_tokens={self.cfg.chunk_tokens} must be a multiple of block_size={block_size}"
            )
        self.model = model_spec_from_vllm(vllm_config, self.cfg.model_name)
        self.stats = ObjectCacheConnectorStats()
        self._client: ObjectCacheClient | None = None
        self.sched = SchedulerSide(self.cfg, self.model, lambda: self.stats, self._get_client)
        self.worker = WorkerSide(
            self.cfg,
            self.model,
            vllm_config.model_config.dtype,
            block_size,
            lambda: self.stats,
            self._get_client,
        )

    @property
    def requires_kv_delivery(self) -> bool:
        """Best effort: a write-back lost to preemption is only a future miss."""
        return False

    def _get_client(self) -> ObjectCacheClient:
        if self._client is None:
            self._client = ObjectCacheClient(**self.cfg.client_kwargs())
        return self._client

    # ============================== scheduler side ==============================
    def on_new_request(self, request: Request) -> None:
        self.sched.on_new_request(
            request.request_id, request.prompt_token_ids, getattr(request, "cache_salt", None)
        )

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        st = self.sched.requests.get(request.request_id)
        if st is None:
            st = self.sched.on_new_request(
                request.request_id, request.prompt_token_ids, getattr(request, "cache_salt", None)
            )
        return self.sched.matched_tokens(st, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        st = self.sched.requests.get(request.request_id)
        if st is not None:
            self.sched.after_alloc(st, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.sched.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput):
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, ObjectCacheWorkerMeta):
            self.sched.on_worker_results(meta.results)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        info = self.sched.finished(request.request_id)
        return False, None if info is None else {"objectcache": info}

    # ============================== both sides ==============================
    def get_kv_connector_stats(self) -> ObjectCacheConnectorStats | None:
        if self.worker.saver is not None:
            for key, n in self.worker.saver.take_counts().items():
                self.stats.add(key, n)
                if key == "saved_chunks":
                    self.stats.add("saved_tokens", n * self.cfg.chunk_tokens)
        if self.stats.is_empty():
            return None
        out, self.stats = self.stats, ObjectCacheConnectorStats()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> ObjectCacheConnectorStats:
        return ObjectCacheConnectorStats(data=dict(data or {}))

    # ============================== worker side ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        layout_kind = self._kv_transfer_config.get_from_extra_config("layout", "cpu_attn")
        self.worker.register(kv_caches, self._vllm_config.cache_config.cache_dtype, layout_kind)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ObjectCacheMetadata)
        self.worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ObjectCacheMetadata)
        self.worker.save_layer(meta, layer_name, kv_layer)

    def wait_for_save(self):
        self.worker.finish_step()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        results = self.worker.take_results()
        return ObjectCacheWorkerMeta(results) if results else None

    def shutdown(self):
        self.worker.close()
        if self._client is not None:
            self._client.close()
            self._client = None
