"""KV sources and the save path of the layerwise prefill engine (shaped like vLLM's KV connector).

A *KV source* fills the cached-prefix rows of the engine's per-layer KV tensors.  The engine calls

    n = source.lookup(keys)            # how many leading chunks this source holds
    source.start_load(request)         # start moving them (returns at once)
    source.wait_for_layer(l)           # before computing layer l: make the compute stream wait for KV(l)
    source.finish_load()               # after the last layer: statistics, release

and catches ``KVLoadError`` (or any ``ObjectCacheError``) from ``wait_for_layer`` to fall back to recompute.

Sources: ``RecomputeSource`` (holds nothing), ``DramSource`` (pinned host memory, whole or layerwise
host-to-device copies) and ``ObjectCacheSource`` (the object-tier client's layer stream into pinned buffers).

Device data path.  Host bytes of layer ``l`` of ``n`` chunks are laid out as the gather payload:
``[n, 2, chunk_tokens, kv_heads, head_dim]`` (chunk-major, K then V per chunk).  ``LayerCopier`` copies them
with one non-blocking host-to-device copy into a device staging buffer on a dedicated copy stream, then a
permute copy (on the same stream) into the engine's token-major ``kv[l][:, :cached]``, and records a CUDA
event; ``wait_for_layer`` makes the compute stream wait on that event.  The host never synchronises with the
device per layer; it only blocks where the *data* has not arrived from the network yet (the object source).
On the CPU (tests) the same code runs with synchronous copies and no events.

Save path (``KVSaver``): after each layer is computed, the new full chunks' KV of that layer is permuted to
the chunk-major layout and copied device-to-host on a separate save stream straight into the DRAM tier's
pinned slots; ``wait_for_save`` (after the logits are out) registers the chunks in the DRAM tier and hands
them to a background thread that writes chunk objects (``testbed.kvformat``) to the object tier.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from scheduler.geometry import DEFAULT_CHUNK_TOKENS, ModelSpec
from scheduler.keys import KeyScope, longest_prefix, object_key
from testbed.errors import ObjectCacheError, StorageUnavailable
from testbed.kvreader import ReaderProcess, SharedSegment, decode_error


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
    """Base class and the recompute source: holds nothing, so every token is computed."""

    name = "recompute"

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


class DramTier:
    """Host-DRAM KV tier: one pinned pool per layer, ``capacity_chunks`` slots of one layer slice each.

    A chunk occupies the same slot index in every layer's pool, so a chunk's layer ``l`` is
    ``pool[l][slot*slice_bytes : (slot+1)*slice_bytes]`` in the chunk object's slice layout.  Chunks saved
    together get consecutive slots, so a prefix usually loads with one host-to-device copy per layer.
    Eviction is LRU by chunk (a later chunk of a chain is useless without the earlier ones, but lookups stop
    at the first hole, so evicting a middle chunk only shortens the usable prefix).
    """

    def __init__(
        self, spec: ModelSpec, capacity_chunks: int, *, chunk_tokens=DEFAULT_CHUNK_TOKENS, device="cpu"
    ):
        self.spec, self.chunk_tokens, self.capacity_chunks = spec, chunk_tokens, capacity_chunks
        self.device = torch.device(device)
        self.slice_bytes = spec.kv_bytes_per_chunk_layer(chunk_tokens)
        self.pools = [
            pinned_empty(capacity_chunks * self.slice_bytes, self.device) for _ in range(spec.num_layers)
        ]
        self.slots: OrderedDict[str, int] = OrderedDict()  # key -> slot, LRU order
        self._free = list(range(capacity_chunks))
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def lookup(self, keys: Sequence[str]) -> int:
        with self._lock:
            n = longest_prefix(keys, self.slots.__contains__)
            for k in keys[:n]:
                self.slots.move_to_end(k)
            return n

    def allocate(self, n: int) -> list[int]:
        """``n`` free slots, consecutive when possible, evicting least-recently-used chunks if needed."""
        with self._lock:
            while len(self._free) < n and self.slots:
                _, slot = self.slots.popitem(last=False)
                self._free.append(slot)
            if len(self._free) < n:
                raise MemoryError(f"DRAM tier holds {self.capacity_chunks} chunks; {n} requested")
            self._free.sort()
            for i in range(len(self._free) - n + 1):  # first run of n consecutive free slots
                if self._free[i + n - 1] - self._free[i] == n - 1:
                    picked = self._free[i : i + n]
                    del self._free[i : i + n]
                    return picked
            picked, self._free = self._free[:n], self._free[n:]
            return picked

    def commit(self, keys: Sequence[str], slots: Sequence[int]) -> None:
        with self._lock:
            for k, s in zip(keys, slots):
                if k in self.slots:  # already held (raced with another save): keep one copy
                    self._free.append(s)
                else:
                    self.slots[k] = s

    def release(self, slots: Sequence[int]) -> None:
        with self._lock:
            self._free.extend(slots)

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

    def put(self, keys: Sequence[str], layers: Sequence[bytes | memoryview]) -> None:
        """Insert chunks from per-layer chunk-major payloads (``layers[l]`` = n slices back to back)."""
        slots = self.allocate(len(keys))
        for layer, payload in enumerate(layers):
            src = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            for i, s in enumerate(slots):
                self.slot_view(layer, s).copy_(src[i * self.slice_bytes : (i + 1) * self.slice_bytes])
        self.commit(keys, slots)

    def chunk_layers(self, key: str) -> list[memoryview]:
        """One memoryview per layer of a held chunk (the chunk object's payload, layer by layer)."""
        s = self.slots[key]
        return [memoryview(self.slot_view(layer, s).numpy()) for layer in range(self.spec.num_layers)]


class DramSource(KVSource):
    """Local DRAM: every layer's copy is issued at ``start_load``; ``layerwise`` lets layer l's compute start
    when layer l has arrived, ``whole`` waits for all layers before layer 0 (the non-layerwise baseline)."""

    def __init__(self, tier: DramTier, copier: LayerCopier, *, layerwise: bool = True):
        self.tier, self.copier, self.layerwise = tier, copier, layerwise
        self.name = "dram_layerwise" if layerwise else "dram"

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

    def abort(self) -> None:
        self.copier.events.clear()


READERS = ("thread", "process")


class ObjectCacheSource(KVSource):
    """The object tier: ``client.load_layers`` runs in background threads, reading each layer's gather payload
    into a pinned buffer; when a layer is complete the thread that completed it issues the layer's
    host-to-device copy on the copy stream and records its event.  ``wait_for_layer`` blocks only until that
    layer's bytes have arrived (a host wait for the network, not for the GPU) and then queues an event wait
    on the compute stream.

    ``streams > 1`` splits the prefix's chunks into that many contiguous groups, one gather request each, in
    parallel: group ``g``'s slices land at its own offset of the same per-layer buffer (the payload is
    chunk-major), and a layer is complete when every group has delivered it.  One Python reader tops out
    around 2 GB/s; several spread the socket reads and checksum work over cores.

    ``reader``: ``"thread"`` runs the streams as threads of the engine process (above); ``"process"`` runs
    them in a reader process (``testbed.kvreader``: off the engine's GIL) that reads into a shared memory
    segment, which this process maps and registers as pinned memory; the engine thread then issues each
    layer's host-to-device copy when it learns (through a pipe) that the layer is complete: at its own
    ``wait_for_layer``, for every layer that has arrived by then.  The process path needs a real
    ``testbed.client.ObjectCacheClient`` (the reader builds its own from ``client.init_kwargs``).
    ``stats.timings_ms`` (ms from ``start_load``): ``first_layer`` (one per group) and, for the process
    reader, ``ipc`` (request reached the reader), ``threads_started``, ``request_sent`` / ``response_headers``
    (one per group: the server has checked every object of that gather) and ``last_group_end``.
    """

    name = "objectcache"

    def __init__(
        self,
        client,
        scope: KeyScope,
        copier: LayerCopier,
        *,
        check_exists: bool = True,
        streams: int = 1,
        reader: str = "thread",
    ):
        if streams < 1:
            raise ValueError("streams must be >= 1")
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        self.client, self.scope, self.copier, self.check_exists = client, scope, copier, check_exists
        self.streams = streams
        self.reader = reader
        self.spec = copier.spec
        self._buffers: list[torch.Tensor] = []
        self._threads: list[threading.Thread] = []
        self._proc: ReaderProcess | None = None
        self._segment: SharedSegment | None = None
        self._seg_tensor: torch.Tensor | None = None
        self._seg_gen = 0
        self._stride = 0
        self._registered = False
        self._req_id = 0
        self._in_flight = False

    def names(self, keys: Sequence[str]) -> list[str]:
        return [object_key(self.scope, k) for k in keys]

    def lookup(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        if not self.check_exists:
            return len(keys)
        try:
            present = dict(zip(keys, self.client.exists(self.names(keys))))
        except ObjectCacheError:
            return 0
        return longest_prefix(keys, present.__getitem__)

    def reserve(self, n_chunks: int) -> None:
        """Pinned per-layer receive buffers for ``n_chunks`` chunks (allocated once, reused); for the
        process reader also the shared segment and the reader process itself (its start takes ~1 s)."""
        if self.reader == "process":
            self._reserve_shared(n_chunks)
            return
        need = n_chunks * self.copier.slice_bytes
        if not self._buffers or self._buffers[0].numel() < need:
            self._buffers = [pinned_empty(need, self.copier.device) for _ in range(self.spec.num_layers)]
        self.copier.reserve(n_chunks)

    def start_load(self, request: LoadRequest) -> None:
        if self.reader == "process":
            self._start_load_process(request)
            return
        self._t0 = time.perf_counter()
        n = request.n_chunks
        self.stats = LoadStats(self.name, n)
        self.n = n
        L = self.spec.num_layers
        self._ready = [threading.Event() for _ in range(L)]
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self.copier.events.clear()
        if not n:
            return
        self.reserve(n)
        sb = self.copier.slice_bytes
        names = self.names(request.keys)
        groups = min(self.streams, n)
        bounds = [round(g * n / groups) for g in range(groups + 1)]
        self._groups = groups
        self._first_ms: list[float | None] = [None] * groups
        self._delivered = [0] * L
        self._lock = threading.Lock()
        self._threads = []
        for g in range(groups):
            lo, hi = bounds[g], bounds[g + 1]
            outs = [memoryview(b[lo * sb : hi * sb].numpy()) for b in self._buffers]
            t = threading.Thread(
                target=self._fetch,
                args=(names[lo:hi], outs, lo, request, g),
                name=f"objectcache-load-{g}",
                daemon=True,
            )
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def _fetch(self, names, outs, first: int, request: LoadRequest, group: int = 0) -> None:
        # The engine's KV tensors are inference tensors; inference mode is per thread.
        try:
            with torch.inference_mode():
                self._fetch_layers(names, outs, first, request, group)
        except BaseException as exc:  # delivered to the compute thread at its next wait
            self._cancel.set()
            with self._lock:
                if self._error is None:
                    self._error = exc
            for ev in self._ready:
                ev.set()

    def _fetch_layers(self, names, outs, first: int, request: LoadRequest, group: int = 0) -> None:
        sb = self.copier.slice_bytes
        nbytes = len(names) * sb
        expected = 0
        stream = self.client.load_layers(names, out=outs, compute_per_layer_s=request.compute_per_layer_s)
        try:
            for layer, view in stream:
                if self._cancel.is_set():
                    return
                if expected == 0:
                    self._first_ms[group] = (time.perf_counter() - self._t0) * 1e3
                if layer != expected or memoryview(view).nbytes != nbytes:
                    raise KVLoadError(
                        f"object tier sent layer {layer} ({memoryview(view).nbytes} bytes), "
                        f"expected layer {expected} ({nbytes} bytes)"
                    )
                host = self._buffers[layer][first * sb : first * sb + nbytes]
                if not _same_memory(view, host):  # the client used its own buffer: stage it ourselves
                    host.copy_(torch.frombuffer(view, dtype=torch.uint8))
                # Under the lock, so layers are copied in completion order (which is layer order: a group
                # delivers its layers in order) and the copy stream's staging buffer is never shared.
                with self._lock:
                    self._delivered[layer] += 1
                    if self._delivered[layer] == self._groups:
                        total = self.n * sb
                        self.copier.copy_layer(
                            layer, [(self._buffers[layer][:total], 0)], request.kv[layer], self.n
                        )
                        self.stats.bytes_loaded += total
                        self._ready[layer].set()
                expected += 1
        finally:
            stream.close()
        if expected != self.spec.num_layers:
            raise KVLoadError(f"object tier stream ended after {expected} of {self.spec.num_layers} layers")

    def wait_for_layer(self, layer: int) -> None:
        if not self.n:
            return
        if self.reader == "process":
            self._wait_process(layer)
            return
        t0 = time.perf_counter()
        self._ready[layer].wait()
        self.stats.wait_s.append(time.perf_counter() - t0)
        self._raise_or_copy(layer)

    def _raise_or_copy(self, layer: int) -> None:
        """After layer ``layer`` arrived (or the load failed): raise the load's error as an ObjectCacheError or
        KVLoadError, so the engine falls back to recompute, else make the compute stream wait for its copy."""
        if self._error is not None:
            err = self._error
            if isinstance(err, ObjectCacheError | KVLoadError):
                raise err
            raise KVLoadError(f"object tier load failed at layer {layer}: {err!r}") from err
        self.copier.wait(layer)

    def _join(self, timeout_s: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout=timeout_s)
        self._threads = []

    def finish_load(self) -> LoadStats:
        if self.reader == "process":
            self._drain(timeout_s=120.0)
            return self.stats
        self._join()
        if getattr(self, "_first_ms", None):
            self.stats.timings_ms["first_layer"] = list(self._first_ms)
        return self.stats

    def abort(self) -> None:
        if self.reader == "process":
            if self._in_flight and self._proc is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._proc.send(("cancel", self._req_id))
            self._drain(timeout_s=30.0)
            self.copier.events.clear()
            return
        if getattr(self, "_cancel", None) is not None:
            self._cancel.set()
        self._join(timeout_s=30)
        self.copier.events.clear()

    # ---- the reader-process path ------------------------------------------------------------------------
    def _reserve_shared(self, n_chunks: int) -> None:
        need = n_chunks * self.copier.slice_bytes
        if self._segment is None or self._stride < need:
            self._release_segment()
            L = self.spec.num_layers
            self._segment = SharedSegment(max(1, L * need))
            self._seg_gen += 1
            self._stride = need
            self._seg_tensor = torch.frombuffer(self._segment.mm, dtype=torch.uint8)
            if self.copier.cuda:
                # Pin the shared pages so the H2D copies are truly asynchronous DMA (done once, reused).
                rc = torch.cuda.cudart().cudaHostRegister(
                    self._seg_tensor.data_ptr(), self._segment.size_bytes, 0
                )
                if int(rc) != 0:
                    raise RuntimeError(f"cudaHostRegister of {self._segment.size_bytes} B failed: {rc}")
                self._registered = True
        self.copier.reserve(n_chunks)
        if self._proc is None:
            self._proc = ReaderProcess()
        self._proc.ensure_started()

    def _release_segment(self) -> None:
        if self._segment is None:
            return
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._seg_tensor.data_ptr())
            self._registered = False
        self._seg_tensor = None
        self._segment.close()
        self._segment = None

    def _start_load_process(self, request: LoadRequest) -> None:
        n = request.n_chunks
        self.stats = LoadStats(self.name, n)
        self.n = n
        self.copier.events.clear()
        if not n:
            return
        kwargs = getattr(self.client, "init_kwargs", None)
        if kwargs is None:
            raise ValueError("the process reader needs a testbed.client.ObjectCacheClient (init_kwargs)")
        if self._in_flight:  # a previous request was not finished or aborted
            self.abort()
        self._reserve_shared(n)
        sb = self.copier.slice_bytes
        names = self.names(request.keys)
        groups = min(self.streams, n)
        bounds = [round(g * n / groups) for g in range(groups + 1)]
        spans = [(names[lo:hi], lo * sb, (hi - lo) * sb) for lo, hi in zip(bounds, bounds[1:])]
        self._req_id += 1
        self._ready = [False] * self.spec.num_layers
        self._error: BaseException | None = None
        self._kv = request.kv
        self._t0 = time.monotonic()
        seg = self._segment
        msg = ("load", self._req_id, kwargs, seg.path, self._seg_gen, seg.size_bytes, self._stride, spans)
        try:
            self._proc.send(msg + (self.spec.num_layers, request.compute_per_layer_s, self._t0))
        except (OSError, ValueError) as exc:
            self._proc.close()
            raise StorageUnavailable(f"object tier reader process is gone: {exc!r}") from exc
        self._in_flight = True

    def _handle(self, msg) -> None:
        kind, rid = msg[0], msg[1]
        if rid != self._req_id:
            return  # a late message of an aborted request
        if kind == "L":
            layer = msg[2]
            total = self.n * self.copier.slice_bytes
            lo = layer * self._stride
            self.copier.copy_layer(layer, [(self._seg_tensor[lo : lo + total], 0)], self._kv[layer], self.n)
            self.stats.bytes_loaded += total
            self._ready[layer] = True
        elif kind == "E":
            if self._error is None:
                self._error = decode_error(msg[2], KVLoadError)
        elif kind == "D":
            self._in_flight = False
            t = msg[2]

            def ms(x):
                return None if x is None else (x - self._t0) * 1e3

            self.stats.timings_ms = {
                "ipc": ms(t.get("recv_s")),
                "threads_started": ms(t.get("threads_started_s")),
                "request_sent": [ms(x) for x in t.get("sent_s", [])],
                "response_headers": [ms(x) for x in t.get("response_s", [])],
                "first_layer": [ms(x) for x in t.get("first_layer_s", [])],
                "last_group_end": max((ms(x) for x in t.get("end_s", []) if x is not None), default=None),
            }

    def _reader_died(self, exc: BaseException, layer: int | None = None) -> None:
        self._in_flight = False
        if self._error is None:
            self._error = StorageUnavailable(f"object tier reader process died: {exc!r}", layer=layer)
        if self._proc is not None:
            self._proc.close()

    def _wait_process(self, layer: int) -> None:
        t0 = time.perf_counter()
        try:
            # recv blocks in os.read (no GIL held); then drain what else has arrived, so later layers'
            # copies are queued on the copy stream as early as this thread can issue them.
            while not self._ready[layer] and self._error is None and self._in_flight:
                self._handle(self._proc.recv())
            while self._in_flight and self._error is None and self._proc.poll():
                self._handle(self._proc.recv())
        except (EOFError, OSError) as exc:
            self._reader_died(exc, layer)
        self.stats.wait_s.append(time.perf_counter() - t0)
        if self._error is None and not self._ready[layer]:
            self._error = KVLoadError(f"object tier reader finished without layer {layer}")
        self._raise_or_copy(layer)

    def _drain(self, timeout_s: float) -> None:
        """Read the reader's messages until it has finished the current request (or kill it)."""
        deadline = time.monotonic() + timeout_s
        try:
            while self._in_flight:
                msg = self._proc.recv(timeout_s=max(0.0, deadline - time.monotonic()))
                if msg is None:
                    self._reader_died(TimeoutError(f"no end of request after {timeout_s} s"))
                    return
                self._handle(msg)
        except (EOFError, OSError) as exc:
            self._reader_died(exc)

    def close(self) -> None:
        """Stop the reader process and free the shared segment (the thread reader holds nothing)."""
        if self._proc is not None:
            if self._in_flight:
                self.abort()
            self._proc.close()
            self._proc = None
        self._release_segment()


def _same_memory(view, host: torch.Tensor) -> bool:
    try:
        t = torch.frombuffer(view, dtype=torch.uint8)
    except (TypeError, ValueError):
        return False
    return t.data_ptr() == host.data_ptr()


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
        self._job: tuple | None = None
        self._staging: torch.Tensor | None = None

    def begin(self, keys: Sequence[str], first_chunk: int, kv: list[torch.Tensor]) -> None:
        """Prepare to save chunks ``first_chunk .. first_chunk+len(keys)-1`` of ``kv`` (skipping held ones)."""
        todo = [first_chunk + i for i, k in enumerate(keys) if k not in self.tier]
        self._job = None
        if not todo:
            return
        slots = self.tier.allocate(len(todo))
        runs: list[tuple[int, int, int]] = []  # (index into todo, first slot, count)
        for j, s in enumerate(slots):
            if runs and runs[-1][1] + runs[-1][2] == s:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((j, s, 1))
        keys_todo = [keys[c - first_chunk] for c in todo]
        self._job = (keys_todo, todo, slots, runs, kv)

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
        _, chunks, _, runs, kv = self._job
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
        keys, _, slots, _, _ = self._job
        self._job = None
        if self.cuda:
            self.stream.synchronize()
        self.tier.commit(keys, slots)
        if self.client is not None:
            self.pending.append(self._uploads.submit(self._upload, keys))
        return keys

    def _upload(self, keys: list[str], batch_chunks: int = 16) -> int:
        from testbed.kvformat import encode_chunk

        written = 0
        for i in range(0, len(keys), batch_chunks):  # bounded memory: a batch of encoded objects at a time
            items = [
                (
                    object_key(self.scope, k),
                    encode_chunk(self.spec, self.tier.chunk_layers(k), self.chunk_tokens),
                )
                for k in keys[i : i + batch_chunks]
                if k in self.tier  # evicted before we got to it: nothing to upload from
            ]
            written += self.client.put_chunks(items) if items else 0
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
