"""The KV load protocol of the layerwise prefill engine (shaped like vLLM's KV connector) and the device data
path its sources share.

A *KV source* fills the cached-prefix rows of the engine's per-layer KV tensors.  The engine calls

    n = source.lookup(keys)            # how many leading chunks this source holds
    source.start_load(request)         # start moving them (returns at once)
    source.wait_for_layer(l)           # before computing layer l: make the compute stream wait for KV(l)
    source.finish_load()               # after the last layer: statistics, release

and catches ``KVLoadError`` (or any ``ObjectCacheError``) from ``wait_for_layer`` to fall back to recompute.
Here: ``KVSource`` (the base class, and ``RecomputeSource``: holds nothing), ``LoadRequest``, ``LoadStats``,
``KVLoadError``, ``pinned_empty`` and ``LayerCopier``.  The sources that hold KV are ``DramSource``
(``testbed.engine.dram``) and ``ObjectCacheSource`` (``testbed.engine.objectsource``).

Device data path.  Host bytes of layer ``l`` of ``n`` chunks are laid out as the gather payload:
``[n, 2, chunk_tokens, kv_heads, head_dim]`` (chunk-major, K then V per chunk).  ``LayerCopier`` copies them
with one non-blocking host-to-device copy into a device staging buffer on a dedicated copy stream, then a
permute copy (on the same stream) into the engine's token-major ``kv[l][:, :cached]``, and records a CUDA
event; ``wait_for_layer`` makes the compute stream wait on that event.  The host never synchronises with the
device per layer; it only blocks where the *data* has not arrived from the network yet (the object source).
On the CPU (tests) the same code runs with synchronous copies and no events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from scheduler.geometry import ModelSpec


class KVLoadError(RuntimeError):
    """A source could not deliver the KV it promised (the engine falls back to recompute)."""


@dataclass
class LoadRequest:
    """What to load: ``keys`` (chunk keys, prefix order) into rows ``[0, len(keys)*chunk_tokens)`` of every
    ``kv[l]`` (``[2, total_tokens, kv_heads, head_dim]`` on the engine's device)."""

    keys: list[str]
    kv: list[torch.Tensor]
    compute_per_layer_s: float | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.keys)


@dataclass
class LoadStats:
    """Host-side view of one load: seconds the compute thread blocked waiting per layer (data not there)."""

    source: str
    n_chunks: int = 0
    bytes_loaded: int = 0
    wait_s: list[float] = field(default_factory=list)
    # Where the first layer's time went (ms from start_load; object source only): see ObjectCacheSource.
    timings_ms: dict = field(default_factory=dict)
    # Seconds from start_load until the last layer's bytes were on the host (object source only; None when
    # not measured or the load failed).
    transfer_s: float | None = None

    @property
    def achieved_Bps(self) -> float | None:
        """Bytes per second the load reached (``bytes_loaded / transfer_s``), ``None`` when not measured."""
        if not self.transfer_s or self.transfer_s <= 0 or not self.bytes_loaded:
            return None
        return self.bytes_loaded / self.transfer_s

    @property
    def first_layer_wait_s(self) -> float:
        return self.wait_s[0] if self.wait_s else 0.0

    @property
    def total_wait_s(self) -> float:
        return float(sum(self.wait_s))


def pinned_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 host buffer, page-locked when the engine runs on CUDA (needed for async copies)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


class LayerCopier:
    """Host chunk-major layer payloads -> token-major device KV rows, on a copy stream with one event a layer."""

    def __init__(self, spec: ModelSpec, chunk_tokens: int, device: torch.device, max_chunks: int, dtype):
        self.spec, self.chunk_tokens, self.device, self.dtype = spec, chunk_tokens, device, dtype
        self.slice_bytes = spec.kv_bytes_per_chunk_layer(chunk_tokens)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # One staging buffer is enough: the H2D copy of layer l+1 is ordered after layer l's permute on the
        # same stream.  Grown on demand (outside any timed path in the benchmarks: they warm up first).
        self._staging = torch.empty(0, dtype=torch.uint8, device=device)
        self.reserve(max_chunks)
        self.events: dict[int, torch.cuda.Event] = {}

    def reserve(self, n_chunks: int) -> None:
        need = n_chunks * self.slice_bytes
        if self.cuda and self._staging.numel() < need:
            self._staging = torch.empty(need, dtype=torch.uint8, device=self.device)

    def _chunk_view(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        s = self.spec
        return (
            flat[: n * self.slice_bytes]
            .view(self.dtype)
            .view(n, 2, self.chunk_tokens, s.num_kv_heads, s.head_dim)
        )

    def _dest_view(self, kv_layer: torch.Tensor, n: int) -> torch.Tensor:
        s = self.spec
        return kv_layer[:, : n * self.chunk_tokens].view(2, n, self.chunk_tokens, s.num_kv_heads, s.head_dim)

    def copy_layer(
        self, layer: int, pieces: Sequence[tuple[torch.Tensor, int]], kv_layer: torch.Tensor, n: int
    ):
        """Copy one layer of ``n`` chunks.  ``pieces``: (host uint8 tensor, chunk offset) runs that together
        cover chunks ``0..n-1`` in order.  Non-blocking on CUDA; records ``events[layer]``."""
        dest = self._dest_view(kv_layer, n)
        if not self.cuda:
            for host, first in pieces:
                k = host.numel() // self.slice_bytes
                dest[:, first : first + k].copy_(self._chunk_view(host, k).permute(1, 0, 2, 3, 4))
            return
        self.reserve(n)
        with torch.cuda.stream(self.stream):
            for host, first in pieces:
                lo = first * self.slice_bytes
                self._staging[lo : lo + host.numel()].copy_(host, non_blocking=True)
            dest.copy_(self._chunk_view(self._staging, n).permute(1, 0, 2, 3, 4))
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[layer] = ev

    def wait(self, layer: int) -> None:
        """Make the current (compute) stream wait for ``layer``'s copy; no host synchronisation."""
        ev = self.events.pop(layer, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)


class KVSource:
    """Base class and the recompute source: holds nothing, so every token is computed.

    For the fetch-vs-recompute decision (``testbed.engine.plan``) a source says which tier its bytes come
    from (``tier_name``: ``dram``, ``object``, or ``none``), the rate it expects its next load to reach
    (``expected_Bps()``, bytes/s, ``None`` when unknown) and the time before a load's first byte
    (``first_byte_s``, s).
    """

    name = "recompute"
    tier_name = "none"
    first_byte_s = 0.0

    def expected_Bps(self) -> float | None:
        """Rate the next load is expected to reach (bytes/s), ``None`` when unknown."""
        return None

    def lookup(self, keys: Sequence[str]) -> int:
        return 0

    def start_load(self, request: LoadRequest) -> None:
        if request.n_chunks:
            raise KVLoadError(f"{self.name} holds no KV")
        self.stats = LoadStats(self.name)

    def wait_for_layer(self, layer: int) -> None:
        return None

    def finish_load(self) -> LoadStats:
        return getattr(self, "stats", LoadStats(self.name))

    def abort(self) -> None:
        """Give up on the current load (after an error); must leave the source reusable."""
        return None


RecomputeSource = KVSource
