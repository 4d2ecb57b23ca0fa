"""The object-tier client's three read paths (``ObjectCacheClient.load_layers`` picks one).

* **gather** (the ObjectCache server): one signed ``POST /<bucket>?gather`` whose response streams framed
  layers, layer-major (layer ``l`` = the layer-``l`` slices of every chunk, in key order).  The client
  ``readinto``-s each layer's payload straight into the caller's buffer and verifies every slice against the
  checksum stored in its object header (end-to-end integrity).
* **ranged** (fallback for plain S3: Ceph RGW, MinIO, AWS): one ranged GET per chunk for its header, then one
  ranged GET per (chunk, layer) slice, bounded by ``max_concurrency`` concurrent requests and submitted in
  layer order, so early layers complete first.
* **whole** (fallback): one GET per chunk object, streamed; the slices are read straight into the per-layer
  buffers as they pass by.

All three return the same bytes: a generator of ``(layer, memoryview)`` pairs in layer order, each as soon as
that layer is complete and verified; the view holds ``n_chunks * slice_bytes`` bytes, chunk ``i``'s slice at
``[i * slice_bytes, (i + 1) * slice_bytes)``.  The paths are methods of ``ReadPaths``, which
``ObjectCacheClient`` (``testbed.client.core``) inherits; the HTTP layer under them is ``testbed.client.signed``.
Errors are ``testbed.wire.errors`` classes whose messages name the object and layer.
"""

from __future__ import annotations

import http.client
import json
import math
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from urllib.parse import quote

import numpy as np
import xxhash

from testbed.client.signed import _error_from_body, _RawBody, _read_exact, object_path
from testbed.wire import kvformat
from testbed.wire.errors import (
    ChecksumMismatch,
    ChunkMissing,
    CorruptObject,
    GeometryMismatch,
    InvalidRequest,
    ObjectCacheError,
    ProtocolError,
    StorageUnavailable,
    TruncatedStream,
)

GATHER_CONTENT_TYPE = "application/x-objectcache-gather"
# First bytes fetched of an object to read its header; a longer header (hundreds of layers) costs one more
# request.
HEADER_PROBE_BYTES = kvformat.HEADER_PROBE_BYTES

# Answers of a plain S3 service to ``POST /<bucket>?gather`` that mean "no such operation here".  RGW says 501
# NotImplemented; others answer 405 or treat it as a malformed browser-form POST.
_UNSUPPORTED_CODES = {"NotImplemented", "MethodNotAllowed", "MalformedPOSTRequest", "InvalidArgument"}
_UNSUPPORTED_STATUS = {405, 501}

_LAYER_FRAME = b"OCLF"
_ERROR_FRAME = b"OCER"
_END_FRAME = b"OCEN"

# Gather payloads larger than this are verified piece by piece, overlapping the receive of the next piece.
_VERIFY_PIECE_BYTES = 8 << 20


class GatherUnsupported(ObjectCacheError):
    """The endpoint does not implement the gather extension (a plain S3 service)."""


def _parse_header(name: str, blob: memoryview) -> kvformat.ChunkHeader:
    """Decode an object header; errors name the object."""
    try:
        return kvformat.parse_header(blob)
    except CorruptObject as e:
        raise CorruptObject(f"object {name!r}: {e}", key=name) from e


def _declared_header_bytes(name: str, blob: memoryview) -> int:
    """``header_bytes`` field of an object's first bytes (to know whether the probe read all of the header)."""
    if len(blob) < 12 or bytes(blob[:4]) != kvformat.MAGIC:
        raise CorruptObject(f"object {name!r} is not a KV chunk object (magic {bytes(blob[:4])!r})", key=name)
    return int.from_bytes(blob[8:12], "little")


def _as_byte_view(buf) -> memoryview:
    view = memoryview(buf)
    if view.readonly:
        raise ValueError("output buffers must be writable")
    if not view.c_contiguous:
        raise ValueError("output buffers must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _first_bad_slice(
    view: memoryview, want: Sequence[int], slice_bytes: int, lo: int, hi: int
) -> tuple[int, int] | None:
    """(index, computed xxh3_64) of the first slice in [lo, hi) whose checksum differs, else None."""
    for i in range(lo, hi):
        got = xxhash.xxh3_64_intdigest(view[i * slice_bytes : (i + 1) * slice_bytes])
        if got != want[i]:
            return i, got
    return None


class _LayerBuffers(Sequence):
    """One fresh buffer per layer, allocated when the layer is first asked for and left uninitialised (the
    exact read fills it before it is yielded).  Allocating and zeroing a whole request up front (64 MB at a
    32K-token prefix of the scaled model, 4 GB at 32K tokens of Llama-3.1-8B) holds the GIL for tens of
    milliseconds and stalls every other request's reader in the process."""

    def __init__(self, n_layers: int, layer_bytes: int) -> None:
        self._n = n_layers
        self._layer_bytes = layer_bytes
        self._views: dict[int, memoryview] = {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        i %= self._n
        v = self._views.get(i)
        if v is None:
            v = self._views[i] = memoryview(np.empty(self._layer_bytes, dtype=np.uint8))
        return v


class ReadPaths:
    """The gather, ranged and whole-object read paths, as methods of ``ObjectCacheClient`` (which inherits
    them).  They use the client's ``bucket``, ``endpoint_url``, ``timeout_s``, ``max_concurrency``, ``_http``
    (a ``SignedHTTP``), ``_pool`` (its thread pool), ``_map`` and ``report_corrupt``."""

    def _out_views(self, out: Sequence | None, n_layers: int, layer_bytes: int) -> Sequence[memoryview]:
        if out is None:
            return _LayerBuffers(n_layers, layer_bytes)
        if len(out) < n_layers:
            raise ValueError(f"out has {len(out)} buffers, need one per layer ({n_layers})")
        views = [_as_byte_view(b) for b in out[:n_layers]]
        for i, v in enumerate(views):
            if len(v) < layer_bytes:
                raise ValueError(f"out[{i}] holds {len(v)} bytes, layer needs {layer_bytes}")
        return [v[:layer_bytes] for v in views]

    # gather ------------------------------------------------------------------------------------------------
    def _gather(self, names, layer_start, layer_end, out, compute_per_layer_s, timings=None):
        """Generator of the gathered layers (the range is not empty)."""
        stamps = timings if timings is not None else {}
        request = {"version": 1, "keys": names, "layer_start": layer_start}
        if layer_end is not None:
            request["layer_end"] = layer_end
        if compute_per_layer_s is not None:
            request["compute_per_layer_s"] = float(compute_per_layer_s)
        body = json.dumps(request).encode()
        path = f"/{quote(self.bucket, safe='')}?gather"
        stamps["sent_s"] = time.monotonic()
        conn, resp = self._http.open("POST", path, {"Content-Type": "application/json"}, body)
        stamps["response_s"] = time.monotonic()
        stamps["stream_id"] = resp.getheader("x-oc-stream-id")
        raw: _RawBody | None = None
        try:
            if resp.status != 200:
                err_body = resp.read()
                err = _error_from_body(resp.status, err_body, None)
                if (
                    resp.status in _UNSUPPORTED_STATUS
                    or getattr(err, "s3_code_seen", "") in _UNSUPPORTED_CODES
                ):
                    raise GatherUnsupported(f"{self.endpoint_url} has no gather: {err}") from err
                if isinstance(err, ChunkMissing):
                    err.keys = [k for k in names if k in str(err)] or err.keys
                raise err
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip()
            if ctype != GATHER_CONTENT_TYPE:
                resp.read()
                raise GatherUnsupported(f"{self.endpoint_url} answered gather with Content-Type {ctype!r}")
            n = len(names)
            slice_bytes = int(resp.getheader("x-oc-slice-bytes", "-1"))
            first = int(resp.getheader("x-oc-layer-start", str(layer_start)))
            end = int(resp.getheader("x-oc-layer-end", "-1"))
            if int(resp.getheader("x-oc-num-chunks", "-1")) != n or slice_bytes < 0 or end < first:
                raise ProtocolError(f"gather response headers do not match the request: {resp.getheaders()}")
            if first != layer_start or (layer_end is not None and end != layer_end):
                raise ProtocolError(
                    f"gather answered layers [{first}, {end}), asked [{layer_start}, {layer_end})"
                )
            views = self._out_views(out, end - first, n * slice_bytes)
            if _RawBody.usable(conn, resp):
                raw = _RawBody(conn, resp, self.timeout_s)
                read = raw.read_exact
            else:

                def read(view: memoryview, what: str) -> None:
                    _read_exact(resp, view, what)

            fixed = memoryview(bytearray(20))
            for layer in range(first, end):
                read(fixed[:4], f"gather frame before layer {layer}")
                tag = bytes(fixed[:4])
                if tag == _ERROR_FRAME:
                    read(fixed[4:8], "gather error frame")
                    msg = bytearray(int.from_bytes(fixed[4:8], "little"))
                    read(memoryview(msg), "gather error frame")
                    raise TruncatedStream(
                        f"server aborted gather at layer {layer}: {msg.decode('utf-8', 'replace')}",
                        layer=layer,
                    )
                if tag != _LAYER_FRAME:
                    raise ProtocolError(
                        f"gather: expected a layer frame for layer {layer}, got {tag!r}", layer=layer
                    )
                read(fixed[4:20], f"gather layer {layer} frame header")
                got_layer = int.from_bytes(fixed[4:8], "little")
                n_slices = int.from_bytes(fixed[8:12], "little")
                got_slice = int.from_bytes(fixed[12:20], "little")
                if (got_layer, n_slices, got_slice) != (layer, n, slice_bytes):
                    raise ProtocolError(
                        f"gather frame says layer {got_layer}, {n_slices} x {got_slice} B; "
                        f"expected layer {layer}, {n} x {slice_bytes} B",
                        layer=layer,
                    )
                sums = bytearray(8 * n)
                read(memoryview(sums), f"gather layer {layer} checksums")
                view = views[layer - first]
                want = struct.unpack(f"<{n}Q", sums)
                # A large payload arrives in pieces of whole slices; each piece is verified in the pool
                # while the next one is received (xxhash releases the GIL), so verification overlaps the
                # network instead of following it.  The last (or only) piece is verified inline.
                step = max(1, _VERIFY_PIECE_BYTES // max(1, slice_bytes))
                checks = []
                for lo in range(0, n, step):
                    hi = min(n, lo + step)
                    read(view[lo * slice_bytes : hi * slice_bytes], f"gather layer {layer} payload")
                    if hi == n:  # the last (or only) piece: nothing left to overlap with
                        checks.append(_first_bad_slice(view, want, slice_bytes, lo, hi))
                    else:
                        checks.append(self._pool.submit(_first_bad_slice, view, want, slice_bytes, lo, hi))
                for check in checks:
                    bad = check if isinstance(check, tuple) or check is None else check.result()
                    if bad is not None:
                        i, got = bad
                        self.report_corrupt(names[i])
                        raise ChecksumMismatch(
                            f"chunk {names[i]!r} layer {layer}: xxh3_64 {got:016x} != stored {want[i]:016x}",
                            key=names[i],
                            layer=layer,
                        )
                if layer == first:
                    stamps["first_layer_s"] = time.monotonic()
                yield layer, view
            read(fixed[:8], "gather end frame")
            if bytes(fixed[:4]) == _ERROR_FRAME:
                msg = bytearray(int.from_bytes(fixed[4:8], "little"))
                read(memoryview(msg), "gather error frame")
                raise TruncatedStream(f"server aborted gather at its end: {msg.decode('utf-8', 'replace')}")
            if bytes(fixed[:4]) != _END_FRAME:
                raise ProtocolError(f"gather: expected the end frame, got {bytes(fixed[:4])!r}")
            if int.from_bytes(fixed[4:8], "little") != end - first:
                raise ProtocolError("gather end frame counts a different number of layers")
            if (raw.remaining > 0) if raw is not None else resp.read(1):
                raise ProtocolError("gather: bytes after the end frame")
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise StorageUnavailable(f"gather from {self.endpoint_url}: {e}") from e
        except BaseException:
            conn.close()  # also on GeneratorExit: the rest of the stream is not read
            raise
        if raw is not None:
            raw.close()
        self._http.finish(conn, resp)

    # fallback: headers ---------------------------------------------------------------------------------------
    def _layouts(self, names: list[str]) -> list[kvformat.ChunkHeader]:
        """Read every chunk's header with ranged GETs and check they agree on geometry."""

        def fetch(name: str) -> kvformat.ChunkHeader:
            buf = memoryview(bytearray(HEADER_PROBE_BYTES))
            try:
                self._http.get_range_into(self.bucket, name, 0, buf, "read header")
            except TruncatedStream as e:  # object shorter than the probe: not a chunk object
                raise CorruptObject(f"object {name!r} is too short for a chunk header", key=name) from e
            need = _declared_header_bytes(name, buf)
            if need > len(buf):
                big = memoryview(bytearray(need))
                self._http.get_range_into(self.bucket, name, 0, big, "read header")
                buf = big
            return _parse_header(name, buf)

        layouts = self._map(fetch, names)
        for name, lay in zip(names, layouts):
            if lay.geometry() != layouts[0].geometry():
                raise GeometryMismatch(
                    f"chunk {name!r} has geometry {lay.geometry()}, chunk {names[0]!r} has {layouts[0].geometry()}",
                    key=name,
                )
        return layouts

    def _check_range(
        self, layouts: list[kvformat.ChunkHeader], layer_start: int, layer_end: int | None
    ) -> int:
        num_layers = layouts[0].num_layers
        end = num_layers if layer_end is None else layer_end
        if end > num_layers or layer_start >= end:
            raise InvalidRequest(
                f"layer range [{layer_start}, {end}) outside the chunks' {num_layers} layers"
            )
        return end

    # fallback: ranged ---------------------------------------------------------------------------------------
    def _ranged(self, names, layer_start, layer_end, out):
        layouts = self._layouts(names)
        end = self._check_range(layouts, layer_start, layer_end)
        n, sb = len(names), layouts[0].slice_bytes
        views = self._out_views(out, end - layer_start, n * sb)
        # Keep enough layers in flight to fill max_concurrency requests, but never write a buffer that an
        # earlier, not yet released layer still holds (out may be a ring of buffers).
        window = max(2, math.ceil(2 * self.max_concurrency / n))
        owner: dict[int, int] = {}  # id of the underlying buffer -> layer holding it
        futures: dict[int, list[Future]] = {}
        next_submit = layer_start

        def fetch_slice(name: str, layout: kvformat.ChunkHeader, layer: int, view: memoryview) -> None:
            start, _ = layout.layer_range(layer)
            self._http.get_range_into(self.bucket, name, start, view, f"layer {layer}")
            got = xxhash.xxh3_64_intdigest(view)
            want = layout.checksums[layer]
            if got != want:
                raise ChecksumMismatch(
                    f"chunk {name!r} layer {layer}: xxh3_64 {got:016x} != stored {want:016x}",
                    key=name,
                    layer=layer,
                )

        def buf_id(layer: int) -> int:
            return id(views[layer - layer_start].obj)

        try:
            for layer in range(layer_start, end):
                while next_submit < end and next_submit - layer < window and buf_id(next_submit) not in owner:
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

    # fallback: whole objects --------------------------------------------------------------------------------
    def _whole(self, names, layer_start, layer_end, out):
        n = len(names)
        views_box: list[list[memoryview] | None] = [None]
        layouts: list[kvformat.ChunkHeader | None] = [None] * n
        done = [0] * max(1, (layer_end or 0) - layer_start)  # resized once the geometry is known
        cond = threading.Condition()
        state = {"end": layer_end, "error": None, "cancel": False}
        if out is not None and len({id(_as_byte_view(b).obj) for b in out}) < len(out):
            raise ValueError("whole-object loading reads every layer at once: out buffers must be distinct")

        def setup(name: str, layout: kvformat.ChunkHeader) -> None:
            """First header seen: fix the geometry, the layer range and the output buffers."""
            end = layout.num_layers if state["end"] is None else state["end"]
            if end > layout.num_layers or layer_start >= end:
                raise InvalidRequest(
                    f"layer range [{layer_start}, {end}) outside the {layout.num_layers} layers of chunk {name!r}"
                )
            state["end"] = end
            views_box[0] = self._out_views(out, end - layer_start, n * layout.slice_bytes)
            done[:] = [0] * (end - layer_start)
            state["geometry"] = layout.geometry()
            state["first"] = name

        def fetch(i: int) -> None:
            name = names[i]
            conn, resp = self._http.open("GET", object_path(self.bucket, name), {}, key=name)
            try:
                if resp.status != 200:
                    raise _error_from_body(resp.status, resp.read(), name)
                head = memoryview(bytearray(HEADER_PROBE_BYTES))
                _read_exact(resp, head, f"header of {name!r}")
                need = _declared_header_bytes(name, head)
                if need > len(head):
                    big = memoryview(bytearray(need))
                    big[: len(head)] = head
                    _read_exact(resp, big[len(head) :], f"header of {name!r}")
                    head = big
                elif need < len(head):
                    raise ProtocolError(
                        f"object {name!r}: header of {need} B is shorter than the probe", key=name
                    )
                layout = _parse_header(name, head)
                with cond:
                    if views_box[0] is None:
                        setup(name, layout)
                        cond.notify_all()  # the consumer waits for the geometry (an empty range needs no more)
                    elif layout.geometry() != state["geometry"]:
                        raise GeometryMismatch(
                            f"chunk {name!r} has geometry {layout.geometry()}, chunk {state['first']!r} has "
                            f"{state['geometry']}",
                            key=name,
                        )
                    layouts[i] = layout
                views = views_box[0]
                sb = layout.slice_bytes
                scratch = memoryview(bytearray(sb)) if layer_start > 0 else None
                for layer in range(state["end"]):
                    if state["cancel"]:
                        conn.close()
                        return
                    if layer < layer_start:
                        _read_exact(resp, scratch, f"layer {layer} of {name!r}")
                        continue
                    view = views[layer - layer_start][i * sb : (i + 1) * sb]
                    _read_exact(resp, view, f"layer {layer} of {name!r}")
                    got = xxhash.xxh3_64_intdigest(view)
                    if got != layout.checksums[layer]:
                        raise ChecksumMismatch(
                            f"chunk {name!r} layer {layer}: xxh3_64 {got:016x} != stored "
                            f"{layout.checksums[layer]:016x}",
                            key=name,
                            layer=layer,
                        )
                    with cond:
                        done[layer - layer_start] += 1
                        cond.notify_all()
                while resp.read(1 << 20):  # layers past layer_end
                    pass
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise StorageUnavailable(f"GET {name!r}: {e}", key=name) from e
            except BaseException:
                conn.close()
                raise
            self._http.finish(conn, resp)

        def run(i: int) -> None:
            try:
                fetch(i)
            except BaseException as e:
                with cond:
                    if state["error"] is None:
                        state["error"] = e
                    cond.notify_all()

        def blocks(layer: int) -> bool:
            err = state["error"]
            return err is not None and (getattr(err, "layer", None) is None or layer >= err.layer)

        futures = [self._pool.submit(run, i) for i in range(n)]
        try:
            layer = layer_start
            while True:
                with cond:
                    # A failure at layer k (checksum) still lets the complete layers before k through.
                    while not blocks(layer) and (
                        views_box[0] is None or (layer < state["end"] and done[layer - layer_start] < n)
                    ):
                        cond.wait()
                    if blocks(layer):
                        raise state["error"]
                    if layer >= state["end"]:
                        return
                yield layer, views_box[0][layer - layer_start]
                layer += 1
        finally:
            state["cancel"] = True
            for f in futures:
                f.cancel()
            wait_futures(futures)
