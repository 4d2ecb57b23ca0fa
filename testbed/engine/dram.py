"""The host-DRAM KV tier, its KV source and the save path that fills it.

``DramTier``: one pinned host pool per layer, a chunk in the same slot of every pool; which chunks are evicted
(LRU or S3-FIFO, pins, TTLs) is decided by the scheduler core (``scheduler.tiers.TierCache``).
``DramSource``: loads a prefix from the tier with whole or layerwise host-to-device copies (``LayerCopier``,
``testbed.engine.kvload``).

Save path (``KVSaver``): after each layer is computed, the new full chunks' KV of that layer is permuted to
the chunk-major layout and copied device-to-host on a separate save stream straight into the DRAM tier's
pinned slots; ``wait_for_save`` (after the logits are out) registers the chunks in the DRAM tier and hands
them to a background thread that writes chunk objects (``testbed.wire.kvformat``) to the object tier.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from scheduler.geometry import DEFAULT_CHUNK_TOKENS, ModelSpec
from scheduler.keys import KeyScope, object_key
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


@dataclass
class SaveJob:
    """One prefill's chunks to save: ``keys`` (not yet held) are chunks ``chunks`` (indices into the prompt)
    of ``kv``, written into DRAM slots ``slots``; ``runs``: (index into ``keys``, first slot, count) runs of
    consecutive slots."""

    keys: list[str]
    chunks: list[int]
    slots: list[int]
    runs: list[tuple[int, int, int]]
    kv: list[torch.Tensor]


class KVSaver:
    """Save path: new full chunks -> DRAM tier (device-to-host on a save stream, straight into pinned slots)
    and, asynchronously, -> the object tier as chunk objects.  ``object_client`` may be ``None``."""

    def __init__(
        self, tier: DramTier | None, *, object_client=None, scope: KeyScope | None = None, dtype=None
    ):
        self.tier, self.client, self.scope = tier, object_client, scope
        if tier is None:
            raise ValueError("KVSaver needs a DRAM tier (the object tier is written from it)")
        self.spec, self.chunk_tokens, self.slice_bytes = tier.spec, tier.chunk_tokens, tier.slice_bytes
        self.cuda = tier.device.type == "cuda"
        self.stream = torch.cuda.Stream(tier.device) if self.cuda else None
        self.dtype = dtype
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="objectcache-save")
        self.pending: list[Future] = []
        self._job: SaveJob | None = None
        # New chunks not saved because the DRAM tier could not make room (full of pinned chunks).
        self.skipped_chunks = 0
        self._staging: torch.Tensor | None = None

    def begin(self, keys: Sequence[str], first_chunk: int, kv: list[torch.Tensor]) -> None:
        """Prepare to save chunks ``first_chunk .. first_chunk+len(keys)-1`` of ``kv``; the ones the tier
        already holds are not written again, only refreshed (a use and a new expiry)."""
        todo = [first_chunk + i for i, k in enumerate(keys) if k not in self.tier]
        self.tier.refresh([k for k in keys if k in self.tier], self._namespace())
        self._job = None
        if not todo:
            return
        try:
            slots = self.tier.allocate(len(todo))
        except MemoryError:  # the prefill's answer does not depend on saving: skip, count it
            self.skipped_chunks += len(todo)
            return
        runs: list[tuple[int, int, int]] = []  # (index into todo, first slot, count)
        for j, s in enumerate(slots):
            if runs and runs[-1][1] + runs[-1][2] == s:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((j, s, 1))
        keys_todo = [keys[c - first_chunk] for c in todo]
        self._job = SaveJob(keys_todo, todo, slots, runs, kv)

    def _namespace(self) -> str:
        """The namespace the DRAM tier's TTL is looked up by."""
        return self.scope.namespace if self.scope is not None else "default"

    def _chunk_major(self, kv_layer: torch.Tensor, chunks: list[int]) -> torch.Tensor:
        """``[m, 2, ct, H, D]`` view/copy of the given chunks of one layer's token-major KV."""
        s, ct = self.spec, self.chunk_tokens
        if chunks == list(range(chunks[0], chunks[0] + len(chunks))):
            c0, m = chunks[0], len(chunks)
            return (
                kv_layer[:, c0 * ct : (c0 + m) * ct]
                .view(2, m, ct, s.num_kv_heads, s.head_dim)
                .permute(1, 0, 2, 3, 4)
            )
        return torch.stack([kv_layer[:, c * ct : (c + 1) * ct] for c in chunks])

    def save_layer(self, layer: int) -> None:
        """Queue the D2H copy of ``layer``'s new chunks (call right after the layer's compute is queued):
        one permute into a device staging buffer, then one copy per run of consecutive DRAM slots."""
        if self._job is None:
            return
        chunks, runs, kv = self._job.chunks, self._job.runs, self._job.kv
        sb, dt = self.slice_bytes, kv[layer].dtype
        if not self.cuda:
            cm = self._chunk_major(kv[layer], chunks)
            for j, slot, count in runs:
                self.tier.slot_view(layer, slot, count).view(dt).view(cm[j : j + count].shape).copy_(
                    cm[j : j + count]
                )
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.tier.device))
        with torch.cuda.stream(self.stream):
            need = len(chunks) * sb
            if self._staging is None or self._staging.numel() < need:
                self._staging = torch.empty(need, dtype=torch.uint8, device=self.tier.device)
            cm = self._chunk_major(kv[layer], chunks)
            self._staging[:need].view(dt).view(cm.shape).copy_(cm)
            for j, slot, count in runs:
                self.tier.slot_view(layer, slot, count).copy_(
                    self._staging[j * sb : (j + count) * sb], non_blocking=True
                )

    def wait_for_save(self) -> list[str]:
        """Finish the DRAM copies, register the chunks, start the object-tier upload; returns saved keys."""
        if self._job is None:
            return []
        keys, slots = self._job.keys, self._job.slots
        self._job = None
        if self.cuda:
            self.stream.synchronize()
        self.tier.commit(keys, slots, self._namespace())
        if self.client is not None:
            # Pinned until encoded: an evicted slot could be reused by the next save before the upload reads it.
            self.tier.pin(keys)
            self.pending.append(self._uploads.submit(self._upload, keys))
        return keys

    def _upload(self, keys: list[str], batch_chunks: int = 16) -> int:
        from testbed.wire.kvformat import encode_chunk

        written, unpinned = 0, 0
        try:
            for i in range(0, len(keys), batch_chunks):  # bounded memory: a batch of objects at a time
                batch = keys[i : i + batch_chunks]
                items = [
                    (
                        object_key(self.scope, k),
                        encode_chunk(self.spec, self.tier.chunk_layers(k), self.chunk_tokens),
                    )
                    for k in batch
                    if k
                    in self.tier.slots  # pinned since the save, so still held unless the tier was cleared
                ]
                self.tier.unpin(batch)
                unpinned = i + len(batch)
                written += self.client.put_chunks(items) if items else 0
        finally:
            self.tier.unpin(keys[unpinned:])
        return written

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait for every queued object-tier write; returns objects written; re-raises upload errors."""
        written = 0
        pending, self.pending = self.pending, []
        for fut in pending:
            written += fut.result(timeout=timeout_s)
        return written

    def close(self) -> None:
        self._uploads.shutdown(wait=True)
