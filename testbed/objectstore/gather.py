"""Layer-major gather on the server: the layer-l slices of many chunk objects, streamed as frames in GPU order.

The request and the frames are the wire protocol of ``testbed.wire.frames``.  A gather runs in three steps:

1. ``parse_gather_body`` validates the JSON body (413 ``EntityTooLarge`` / 400 ``InvalidRequest``).
2. ``prepare_gather`` opens every object and parses its header before any payload: a missing key is a 404
   ``NoSuchKey`` naming the missing names; chunks that disagree on geometry or a bad layer range are a 400
   ``InvalidRequest``.  The result, a ``GatherPlan``, knows the response's exact ``Content-Length``.
3. ``stream_gather`` sends the layer frames, layer_start first, then the end frame, through a sink
   (``testbed.objectstore.gather_sinks``).

An *early* gather (``"stream_early": true``) checks only the first part's objects (``frames.early_parts``:
2 keys) in step 2, and opens the others meanwhile, in order, in batches of 16 (in the I/O pool, or in the
event loop for a small gather on the filesystem store, see ``inline``).  Step 3 then sends the first layer
as a *parts frame*: each part (its stored checksums, then its slices) as soon as its objects are open and
checked.  The ``Content-Length`` is still exact before the first byte: slice size and layer count come from
the first part's headers (every later object must agree: it is checked against them), and the parts are
fixed by the key count.  A later key that is missing, damaged or of another geometry ends the stream with an
error frame in place of its part (after the parts before it), and the connection is closed; a client
treats it as a failed fetch.  The later layers need every object and are sent as before.

Payload bytes leave the server with ``sendfile`` straight from the object files when the store exposes file
descriptors (the filesystem store), otherwise they are read into a layer buffer (``preadv``/ranged reads in a
thread) while the previous layer is sent.  The server does not re-hash payload bytes: the frame carries the
*stored* checksums, and the client verifies every slice end to end.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from testbed.objectstore.gather_sinks import Part, SocketSink, WriterSink
from testbed.objectstore.paced_stream import PacedStream
from testbed.objectstore.pacer import DEFAULT_PIECE_BYTES, Pacer
from testbed.objectstore.storeapi import ObjectHandle, Store
from testbed.wire.errors import (
    ChunkMissing,
    CorruptObject,
    GeometryMismatch,
    InvalidRequest,
    RequestTooLarge,
    S3Error,
)
from testbed.wire.frames import (
    END_FRAME_BYTES,
    GATHER_VERSION,
    early_parts,
    encode_end_frame,
    encode_layer_head,
    encode_part_head,
    encode_parts_head,
    stream_bytes,
)
from testbed.wire.kvformat import HEADER_PROBE_BYTES, ChunkHeader, parse_header

DEFAULT_MAX_KEYS = 1024  # 256k tokens of 256-token chunks; each key holds a file open during its gather
DEFAULT_MAX_BODY_BYTES = 1 << 20
_HEADER_BATCH_KEYS = 16  # keys per executor task while reading headers
MAX_COMPUTE_PER_LAYER_S = 3600.0  # a pacing hint beyond an hour per layer is a mistake, not a model
_STREAM_ID = re.compile(r"[\x20-\x7e]{1,128}")


@dataclass(frozen=True)
class GatherRequest:
    """A validated gather request body (its JSON form: ``testbed.wire.frames``).  Layers
    ``[layer_start, layer_end)`` of ``keys`` (``layer_end`` None: to the model's last layer);
    ``compute_per_layer_s`` is the client's GPU time per layer in seconds, a hint for the pacer;
    ``stream_id`` names the stream in the pacer's control API and metrics; ``pace_group`` names the set of
    streams one client request split its chunks into, paced as one flow (``testbed.objectstore.pacer``)."""

    keys: tuple[str, ...]
    layer_start: int
    layer_end: int | None
    compute_per_layer_s: float | None = None
    stream_id: str | None = None
    stream_early: bool = False
    pace_group: str | None = None


def parse_gather_body(body: bytes, max_keys: int = DEFAULT_MAX_KEYS) -> GatherRequest:
    """Validate a gather request body; raise ``InvalidRequest`` (a key named twice too: it would be sent
    twice, amplifying the response) / ``RequestTooLarge``.  Not ``InvalidArgument``: clients read that
    code as "this endpoint has no gather" (``testbed.client.gather_path``) and fall back to plain GETs."""
    try:
        doc = json.loads(body)
    except (
        ValueError,
        UnicodeDecodeError,
        RecursionError,
    ):  # RecursionError: nesting deeper than the parser's stack
        raise InvalidRequest("gather body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("gather body must be a JSON object")
    if doc.get("version", GATHER_VERSION) != GATHER_VERSION:
        raise InvalidRequest(
            f"unsupported gather version {_shown(doc.get('version'))}; this server speaks {GATHER_VERSION}"
        )
    keys = doc.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise InvalidRequest("gather 'keys' must be a non-empty list of object names")
    if len(keys) > max_keys:
        raise RequestTooLarge(f"gather names {len(keys)} keys; the limit is {max_keys}")
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise InvalidRequest(f"gather names key {dup!r} more than once", key=dup)
    start = doc.get("layer_start", 0)
    end = doc.get("layer_end")
    if not _is_int(start) or start < 0 or (end is not None and (not _is_int(end) or end <= start)):
        raise InvalidRequest(f"bad layer range [{_shown(start)}, {_shown(end)})")
    compute_per_layer_s = doc.get("compute_per_layer_s")
    if compute_per_layer_s is not None and (
        not isinstance(compute_per_layer_s, int | float)
        or isinstance(compute_per_layer_s, bool)
        or not math.isfinite(compute_per_layer_s)
        or not 0 <= compute_per_layer_s <= MAX_COMPUTE_PER_LAYER_S
    ):
        raise InvalidRequest(
            f"compute_per_layer_s must be a number of seconds in [0, {MAX_COMPUTE_PER_LAYER_S:g}]"
        )
    sid, group = doc.get("stream_id"), doc.get("pace_group")
    for name, value in (("stream_id", sid), ("pace_group", group)):
        if value is not None and (not isinstance(value, str) or not _STREAM_ID.fullmatch(value)):
            # Echoed in a response header and labels metrics: no control characters.
            raise InvalidRequest(f"{name} must be 1 to 128 printable ASCII characters")
    early = doc.get("stream_early", False)
    if not isinstance(early, bool):
        raise InvalidRequest("stream_early must be true or false")
    if compute_per_layer_s is not None:
        compute_per_layer_s = float(compute_per_layer_s)
    return GatherRequest(tuple(keys), start, end, compute_per_layer_s, sid, early, group)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shown(value, max_chars: int = 64) -> str:
    """A client's value in an error message: short, and safe for any JSON (a deep nesting's ``repr``
    would exceed the recursion limit; a long integer's would exceed the digit limit)."""
    if isinstance(value, list | dict):
        return f"<a JSON {'array' if isinstance(value, list) else 'object'}>"
    if _is_int(value) and abs(value) >= 10**max_chars:
        return "<a huge integer>"
    text = repr(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


class GatherBudget:
    """What gathers may send: at most ``max_response_bytes`` per gather (its exact ``Content-Length``)
    and at most ``max_tenant_bytes`` of responses in flight per tenant (access key): the sum of the
    ``Content-Length`` of its open gather streams, reserved when a stream opens and released when it ends.

    A gather over the first bound is refused ``400 InvalidRequest`` (it can never be served: split it);
    one over its tenant's bound ``503 SlowDown`` (retry when the tenant's other gathers end).  Both before
    any response byte."""

    def __init__(self, max_response_bytes: int, max_tenant_bytes: int) -> None:
        self.max_response_bytes = max_response_bytes
        self.max_tenant_bytes = max_tenant_bytes
        self.in_flight_bytes: dict[str, int] = {}

    def admit(self, tenant: str, response_bytes: int) -> None:
        """Reserve ``response_bytes`` for ``tenant`` or raise; the caller ``release``s what was admitted.
        Synchronous: the check and the reservation are one step of the event loop."""
        if response_bytes > self.max_response_bytes:
            raise InvalidRequest(
                f"the gather response would be {response_bytes} bytes; the limit is "
                f"{self.max_response_bytes} per gather: gather fewer keys or layers per request"
            )
        held = self.in_flight_bytes.get(tenant, 0)
        if held + response_bytes > self.max_tenant_bytes:
            raise S3Error(
                "SlowDown",
                f"access key {tenant!r} has {held} gather response bytes in flight; another "
                f"{response_bytes} would exceed its limit of {self.max_tenant_bytes}: retry later",
                503,
            )
        self.in_flight_bytes[tenant] = held + response_bytes

    def release(self, tenant: str, response_bytes: int) -> None:
        left = self.in_flight_bytes.get(tenant, 0) - response_bytes
        if left > 0:
            self.in_flight_bytes[tenant] = left
        else:
            self.in_flight_bytes.pop(tenant, None)


@dataclass
class GatherPlan:
    """Open objects and their headers, checked to agree, for one gather.

    An early plan (``first_parts`` set) starts with only the first part's objects open; ``open_part(i)``
    waits for part ``i``'s (``handles[k]`` / ``headers[k]`` are None until then).  ``geometry``: the chunk
    geometry every object must have (the first object's)."""

    keys: tuple[str, ...]
    handles: list[ObjectHandle | None]
    headers: list[ChunkHeader | None]
    layer_start: int
    layer_end: int
    first_parts: list[tuple[int, int]] | None = None
    # Early plans: part index -> what opens it (an asyncio future of ``open_batch``'s results, a function
    # that opens it in the event loop, or its results already); removed once the part is checked.
    pending: dict = field(default_factory=dict)

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
        """The layer frame up to its payload: head and the stored checksum of each slice."""
        return encode_layer_head(layer, self.slice_bytes, [h.checksums[layer] for h in self.headers])

    @property
    def content_length(self) -> int:
        """Bytes of the whole response body: every layer frame and the end frame."""
        parts = len(self.first_parts) if self.first_parts is not None else 0
        return stream_bytes(self.num_layers, self.n_slices, self.slice_bytes, parts)

    async def open_part(self, i: int) -> None:
        """Wait until part ``i``'s objects are open and checked (early plans); raises what a late key
        is: ``ChunkMissing``, ``CorruptObject``, ``GeometryMismatch``."""
        opener = self.pending.get(i)
        if opener is None:
            return
        self.pending.pop(i, None)
        if isinstance(opener, asyncio.Future):
            results = await opener
        elif isinstance(opener, list):
            results = opener
        else:
            results = opener()
        lo, hi = self.first_parts[i]
        self._accept(lo, hi, results)

    def open_inline_ahead(self, i: int) -> None:
        """Open part ``i``'s objects now if they are to be opened in the event loop (while a send thread
        carries the previous part); ``open_part`` checks them.  An unexpected error is raised there."""
        opener = self.pending.get(i)
        if opener is None or isinstance(opener, asyncio.Future | list):
            return
        try:
            self.pending[i] = opener()
        except Exception as e:

            def fail(e=e):
                raise e

            self.pending[i] = fail

    def _accept(self, lo: int, hi: int, results: list) -> None:
        try:
            headers = _check_results(self.keys[lo:hi], results, self.headers[0].geometry(), self.keys[0])
        except BaseException:
            _close_all(results)
            raise
        self.handles[lo:hi] = [r[0] for r in results]
        self.headers[lo:hi] = headers

    def close(self) -> None:
        for h in self.handles:
            if h is not None:
                h.close()
        self.handles = []
        for opener in self.pending.values():
            if isinstance(opener, asyncio.Future):  # an open still running in the pool: close what it opens
                opener.add_done_callback(_close_results)
            elif isinstance(opener, list):
                _close_all(opener)
        self.pending = {}


def _close_results(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        _close_all(fut.result())


def _close_all(results: list) -> None:
    for r in results:
        if isinstance(r, tuple):
            r[0].close()


def _check_results(
    keys: Sequence[str], results: list, geometry=None, ref_key: str | None = None
) -> list[ChunkHeader]:
    """The headers of ``open_batch``'s ``results`` for ``keys``, or raise: ``ChunkMissing`` naming every
    missing key, else the first other error, else ``GeometryMismatch`` (against ``geometry``, chunk
    ``ref_key``'s, or else the first key's).  Closes nothing."""
    missing = [k for k, r in zip(keys, results) if isinstance(r, ChunkMissing)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ChunkMissing(f"{len(missing)} of {len(keys)} keys do not exist: {shown}", keys=missing)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    headers = [r[1] for r in results]
    first = headers[0].geometry() if geometry is None else geometry
    ref = keys[0] if ref_key is None else ref_key
    for key, h in zip(keys, headers):
        if h.geometry() != first:
            raise GeometryMismatch(f"chunk {key} has geometry {h.geometry()}, but {ref} has {first}", key=key)
    return headers


def open_batch(store: Store, bucket: str, keys: Sequence[str]) -> list:
    """Open and parse the header of each key; a result is (handle, header), ChunkMissing, or an error.
    The caller closes the handles."""
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
    store: Store,
    bucket: str,
    req: GatherRequest,
    executor: Executor | None = None,
    inline: bool = False,
    first_inline: bool = False,
) -> GatherPlan:
    """Open all objects and check them (see the module docstring); nothing is sent yet.  An early request
    (``req.stream_early``) opens only the first part's objects here and starts opening the rest.

    ``inline=True`` opens the objects in the calling thread (the event loop) instead of ``executor``: for a
    few keys on a local filesystem store this is tens of microseconds, whereas a hop to a thread pool that
    is busy streaming other gathers waits for a free thread and the GIL (measured 2-42 ms with ~7 streams
    running on 2 cores), which delays the stream's open unpredictably.  An early gather opens its first
    part in the event loop whenever ``inline`` or ``first_inline`` is set, and its other parts in the
    event loop (``inline``: one part at a time, when the stream needs it) or in the pool (all submitted at
    once, in order).
    """
    if req.stream_early:
        return await _prepare_early(store, bucket, req, executor, inline, first_inline)
    batches = [req.keys[i : i + _HEADER_BATCH_KEYS] for i in range(0, len(req.keys), _HEADER_BATCH_KEYS)]
    if inline:
        results: list = []
        for b in batches:
            try:
                results.append(open_batch(store, bucket, b))
            except Exception as e:  # like ``return_exceptions=True`` below: the check closes the handles
                results.append(e)
    else:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(executor, open_batch, store, bucket, b) for b in batches),
            return_exceptions=True,
        )
    flat: list = []
    for r in results:
        flat.extend(r if isinstance(r, list) else [r])
    handles = [r[0] for r in flat if isinstance(r, tuple)]
    try:
        headers = _check_results(req.keys, flat)
        end = _layer_end(req, headers[0])
        return GatherPlan(req.keys, handles, headers, req.layer_start, end)
    except BaseException:
        for h in handles:
            h.close()
        raise


def _layer_end(req: GatherRequest, header: ChunkHeader) -> int:
    num_layers = header.num_layers
    end = num_layers if req.layer_end is None else req.layer_end
    if end > num_layers or req.layer_start >= end:
        raise InvalidRequest(
            f"layer range [{req.layer_start}, {end}) outside the model's {num_layers} layers"
        )
    return end


async def _prepare_early(
    store: Store, bucket: str, req: GatherRequest, executor: Executor | None, inline: bool, first_inline: bool
) -> GatherPlan:
    """``prepare_gather`` of an early request: the first part checked, the others pending."""
    parts = early_parts(len(req.keys), step=_HEADER_BATCH_KEYS)
    lo, hi = parts[0]
    loop = asyncio.get_running_loop()
    if inline or first_inline:
        first = open_batch(store, bucket, req.keys[lo:hi])
    else:
        first = await loop.run_in_executor(executor, open_batch, store, bucket, req.keys[lo:hi])
    n = len(req.keys)
    plan = GatherPlan(req.keys, [None] * n, [None] * n, req.layer_start, req.layer_start + 1, parts)
    try:
        headers = _check_results(req.keys[lo:hi], first)
        plan.handles[lo:hi] = [r[0] for r in first]
        plan.headers[lo:hi] = headers
        plan.layer_end = _layer_end(req, headers[0])
    except BaseException:
        _close_all(first)
        raise
    for i, (a, b) in enumerate(parts[1:], start=1):
        keys = req.keys[a:b]
        if inline:
            plan.pending[i] = lambda keys=keys: open_batch(store, bucket, keys)
        else:
            plan.pending[i] = loop.run_in_executor(executor, open_batch, store, bucket, keys)
    return plan


# --- streaming --------------------------------------------------------------------------------------------


def _read_slices(plan: GatherPlan, layer: int, buf: memoryview, chunk_ids: range, first: int = 0) -> None:
    """Read the layer-``layer`` slices of chunks ``chunk_ids`` into their places in the buffer, which holds
    the slices from chunk ``first`` on (the layer buffer: 0)."""
    sb = plan.slice_bytes
    for i in chunk_ids:
        start, _ = plan.headers[i].layer_range(layer)
        got = plan.handles[i].read_into(start, buf[(i - first) * sb : (i - first + 1) * sb])
        if got != sb:
            raise CorruptObject(
                f"chunk {plan.keys[i]} layer {layer}: short read", key=plan.keys[i], layer=layer
            )


def _start_layer_read(
    plan: GatherPlan, layer: int, executor: Executor | None, read_parallelism: int
) -> tuple[bytearray, asyncio.Future]:
    """Start reading one layer into a fresh buffer (a sink may still reference the previous one): the slices
    are read in up to ``read_parallelism`` concurrent tasks (a remote store serves each with its own
    request).  Returns the buffer and the future of the reads."""
    loop = asyncio.get_running_loop()
    buf = bytearray(plan.layer_payload_bytes)
    n = plan.n_slices
    step = -(-n // max(1, min(read_parallelism, n)))
    futs = [
        loop.run_in_executor(executor, _read_slices, plan, layer, memoryview(buf), range(i, min(n, i + step)))
        for i in range(0, n, step)
    ]
    return buf, asyncio.gather(*futs)


def _file_ranges(plan: GatherPlan, fds: list[int], layer: int) -> list[Part]:
    """The layer's payload as (file descriptor, offset, count) ranges of the object files, in key order."""
    return [(fds[i], h.layer_range(layer)[0], plan.slice_bytes) for i, h in enumerate(plan.headers)]


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
    ``on_bytes(n)`` is told every ``n`` bytes sent.  Errors propagate: the caller sends an error frame and
    closes the connection.
    """
    account = on_bytes or (lambda n: None)
    sent, first = 0, plan.layer_start
    if plan.first_parts is not None:  # an early plan: the first layer part by part, as objects open
        await _send_first_layer_in_parts(
            plan, sink, pacer, stream, executor, piece_bytes, account, allow_sendfile
        )
        sent, first = 1, first + 1
    fds = [h.fileno() for h in plan.handles]
    use_sendfile = allow_sendfile and sink.can_sendfile and all(fd is not None for fd in fds)
    socket_paced = pacer.limited and isinstance(sink, SocketSink)
    if first >= plan.layer_end:
        pass
    elif use_sendfile and (not pacer.limited or socket_paced):
        sent += await _send_all_layers_at_once(plan, sink, fds, pacer, stream, piece_bytes, account, first)
    else:
        sent += await _send_layer_by_layer(
            plan,
            sink,
            fds if use_sendfile else None,
            pacer,
            stream,
            executor,
            piece_bytes,
            account,
            read_parallelism,
            first,
        )
    await sink.send([encode_end_frame(sent)])
    account(END_FRAME_BYTES)
    return sent


async def _send_all_layers_at_once(
    plan: GatherPlan,
    sink: SocketSink,
    fds: list[int],
    pacer: Pacer,
    stream: PacedStream,
    piece_bytes: int,
    account: Callable[[int], None],
    first: int,
) -> int:
    """Zero-copy, every layer from ``first`` in one thread hop, so the socket never idles between layers;
    paced, the send thread paces itself piece by piece (no hop per piece)."""
    layers = range(first, plan.layer_end)
    groups = [[plan.frame_head(layer), *_file_ranges(plan, fds, layer)] for layer in layers]

    def layer_done(i: int) -> None:
        if not pacer.limited:  # paced bytes are counted by the pacer as they are paced
            stream.delivered_bytes += plan.layer_payload_bytes
        account(len(groups[i][0]) + plan.layer_payload_bytes)
        pacer.layer_sent(stream)

    pacing = (pacer, stream, piece_bytes) if pacer.limited else None
    await sink.send_groups(groups, layer_done, pacing)
    return len(groups)


async def _send_layer_by_layer(
    plan: GatherPlan,
    sink: WriterSink | SocketSink,
    fds: list[int] | None,
    pacer: Pacer,
    stream: PacedStream,
    executor: Executor | None,
    piece_bytes: int,
    account: Callable[[int], None],
    read_parallelism: int,
    first: int,
) -> int:
    """One layer per step from ``first``: file ranges when ``fds`` is given, else the layer read into a
    buffer while the previous one is sent.  Paced through the send thread of a ``SocketSink``, else through
    the event loop."""
    socket_paced = pacer.limited and isinstance(sink, SocketSink)
    pending = None if fds is not None else _start_layer_read(plan, first, executor, read_parallelism)
    sent = 0
    for layer in range(first, plan.layer_end):
        head = plan.frame_head(layer)
        if fds is not None:
            ranges = _file_ranges(plan, fds, layer)
        else:
            buf, reads = pending
            await reads
            if layer + 1 < plan.layer_end:
                pending = _start_layer_read(plan, layer + 1, executor, read_parallelism)
            view, sb = memoryview(buf), plan.slice_bytes
            ranges = [view[i * sb : (i + 1) * sb] for i in range(plan.n_slices)]
        if not pacer.limited:
            await pacer.pace(stream, plan.layer_payload_bytes)
            await sink.send([head, *ranges])
        elif socket_paced:
            # The layer (read into its buffer) goes in one hop; the send thread paces the pieces.
            await sink.send_groups([[head, *ranges]], None, (pacer, stream, piece_bytes))
        else:
            await sink.send([head])
            await _send_paced_pieces(sink, ranges, plan.slice_bytes, pacer, stream, piece_bytes)
        account(len(head) + plan.layer_payload_bytes)
        sent += 1
        pacer.layer_sent(stream)
    return sent


async def _send_first_layer_in_parts(
    plan: GatherPlan,
    sink: WriterSink | SocketSink,
    pacer: Pacer,
    stream: PacedStream,
    executor: Executor | None,
    piece_bytes: int,
    account: Callable[[int], None],
    allow_sendfile: bool,
) -> None:
    """An early plan's first layer as a parts frame: each part (head and stored checksums, then its slices:
    file ranges, or read into a buffer in ``executor``) sent as soon as its objects are open and checked,
    paced like a layer (``_send_layer_by_layer``).  A part's objects opened in the event loop are opened
    while the send thread carries the part before.  A late key's error propagates after the parts before
    it (the caller sends the error frame)."""
    layer, sb = plan.layer_start, plan.slice_bytes
    socket_paced = pacer.limited and isinstance(sink, SocketSink)
    loop = asyncio.get_running_loop()
    for i, (lo, hi) in enumerate(plan.first_parts):
        await plan.open_part(i)
        head = encode_part_head([plan.headers[k].checksums[layer] for k in range(lo, hi)])
        if i == 0:
            head = encode_parts_head(layer, plan.n_slices, sb) + head
        fds = [plan.handles[k].fileno() for k in range(lo, hi)]
        if allow_sendfile and sink.can_sendfile and all(fd is not None for fd in fds):
            ranges: list[Part] = [
                (fd, plan.headers[k].layer_range(layer)[0], sb) for fd, k in zip(fds, range(lo, hi))
            ]
        else:
            buf = memoryview(bytearray((hi - lo) * sb))
            await loop.run_in_executor(executor, _read_slices, plan, layer, buf, range(lo, hi), lo)
            ranges = [buf[j * sb : (j + 1) * sb] for j in range(hi - lo)]
        payload = (hi - lo) * sb
        if not pacer.limited:
            await pacer.pace(stream, payload)
            send = sink.send([head, *ranges])
        elif socket_paced:
            send = sink.send_groups([[head, *ranges]], None, (pacer, stream, piece_bytes))
        else:
            await sink.send([head])
            send = _send_paced_pieces(sink, ranges, sb, pacer, stream, piece_bytes)
        task = asyncio.ensure_future(send)
        try:
            if i + 1 < len(plan.first_parts) and isinstance(sink, SocketSink):
                plan.open_inline_ahead(i + 1)
        finally:
            await task
        account(len(head) + payload)
    pacer.layer_sent(stream)


async def _send_paced_pieces(
    sink: WriterSink | SocketSink,
    ranges: list[Part],
    slice_bytes: int,
    pacer: Pacer,
    stream: PacedStream,
    piece_bytes: int,
) -> None:
    """Send each slice in rate-scaled pieces, each after ``await pacer.pace`` (a sink without a send thread)."""
    for part in ranges:
        offset_bytes = 0
        while offset_bytes < slice_bytes:
            n = min(pacer.piece_bytes(stream, piece_bytes), slice_bytes - offset_bytes)
            await pacer.pace(stream, n)
            if isinstance(part, tuple):
                await sink.send([(part[0], part[1] + offset_bytes, n)])
            else:
                await sink.send([part[offset_bytes : offset_bytes + n]])
            offset_bytes += n
