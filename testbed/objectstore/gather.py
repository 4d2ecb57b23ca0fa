"""Layer-major gather: the layer-l slices of many chunk objects, streamed as frames in GPU order.

Request (``POST /<bucket>?gather``, JSON, SigV4-signed like any S3 request)::

    {"version": 1, "keys": [object names...], "layer_start": 0, "layer_end": L,
     "compute_per_layer_s": 0.004, "stream_id": "req-17"}     # the last two are optional

Before any payload the server opens every object and parses its header (``prepare_gather``): a missing key
is a 404 ``NoSuchKey`` naming the missing names, chunks that disagree on geometry or a bad layer range are a
400 ``InvalidRequest``, a body that is too big or names too many keys a 413 ``EntityTooLarge`` / 400.

Response body (``application/x-objectcache-gather``, ``Content-Length`` known up front), layer_start first::

    layer frame:  b"OCLF" | layer u32 | n_slices u32 | slice_bytes u64 | n_slices x u64 xxh3_64 (stored
                  per-slice checksums) | payload: layer-l slice of each chunk in key order
    error frame:  b"OCER" | msg_len u32 | utf-8 message      (then the server closes the connection)
    end frame:    b"OCEN" | layers_sent u32                  (a stream without it is truncated: failed)

Payload bytes leave the server with ``sendfile`` straight from the object files when the store exposes file
descriptors (the filesystem store), otherwise they are read into a layer buffer (``preadv``/ranged reads in a
thread) while the previous layer is sent.  The server does not re-hash payload bytes: the frame carries the
*stored* checksums, and the client verifies every slice end to end (``iter_frames`` + ``verify_frame``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import select
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from testbed.objectstore.pacer import DEFAULT_PIECE_BYTES, PacedStream, Pacer
from testbed.objectstore.store import ObjectHandle, Store
from testbed.wire.errors import (
    ChecksumMismatch,
    ChunkMissing,
    CorruptObject,
    GeometryMismatch,
    InvalidRequest,
    ProtocolError,
    RequestTooLarge,
    TruncatedStream,
)
from testbed.wire.kvformat import HEADER_PROBE_BYTES, ChunkHeader, parse_header, slice_checksum

CONTENT_TYPE = "application/x-objectcache-gather"
GATHER_VERSION = 1
LAYER_MAGIC = b"OCLF"
ERROR_MAGIC = b"OCER"
END_MAGIC = b"OCEN"
_LAYER_HEAD = struct.Struct("<4sIIQ")  # magic, layer, n_slices, slice_bytes
_ERROR_HEAD = struct.Struct("<4sI")
_END = struct.Struct("<4sI")
DEFAULT_MAX_KEYS = 1024  # 256k tokens of 256-token chunks; each key holds a file open during its gather
DEFAULT_MAX_BODY_BYTES = 1 << 20
_HEADER_BATCH = 16  # keys per executor task while reading headers


@dataclass(frozen=True)
class GatherRequest:
    keys: tuple[str, ...]
    layer_start: int
    layer_end: int | None
    compute_per_layer_s: float | None = None
    stream_id: str | None = None


def parse_gather_body(body: bytes, max_keys: int = DEFAULT_MAX_KEYS) -> GatherRequest:
    """Validate a gather request body; raise ``InvalidRequest`` / ``RequestTooLarge``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("gather body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("gather body must be a JSON object")
    if doc.get("version", GATHER_VERSION) != GATHER_VERSION:
        raise InvalidRequest(f"unsupported gather version {doc.get('version')!r}; this server speaks 1")
    keys = doc.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise InvalidRequest("gather 'keys' must be a non-empty list of object names")
    if len(keys) > max_keys:
        raise RequestTooLarge(f"gather names {len(keys)} keys; the limit is {max_keys}")
    start = doc.get("layer_start", 0)
    end = doc.get("layer_end")
    if not _is_int(start) or start < 0 or (end is not None and (not _is_int(end) or end <= start)):
        raise InvalidRequest(f"bad layer range [{start!r}, {end!r})")
    cpl = doc.get("compute_per_layer_s")
    if cpl is not None and (
        not isinstance(cpl, int | float) or isinstance(cpl, bool) or not math.isfinite(cpl) or cpl < 0
    ):
        raise InvalidRequest("compute_per_layer_s must be a non-negative number")
    sid = doc.get("stream_id")
    if sid is not None and (not isinstance(sid, str) or len(sid) > 128):
        raise InvalidRequest("stream_id must be a string of at most 128 characters")
    return GatherRequest(tuple(keys), start, end, float(cpl) if cpl is not None else None, sid)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class GatherPlan:
    """Open objects and their headers, checked to agree, for one gather."""

    keys: tuple[str, ...]
    handles: list[ObjectHandle]
    headers: list[ChunkHeader]
    layer_start: int
    layer_end: int

    @property
    def slice_bytes(self) -> int:
        return self.headers[0].slice_bytes

    @property
    def n_slices(self) -> int:
        return len(self.keys)

    @property
    def layer_payload_bytes(self) -> int:
        return self.n_slices * self.slice_bytes

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def frame_head(self, layer: int) -> bytes:
        return layer_frame_head(layer, self.slice_bytes, [h.checksums[layer] for h in self.headers])

    @property
    def content_length(self) -> int:
        per_layer = _LAYER_HEAD.size + 8 * self.n_slices + self.layer_payload_bytes
        return per_layer * self.num_layers + _END.size

    def close(self) -> None:
        for h in self.handles:
            h.close()
        self.handles = []


def _open_batch(store: Store, bucket: str, keys: Sequence[str]) -> list:
    """Open and parse the header of each key; a result is (handle, header), ChunkMissing, or an error."""
    out = []
    for key in keys:
        try:
            handle = store.open_object(bucket, key)
        except ChunkMissing as e:
            out.append(e)
            continue
        try:
            buf = bytearray(min(HEADER_PROBE_BYTES, handle.info.size_bytes))
            handle.read_into(0, memoryview(buf))
            header = parse_header(buf)
            if header.total_bytes != handle.info.size_bytes:
                raise CorruptObject(
                    f"chunk {key}: object is {handle.info.size_bytes} bytes, header says {header.total_bytes}",
                    key=key,
                )
            out.append((handle, header))
        except CorruptObject as e:
            handle.close()
            out.append(CorruptObject(f"chunk {key}: {e}", key=key))
        except BaseException:
            handle.close()
            raise
    return out


async def prepare_gather(
    store: Store, bucket: str, req: GatherRequest, executor: Executor | None = None, inline: bool = False
) -> GatherPlan:
    """Open all objects and check them (see the module docstring); nothing is sent yet.

    ``inline=True`` opens the objects in the calling thread (the event loop) instead of ``executor``: for a
    few keys on a local filesystem store this is tens of microseconds, whereas a hop to a thread pool that
    is busy streaming other gathers waits for a free thread and the GIL (measured 2-42 ms with ~7 streams
    running on 2 cores), which delays the stream's open unpredictably.
    """
    batches = [req.keys[i : i + _HEADER_BATCH] for i in range(0, len(req.keys), _HEADER_BATCH)]
    if inline:
        results: list = []
        for b in batches:
            try:
                results.append(_open_batch(store, bucket, b))
            except Exception as e:  # like ``return_exceptions=True`` below: the check closes the handles
                results.append(e)
    else:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(executor, _open_batch, store, bucket, b) for b in batches),
            return_exceptions=True,
        )
    flat: list = []
    for r in results:
        flat.extend(r if isinstance(r, list) else [r])
    handles = [r[0] for r in flat if isinstance(r, tuple)]
    try:
        missing = [k for k, r in zip(req.keys, flat) if isinstance(r, ChunkMissing)]
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise ChunkMissing(f"{len(missing)} of {len(req.keys)} keys do not exist: {shown}", keys=missing)
        for r in flat:
            if isinstance(r, BaseException):
                raise r
        headers = [r[1] for r in flat]
        first = headers[0].geometry()
        for key, h in zip(req.keys, headers):
            if h.geometry() != first:
                raise GeometryMismatch(
                    f"chunk {key} has geometry {h.geometry()}, but {req.keys[0]} has {first}", key=key
                )
        num_layers = headers[0].num_layers
        end = num_layers if req.layer_end is None else req.layer_end
        if end > num_layers or req.layer_start >= end:
            raise InvalidRequest(
                f"layer range [{req.layer_start}, {end}) outside the model's {num_layers} layers"
            )
        return GatherPlan(req.keys, handles, headers, req.layer_start, end)
    except BaseException:
        for h in handles:
            h.close()
        raise


# --- frames -----------------------------------------------------------------------------------------------


def layer_frame_head(layer: int, slice_bytes: int, checksums: Sequence[int]) -> bytes:
    n = len(checksums)
    return _LAYER_HEAD.pack(LAYER_MAGIC, layer, n, slice_bytes) + struct.pack(f"<{n}Q", *checksums)


def error_frame(message: str) -> bytes:
    raw = message.encode("utf-8", "replace")[:65536]
    return _ERROR_HEAD.pack(ERROR_MAGIC, len(raw)) + raw


def end_frame(layers_sent: int) -> bytes:
    return _END.pack(END_MAGIC, layers_sent)


@dataclass
class LayerFrame:
    layer: int
    slice_bytes: int
    checksums: tuple[int, ...]
    payload: memoryview


def iter_frames(read_exact: Callable[[int], bytes]) -> Iterator[LayerFrame]:
    """Parse a gather body with ``read_exact(n)`` (returns exactly ``n`` bytes, or fewer at EOF).

    Yields layer frames; returns after the end frame; raises ``TruncatedStream`` for an error frame or a
    stream that ends early, ``ProtocolError`` for anything else unexpected.
    """
    layers = 0
    while True:
        magic = read_exact(4)
        if len(magic) < 4:
            raise TruncatedStream(f"gather stream ended after {layers} layers without an end frame")
        if magic == LAYER_MAGIC:
            head = read_exact(_LAYER_HEAD.size - 4)
            if len(head) < _LAYER_HEAD.size - 4:
                raise TruncatedStream("gather stream truncated inside a layer frame header")
            layer, n, slice_bytes = struct.unpack("<IIQ", head)
            sums = read_exact(8 * n)
            payload = read_exact(n * slice_bytes)
            if len(sums) < 8 * n or len(payload) < n * slice_bytes:
                raise TruncatedStream(f"gather stream truncated inside layer {layer}", layer=layer)
            layers += 1
            yield LayerFrame(layer, slice_bytes, struct.unpack(f"<{n}Q", sums), memoryview(payload))
        elif magic == ERROR_MAGIC:
            (length,) = struct.unpack("<I", _read_u32(read_exact, "an error frame"))
            msg = read_exact(length).decode("utf-8", "replace")
            raise TruncatedStream(f"server aborted the gather after {layers} layers: {msg}")
        elif magic == END_MAGIC:
            (sent,) = struct.unpack("<I", _read_u32(read_exact, "the end frame"))
            if sent != layers:
                raise ProtocolError(f"end frame says {sent} layers, received {layers}")
            return
        else:
            raise ProtocolError(f"unknown gather frame magic {magic!r}")


def _read_u32(read_exact: Callable[[int], bytes], what: str) -> bytes:
    raw = read_exact(4)
    if len(raw) < 4:
        raise TruncatedStream(f"gather stream truncated inside {what}")
    return raw


def verify_frame(frame: LayerFrame, keys: Sequence[str]) -> None:
    """Check every slice of a layer frame against its stored checksum; the error names key and layer."""
    for i, expected in enumerate(frame.checksums):
        piece = frame.payload[i * frame.slice_bytes : (i + 1) * frame.slice_bytes]
        if slice_checksum(piece) != expected:
            key = keys[i] if i < len(keys) else f"#{i}"
            raise ChecksumMismatch(
                f"chunk {key} layer {frame.layer}: checksum mismatch", key=key, layer=frame.layer
            )


# --- streaming --------------------------------------------------------------------------------------------


Part = bytes | bytearray | memoryview | tuple[int, int, int]  # bytes, or (file descriptor, offset, count)


class WriterSink:
    """Sends parts through an awaitable ``write(bytes)`` (aiohttp's ``StreamResponse.write``, or a test).

    File ranges are not supported (``can_sendfile`` is False): the buffered path is used.
    """

    can_sendfile = False

    def __init__(self, write: Callable[[bytes | memoryview], Awaitable[None]]) -> None:
        self._write = write

    async def send(self, parts: Sequence[Part]) -> None:
        for part in parts:
            await self._write(part)

    async def send_groups(
        self, groups: Sequence[Sequence[Part]], on_group_sent: Callable[[int], None]
    ) -> None:
        for i, parts in enumerate(groups):
            await self.send(parts)
            on_group_sent(i)


class SocketSink:
    """Sends parts straight to a connected non-blocking socket from a worker thread.

    One thread hop per call moves a whole list of parts (a frame header and the file ranges or buffer of a
    layer): ``os.sendfile`` for file ranges (zero copy from the page cache), ``socket.send`` for buffers (no
    copy into an asyncio buffer).  The event loop's transport must not hold unsent bytes meanwhile
    (``send`` waits until its buffer is empty).  A peer that accepts nothing for ``stall_timeout_s`` is
    dropped (``TimeoutError``); a closed peer raises ``ConnectionResetError``.
    """

    can_sendfile = True

    def __init__(
        self, transport, executor: Executor | None, stall_timeout_s: float = 60.0, sndbuf_bytes: int = 4 << 20
    ) -> None:
        self._transport = transport
        self._sock = transport.get_extra_info("socket")
        self._executor = executor
        self.stall_timeout_s = stall_timeout_s
        with contextlib.suppress(OSError):
            # No Nagle: a small frame (the end frame) after a large send must not wait for the peer's
            # delayed ACK (up to 200 ms on Linux).
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sndbuf_bytes:
            # A larger send buffer means fewer wake-ups per MiB (~+30% on loopback here).
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf_bytes)

    @classmethod
    def usable(cls, transport) -> bool:
        """A plain TCP transport (no TLS) whose socket we can write to directly."""
        return (
            transport is not None
            and transport.get_extra_info("socket") is not None
            and transport.get_extra_info("sslcontext") is None
        )

    async def send(self, parts: Sequence[Part]) -> None:
        await self.send_groups([parts])

    async def send_groups(
        self,
        groups: Sequence[Sequence[Part]],
        on_group_sent: Callable[[int], None] | None = None,
        pacing: tuple[Pacer, PacedStream, int] | None = None,
    ) -> None:
        """Send several groups (e.g. whole layers) in one thread hop; ``on_group_sent(i)`` runs on the event
        loop after group ``i`` is handed to the kernel.  No gaps between groups waiting for the loop.

        ``pacing=(pacer, stream, floor_bytes)``: payload parts (file ranges and buffers; not the small frame
        heads, which are sent as they come) go in rate-scaled pieces, each after ``pacer.pace_blocking`` in
        this thread, so a paced stream costs one thread hop, not one per piece.

        The thread works on duplicates of the socket and file descriptors, taken here on the event loop: if
        the connection is torn down or the caller closes its files meanwhile (cancellation), the thread can
        never write to or read from an unrelated descriptor that reused the number.
        """
        t = self._transport
        if t is None or t.is_closing():
            raise ConnectionResetError("client went away")
        while t.get_write_buffer_size():  # e.g. response headers still queued in the transport
            await asyncio.sleep(0.0005)
        loop = asyncio.get_running_loop()
        dups: dict[int, int] = {}
        try:
            sock_fd = os.dup(self._sock.fileno())
        except (OSError, ValueError):
            raise ConnectionResetError("client went away") from None
        try:
            for parts in groups:
                for p in parts:
                    if isinstance(p, tuple) and p[0] not in dups:
                        dups[p[0]] = os.dup(p[0])
        except BaseException:
            for fd in [sock_fd, *dups.values()]:
                os.close(fd)
            raise
        stop = threading.Event()
        pace = None
        if pacing is not None and pacing[0].limited:
            pacer, stream, floor_bytes = pacing

            def starved() -> None:
                loop.call_soon_threadsafe(pacer.reallocate)

            def pace(n: int) -> None:
                pacer.pace_blocking(stream, n, stop.wait, starved)
                if stop.is_set():
                    raise ConnectionResetError("gather cancelled")

            def piece() -> int:
                return pacer.piece_bytes(stream, floor_bytes)

        def run() -> None:
            try:
                for i, parts in enumerate(groups):
                    if stop.is_set():
                        raise ConnectionResetError("gather cancelled")
                    own = [(dups[p[0]], p[1], p[2]) if isinstance(p, tuple) else p for p in parts]
                    if pace is None:
                        self._send_blocking(sock_fd, own)
                    else:
                        self._send_paced(sock_fd, own, pace, piece)
                    if on_group_sent is not None:
                        loop.call_soon_threadsafe(on_group_sent, i)
            finally:
                for fd in [sock_fd, *dups.values()]:
                    os.close(fd)

        try:
            await loop.run_in_executor(self._executor, run)
        except asyncio.CancelledError:
            stop.set()
            raise

    def _send_paced(
        self, fd: int, parts: list[Part], pace: Callable[[int], None], piece: Callable[[], int]
    ) -> None:
        """Like ``_send_blocking``, but payload parts go in pieces of ``piece()`` bytes, ``pace(n)`` first."""
        for i, part in enumerate(parts):
            if i == 0:
                self._send_blocking(fd, [part])  # the frame head: not paced (it is not payload)
                continue
            if isinstance(part, tuple):
                src, offset, count = part
                while count:
                    n = min(count, piece())
                    pace(n)
                    self._send_blocking(fd, [(src, offset, n)])
                    offset += n
                    count -= n
            else:
                view = memoryview(part).cast("B")
                while view:
                    n = min(len(view), piece())
                    pace(n)
                    self._send_blocking(fd, [view[:n]])
                    view = view[n:]

    def _send_blocking(self, fd: int, parts: list[Part]) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        timeout_ms = int(self.stall_timeout_s * 1000)
        for part in parts:
            if isinstance(part, tuple):
                src, offset, count = part
                while count:
                    try:
                        n = os.sendfile(fd, src, offset, count)
                    except BlockingIOError:
                        n = -1
                    if n == 0:
                        raise ConnectionResetError("short sendfile: file truncated or peer closed")
                    if n < 0:
                        if not poller.poll(timeout_ms):
                            raise TimeoutError("client stopped reading")
                        continue
                    offset += n
                    count -= n
            else:
                view = memoryview(part).cast("B")
                while view:
                    try:
                        n = os.write(fd, view)
                    except BlockingIOError:
                        if not poller.poll(timeout_ms):
                            raise TimeoutError("client stopped reading") from None
                        continue
                    view = view[n:]


def _read_slices(plan: GatherPlan, layer: int, buf: memoryview, chunk_ids: range) -> None:
    sb = plan.slice_bytes
    for i in chunk_ids:
        start, _ = plan.headers[i].layer_range(layer)
        got = plan.handles[i].read_into(start, buf[i * sb : (i + 1) * sb])
        if got != sb:
            raise CorruptObject(
                f"chunk {plan.keys[i]} layer {layer}: short read", key=plan.keys[i], layer=layer
            )


async def stream_gather(
    plan: GatherPlan,
    sink: WriterSink | SocketSink,
    pacer: Pacer,
    stream: PacedStream,
    executor: Executor | None = None,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    read_parallelism: int = 8,
    allow_sendfile: bool = True,
) -> int:
    """Send all layer frames and the end frame through ``sink``; return the layers sent.

    File ranges go to the sink (sendfile) when it and every object handle allow it; otherwise each layer
    is read into a fresh buffer in ``executor`` one layer ahead of the one being sent.  Unpaced, a layer is
    one ``sink.send`` call; paced, its payload goes in rate-scaled pieces (``pacer.piece_bytes``, at least
    ``piece_bytes``), each after the pacer's deadline: inside the send thread for a ``SocketSink`` (one
    hop per stream, or per layer on the buffered path), through ``await pacer.pace`` for other sinks.
    Errors propagate: the caller sends an error frame and closes the connection.
    """
    loop = asyncio.get_running_loop()
    fds = [h.fileno() for h in plan.handles]
    use_sendfile = allow_sendfile and sink.can_sendfile and all(fd is not None for fd in fds)
    sb = plan.slice_bytes
    account = on_bytes or (lambda n: None)

    def start_read(layer: int):
        # A fresh buffer per layer: a sink may still reference the previous one.  The slices are read in
        # up to ``read_parallelism`` concurrent tasks (a remote store serves each with its own request).
        buf = bytearray(plan.layer_payload_bytes)
        n = plan.n_slices
        step = -(-n // max(1, min(read_parallelism, n)))
        futs = [
            loop.run_in_executor(
                executor, _read_slices, plan, layer, memoryview(buf), range(i, min(n, i + step))
            )
            for i in range(0, n, step)
        ]
        return buf, asyncio.gather(*futs)

    layers = range(plan.layer_start, plan.layer_end)
    socket_paced = pacer.limited and isinstance(sink, SocketSink)
    if use_sendfile and (not pacer.limited or socket_paced):
        # Zero-copy, every layer in one thread hop, so the socket never idles between layers; paced, the
        # send thread paces itself piece by piece (no hop per piece).
        groups = [
            [
                plan.frame_head(layer),
                *[(fds[i], h.layer_range(layer)[0], sb) for i, h in enumerate(plan.headers)],
            ]
            for layer in layers
        ]

        def layer_done(i: int) -> None:
            if not pacer.limited:  # paced bytes are counted by the pacer as they are paced
                stream.delivered_bytes += plan.layer_payload_bytes
            account(len(groups[i][0]) + plan.layer_payload_bytes)
            pacer.layer_sent(stream)

        pacing = (pacer, stream, piece_bytes) if socket_paced else None
        await sink.send_groups(groups, layer_done, pacing)
        await sink.send([end_frame(len(groups))])
        account(_END.size)
        return len(groups)

    pending = None if use_sendfile else start_read(plan.layer_start)
    sent = 0
    for layer in layers:
        head = plan.frame_head(layer)
        if use_sendfile:
            ranges = [(fds[i], h.layer_range(layer)[0], sb) for i, h in enumerate(plan.headers)]
        else:
            buf, fut = pending
            await fut
            pending = start_read(layer + 1) if layer + 1 < plan.layer_end else None
            view = memoryview(buf)
            ranges = [view[i * sb : (i + 1) * sb] for i in range(plan.n_slices)]
        if not pacer.limited:
            await pacer.pace(stream, plan.layer_payload_bytes)
            await sink.send([head, *ranges])
        elif socket_paced:
            # The layer (read into its buffer) goes in one hop; the send thread paces the pieces.
            await sink.send_groups([[head, *ranges]], None, (pacer, stream, piece_bytes))
        else:
            await sink.send([head])
            for part in ranges:
                off = 0
                while off < sb:
                    n = min(pacer.piece_bytes(stream, piece_bytes), sb - off)
                    await pacer.pace(stream, n)
                    if isinstance(part, tuple):
                        await sink.send([(part[0], part[1] + off, n)])
                    else:
                        await sink.send([part[off : off + n]])
                    off += n
        account(len(head) + plan.layer_payload_bytes)
        sent += 1
        pacer.layer_sent(stream)
    await sink.send([end_frame(sent)])
    account(_END.size)
    return sent
