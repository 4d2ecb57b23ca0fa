"""The object tier as a KV source: ``ObjectCacheSource``.

The object-tier client's layer stream (``testbed.client.core``) is read into pinned per-layer buffers, by threads
of the engine process or by a reader process (``testbed.engine.reader``) into a shared memory segment; each
complete layer's host-to-device copy goes through ``LayerCopier`` (``testbed.engine.kvload``).  The engine's
compute thread blocks only where a layer's bytes have not arrived from the network yet.

One class a little over 400 lines: its two readers (threads, process) share the stream grouping, the
buffer bookkeeping and the failure path, which is what the class is.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

import torch

from scheduler.keys import KeyScope, longest_prefix, object_key
from testbed.engine.kvload import KVLoadError, KVSource, LayerCopier, LoadRequest, LoadStats, pinned_empty
from testbed.engine.reader import (
    CancelCommand,
    GatherGroup,
    LayerReady,
    LoadCommand,
    LoadDone,
    LoadFailed,
    ReaderProcess,
    decode_error,
    new_pace_group,
)
from testbed.engine.segment import LayerSegment
from testbed.wire.errors import ObjectCacheError, StorageUnavailable

READERS = ("thread", "process")


# Short prefixes still get this many streams (when ``streams`` allows): on the H100 a 2K-token prefix loaded
# in 56 ms with 4 streams and 74 ms with 2 (results/testbed/h100_streams_auto_raw.json).
MIN_STREAMS = 4

# Weight of the latest load in the running estimate of the achieved rate (``observed_Bps``): recent loads
# count most, one odd load does not flip the fetch-vs-recompute decision on its own.
OBSERVED_WEIGHT = 0.5


class ObjectCacheSource(KVSource):
    """The object tier: ``client.load_layers`` runs in background threads, reading each layer's gather payload
    into a pinned buffer; when a layer is complete the thread that completed it issues the layer's
    host-to-device copy on the copy stream and records its event.  ``wait_for_layer`` blocks only until that
    layer's bytes have arrived (a host wait for the network, not for the GPU) and then queues an event wait
    on the compute stream.

    ``streams > 1`` splits the prefix's chunks into that many contiguous groups, one gather request each, in
    parallel: group ``g``'s slices land at its own offset of the same per-layer buffer (the payload is
    chunk-major), and a layer is complete when every group has delivered it.  One Python reader tops out
    around 2 GB/s; several spread the socket reads and checksum work over cores.  ``min_stream_bytes``: a
    stream carries at least this much of the prefix (fewer streams for short prefixes; 0: always
    ``streams``; at least ``MIN_STREAMS``).  On the H100, paced at 100 Gbps, a 4K-token prefix of
    Llama-3.1-8B (537 MB) loaded in 78-86 ms with 4 streams and 101-136 ms with 8, while 16K and 60K prefixes
    need 8 (`docs/engine.md`, "Gather streams per prefill").

    ``reader``: ``"thread"`` runs the streams as threads of the engine process (above); ``"process"`` runs
    them in a reader process (``testbed.engine.reader``: off the engine's GIL) that reads into a shared memory
    segment, which this process maps and registers as pinned memory; the engine thread then issues each
    layer's host-to-device copy when it learns (through a pipe) that the layer is complete: at its own
    ``wait_for_layer``, for every layer that has arrived by then.  The process path needs a real
    ``testbed.client.core.ObjectCacheClient`` (the reader builds its own from ``client.init_kwargs``).
    ``stats.timings_ms`` (ms from ``start_load``): per group ``request_sent`` / ``response_headers`` (the
    server has checked every object of that gather, or an early gather's first few) / ``first_byte`` (the
    first layer frame's head) / ``first_layer``, and for the process reader ``ipc`` (request reached the
    reader), ``threads_started`` and ``last_group_end``.  ``timeline`` (set by the engine): a
    ``testbed.engine.timeline.Timeline`` that gets each layer's arrival in the host buffer.

    Link rate for the fetch-vs-recompute decision (``expected_Bps``): ``link_Bps`` when configured (bytes/s),
    else ``observed_Bps``, a running average (``OBSERVED_WEIGHT``) of what completed loads achieved
    (``LoadStats.achieved_Bps``: bytes over the time from ``start_load`` to the last layer's arrival), else
    unknown.  A load paced to the engine's compute (``compute_per_layer_s``) achieves less than the link can
    carry, so the observed rate errs towards recomputing only where the compute is that fast anyway.
    ``first_byte_s``: expected time before a load's first byte (s, configured).  ``segment``: the process
    reader's receive buffers (``testbed.engine.segment.LayerSegment``).
    """

    name = "objectcache"
    tier_name = "object"

    def __init__(
        self,
        client,
        scope: KeyScope,
        copier: LayerCopier,
        *,
        check_exists: bool = True,
        streams: int = 1,
        reader: str = "thread",
        min_stream_bytes: int = 128 << 20,
        link_Bps: float | None = None,
        first_byte_s: float = 0.0,
    ):
        if streams < 1:
            raise ValueError("streams must be >= 1")
        if min_stream_bytes < 0:
            raise ValueError("min_stream_bytes must be >= 0")
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        self.client, self.scope, self.copier, self.check_exists = client, scope, copier, check_exists
        self.streams = streams
        self.min_stream_bytes = min_stream_bytes
        self.reader = reader
        self.link_Bps = link_Bps
        self.first_byte_s = first_byte_s
        self.observed_Bps: float | None = None
        self.spec = copier.spec
        self._buffers: list[torch.Tensor] = []
        self._threads: list[threading.Thread] = []
        self._proc: ReaderProcess | None = None
        self.segment = LayerSegment(self.spec.num_layers, cuda=copier.cuda)
        self._req_id = 0
        self._in_flight = False
        self.timeline = None  # a Timeline the engine sets: layer arrivals are stamped into it

    def stream_count(self, n_chunks: int) -> int:
        """Gather streams for a prefix of ``n_chunks`` chunk objects: one per ``min_stream_bytes`` of the
        prefix, at least ``MIN_STREAMS`` and at most ``streams``, never more than the chunks."""
        if n_chunks <= 0:
            return 0
        groups = min(self.streams, n_chunks)
        if self.min_stream_bytes > 0:
            prefix_bytes = n_chunks * self.copier.slice_bytes * self.spec.num_layers
            groups = min(groups, max(MIN_STREAMS, prefix_bytes // self.min_stream_bytes))
        return groups

    def expected_Bps(self) -> float | None:
        """The configured ``link_Bps``, else the observed rate of past loads, else ``None`` (bytes/s)."""
        return self.link_Bps if self.link_Bps is not None else self.observed_Bps

    def _observe(self, transfer_s: float | None) -> None:
        """Record a completed load's transfer time (s) in ``stats`` and the running rate estimate."""
        self.stats.transfer_s = transfer_s
        rate = self.stats.achieved_Bps
        if rate is None:
            return
        prev = self.observed_Bps
        self.observed_Bps = rate if prev is None else OBSERVED_WEIGHT * rate + (1 - OBSERVED_WEIGHT) * prev

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
        self._t0_mono = time.monotonic()
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
        groups = self.stream_count(n)
        bounds = [round(g * n / groups) for g in range(groups + 1)]
        self._groups = groups
        self._pace_group = new_pace_group(groups)
        self._first_ms: list[float | None] = [None] * groups
        self._stamps: list[dict] = [{} for _ in range(groups)]  # the client's stamps per stream
        self._delivered = [0] * L
        self._last_layer_s: float | None = None
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
        stream = self.client.load_layers(
            names,
            out=outs,
            compute_per_layer_s=request.compute_per_layer_s,
            timings=self._stamps[group],
            pace_group=self._pace_group,
        )
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
                        if self.timeline is not None:
                            self.timeline.layer_arrived(layer)
                        total = self.n * sb
                        self.copier.copy_layer(
                            layer, [(self._buffers[layer][:total], 0)], request.kv[layer], self.n
                        )
                        self.stats.bytes_loaded += total
                        if layer == self.spec.num_layers - 1:
                            self._last_layer_s = time.perf_counter()
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
            end_ms = self.stats.timings_ms.get("last_group_end")
            if self.n and self._error is None and all(self._ready) and end_ms is not None:
                self._observe(end_ms / 1e3)
            return self.stats
        self._join()
        if getattr(self, "_first_ms", None):
            self.stats.timings_ms["first_layer"] = list(self._first_ms)
            for key, stamp in (
                ("request_sent", "sent_s"),
                ("response_headers", "response_s"),
                ("first_byte", "first_byte_s"),
            ):
                self.stats.timings_ms[key] = [
                    None if st.get(stamp) is None else (st[stamp] - self._t0_mono) * 1e3
                    for st in self._stamps
                ]
        if self.n and self._error is None and self._last_layer_s is not None:
            self._observe(self._last_layer_s - self._t0)
        return self.stats

    def abort(self) -> None:
        if self.reader == "process":
            if self._in_flight and self._proc is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._proc.send(CancelCommand(self._req_id))
            self._drain(timeout_s=30.0)
            self.copier.events.clear()
            return
        if getattr(self, "_cancel", None) is not None:
            self._cancel.set()
        self._join(timeout_s=30)
        self.copier.events.clear()

    # ---- the reader-process path ------------------------------------------------------------------------
    def _reserve_shared(self, n_chunks: int) -> None:
        self.segment.reserve(n_chunks * self.copier.slice_bytes)
        self.copier.reserve(n_chunks)
        if self._proc is None:
            self._proc = ReaderProcess()
        self._proc.ensure_started()

    def _start_load_process(self, request: LoadRequest) -> None:
        n = request.n_chunks
        self.stats = LoadStats(self.name, n)
        self.n = n
        self.copier.events.clear()
        if not n:
            return
        kwargs = getattr(self.client, "init_kwargs", None)
        if kwargs is None:
            raise ValueError("the process reader needs a testbed.client.core.ObjectCacheClient (init_kwargs)")
        if self._in_flight:  # a previous request was not finished or aborted
            self.abort()
        self._reserve_shared(n)
        sb = self.copier.slice_bytes
        names = self.names(request.keys)
        groups = self.stream_count(n)
        bounds = [round(g * n / groups) for g in range(groups + 1)]
        spans = [GatherGroup(names[lo:hi], lo * sb, (hi - lo) * sb) for lo, hi in zip(bounds, bounds[1:])]
        self._req_id += 1
        self._ready = [False] * self.spec.num_layers
        self._error: BaseException | None = None
        self._kv = request.kv
        self._t0 = time.monotonic()
        seg = self.segment
        cmd = LoadCommand(
            req_id=self._req_id,
            client_kwargs=kwargs,
            segment_path=seg.shared.path,
            segment_generation=seg.generation,
            segment_bytes=seg.shared.size_bytes,
            layer_stride_bytes=seg.layer_stride_bytes,
            groups=spans,
            num_layers=self.spec.num_layers,
            compute_per_layer_s=request.compute_per_layer_s,
            sent_monotonic_s=self._t0,
        )
        try:
            self._proc.send(cmd)
        except (OSError, ValueError) as exc:
            self._proc.close()
            raise StorageUnavailable(f"object tier reader process is gone: {exc!r}") from exc
        self._in_flight = True

    def _handle(self, msg: LayerReady | LoadFailed | LoadDone) -> None:
        if msg.req_id != self._req_id:
            return  # a late message of an aborted request
        if isinstance(msg, LayerReady):
            layer = msg.layer
            if self.timeline is not None:
                self.timeline.layer_arrived(layer, msg.arrived_s)
            total = self.n * self.copier.slice_bytes
            self.copier.copy_layer(layer, [(self.segment.layer(layer, total), 0)], self._kv[layer], self.n)
            self.stats.bytes_loaded += total
            self._ready[layer] = True
        elif isinstance(msg, LoadFailed):
            if self._error is None:
                self._error = decode_error(msg.error, KVLoadError)
        elif isinstance(msg, LoadDone):
            self._in_flight = False
            self.stats.timings_ms = msg.timings.ms_since(self._t0)

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
        self.segment.close()


def _same_memory(view, host: torch.Tensor) -> bool:
    try:
        t = torch.frombuffer(view, dtype=torch.uint8)
    except (TypeError, ValueError):
        return False
    return t.data_ptr() == host.data_ptr()
