"""Request bodies: read, decode and verify what a client uploads.

A body is checked against everything the request declares about it: the signed SHA-256
(``x-amz-content-sha256`` as 64 hex digits), ``aws-chunked`` framing with its chunk signatures and trailer
(``testbed.objectstore.auth.ChunkedDecoder``), ``x-amz-checksum-*`` headers or trailers, ``Content-MD5``, and
the declared length (``Content-Length``, or ``x-amz-decoded-content-length`` for ``aws-chunked``), and, when
the signed header ``x-oc-verify: kvchunk`` asks for it, the KV chunk object format (header and every slice's
xxh3, ``testbed.wire.kvformat.ChunkVerifier``; the answer then carries ``x-oc-verified: kvchunk``).  Hashing
runs in the I/O thread pool in batches of ``BATCH_BYTES`` while the next batch arrives from the network.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

from aiohttp import web

from testbed.objectstore.auth import AuthResult
from testbed.objectstore.chunked import ChunkedDecoder, checksum_b64, new_checksum
from testbed.objectstore.config import BATCH_BYTES
from testbed.objectstore.sigv4 import STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER
from testbed.wire.errors import ChecksumMismatch, CorruptObject, S3Error
from testbed.wire.kvformat import ChunkVerifier

VERIFY_HEADER = "x-oc-verify"  # request: "kvchunk" asks for the KV chunk check of the body
VERIFIED_HEADER = "x-oc-verified"  # response: the check was made
VERIFY_KVCHUNK = "kvchunk"

# Bodies up to this size are hashed in the event loop: cheaper than a hop to the busy thread pool.
INLINE_HASH_BYTES = 64 * 1024
CHECKSUM_ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BodyPace:
    """How slowly a request body may arrive: the next bytes within ``timeout_s``, and, once ``timeout_s``
    has passed since the body began, an average of at least ``min_bytes_per_s`` (0: no rate floor).  A body
    that falls behind is answered ``400 RequestTimeout`` and its connection closed, so a client that
    trickles a body (slowloris on the body) cannot hold a connection and its handler for long.

    The server puts its pace on every request (``request[BODY_PACE]``); ``DEFAULT_BODY_PACE`` is for
    requests without one."""

    timeout_s: float
    min_bytes_per_s: float = 0.0

    def wait_s(self, elapsed_s: float, received_bytes: int) -> float:
        """How long the next read may wait, ``elapsed_s`` after the body began with ``received_bytes``
        received (wire bytes); <= 0: the body is already too slow."""
        if self.min_bytes_per_s <= 0:
            return self.timeout_s
        return min(self.timeout_s, self.timeout_s + received_bytes / self.min_bytes_per_s - elapsed_s)


BODY_PACE = "objectcache.body_pace"
DEFAULT_BODY_PACE = BodyPace(60.0)


def body_timeout_error(received_bytes: int, pace: BodyPace) -> S3Error:
    return S3Error(
        "RequestTimeout",
        f"the request body was not sent fast enough (received {received_bytes} bytes; the server waits "
        f"{pace.timeout_s:g} s for more and then wants at least {pace.min_bytes_per_s:g} bytes/s on "
        "average); the connection is closed",
        400,
    )


async def _timed_reads(request: web.Request):
    """``request.content``'s pieces as they arrive, each read bounded by the request's ``BodyPace``; a
    body that falls behind ends the connection (no lingering read of the rest) with ``RequestTimeout``."""
    pace: BodyPace = request.get(BODY_PACE, DEFAULT_BODY_PACE)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    received = 0
    while True:
        wait_s = pace.wait_s(loop.time() - t0, received)
        try:
            if wait_s <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait_s):
                data = await request.content.readany()
        except TimeoutError:
            # Read no more (the parser must not feed a finished stream), skip aiohttp's lingering read of
            # the rest, and close the connection after the answer.
            if request.transport is not None:
                request.transport.pause_reading()
            request.content.feed_eof()
            request["close_connection"] = True
            raise body_timeout_error(received, pace) from None
        if not data:
            return
        received += len(data)
        yield data


@dataclass
class ReceivedBody:
    """A verified request body: its bytes (empty when it went to a sink), its decoded size, and the
    ``x-amz-checksum-*`` values it was verified against (to echo in the response)."""

    data: bytes
    size_bytes: int
    checksums: dict[str, str] = field(default_factory=dict)
    direct: bool = False  # received off the event loop (``read_body_direct``): the connection must close
    etag: str | None = None  # set for a verified KV chunk (``chunk_etag``); else the store's content MD5


def chunk_etag(header_raw: bytes, num_layers: int) -> str:
    """The ETag of a verified KV chunk object: hex MD5 of its header, dash, its number of slices.

    The header holds every slice's xxh3 (verified against the bytes as they arrived), so it names the content
    the way a multipart ETag's part MD5s do; the ``-<n>`` suffix tells S3 clients that this is not the MD5
    of the bytes (as for multipart objects), so they do not compare it with one.  It spares the write-back
    path an MD5 over every byte, which would be its largest CPU cost (about 1.3 CPU-s per GB)."""
    return f"{hashlib.md5(header_raw).hexdigest()}-{num_layers}"


class BodyChecks:
    """What one request's headers promise about its body, and the hashers that check it.

    Construct from the headers and the verified signature (raises the S3 error for an unusable
    declaration), ``update`` with every decoded batch, then ``verify`` with the decoded size and the
    ``aws-chunked`` trailers."""

    def __init__(self, headers: Mapping[str, str], auth: AuthResult, max_bytes: int, method: str) -> None:
        self.headers = headers
        mode = self.mode = auth.payload_hash
        self.chunked = mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER) or (
            "aws-chunked" in headers.get("Content-Encoding", "")
        )
        if self.chunked and mode.startswith("STREAMING-AWS4-ECDSA"):
            raise S3Error("NotImplemented", "SigV4a streaming payloads are not supported", 501)
        declared = headers.get("x-amz-decoded-content-length" if self.chunked else "Content-Length")
        self.declared_bytes: int | None = None
        if declared is not None:
            try:
                self.declared_bytes = int(declared)
            except ValueError:
                raise S3Error("InvalidArgument", "bad content length", 400) from None
            if self.declared_bytes > max_bytes:
                raise S3Error(
                    "EntityTooLarge",
                    f"body of {self.declared_bytes} bytes exceeds the limit of {max_bytes}",
                    413,
                )
        elif method == "PUT" and "chunked" not in headers.get("Transfer-Encoding", ""):
            raise S3Error("MissingContentLength", "you must provide the Content-Length header", 411)
        self.sha = hashlib.sha256() if _HEX64.match(mode) else None
        self.md5 = hashlib.md5() if "Content-MD5" in headers else None
        # algorithm -> (hasher, expected base64 value; None: expected in the trailer)
        self.checks: dict[str, tuple[object, str | None]] = {}
        for alg in CHECKSUM_ALGORITHMS:
            value = headers.get(f"x-amz-checksum-{alg}")
            if value is not None:
                self.checks[alg] = (new_checksum(alg), value)
        trailer = headers.get("x-amz-trailer", "").strip().lower()
        if trailer:
            if not trailer.startswith("x-amz-checksum-"):
                raise S3Error("InvalidRequest", f"unsupported trailer {trailer!r}", 400)
            alg = trailer[len("x-amz-checksum-") :]
            self.checks.setdefault(alg, (new_checksum(alg), None))
        self.hashers = [h for h in (self.sha, self.md5) if h is not None] + [
            h for h, _ in self.checks.values()
        ]
        # ``x-oc-verify: kvchunk`` (signed): the body is a KV chunk object; its header and per-slice xxh3
        # checksums are verified as it streams in (what lets a PUT skip the payload's SHA-256).
        self.chunk: ChunkVerifier | None = None
        self.chunk_error: Exception | None = None
        verify = headers.get(VERIFY_HEADER)
        if verify is not None:
            if verify.strip().lower() != VERIFY_KVCHUNK:
                raise S3Error("InvalidArgument", f"unknown {VERIFY_HEADER} {verify!r}", 400)
            if VERIFY_HEADER not in auth.signed_headers:
                raise S3Error("AccessDenied", f"the {VERIFY_HEADER} header must be signed", 403)
            self.chunk = ChunkVerifier()

    def etag(self) -> str | None:
        """The ETag of a verified KV chunk body (after ``verify``), else None."""
        if self.chunk is None or self.chunk.header is None:
            return None
        return chunk_etag(self.chunk.header_raw, self.chunk.header.num_layers)

    def decoder(self, auth: AuthResult) -> ChunkedDecoder | None:
        return ChunkedDecoder(auth, self.mode) if self.chunked else None

    def update(self, batch: bytes) -> None:
        for h in self.hashers:
            h.update(batch)
        if self.chunk is not None and self.chunk_error is None:
            try:
                self.chunk.update(batch)
            except (CorruptObject, ChecksumMismatch) as e:
                self.chunk_error = e

    def verify(self, size_bytes: int, trailers: Mapping[str, str]) -> dict[str, str]:
        """Check the received body; return the verified ``x-amz-checksum-*`` values (base64)."""
        if self.declared_bytes is not None and size_bytes != self.declared_bytes:
            raise S3Error(
                "IncompleteBody", f"received {size_bytes} bytes, expected {self.declared_bytes}", 400
            )
        if self.sha is not None and self.sha.hexdigest() != self.mode:
            raise S3Error("XAmzContentSHA256Mismatch", "the payload does not match x-amz-content-sha256", 400)
        if (
            self.md5 is not None
            and base64.b64encode(self.md5.digest()).decode() != self.headers["Content-MD5"].strip()
        ):
            raise S3Error("BadDigest", "the Content-MD5 you specified did not match what we received", 400)
        results = {}
        for alg, (hasher, expected) in self.checks.items():
            expected = expected if expected is not None else trailers.get(f"x-amz-checksum-{alg}")
            if expected is None:
                raise S3Error(
                    "InvalidRequest", f"trailer x-amz-checksum-{alg} was announced but not sent", 400
                )
            got = checksum_b64(hasher)
            if got != expected.strip():
                raise S3Error(
                    "BadDigest", f"the {alg.upper()} you specified did not match the calculated checksum", 400
                )
            results[f"x-amz-checksum-{alg}"] = got
        if self.chunk is not None:
            try:
                if self.chunk_error is not None:
                    raise self.chunk_error
                self.chunk.verify()
            except (CorruptObject, ChecksumMismatch) as e:
                raise S3Error(
                    "BadDigest", f"the body is not the KV chunk object it declares: {e}", 400
                ) from None
            results[VERIFIED_HEADER] = VERIFY_KVCHUNK
        return results


async def read_body(
    request: web.Request,
    auth: AuthResult,
    max_bytes: int,
    executor: Executor,
    sink: Callable[[bytes], None] | None = None,
) -> ReceivedBody:
    """Read, decode and verify ``request``'s body (at most ``max_bytes`` decoded bytes).

    Without ``sink`` the bytes are returned; with it they go to ``sink(batch)`` in batches of about
    ``BATCH_BYTES``, called from an ``executor`` thread (hashing there, GIL released for large buffers,
    overlaps the next network reads)."""
    checks = BodyChecks(request.headers, auth, max_bytes, request.method)
    decoder = checks.decoder(auth)

    def consume(batch: list) -> None:
        for piece in batch:
            checks.update(piece)
        if sink is not None:
            for piece in batch:
                sink(piece)

    loop = asyncio.get_running_loop()
    # The pieces as received (no joining copy): hashed and written piece by piece in a pool thread.
    kept: list = []
    kept_bytes = 0
    chunks: list = []
    pending = None
    size = 0
    async for data in _timed_reads(request):
        for piece in decoder.feed(data) if decoder else (data,):
            size += len(piece)
            if size > max_bytes:
                raise S3Error("EntityTooLarge", f"body exceeds the limit of {max_bytes} bytes", 413)
            kept.append(piece)
            kept_bytes += len(piece)
        if kept_bytes >= BATCH_BYTES:
            batch, kept, kept_bytes = kept, [], 0
            if sink is None:
                chunks.extend(batch)
            if pending is not None:
                await pending
            pending = loop.run_in_executor(executor, consume, batch)
    trailers = decoder.finish() if decoder else {}
    batch = kept
    if sink is None:
        chunks.extend(batch)
    if pending is not None:
        await pending
    if sink is None and kept_bytes <= INLINE_HASH_BYTES:
        consume(batch)  # a small body (a gather request): cheaper than a hop to the busy thread pool
    else:
        await loop.run_in_executor(executor, consume, batch)
    return ReceivedBody(b"".join(chunks), size, checks.verify(size, trailers), etag=checks.etag())


DIRECT_MIN_BYTES = 1 << 20  # smaller bodies are not worth a thread hop of their own
DIRECT_RECV_BYTES = 1 << 20


async def read_body_direct(
    request: web.Request,
    auth: AuthResult,
    max_bytes: int,
    executor: Executor,
    sink: Callable,
    on_taken: Callable[[web.Request], None],
    pace: BodyPace | None = None,
) -> ReceivedBody | None:
    """``read_body`` for a large plain-length body of a chunk PUT (``x-oc-verify: kvchunk``), received off
    the event loop: the transport stops reading, a pool thread ``recv_into``s a reused buffer from (a
    duplicate of) the connection's socket, and hashes, verifies and writes each piece there, so parallel
    PUT streams are received in parallel.  The connection is not reused afterwards (the HTTP parser never
    saw the body): ``on_taken(request)`` is called once the body is taken from the parser, and the caller
    answers with ``Connection: close``.  The body must keep ``pace`` (default: the request's ``BodyPace``).
    None when the request does not qualify (the caller then uses ``read_body``)."""
    pace = pace or request.get(BODY_PACE, DEFAULT_BODY_PACE)
    checks = BodyChecks(request.headers, auth, max_bytes, request.method)
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    declared = checks.declared_bytes
    if (
        checks.chunk is None
        or checks.chunked
        or declared is None
        or declared < DIRECT_MIN_BYTES
        or sock is None
        or transport.get_extra_info("sslcontext") is not None
        or "chunked" in request.headers.get("Transfer-Encoding", "")
        or request.headers.get("Expect", "").lower() == "100-continue"
    ):
        return None
    # What the parser already buffered, then no more reads on the loop (no await in between).
    pre: list[bytes] = []
    while True:
        b = request.content.read_nowait(-1)
        if not b:
            break
        pre.append(b)
    transport.pause_reading()
    on_taken(request)
    fd = os.dup(sock.fileno())
    have = sum(len(b) for b in pre)
    if have > declared:
        os.close(fd)
        raise S3Error("IncompleteBody", f"received more than the declared {declared} bytes", 400)

    def pump() -> int:
        s = socket.socket(fileno=fd)
        t0 = time.monotonic()
        try:
            for b in pre:
                checks.update(b)
                sink(b)
            remaining = declared - have
            buf = memoryview(bytearray(min(max(remaining, 1), DIRECT_RECV_BYTES)))
            while remaining:
                wait_s = pace.wait_s(time.monotonic() - t0, declared - remaining)
                if wait_s <= 0:
                    raise body_timeout_error(declared - remaining, pace)
                s.settimeout(wait_s)
                try:
                    n = s.recv_into(buf, min(remaining, len(buf)))
                except TimeoutError:
                    raise body_timeout_error(declared - remaining, pace) from None
                if not n:
                    raise S3Error(
                        "IncompleteBody", f"received {declared - remaining} of {declared} bytes", 400
                    )
                piece = buf[:n]
                checks.update(piece)
                sink(piece)
                remaining -= n
            return declared
        finally:
            s.close()  # the duplicate only

    try:
        size = await asyncio.get_running_loop().run_in_executor(executor, pump)
    finally:
        request.content.feed_eof()  # aiohttp: the body is done (no lingering read), the connection closes
    return ReceivedBody(b"", size, checks.verify(size, {}), direct=True, etag=checks.etag())
