"""What the two halves of the connector tell each other, and the scheduler's per-request state.

Scheduler -> worker, once per step (``ObjectCacheMetadata``): which requests load which chunks into which
blocks (``LoadSpec``), and which newly completed chunks to write back from which blocks (``SaveSpec``).
Worker -> scheduler, once per step (``ObjectCacheWorkerMeta``): per request, what the load did.
Token positions are request-relative token indexes; ``block_ids`` is the request's block table (one KV
cache group), so token ``s`` lives in block ``block_ids[s // block_size]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class LoadSpec:
    """Fill tokens ``[start_token, end_token)`` of a request from the chunk objects ``names`` (the first one
    starts ``skip_tokens`` before ``start_token``) into the blocks ``block_ids``."""

    req_id: str
    names: list[str]
    start_token: int
    end_token: int
    skip_tokens: int
    block_ids: list[int]


@dataclass
class SaveSpec:
    """Write back chunks ``chunk_indexes`` (objects ``names``, ``chunk_tokens`` each) of a request."""

    req_id: str
    chunk_indexes: list[int]
    names: list[str]
    block_ids: list[int]


@dataclass
class ObjectCacheMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class ObjectCacheWorkerMeta(KVConnectorWorkerMetadata):
    """Per-request outcome of this step's loads: req_id -> {loaded_tokens | failed_tokens, load_ms,
    stall_ms, path, chunks, error}."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        for req_id, res in getattr(other, "results", {}).items():
            self.results.setdefault(req_id, {}).update(res)
        return self


@dataclass
class RequestState:
    """Scheduler-side state of one request, from ``on_new_request`` to ``request_finished``.

    ``names``: object names of the prompt's full chunks.  ``hit_tokens``: leading tokens present in the
    object tier; ``local_tokens``: vLLM's own prefix-cache hit; ``[load_start_token, load_end_token)``: what
    the planner chose to load.  ``next_save_chunk``: first chunk not yet known stored or queued.
    ``computed_tokens``: tokens whose KV is in the blocks after the step being scheduled.
    """

    names: list[str]
    prompt_tokens: int
    looked_up: bool = False
    pending_load: bool = False
    hit_tokens: int = 0
    local_tokens: int = 0
    load_start_token: int = 0
    load_end_token: int = 0
    next_save_chunk: int = 0
    queued_save_chunks: int = 0
    computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    predicted_ttft_ms: float | None = None
    recompute_ttft_ms: float | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What ``request_finished`` returns as ``kv_transfer_params["objectcache"]``."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
            "local_tokens": self.local_tokens,
            "planned_load_tokens": max(0, self.load_end_token - self.load_start_token),
            "predicted_ttft_ms": self.predicted_ttft_ms,
            "recompute_ttft_ms": self.recompute_ttft_ms,
            "write_back_chunks": self.queued_save_chunks,
            **self.result,
        }
