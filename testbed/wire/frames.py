"""The gather wire protocol: the request body, the response headers and the one codec of the response frames.

Request (``POST /<bucket>?gather``, ``Content-Type: application/json``, SigV4-signed like any S3 request)::

    {"version": 1, "keys": [object names...], "layer_start": 0, "layer_end": L,
     "compute_per_layer_s": 0.004, "stream_id": "req-17", "stream_early": true,
     "pace_group": "a1b2c3"}  # all but version and keys are optional

Response body (``Content-Type: application/x-objectcache-gather``, exact ``Content-Length``), frames in layer
order, all integers little-endian::

    layer frame:  b"OCLF" | layer u32 | n_slices u32 | slice_bytes u64 | n_slices x u64 xxh3_64 (the stored
                  per-slice checksums) | payload: n_slices * slice_bytes bytes, the layer-l slice of each
                  chunk in key order
    parts frame:  b"OCLP" | layer u32 | n_slices u32 | slice_bytes u64 | parts, each:
                      b"OCPT" | count u32 | count x u64 xxh3_64 | payload: count * slice_bytes bytes
                  (a layer frame whose checksums come part by part, each before its own slices; the
                  counts add up to n_slices; an error frame may stand where a part's head is expected)
    error frame:  b"OCER" | message_bytes u32 | utf-8 message   (the server then closes the connection)
    end frame:    b"OCEN" | layers_sent u32                     (a stream without it is truncated: failed)

``stream_early`` (a client that can read parts frames asks for them): the server checks only the first few
objects before it answers, sends the first layer as a parts frame, each part as soon as its objects are open
and checked, and opens the rest meanwhile; a key found missing or damaged after the answer has begun ends
the stream with an error frame (``testbed.objectstore.gather``).  Without it every object is checked before
the status line (a missing key: ``404 NoSuchKey``) and every layer is a plain layer frame.  The parts of the
first layer are fixed by the key count alone (``early_parts``), so the ``Content-Length`` is exact either way.

Every frame opens with the same 8-byte *short head* (magic, u32), so a reader takes 8 bytes and then knows
what follows.  The server writes frame heads with the encoder (``encode_layer_head``, ``encode_error_frame``,
``encode_end_frame``) and sends payload bytes itself (``sendfile`` or a buffer).  The client reads with the
decoder (``FrameDecoder``), which parses heads and checksum arrays with ``struct`` and hands the payload length
back: the caller reads the payload straight into its own buffer, so payload bytes are never copied here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from testbed.wire.errors import ChecksumMismatch, ChunkMissing, ProtocolError, TruncatedStream
from testbed.wire.kvformat import slice_checksum

CONTENT_TYPE = "application/x-objectcache-gather"
GATHER_VERSION = 1

# Response headers of a successful gather: the geometry of the stream, known before the first frame.
NUM_CHUNKS_HEADER = "x-oc-num-chunks"
SLICE_BYTES_HEADER = "x-oc-slice-bytes"
LAYER_START_HEADER = "x-oc-layer-start"
LAYER_END_HEADER = "x-oc-layer-end"
STREAM_ID_HEADER = "x-oc-stream-id"

LAYER_MAGIC = b"OCLF"
PARTS_MAGIC = b"OCLP"
PART_MAGIC = b"OCPT"
ERROR_MAGIC = b"OCER"
END_MAGIC = b"OCEN"

SHORT_HEAD = struct.Struct(
    "<4sI"
)  # magic, then layer (layer frame) / message_bytes (error) / layers_sent (end)
LAYER_HEAD = struct.Struct("<4sIIQ")  # magic, layer, n_slices, slice_bytes
LAYER_HEAD_REST = struct.Struct("<IQ")  # what follows the short head of a layer frame: n_slices, slice_bytes
CHECKSUM_BYTES = 8  # one u64 xxh3_64 per slice
END_FRAME_BYTES = SHORT_HEAD.size
MAX_ERROR_MESSAGE_BYTES = 65536  # the encoder truncates longer messages; the decoder refuses them
# A decoder refuses a layer frame claiming more slices than this (its checksum array is read into memory);
# the server's own limit on keys per gather is far lower.
DEFAULT_MAX_SLICES = 1 << 20


def encode_gather_request(
    keys: Sequence[str],
    layer_start: int = 0,
    layer_end: int | None = None,
    compute_per_layer_s: float | None = None,
    stream_id: str | None = None,
    stream_early: bool = False,
    pace_group: str | None = None,
) -> bytes:
    """The JSON body of a gather request (the server validates it with ``parse_gather_body``)."""
    doc: dict = {"version": GATHER_VERSION, "keys": list(keys), "layer_start": layer_start}
    if stream_early:
        doc["stream_early"] = True
    if layer_end is not None:
        doc["layer_end"] = layer_end
    if compute_per_layer_s is not None:
        doc["compute_per_layer_s"] = float(compute_per_layer_s)
    if stream_id is not None:
        doc["stream_id"] = stream_id
    if pace_group is not None:
        doc["pace_group"] = pace_group
    return json.dumps(doc).encode()


# --- encoder ----------------------------------------------------------------------------------------------


def encode_layer_head(layer: int, slice_bytes: int, checksums: Sequence[int]) -> bytes:
    """A layer frame up to its payload: the head and the stored checksum of each slice, in key order."""
    n_slices = len(checksums)
    return LAYER_HEAD.pack(LAYER_MAGIC, layer, n_slices, slice_bytes) + struct.pack(
        f"<{n_slices}Q", *checksums
    )


def encode_parts_head(layer: int, n_slices: int, slice_bytes: int) -> bytes:
    """The head of a parts frame (its parts follow, each from ``encode_part_head``)."""
    return LAYER_HEAD.pack(PARTS_MAGIC, layer, n_slices, slice_bytes)


def encode_part_head(checksums: Sequence[int]) -> bytes:
    """One part of a parts frame up to its payload: its slice count and their stored checksums."""
    n = len(checksums)
    return SHORT_HEAD.pack(PART_MAGIC, n) + struct.pack(f"<{n}Q", *checksums)


def early_parts(n_slices: int, first: int = 2, step: int = 16) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` slice ranges of the parts of an early stream's first layer: ``first`` slices, then
    ``step`` at a time.  Client and server need not agree on it (the frame says its parts), but the server
    computes its ``Content-Length`` from it."""
    bounds = [0, min(n_slices, first)]
    while bounds[-1] < n_slices:
        bounds.append(min(n_slices, bounds[-1] + step))
    return list(zip(bounds, bounds[1:]))


def encode_error_frame(message: str) -> bytes:
    """A whole error frame (utf-8 message, cut to ``MAX_ERROR_MESSAGE_BYTES``)."""
    raw = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_BYTES]
    return SHORT_HEAD.pack(ERROR_MAGIC, len(raw)) + raw


def encode_end_frame(layers_sent: int) -> bytes:
    return SHORT_HEAD.pack(END_MAGIC, layers_sent)


def layer_frame_bytes(n_slices: int, slice_bytes: int) -> int:
    """Bytes of one layer frame on the wire: head, checksums and payload."""
    return LAYER_HEAD.size + CHECKSUM_BYTES * n_slices + n_slices * slice_bytes


def stream_bytes(num_layers: int, n_slices: int, slice_bytes: int, first_layer_parts: int = 0) -> int:
    """``Content-Length`` of a complete gather body of ``num_layers`` layer frames and the end frame; with
    ``first_layer_parts`` > 0 the first layer is a parts frame of that many parts (a part head each)."""
    parts_bytes = SHORT_HEAD.size * first_layer_parts
    return num_layers * layer_frame_bytes(n_slices, slice_bytes) + parts_bytes + END_FRAME_BYTES


# --- decoder ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFrameHead:
    """A decoded layer frame up to its payload; ``payload_bytes`` follow it on the wire."""

    layer: int
    n_slices: int
    slice_bytes: int
    checksums: tuple[int, ...]
    in_parts: bool = False  # a parts frame: ``checksums`` is empty, read them with ``next_part``

    @property
    def payload_bytes(self) -> int:
        return self.n_slices * self.slice_bytes


class FrameDecoder:
    """Incremental parser of a gather body, pulling bytes through ``readinto``.

    ``readinto(view) -> int`` fills some or all of ``view`` and returns how many bytes it wrote, 0 only at the
    end of the body (``http.client.HTTPResponse.readinto``, ``testbed.client.signed.RawBody.readinto``).
    ``next_frame()`` reads one frame head: for a layer frame it returns the ``LayerFrameHead``, and the caller
    then reads exactly ``payload_bytes`` from the same source into its own buffer before asking for the next
    frame (a parts frame: ``next_part()`` and its payload, until the frame's slices are read); for the end
    frame it checks the layer count and returns None; an error frame raises ``TruncatedStream`` with the
    server's message (``ChunkMissing`` for the server's ``NoSuchKey``).  ``max_slices`` bounds the checksum array a frame may
    claim (a client passes the slice count it asked for); ``first_layer``, where known, lets errors before the
    first layer frame name the layer.
    """

    def __init__(
        self,
        readinto: Callable[[memoryview], int],
        max_slices: int = DEFAULT_MAX_SLICES,
        first_layer: int | None = None,
    ) -> None:
        self._readinto = readinto
        self.max_slices = max_slices
        self.layers_read = 0
        self.next_layer = first_layer  # the layer whose frame comes next, where known
        self._short = memoryview(bytearray(SHORT_HEAD.size))
        self._rest = memoryview(bytearray(LAYER_HEAD_REST.size))
        self._sums = memoryview(bytearray(0))
        self._sums_struct = struct.Struct("<0Q")
        self._part_left = 0  # slices of the current parts frame whose part heads are still to come
        self._part_layer = 0

    def _fill(self, view: memoryview) -> int:
        """Read until ``view`` is full or the body ends; returns the bytes read."""
        got = 0
        while got < len(view):
            k = self._readinto(view[got:])
            if not k:
                break
            got += k
        return got

    def _fill_exact(self, view: memoryview, what: str) -> None:
        got = self._fill(view)
        if got < len(view):
            raise TruncatedStream(
                f"gather stream ended inside {what} after {got} of {len(view)} bytes", layer=self.next_layer
            )

    def next_frame(self) -> LayerFrameHead | None:
        """The next layer frame's head and checksums, or None after a valid end frame (see the class doc).
        A parts frame's head comes with no checksums (``in_parts``): read its parts with ``next_part``."""
        if self._part_left:
            raise ProtocolError(
                f"gather layer {self._part_layer}: {self._part_left} slices of its parts frame not read",
                layer=self._part_layer,
            )
        got = self._fill(self._short)
        if got == 0:
            raise TruncatedStream(
                f"gather stream ended after {self.layers_read} layers without an end frame",
                layer=self.next_layer,
            )
        if got < SHORT_HEAD.size:
            raise TruncatedStream(f"gather stream ended inside a frame head after {got} bytes")
        magic, value = SHORT_HEAD.unpack(self._short)
        if magic == LAYER_MAGIC:
            return self._layer_frame(value)
        if magic == PARTS_MAGIC:
            return self._layer_frame(value, in_parts=True)
        if magic == END_MAGIC:
            if value != self.layers_read:
                raise ProtocolError(f"gather end frame says {value} layers, received {self.layers_read}")
            return None
        if magic == ERROR_MAGIC:
            raise _aborted(
                f"server aborted the gather after {self.layers_read} layers: ",
                self._error_message(value),
                self.next_layer,
            )
        raise ProtocolError(f"unknown gather frame magic {magic!r}", layer=self.next_layer)

    def _layer_frame(self, layer: int, in_parts: bool = False) -> LayerFrameHead:
        self._fill_exact(self._rest, f"the layer {layer} frame head")
        n_slices, slice_bytes = LAYER_HEAD_REST.unpack(self._rest)
        if n_slices > self.max_slices:
            raise ProtocolError(
                f"gather layer {layer} frame claims {n_slices} slices, at most {self.max_slices} expected",
                layer=layer,
            )
        if in_parts:
            if n_slices == 0:
                raise ProtocolError(f"gather layer {layer} parts frame has no slices", layer=layer)
            self._part_left, self._part_layer = n_slices, layer
            self.next_layer = layer  # an error frame among the parts names this layer
            return LayerFrameHead(layer, n_slices, slice_bytes, (), in_parts=True)
        if n_slices != len(self._sums) // CHECKSUM_BYTES:
            self._sums = memoryview(bytearray(CHECKSUM_BYTES * n_slices))
            self._sums_struct = struct.Struct(f"<{n_slices}Q")
        self._fill_exact(self._sums, f"the layer {layer} checksums")
        self.layers_read += 1
        self.next_layer = layer + 1
        return LayerFrameHead(layer, n_slices, slice_bytes, self._sums_struct.unpack(self._sums))

    def next_part(self) -> tuple[int, ...]:
        """The stored checksums of the next part of the current parts frame (one per slice of the part);
        the caller then reads ``len(result) * slice_bytes`` payload bytes.  An error frame in its place
        raises ``TruncatedStream`` with the server's message (e.g. a key found missing after the answer
        had begun)."""
        layer = self._part_layer
        if not self._part_left:
            raise ProtocolError(f"gather layer {layer}: no part left to read", layer=layer)
        self._fill_exact(self._short, f"a layer {layer} part head")
        magic, count = SHORT_HEAD.unpack(self._short)
        if magic == ERROR_MAGIC:
            self._part_left = 0
            raise _aborted(
                f"server aborted the gather in layer {layer} after {self.layers_read} layers: ",
                self._error_message(count),
                layer,
            )
        if magic != PART_MAGIC:
            raise ProtocolError(
                f"gather layer {layer}: expected a part head, got magic {magic!r}", layer=layer
            )
        if not 0 < count <= self._part_left:
            raise ProtocolError(
                f"gather layer {layer} part claims {count} slices, {self._part_left} left", layer=layer
            )
        raw = memoryview(bytearray(CHECKSUM_BYTES * count))
        self._fill_exact(raw, f"the checksums of a layer {layer} part")
        self._part_left -= count
        if not self._part_left:
            self.layers_read += 1
            self.next_layer = layer + 1
        return struct.unpack(f"<{count}Q", raw)

    def _error_message(self, message_bytes: int) -> str:
        if message_bytes > MAX_ERROR_MESSAGE_BYTES:
            raise ProtocolError(f"gather error frame claims a {message_bytes}-byte message")
        raw = memoryview(bytearray(message_bytes))
        got = self._fill(raw)
        return bytes(raw[:got]).decode("utf-8", "replace")


def _aborted(prefix: str, message: str, layer: int | None) -> Exception:
    """The error an error frame stands for: ``ChunkMissing`` when the server found a key missing (its
    message starts with ``NoSuchKey``: an early stream's late key), else ``TruncatedStream``."""
    if message.startswith("NoSuchKey:"):
        return ChunkMissing(prefix + message)
    return TruncatedStream(prefix + message, layer=layer)


# --- whole frames, for tests and tools ---------------------------------------------------------------------


@dataclass
class LayerFrame:
    """A layer frame with its payload in memory."""

    layer: int
    slice_bytes: int
    checksums: tuple[int, ...]
    payload: memoryview


def iter_frames(read: Callable[[int], bytes]) -> Iterator[LayerFrame]:
    """Parse a whole gather body with ``read(n)`` (returns ``n`` bytes, fewer only at the end), payloads
    copied into memory: for tests and tools; the client reads payloads in place with ``FrameDecoder``.

    Yields layer frames; returns after the end frame; raises ``TruncatedStream`` for an error frame or a
    stream that ends early, ``ProtocolError`` for anything else unexpected.
    """

    def readinto(view: memoryview) -> int:
        data = read(len(view))
        view[: len(data)] = data
        return len(data)

    decoder = FrameDecoder(readinto)
    while (head := decoder.next_frame()) is not None:
        if head.in_parts:  # gather the parts' checksums and payloads into one frame
            sums: list[int] = []
            data = bytearray()
            while len(sums) < head.n_slices:
                part = decoder.next_part()
                sums.extend(part)
                chunk = read(len(part) * head.slice_bytes)
                if len(chunk) < len(part) * head.slice_bytes:
                    raise TruncatedStream(
                        f"gather stream truncated inside layer {head.layer}", layer=head.layer
                    )
                data += chunk
            yield LayerFrame(head.layer, head.slice_bytes, tuple(sums), memoryview(bytes(data)))
            continue
        payload = read(head.payload_bytes)
        if len(payload) < head.payload_bytes:
            raise TruncatedStream(f"gather stream truncated inside layer {head.layer}", layer=head.layer)
        yield LayerFrame(head.layer, head.slice_bytes, head.checksums, memoryview(payload))


def first_bad_slice(
    payload: memoryview, checksums: Sequence[int], slice_bytes: int, lo: int = 0, hi: int | None = None
) -> tuple[int, int] | None:
    """(index, computed xxh3_64) of the first slice in ``[lo, hi)`` whose bytes do not hash to its stored
    checksum, else None.  Slice ``i`` is ``payload[i * slice_bytes : (i + 1) * slice_bytes]``."""
    for i in range(lo, len(checksums) if hi is None else hi):
        got = slice_checksum(payload[i * slice_bytes : (i + 1) * slice_bytes])
        if got != checksums[i]:
            return i, got
    return None


def verify_frame(frame: LayerFrame, keys: Sequence[str]) -> None:
    """Check every slice of a layer frame against its stored checksum; the error names key and layer."""
    bad = first_bad_slice(frame.payload, frame.checksums, frame.slice_bytes)
    if bad is not None:
        i, got = bad
        key = keys[i] if i < len(keys) else f"#{i}"
        raise ChecksumMismatch(
            f"chunk {key} layer {frame.layer}: xxh3_64 {got:016x} != stored {frame.checksums[i]:016x}",
            key=key,
            layer=frame.layer,
        )
