"""The host-DRAM KV tier and its KV source (the save path that fills it: ``testbed.engine.save``).

``DramTier``: one pinned host pool per layer, a chunk in the same slot of every pool; which chunks are evicted
(LRU or S3-FIFO, pins, TTLs) is decided by the scheduler core (``scheduler.tiers.TierCache``).
``DramSource``: loads a prefix from the tier with whole or layerwise host-to-device copies (``LayerCopier``,
``testbed.engine.kvload``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from scheduler.geometry import DEFAULT_CHUNK_TOKENS, ModelSpec
from scheduler.tiers import TierCache
from testbed.engine.kvload import KVLoadError, KVSource, LayerCopier, LoadRequest, LoadStats, pinned_empty


class DramTier:
    """Host-DRAM KV tier: one pinned pool per layer, ``capacity_chunks`` slots of one layer slice each.

    A chunk occupies the same slot index in every layer's pool, so a chunk's layer ``l`` is
    ``pool[l][slot*slice_bytes : (slot+1)*slice_bytes]`` in the chunk object's slice layout.  Chunks saved
    together get consecutive slots, so a prefix usually loads with one host-to-device copy per layer.

    Which chunks stay is decided by the scheduler core: a ``scheduler.tiers.TierCache`` (the code the
    simulator's DRAM tier runs) holds the keys, sizes (``chunk_bytes``), pins and expiry times, and picks the
    victims; this class keeps the bytes and the key -> slot map in step with it.  ``policy``: ``lru`` or
    ``s3fifo``.  ``ttl_s``: seconds a chunk of a namespace stays usable after it was saved
    (``default_ttl_s`` for namespaces not listed).  ``clock``: seconds, monotonic; the tier reads it and
    passes the time to the core (which never reads a clock).  Pinned chunks (``pin``: a load is reading
    them) are never evicted.  A later chunk of a chain is useless without the earlier ones, but lookups stop
    at the first hole, so evicting a middle chunk only shortens the usable prefix.
    """

    def __init__(
        self,
        spec: ModelSpec,
        capacity_chunks: int,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        device="cpu",
        policy: str = "lru",
        ttl_s: Mapping[str, float] | None = None,
        default_ttl_s: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.spec, self.chunk_tokens, self.capacity_chunks = spec, chunk_tokens, capacity_chunks
        self.device = torch.device(device)
        self.slice_bytes = spec.kv_bytes_per_chunk_layer(chunk_tokens)
        self.chunk_bytes = self.slice_bytes * spec.num_layers
        self.pools = [
            pinned_empty(capacity_chunks * self.slice_bytes, self.device) for _ in range(spec.num_layers)
        ]
        self.cache = TierCache("dram", capacity_chunks * self.chunk_bytes, policy)
        self.ttl_s = dict(ttl_s or {})
        self.default_ttl_s = default_ttl_s
        self.clock = clock
        self.slots: dict[str, int] = {}  # key -> slot of every committed chunk (the keys of ``cache``)
        self._free = list(range(capacity_chunks))
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        """Held and not expired."""
        with self._lock:
            return self.cache.peek(key, self.clock())

    def __len__(self) -> int:
        return len(self.slots)

    def _forget(self, keys) -> None:
        """The core dropped ``keys`` (evicted or expired): free their slots.  Caller holds the lock."""
        for key in keys:
            slot = self.slots.pop(key, None)
            if slot is not None:
                self._free.append(slot)

    def lookup(self, keys: Sequence[str]) -> int:
        """Leading ``keys`` held (unexpired); counts hits and the first miss, refreshes their recency."""
        with self._lock:
            now_s = self.clock()
            n = 0
            for key in keys:
                hit = self.cache.get(key, now_s)
                if key in self.slots and key not in self.cache.entries:
                    self._forget([key])  # expired: the core dropped it
                if not hit:
                    break
                n += 1
            return n

    def allocate(self, n: int) -> list[int]:
        """``n`` free slots, consecutive when possible, dropping expired chunks and then evicting the core's
        victims if needed.  ``MemoryError`` if the unpinned chunks cannot make room."""
        if n <= 0:
            return []
        with self._lock:
            now_s = self.clock()
            self._forget(self.cache.expire(now_s))
            in_flight = self.capacity_chunks - len(self._free) - len(self.slots)  # allocated, not committed
            if n > self.capacity_chunks - in_flight:
                raise MemoryError(f"DRAM tier holds {self.capacity_chunks} chunks; {n} requested")
            try:
                evicted = self.cache.make_room((in_flight + n) * self.chunk_bytes)
            except MemoryError:
                self._forget([k for k in self.slots if k not in self.cache.entries])
                raise
            self._forget(e.key for e in evicted)
            self._free.sort()
            for i in range(len(self._free) - n + 1):  # first run of n consecutive free slots
                if self._free[i + n - 1] - self._free[i] == n - 1:
                    picked = self._free[i : i + n]
                    del self._free[i : i + n]
                    return picked
            picked, self._free = self._free[:n], self._free[n:]
            return picked

    def commit(self, keys: Sequence[str], slots: Sequence[int], namespace: str = "default") -> None:
        """Register chunks written into allocated ``slots``; a key already held keeps its old copy (same
        content: keys are content-addressed) and has its expiry refreshed."""
        ttl_s = self.ttl_s.get(namespace, self.default_ttl_s)
        with self._lock:
            now_s = self.clock()
            for k, s in zip(keys, slots):
                if k in self.slots:  # already held (raced with another save): keep one copy
                    self._free.append(s)
                    self.cache.put_entry(k, self.chunk_bytes, namespace, now_s, ttl_s)
                else:
                    # Never evicts: the slot was reserved by allocate.
                    self._forget(
                        e.key for e in self.cache.put_entry(k, self.chunk_bytes, namespace, now_s, ttl_s)
                    )
                    self.slots[k] = s

    def refresh(self, keys: Sequence[str], namespace: str = "default") -> None:
        """Saved again (a prefill produced chunks the tier already holds): a use for the eviction policy and
        a new expiry, as the simulator's write-back does; keys not held are ignored."""
        ttl_s = self.ttl_s.get(namespace, self.default_ttl_s)
        with self._lock:
            now_s = self.clock()
            for k in keys:
                if k in self.slots:
                    self.cache.put_entry(k, self.chunk_bytes, namespace, now_s, ttl_s)

    def release(self, slots: Sequence[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    def pin(self, keys: Sequence[str]) -> None:
        """Keep ``keys`` from eviction (and from expiry) until ``unpin``; keys not held are ignored."""
        with self._lock:
            for k in keys:
                if k in self.cache.entries:
                    self.cache.pin(k)

    def unpin(self, keys: Sequence[str]) -> None:
        with self._lock:
            for k in keys:
                e = self.cache.entries.get(k)
                if e is not None and e.pins > 0:
                    self.cache.unpin(k)

    def clear(self) -> list[str]:
        """Drop every unpinned chunk and free its slot (pinned ones are being read); returns the keys."""
        with self._lock:
            gone = [k for k, e in self.cache.entries.items() if e.pins == 0]
            for k in gone:
                self.cache.remove(k)
            self._forget(gone)
            return gone

    def expire(self) -> list[str]:
        """Drop the expired, unpinned chunks now (``allocate`` does it too); returns their keys."""
        with self._lock:
            gone = self.cache.expire(self.clock())
            self._forget(gone)
            return gone

    def slot_view(self, layer: int, slot: int, count: int = 1) -> torch.Tensor:
        lo = slot * self.slice_bytes
        return self.pools[layer][lo : lo + count * self.slice_bytes]

    def runs(self, keys: Sequence[str]) -> list[tuple[int, int, int]]:
        """(first chunk index, first slot, count) runs of consecutive slots covering ``keys``."""
        slots = [self.slots[k] for k in keys]
        out: list[tuple[int, int, int]] = []
        for i, s in enumerate(slots):
            if out and out[-1][1] + out[-1][2] == s:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
            else:
                out.append((i, s, 1))
        return out

    def put(
        self, keys: Sequence[str], layers: Sequence[bytes | memoryview], namespace: str = "default"
    ) -> None:
        """Insert chunks from per-layer chunk-major payloads (``layers[l]`` = n slices back to back)."""
        slots = self.allocate(len(keys))
        for layer, payload in enumerate(layers):
            src = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            for i, s in enumerate(slots):
                self.slot_view(layer, s).copy_(src[i * self.slice_bytes : (i + 1) * self.slice_bytes])
        self.commit(keys, slots, namespace)

    def chunk_layers(self, key: str) -> list[memoryview]:
        """One memoryview per layer of a held chunk (the chunk object's payload, layer by layer)."""
        s = self.slots[key]
        return [memoryview(self.slot_view(layer, s).numpy()) for layer in range(self.spec.num_layers)]


class DramSource(KVSource):
    """Local DRAM: every layer's copy is issued at ``start_load``; ``layerwise`` lets layer l's compute start
    when layer l has arrived, ``whole`` waits for all layers before layer 0 (the non-layerwise baseline)."""

    tier_name = "dram"

    def __init__(
        self, tier: DramTier, copier: LayerCopier, *, layerwise: bool = True, link_Bps: float | None = None
    ):
        self.tier, self.copier, self.layerwise = tier, copier, layerwise
        self.name = "dram_layerwise" if layerwise else "dram"
        # Host-to-device copies are asynchronous, so the host never sees their rate: configured only.
        self.link_Bps = link_Bps

    def expected_Bps(self) -> float | None:
        """The configured host-to-device rate (bytes/s; ``None``: unknown, take the whole cached prefix)."""
        return self.link_Bps

    def lookup(self, keys: Sequence[str]) -> int:
        return self.tier.lookup(keys)

    def start_load(self, request: LoadRequest) -> None:
        self.stats = LoadStats(self.name, request.n_chunks)
        self.n = request.n_chunks
        self.copier.events.clear()
        self._last = self.tier.spec.num_layers - 1
        if not self.n:
            return
        try:
            runs = self.tier.runs(request.keys)
        except KeyError as exc:
            raise KVLoadError(f"DRAM tier lost chunk {exc.args[0]}") from None
        # Pinned while the copies may still read their slots (the save path allocates slots meanwhile).
        self._pinned = list(request.keys)
        self.tier.pin(self._pinned)
        for layer in range(self.tier.spec.num_layers):
            pieces = [(self.tier.slot_view(layer, slot, count), first) for first, slot, count in runs]
            self.copier.copy_layer(layer, pieces, request.kv[layer], self.n)
        self.stats.bytes_loaded = self.n * self.tier.slice_bytes * self.tier.spec.num_layers

    def wait_for_layer(self, layer: int) -> None:
        if not self.n:
            return
        if self.layerwise:
            self.copier.wait(layer)
        elif layer == 0:
            self.copier.wait(self._last)  # one copy stream: the last event covers every layer
        self.stats.wait_s.append(0.0)

    def finish_load(self) -> LoadStats:
        self._unpin()
        return self.stats

    def abort(self) -> None:
        self.copier.events.clear()
        self._unpin()

    def _unpin(self) -> None:
        self.tier.unpin(getattr(self, "_pinned", []))
        self._pinned = []
