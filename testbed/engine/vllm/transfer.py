"""Background transfers of the worker side: one layer-major load per request, and the write-back queue.

``LayerLoad`` runs ``ObjectCacheClient.load_layers`` (one gather request against ObjectCache's server,
ranged GETs against plain S3) in a thread and hands each verified layer to a ``scatter`` callback that
writes it into vLLM's paged blocks; the forward pass waits per layer (``wait``), so layer ``l`` of the
prefill overlaps the fetch of layers ``l+1...``.  A failure (missing object, checksum mismatch, server gone)
releases every waiter and is kept in ``error``: the caller reports the request's loaded blocks as invalid
so vLLM recomputes them.  A corrupt object is reported to the server (``report_corrupt``), which
re-verifies and quarantines it, so the next lookup misses.

``ChunkSaver`` encodes full chunks (``kvformat.encode_chunk``, per-layer checksums) and writes them with
``If-None-Match: *`` (idempotent: a chunk that exists is skipped) on its own thread and client, off the
forward's critical path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from scheduler.geometry import ModelSpec
from testbed.client import ObjectCacheClient
from testbed.wire import kvformat
from testbed.wire.errors import ChecksumMismatch, CorruptObject

log = logging.getLogger(__name__)


class LayerLoad:
    """One request's layer-major load of ``names`` (chunk objects) into vLLM's blocks."""

    def __init__(
        self,
        client: ObjectCacheClient,
        names: Sequence[str],
        num_layers: int,
        scatter: Callable[[int, memoryview], None],
    ) -> None:
        self.client = client
        self.names = list(names)
        self.num_layers = num_layers
        self.scatter = scatter
        self.error: BaseException | None = None
        self.layers_done = 0
        self.load_s = 0.0
        self.path: str | None = None
        self._ready = [threading.Event() for _ in range(num_layers)]
        self._thread = threading.Thread(target=self._run, name="oc-layer-load", daemon=True)

    def start(self) -> LayerLoad:
        self._t0_s = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for layer, payload in self.client.load_layers(
                self.names, layer_start=0, layer_end=self.num_layers
            ):
                self.scatter(layer, payload)
                self.layers_done = layer + 1
                self._ready[layer].set()
            self.path = self.client.last_path
        except BaseException as e:  # noqa: BLE001 - every failure means: recompute these blocks
            self.error = e
            self._report_corrupt(e)
        finally:
            self.load_s = time.monotonic() - self._t0_s
            for ev in self._ready:
                ev.set()

    def _report_corrupt(self, e: BaseException) -> None:
        key = getattr(e, "key", None)
        if isinstance(e, (ChecksumMismatch, CorruptObject)) and key:
            quarantined = self.client.report_corrupt(key)
            log.warning("ObjectCache: corrupt chunk %s (%s); quarantined=%s", key, e, quarantined)
        else:
            log.warning("ObjectCache: load of %d chunks failed: %r", len(self.names), e)

    def wait(self, layer: int) -> float:
        """Block until layer ``layer`` is in the blocks (or the load failed); returns the stall in seconds."""
        if layer >= self.num_layers or self._ready[layer].is_set():
            return 0.0
        t0 = time.monotonic()
        self._ready[layer].wait()
        return time.monotonic() - t0

    def join(self) -> None:
        self._thread.join()

    @property
    def ok(self) -> bool:
        return self.error is None and self.layers_done == self.num_layers


class ChunkSaver:
    """Write-back queue: ``submit(name, layers)`` returns at once; a thread encodes and PUTs."""

    def __init__(self, client: ObjectCacheClient, model: ModelSpec, chunk_tokens: int, dtype: str) -> None:
        self.client = client
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.dtype = dtype
        self.counts = {"saved_chunks": 0, "skipped_chunks": 0, "save_errors": 0}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="oc-chunk-save", daemon=True)
        self._thread.start()

    def submit(self, name: str, layers: Sequence | Callable[[], Sequence]) -> None:
        """Queue one chunk: ``layers[l]`` is layer ``l``'s slice (K then V), bytes-like; or a function
        returning them (called on the write-back thread: conversions stay off the forward's path)."""
        self._queue.put((name, layers))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._save(*item)
            finally:
                self._queue.task_done()

    def _save(self, name: str, layers: Sequence) -> None:
        try:
            if callable(layers):
                layers = layers()
            blob = kvformat.encode_chunk(self.model, layers, self.chunk_tokens, self.dtype)
            written = self.client.put_chunks([(name, blob)])
            key = "saved_chunks" if written else "skipped_chunks"
        except Exception as e:  # noqa: BLE001 - a failed write-back is only a future miss
            log.warning("ObjectCache: write-back of %s failed: %r", name, e)
            key = "save_errors"
        with self._lock:
            self.counts[key] += 1

    def take_counts(self) -> dict[str, int]:
        """Counts since the last call."""
        with self._lock:
            out, self.counts = self.counts, {k: 0 for k in self.counts}
        return out

    def flush(self) -> None:
        """Block until every queued chunk is written (or failed)."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=30)
