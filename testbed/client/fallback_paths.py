"""The client's read paths for plain S3 services (Ceph RGW, MinIO, AWS), which have no gather.

* **ranged**: one ranged GET per chunk for its header, then one ranged GET per (chunk, layer) slice, bounded
  by ``max_concurrency`` concurrent requests and submitted in layer order, so early layers complete first.
* **whole**: one GET per chunk object, streamed; the slices are read straight into the per-layer buffers as
  they pass by.

Both return what the gather path returns (``testbed.client.gather_path``): a generator of ``(layer,
memoryview)`` pairs in layer order, each as soon as that layer is complete and every slice verified against
the checksum in its object header.  Errors are ``testbed.wire.errors`` classes whose messages name the object
and layer.
"""

from __future__ import annotations

import http.client
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures

from testbed.client.buffers import as_byte_view, layer_views
from testbed.client.signed import SignedHTTP, error_from_response, object_path, read_exact
from testbed.wire import kvformat
from testbed.wire.errors import (
    ChecksumMismatch,
    CorruptObject,
    GeometryMismatch,
    InvalidRequest,
    ProtocolError,
    StorageUnavailable,
    TruncatedStream,
)


def parse_named_header(name: str, blob: memoryview) -> kvformat.ChunkHeader:
    """Decode object ``name``'s header; errors name the object."""
    try:
        return kvformat.parse_header(blob)
    except CorruptObject as e:
        raise CorruptObject(f"object {name!r}: {e}", key=name) from e


def declared_header_bytes(name: str, blob: memoryview) -> int:
    """How many bytes hold object ``name``'s header (``kvformat.declared_header_bytes``); errors name it."""
    try:
        return kvformat.declared_header_bytes(blob)
    except CorruptObject as e:
        raise CorruptObject(f"object {name!r}: {e}", key=name) from e


def check_slice(name: str, layout: kvformat.ChunkHeader, layer: int, view: memoryview) -> None:
    """Raise ``ChecksumMismatch`` naming the chunk and layer unless ``view`` hashes to the stored checksum."""
    got = kvformat.slice_checksum(view)
    want = layout.checksums[layer]
    if got != want:
        raise ChecksumMismatch(
            f"chunk {name!r} layer {layer}: xxh3_64 {got:016x} != stored {want:016x}", key=name, layer=layer
        )


def layer_range_end(num_layers: int, layer_start: int, layer_end: int | None, what: str) -> int:
    """The end of the asked layer range, checked against the chunks' ``num_layers``."""
    end = num_layers if layer_end is None else layer_end
    if end > num_layers or layer_start >= end:
        raise InvalidRequest(f"layer range [{layer_start}, {end}) outside the {num_layers} layers of {what}")
    return end


class FallbackReader:
    """The ranged and whole-object read paths of one ``ObjectCacheClient``: its ``SignedHTTP`` connections,
    its thread pool, its bucket, at most ``max_concurrency`` requests in flight, and ``map_in_pool(fn, items)``
    (the client's parallel map over its pool)."""

    def __init__(
        self,
        signed_http: SignedHTTP,
        pool: Executor,
        bucket: str,
        max_concurrency: int,
        map_in_pool: Callable[[Callable, list], list],
    ) -> None:
        self._http = signed_http
        self._pool = pool
        self.bucket = bucket
        self.max_concurrency = max_concurrency
        self._map = map_in_pool

    # --- ranged ---------------------------------------------------------------------------------------------
    def layouts(self, names: list[str]) -> list[kvformat.ChunkHeader]:
        """Read every chunk's header with ranged GETs and check they agree on geometry."""

        def fetch(name: str) -> kvformat.ChunkHeader:
            buf = memoryview(bytearray(kvformat.HEADER_PROBE_BYTES))
            try:
                self._http.get_range_into(self.bucket, name, 0, buf, "read header")
            except TruncatedStream as e:  # object shorter than the probe: not a chunk object
                raise CorruptObject(f"object {name!r} is too short for a chunk header", key=name) from e
            need_bytes = declared_header_bytes(name, buf)
            if need_bytes > len(buf):
                big = memoryview(bytearray(need_bytes))
                self._http.get_range_into(self.bucket, name, 0, big, "read header")
                buf = big
            return parse_named_header(name, buf)

        layouts = self._map(fetch, names)
        for name, lay in zip(names, layouts):
            if lay.geometry() != layouts[0].geometry():
                raise GeometryMismatch(
                    f"chunk {name!r} has geometry {lay.geometry()}, chunk {names[0]!r} has {layouts[0].geometry()}",
                    key=name,
                )
        return layouts

    def ranged(
        self, names: list[str], layer_start: int, layer_end: int | None, out: Sequence | None
    ) -> Iterator[tuple[int, memoryview]]:
        """Generator of the layers read with one ranged GET per (chunk, layer) slice."""
        layouts = self.layouts(names)
        end = layer_range_end(layouts[0].num_layers, layer_start, layer_end, "the chunks")
        n, sb = len(names), layouts[0].slice_bytes
        views = layer_views(out, end - layer_start, n * sb)
        # Keep enough layers in flight to fill max_concurrency requests, but never write a buffer that an
        # earlier, not yet released layer still holds (out may be a ring of buffers).
        window_layers = max(2, math.ceil(2 * self.max_concurrency / n))
        owner: dict[int, int] = {}  # id of the underlying buffer -> layer holding it
        futures: dict[int, list[Future]] = {}
        next_submit = layer_start

        def fetch_slice(name: str, layout: kvformat.ChunkHeader, layer: int, view: memoryview) -> None:
            start, _ = layout.layer_range(layer)
            self._http.get_range_into(self.bucket, name, start, view, f"layer {layer}")
            check_slice(name, layout, layer, view)

        def buf_id(layer: int) -> int:
            return id(views[layer - layer_start].obj)

        try:
            for layer in range(layer_start, end):
                while (
                    next_submit < end
                    and next_submit - layer < window_layers
                    and buf_id(next_submit) not in owner
                ):
                    owner[buf_id(next_submit)] = next_submit
                    v = views[next_submit - layer_start]
                    futures[next_submit] = [
                        self._pool.submit(
                            fetch_slice, names[i], layouts[i], next_submit, v[i * sb : (i + 1) * sb]
                        )
                        for i in range(n)
                    ]
                    next_submit += 1
                for f in futures[layer]:
                    f.result()
                del futures[layer]
                yield layer, views[layer - layer_start]
                del owner[buf_id(layer)]
        finally:
            pending = [f for fs in futures.values() for f in fs]
            for f in pending:
                f.cancel()
            wait_futures(pending)  # nothing may write into the caller's buffers after we return

    # --- whole objects --------------------------------------------------------------------------------------
    def whole(
        self, names: list[str], layer_start: int, layer_end: int | None, out: Sequence | None
    ) -> Iterator[tuple[int, memoryview]]:
        """Generator of the layers read from one streamed GET per chunk object."""
        if out is not None and len({id(as_byte_view(b).obj) for b in out}) < len(out):
            raise ValueError("whole-object loading reads every layer at once: out buffers must be distinct")
        return WholeObjectRead(
            self._http, self._pool, self.bucket, names, layer_start, layer_end, out
        ).layers()


class WholeObjectRead:
    """One whole-object load: a pool task per chunk streams its object, reading each layer's slice into that
    layer's buffer and verifying it; ``layers()`` yields a layer once every chunk has delivered it.

    The first header that arrives fixes the geometry, the layer range and the buffers (``_setup``); every
    other chunk must match it.  A failure at layer ``k`` (a checksum) still lets the complete layers before
    ``k`` through; any other failure stops the stream at once.
    """

    def __init__(
        self,
        signed_http: SignedHTTP,
        pool: Executor,
        bucket: str,
        names: list[str],
        layer_start: int,
        layer_end: int | None,
        out: Sequence | None,
    ) -> None:
        self._http = signed_http
        self._pool = pool
        self._bucket = bucket
        self._names = names
        self._layer_start = layer_start
        self._layer_end = layer_end
        self._out = out
        self._views: Sequence[memoryview] | None = None
        self._done_chunks: list[int] = []  # per layer of the range: chunks that delivered it
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._cancelled = False
        self._geometry: tuple | None = None
        self._first_name = ""

    def layers(self) -> Iterator[tuple[int, memoryview]]:
        futures = [self._pool.submit(self._run, i) for i in range(len(self._names))]
        n = len(self._names)
        try:
            layer = self._layer_start
            while True:
                with self._cond:
                    while not self._blocks(layer) and (
                        self._views is None
                        or (layer < self._layer_end and self._done_chunks[layer - self._layer_start] < n)
                    ):
                        self._cond.wait()
                    if self._blocks(layer):
                        raise self._error
                    if layer >= self._layer_end:
                        return
                yield layer, self._views[layer - self._layer_start]
                layer += 1
        finally:
            self._cancelled = True
            for f in futures:
                f.cancel()
            wait_futures(futures)

    def _blocks(self, layer: int) -> bool:
        err = self._error
        return err is not None and (getattr(err, "layer", None) is None or layer >= err.layer)

    def _run(self, i: int) -> None:
        try:
            self._fetch(i)
        except BaseException as e:
            with self._cond:
                if self._error is None:
                    self._error = e
                self._cond.notify_all()

    def _setup(self, name: str, layout: kvformat.ChunkHeader) -> None:
        """First header seen: fix the geometry, the layer range and the output buffers."""
        end = layer_range_end(layout.num_layers, self._layer_start, self._layer_end, f"chunk {name!r}")
        self._layer_end = end
        self._views = layer_views(self._out, end - self._layer_start, len(self._names) * layout.slice_bytes)
        self._done_chunks = [0] * (end - self._layer_start)
        self._geometry = layout.geometry()
        self._first_name = name

    def _fetch(self, i: int) -> None:
        name = self._names[i]
        conn, resp = self._http.open("GET", object_path(self._bucket, name), {}, key=name)
        try:
            if resp.status != 200:
                raise error_from_response(resp.status, resp.read(), name)
            layout = self._read_header(name, resp)
            with self._cond:
                if self._views is None:
                    self._setup(name, layout)
                    self._cond.notify_all()  # the consumer waits for the geometry
                elif layout.geometry() != self._geometry:
                    raise GeometryMismatch(
                        f"chunk {name!r} has geometry {layout.geometry()}, chunk {self._first_name!r} has "
                        f"{self._geometry}",
                        key=name,
                    )
            if not self._read_layers(i, name, layout, resp):
                conn.close()
                return
            while resp.read(1 << 20):  # layers past layer_end
                pass
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise StorageUnavailable(f"GET {name!r}: {e}", key=name) from e
        except BaseException:
            conn.close()
            raise
        self._http.finish(conn, resp)

    @staticmethod
    def _read_header(name: str, resp: http.client.HTTPResponse) -> kvformat.ChunkHeader:
        head = memoryview(bytearray(kvformat.HEADER_PROBE_BYTES))
        read_exact(resp, head, f"header of {name!r}")
        need_bytes = declared_header_bytes(name, head)
        if need_bytes > len(head):
            big = memoryview(bytearray(need_bytes))
            big[: len(head)] = head
            read_exact(resp, big[len(head) :], f"header of {name!r}")
            head = big
        elif need_bytes < len(head):
            raise ProtocolError(
                f"object {name!r}: header of {need_bytes} B is shorter than the probe", key=name
            )
        return parse_named_header(name, head)

    def _read_layers(self, i: int, name: str, layout: kvformat.ChunkHeader, resp) -> bool:
        """Read chunk ``i``'s layers up to the range's end into the buffers, verified; False if cancelled."""
        sb = layout.slice_bytes
        scratch = memoryview(bytearray(sb)) if self._layer_start > 0 else None
        for layer in range(self._layer_end):
            if self._cancelled:
                return False
            if layer < self._layer_start:
                read_exact(resp, scratch, f"layer {layer} of {name!r}")
                continue
            view = self._views[layer - self._layer_start][i * sb : (i + 1) * sb]
            read_exact(resp, view, f"layer {layer} of {name!r}")
            check_slice(name, layout, layer, view)
            with self._cond:
                self._done_chunks[layer - self._layer_start] += 1
                self._cond.notify_all()
        return True
