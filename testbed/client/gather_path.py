"""The client's gather read path: one signed ``POST /<bucket>?gather`` to ObjectCache's server, whose response
streams framed layers, layer-major (layer ``l`` = the layer-``l`` slices of every chunk, in key order).

The frames are decoded by ``testbed.wire.frames.FrameDecoder``; each layer's payload is read (``readinto``)
straight into the caller's buffer and every slice is verified against the checksum stored in its object
header (end-to-end integrity).  Large payloads are verified piece by piece in the client's thread pool while
the next piece arrives.  ``ObjectCacheClient.load_layers`` takes this path against a server that speaks
gather; a plain S3 service answers with ``GatherUnsupported`` and the client falls back
(``testbed.client.fallback_paths``).
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from urllib.parse import quote

from testbed.client.buffers import layer_views
from testbed.client.signed import RawBody, SignedHTTP, error_from_response, read_exact
from testbed.wire import frames
from testbed.wire.errors import (
    ChecksumMismatch,
    ChunkMissing,
    GatherUnsupported,
    ProtocolError,
    StorageUnavailable,
)

# Answers of a plain S3 service to ``POST /<bucket>?gather`` that mean "no such operation here".  RGW says 501
# NotImplemented; others answer 405 or treat it as a malformed browser-form POST.
UNSUPPORTED_S3_CODES = {"NotImplemented", "MethodNotAllowed", "MalformedPOSTRequest", "InvalidArgument"}
UNSUPPORTED_HTTP_STATUS = {405, 501}

# Gather payloads larger than this are verified piece by piece, overlapping the receive of the next piece.
VERIFY_PIECE_BYTES = 8 << 20

ReadExact = Callable[[memoryview, str], None]  # fill the view from the body or raise TruncatedStream(what)


class GatherReader:
    """The gather read path of one ``ObjectCacheClient``: its ``SignedHTTP`` connections, its thread pool
    (piecewise verification), its bucket and endpoint, ``timeout_s`` for each socket receive, and
    ``report_corrupt(name)``, told about a chunk whose slice failed its checksum."""

    def __init__(
        self,
        signed_http: SignedHTTP,
        pool: Executor,
        bucket: str,
        endpoint_url: str,
        timeout_s: float,
        report_corrupt: Callable[[str], bool],
    ) -> None:
        self._http = signed_http
        self._pool = pool
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.timeout_s = timeout_s
        self.report_corrupt = report_corrupt
        # Ask for an early stream (``testbed.wire.frames``): the first layer's first slices leave the server
        # before it has checked every object; a key found missing later ends the stream with an error.
        self.stream_early = True

    def layers(
        self,
        names: list[str],
        layer_start: int,
        layer_end: int | None,
        out: Sequence | None,
        compute_per_layer_s: float | None,
        timings: dict | None = None,
        pace_group: str | None = None,
    ) -> Iterator[tuple[int, memoryview]]:
        """Generator of the gathered ``(layer, view)`` pairs (the range is not empty); ``timings`` gets the
        ``time.monotonic()`` stamps ``load_layers`` documents."""
        stamps = timings if timings is not None else {}
        body = frames.encode_gather_request(
            names,
            layer_start,
            layer_end,
            compute_per_layer_s,
            stream_early=self.stream_early,
            pace_group=pace_group,
        )
        path = f"/{quote(self.bucket, safe='')}?gather"
        stamps["sent_s"] = time.monotonic()
        conn, resp = self._http.open("POST", path, {"Content-Type": "application/json"}, body)
        stamps["response_s"] = time.monotonic()
        stamps["stream_id"] = resp.getheader(frames.STREAM_ID_HEADER)
        raw: RawBody | None = None
        try:
            first, end, slice_bytes = self._check_gather_response(resp, names, layer_start, layer_end)
            views = layer_views(out, end - first, len(names) * slice_bytes)
            if RawBody.usable(conn, resp):
                raw = RawBody(conn, resp, self.timeout_s)
                readinto, fill = raw.readinto, raw.read_exact
            else:
                readinto = resp.readinto

                def fill(view: memoryview, what: str) -> None:
                    read_exact(resp, view, what)

            decoder = frames.FrameDecoder(readinto, max_slices=len(names), first_layer=first)
            for layer in range(first, end):
                view = views[layer - first]
                self._receive_layer(
                    decoder, fill, names, layer, slice_bytes, view, stamps if layer == first else None
                )
                if layer == first:
                    stamps["first_layer_s"] = time.monotonic()
                yield layer, view
            if decoder.next_frame() is not None:
                raise ProtocolError(f"gather: a layer frame after the last layer asked for ({end - 1})")
            if (raw.remaining_bytes > 0) if raw is not None else resp.read(1):
                raise ProtocolError("gather: bytes after the end frame")
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise StorageUnavailable(f"gather from {self.endpoint_url}: {e}") from e
        except ChunkMissing as e:  # a key found missing after an early stream had begun
            conn.close()
            e.keys = [k for k in names if k in str(e)] or e.keys
            e.key = e.keys[0] if e.keys else e.key
            raise
        except BaseException:
            conn.close()  # also on GeneratorExit: the rest of the stream is not read
            raise
        if raw is not None:
            raw.close()
        self._http.finish(conn, resp)

    def _check_gather_response(
        self, resp: http.client.HTTPResponse, names: list[str], layer_start: int, layer_end: int | None
    ) -> tuple[int, int, int]:
        """Status and headers of a gather response, checked against the request: ``(first layer, end layer,
        slice_bytes)`` of the stream.  An S3 error answer raises its ``testbed.wire.errors`` class, one that
        means "no gather here" raises ``GatherUnsupported``."""
        if resp.status != 200:
            err = error_from_response(resp.status, resp.read(), None)
            if (
                resp.status in UNSUPPORTED_HTTP_STATUS
                or getattr(err, "s3_code_seen", "") in UNSUPPORTED_S3_CODES
            ):
                raise GatherUnsupported(f"{self.endpoint_url} has no gather: {err}") from err
            if isinstance(err, ChunkMissing):
                err.keys = [k for k in names if k in str(err)] or err.keys
            raise err
        content_type = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        if content_type != frames.CONTENT_TYPE:
            resp.read()
            raise GatherUnsupported(f"{self.endpoint_url} answered gather with Content-Type {content_type!r}")
        slice_bytes = int(resp.getheader(frames.SLICE_BYTES_HEADER, "-1"))
        first = int(resp.getheader(frames.LAYER_START_HEADER, str(layer_start)))
        end = int(resp.getheader(frames.LAYER_END_HEADER, "-1"))
        n_chunks = int(resp.getheader(frames.NUM_CHUNKS_HEADER, "-1"))
        if n_chunks != len(names) or slice_bytes < 0 or end < first:
            raise ProtocolError(f"gather response headers do not match the request: {resp.getheaders()}")
        if first != layer_start or (layer_end is not None and end != layer_end):
            raise ProtocolError(
                f"gather answered layers [{first}, {end}), asked [{layer_start}, {layer_end})"
            )
        return first, end, slice_bytes

    def _receive_layer(
        self,
        decoder: frames.FrameDecoder,
        fill: ReadExact,
        names: list[str],
        layer: int,
        slice_bytes: int,
        view: memoryview,
        stamps: dict | None = None,
    ) -> None:
        """Read layer ``layer``'s frame: its head through ``decoder``, its payload straight into ``view``,
        every slice verified.  A large payload arrives in pieces of whole slices; each piece is verified in
        the pool while the next one is received (xxhash releases the GIL), so verification overlaps the
        network instead of following it.  The last (or only) piece is verified inline.  A parts frame's
        pieces are its parts.  ``stamps`` (the first layer's) gets ``first_byte_s``: the frame head is in,
        its payload follows."""
        n = len(names)
        head = decoder.next_frame()
        if stamps is not None:
            stamps["first_byte_s"] = time.monotonic()
        if head is None:
            raise ProtocolError(f"gather: the end frame came where layer {layer} was expected", layer=layer)
        if (head.layer, head.n_slices, head.slice_bytes) != (layer, n, slice_bytes):
            raise ProtocolError(
                f"gather frame says layer {head.layer}, {head.n_slices} x {head.slice_bytes} B; "
                f"expected layer {layer}, {n} x {slice_bytes} B",
                layer=layer,
            )
        checks: list[Future | tuple[int, int] | None] = []
        if head.in_parts:
            want: list[int] | tuple[int, ...] = [0] * n
            lo = 0
            while lo < n:
                part = decoder.next_part()
                hi = lo + len(part)
                want[lo:hi] = part
                fill(view[lo * slice_bytes : hi * slice_bytes], f"gather layer {layer} payload")
                if hi == n:
                    checks.append(frames.first_bad_slice(view, want, slice_bytes, lo, hi))
                else:
                    checks.append(self._pool.submit(frames.first_bad_slice, view, want, slice_bytes, lo, hi))
                lo = hi
        else:
            want = head.checksums
            piece_slices = max(1, VERIFY_PIECE_BYTES // max(1, slice_bytes))
            for lo in range(0, n, piece_slices):
                hi = min(n, lo + piece_slices)
                fill(view[lo * slice_bytes : hi * slice_bytes], f"gather layer {layer} payload")
                if hi == n:  # the last (or only) piece: nothing left to overlap with
                    checks.append(frames.first_bad_slice(view, want, slice_bytes, lo, hi))
                else:
                    checks.append(self._pool.submit(frames.first_bad_slice, view, want, slice_bytes, lo, hi))
        for check in checks:
            bad = check.result() if isinstance(check, Future) else check
            if bad is not None:
                i, got = bad
                self.report_corrupt(names[i])
                raise ChecksumMismatch(
                    f"chunk {names[i]!r} layer {layer}: xxh3_64 {got:016x} != stored {want[i]:016x}",
                    key=names[i],
                    layer=layer,
                )
