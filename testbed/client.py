"""The object-tier client: put chunks, check existence, load a cached prefix layer by layer.

``ObjectCacheClient`` talks S3 to any S3-compatible service and uses ObjectCache's *gather* extension when the
endpoint has it:

* **gather** (the ObjectCache server): one signed ``POST /<bucket>?gather`` whose response streams framed
  layers, layer-major (layer ``l`` = the layer-``l`` slices of every chunk, in key order).  The client
  ``readinto``-s each layer's payload straight into the caller's buffer and verifies every slice against the
  checksum stored in its object header (end-to-end integrity).
* **ranged** (fallback for plain S3: Ceph RGW, MinIO, AWS): one ranged GET per chunk for its header, then one
  ranged GET per (chunk, layer) slice, bounded by ``max_concurrency`` concurrent requests and submitted in
  layer order, so early layers complete first.
* **whole** (fallback): one GET per chunk object, streamed; the slices are read straight into the per-layer
  buffers as they pass by.

All three return the same bytes: ``load_layers`` yields ``(layer, memoryview)`` pairs in layer order, each as
soon as that layer is complete and verified; the view holds ``n_chunks * slice_bytes`` bytes, chunk ``i``'s
slice at ``[i * slice_bytes, (i + 1) * slice_bytes)``.

``mode="auto"`` tries gather once per endpoint; if the service answers that it does not know the request (RGW
answers ``501 NotImplemented``), the client remembers that for the endpoint and uses ``fallback_mode``.

Requests are signed with botocore's SigV4 signer; the data path uses ``http.client`` connections of its own
(``readinto`` into caller memory, no intermediate copies), the control path (PUT, HEAD, bucket) uses boto3.
Errors are ``testbed.errors`` classes whose messages name the object and layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from urllib.parse import quote, urlsplit

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.credentials
import numpy as np
import xxhash
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from testbed import kvformat
from testbed.errors import (
    ChecksumMismatch,
    ChunkMissing,
    CorruptObject,
    GeometryMismatch,
    InvalidRequest,
    ObjectCacheError,
    ProtocolError,
    StorageUnavailable,
    TruncatedStream,
    from_s3_error,
)

MODES = ("auto", "gather", "ranged", "whole")
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

# Endpoint URL -> does it speak gather?  Shared by every client in the process: probing costs a round trip.
_GATHER_SUPPORT: dict[str, bool] = {}
_GATHER_SUPPORT_LOCK = threading.Lock()


def forget_gather_support(endpoint_url: str | None = None) -> None:
    """Drop what was learned about gather support (of one endpoint, or of all)."""
    with _GATHER_SUPPORT_LOCK:
        if endpoint_url is None:
            _GATHER_SUPPORT.clear()
        else:
            _GATHER_SUPPORT.pop(endpoint_url.rstrip("/"), None)


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


def _error_from_body(status: int, body: bytes, key: str | None) -> ObjectCacheError:
    """Map an S3 XML error response to a ``testbed.errors`` instance."""
    text = body.decode("utf-8", "replace")
    code = _xml_field(text, "Code") or {404: "NoSuchKey", 403: "AccessDenied", 503: "ServiceUnavailable"}.get(
        status, f"HTTP{status}"
    )
    message = _xml_field(text, "Message") or ""
    named = _xml_field(text, "Key") or key
    err = from_s3_error(code, f"{message} (HTTP {status}{f', object {named!r}' if named else ''})", key=named)
    err.http_status_seen = status  # type: ignore[attr-defined]
    err.s3_code_seen = code  # type: ignore[attr-defined]
    return err


def _xml_field(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S)
    return m.group(1).strip() if m else None


def object_path(bucket: str, name: str) -> str:
    """URL path of an object (path-style addressing)."""
    return f"/{quote(bucket, safe='')}/{quote(name, safe='/-_.~')}"


def _as_byte_view(buf) -> memoryview:
    view = memoryview(buf)
    if view.readonly:
        raise ValueError("output buffers must be writable")
    if not view.c_contiguous:
        raise ValueError("output buffers must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _read_exact(resp: http.client.HTTPResponse, view: memoryview, what: str) -> None:
    """Fill ``view`` from the response body, raising ``TruncatedStream`` if the body ends early."""
    got, n = 0, len(view)
    while got < n:
        k = resp.readinto(view[got:])
        if not k:
            raise TruncatedStream(f"{what}: stream ended after {got} of {n} bytes")
        got += k


class _RawBody:
    """Reads a response body of known length straight from the connection's socket, bypassing
    ``http.client``'s buffered reader: large ``recv_into(MSG_WAITALL)`` calls into the caller's buffer, so
    one blocking system call (GIL released) fills most of a layer.  The bytes the buffered reader already
    holds (read along with the headers) are served first.  A receive that makes no progress for
    ``timeout_s`` raises ``TimeoutError``.  ``close`` restores the socket for keep-alive reuse.
    """

    WAITALL_BYTES = 64 << 20  # one recv per this many bytes at most (bounded time inside one call)

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, timeout_s: float):
        self._conn, self._resp, self._timeout_s = conn, resp, timeout_s
        self.remaining = resp.length if resp.length is not None else -1
        self._sock = conn.sock
        # Drain what the buffered reader already holds (never more than it has buffered, or one recv).
        self._pre = memoryview(resp.fp.read1(1 << 16) if self.remaining else b"")
        sec = max(1, int(math.ceil(timeout_s)))
        self._sock.settimeout(None)  # blocking, so MSG_WAITALL waits in the kernel; SO_RCVTIMEO bounds it
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, 0))
        _grow_rcvbuf(self._sock)

    @classmethod
    def usable(cls, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> bool:
        return (
            isinstance(conn.sock, socket.socket)
            and not isinstance(conn, http.client.HTTPSConnection)
            and not resp.chunked
            and resp.length is not None
        )

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (as much as the body holds); returns the bytes read (short only at the end)."""
        n, got = len(view), 0
        if self._pre:
            k = min(n, len(self._pre))
            view[:k] = self._pre[:k]
            self._pre = self._pre[k:]
            got = k
        while got < n:
            want = min(n - got, self.WAITALL_BYTES)
            try:
                k = self._sock.recv_into(view[got : got + want], want, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO expired with nothing received
                raise TimeoutError(f"no gather data for {self._timeout_s:.0f} s") from None
            if not k:
                break
            got += k
        self.remaining -= got
        return got

    def read_exact(self, view: memoryview, what: str) -> None:
        got = self.readinto(view)
        if got < len(view):
            raise TruncatedStream(f"{what}: stream ended after {got} of {len(view)} bytes")

    def close(self) -> None:
        """Back to ``http.client``'s timeout mode; the response is done when the whole body was read."""
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
            self._sock.settimeout(self._conn.timeout)
        if self.remaining == 0 and not self._pre:
            self._resp.length = 0
            self._resp.close()  # the connection may be reused (``SignedHTTP.finish``)


_RCVBUF_BYTES = 16 << 20
# Gather payloads larger than this are verified piece by piece, overlapping the receive of the next piece.
_VERIFY_PIECE_BYTES = 8 << 20


def _first_bad_slice(
    view: memoryview, want: Sequence[int], slice_bytes: int, lo: int, hi: int
) -> tuple[int, int] | None:
    """(index, computed xxh3_64) of the first slice in [lo, hi) whose checksum differs, else None."""
    for i in range(lo, hi):
        got = xxhash.xxh3_64_intdigest(view[i * slice_bytes : (i + 1) * slice_bytes])
        if got != want[i]:
            return i, got
    return None


def _grow_rcvbuf(sock: socket.socket, want: int = _RCVBUF_BYTES) -> None:
    """A large receive buffer, unless the kernel's autotuning already allows one (setting SO_RCVBUF turns
    autotuning off, so never set it lower than autotuning would reach)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem") as f:
            auto_max = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        auto_max = 0
    if auto_max >= want:
        return
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < want:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)


class _Connections:
    """A small pool of keep-alive ``http.client`` connections to one endpoint (thread-safe)."""

    def __init__(self, endpoint_url: str, timeout_s: float, size: int) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint_url must be http(s)://host[:port], got {endpoint_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout_s = timeout_s
        self._idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue(maxsize=max(1, size))

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, reused): a reused keep-alive connection may have been closed by the server."""
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=self.timeout_s)
            return conn, False

    def put(self, conn: http.client.HTTPConnection) -> None:
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def make_boto3_client(
    endpoint_url: str,
    access_key: str,
    secret_key: str,
    region: str,
    timeout_s: float,
    max_pool_connections: int,
    retries: int = 2,
):
    """A boto3 S3 client for any S3 service: path-style addressing, bounded timeouts and retries, and
    checksums only where S3 requires them (our own per-slice checksums cover the KV payload)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(
            max_pool_connections=max_pool_connections,
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": retries + 1, "mode": "standard"},
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


class SignedHTTP:
    """SigV4-signed requests over pooled keep-alive ``http.client`` connections to one S3 endpoint.

    The data path of the client and of the S3-proxy store: responses are read with ``readinto`` into the
    caller's memory.  Connection failures are retried on a fresh connection, 503s after a short back-off.
    """

    def __init__(
        self,
        endpoint_url: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        timeout_s: float = 30.0,
        pool_size: int = 16,
        retries: int = 2,
    ) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.retries = retries
        self._signer = botocore.auth.S3SigV4Auth(
            botocore.credentials.Credentials(access_key, secret_key), "s3", region
        )
        self._conns = _Connections(self.endpoint_url, timeout_s, pool_size)

    def close(self) -> None:
        self._conns.close()

    def signed_headers(self, method: str, path_query: str, headers: dict[str, str], body: bytes) -> dict:
        req = botocore.awsrequest.AWSRequest(
            method=method, url=self.endpoint_url + path_query, data=body, headers=headers
        )
        self._signer.add_auth(req)
        return dict(req.headers.items())

    def open(self, method: str, path_query: str, headers: dict[str, str], body: bytes = b"", key=None):
        """Send a signed request; returns (connection, response).  Retries connection failures."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            conn, reused = self._conns.get()
            try:
                signed = self.signed_headers(method, path_query, headers, body)
                conn.request(method, path_query, body=body or None, headers=signed)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                last = e
                # A pooled keep-alive connection the server already closed: retry at once on a fresh one.
                if not reused:
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                continue
            if resp.status == 503 and attempt < self.retries:  # SlowDown / overloaded: back off and retry
                resp.read()
                self._conns.put(conn)
                time.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            return conn, resp
        raise StorageUnavailable(
            f"{method} {path_query[:120]}: {self.endpoint_url} unreachable after {self.retries + 1} tries: {last}",
            key=key,
        )

    def finish(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Return a connection to the pool if its response was read to the end, else close it."""
        if resp.isclosed() and not resp.will_close:
            self._conns.put(conn)
        else:
            conn.close()

    def get_range_into(self, bucket: str, name: str, start: int, view: memoryview, what: str) -> None:
        """GET object bytes ``[start, start + len(view))`` straight into ``view``."""
        end = start + len(view) - 1
        conn, resp = self.open("GET", object_path(bucket, name), {"Range": f"bytes={start}-{end}"}, key=name)
        try:
            if resp.status not in (200, 206):
                body = resp.read()
                if resp.status == 416:
                    raise CorruptObject(f"{what}: object {name!r} is shorter than its header says", key=name)
                raise _error_from_body(resp.status, body, name)
            if resp.status == 200 and start != 0:
                raise ProtocolError(f"{what}: {self.endpoint_url} ignored the Range header", key=name)
            length = resp.getheader("Content-Length")
            if resp.status == 206 and length is not None and int(length) != len(view):
                raise CorruptObject(
                    f"{what}: object {name!r} returned {length} bytes, expected {len(view)}", key=name
                )
            _read_exact(resp, view, f"{what} ({name!r})")
            if resp.status == 200:
                resp.read()  # a 200 for a prefix range: drain the rest of the object
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise StorageUnavailable(f"{what}: reading {name!r}: {e}", key=name) from e
        except BaseException:
            conn.close()
            raise
        self.finish(conn, resp)


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


class ObjectCacheClient:
    """Client of the object tier (see the module docstring).

    ``max_concurrency`` bounds the concurrent requests of the fallback paths and of bulk PUT/HEAD;
    ``timeout_s`` bounds connecting and every single socket read or write (not a whole transfer).
    ``fallback_mode`` is what ``mode="auto"`` uses against a service without gather (``ranged``/``whole``).
    """

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        mode: str = "auto",
        max_concurrency: int = 16,
        timeout_s: float = 30.0,
        fallback_mode: str = "ranged",
        retries: int = 2,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if fallback_mode not in ("ranged", "whole"):
            raise ValueError(f"fallback_mode must be 'ranged' or 'whole', got {fallback_mode!r}")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        # What another process needs to build an equivalent client (the engine's reader process).
        self.init_kwargs = dict(
            endpoint_url=endpoint_url,
            bucket=bucket,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            mode=mode,
            max_concurrency=max_concurrency,
            timeout_s=timeout_s,
            fallback_mode=fallback_mode,
            retries=retries,
        )
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.mode = mode
        self.fallback_mode = fallback_mode
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.last_path: str | None = None  # path the last load_layers used: gather | ranged | whole
        self._http = SignedHTTP(
            self.endpoint_url, access_key, secret_key, region, timeout_s, max_concurrency + 2, retries
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="oc-client")
        self._s3 = make_boto3_client(
            self.endpoint_url, access_key, secret_key, region, timeout_s, max_concurrency + 2, retries
        )

    # --- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
        self._s3.close()

    def __enter__(self) -> ObjectCacheClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- control path (boto3) -----------------------------------------------------------------------------
    def _s3_call(self, what: str, fn, key: str | None = None, **kwargs):
        try:
            return fn(**kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.get("Code") or str(status)
            raise from_s3_error(code, f"{what}: {err.get('Message') or code} (HTTP {status})", key=key) from e
        except (BotoCoreError, OSError) as e:
            raise StorageUnavailable(f"{what}: {self.endpoint_url} unreachable: {e}", key=key) from e

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise from_s3_error(str(e.response.get("Error", {}).get("Code")), str(e)) from e
        except (BotoCoreError, OSError) as e:
            raise StorageUnavailable(f"head bucket {self.bucket!r}: {e}") from e
        try:
            self._s3.create_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise from_s3_error(str(e.response["Error"].get("Code")), str(e)) from e

    def put_chunk(self, name: str, blob: bytes | memoryview) -> bool:
        """Write one chunk object unless it exists (``If-None-Match: *``); False if it already existed."""
        try:
            self._s3.put_object(Bucket=self.bucket, Key=name, Body=bytes(blob), IfNoneMatch="*")
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: it exists.  409: a concurrent conditional write of the same key won; same bytes either way
            # (content-addressed), so it exists too.
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise from_s3_error(str(code), f"put {name!r}: {e}", key=name) from e
        except (BotoCoreError, OSError) as e:
            raise StorageUnavailable(f"put {name!r}: {self.endpoint_url} unreachable: {e}", key=name) from e

    def put_chunks(self, items: Sequence[tuple[str, bytes | memoryview]]) -> int:
        """Write the chunks that do not exist yet, in parallel; returns how many were written."""
        items = list(items)
        present = self.exists([name for name, _ in items])
        todo = [(n, b) for (n, b), p in zip(items, present) if not p]
        return sum(self._map(lambda nb: self.put_chunk(*nb), todo))

    def exists(self, names: Sequence[str]) -> list[bool]:
        """Existence of each object (parallel HEADs)."""

        def head(name: str) -> bool:
            try:
                self._s3.head_object(Bucket=self.bucket, Key=name)
                return True
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    return False
                code = str(e.response.get("Error", {}).get("Code") or status)
                # A HEAD reply has no body: botocore's "code" is then the status number.
                code = {"403": "AccessDenied", "503": "ServiceUnavailable"}.get(code, code)
                raise from_s3_error(code, str(e), key=name) from e
            except (BotoCoreError, OSError) as e:
                raise StorageUnavailable(f"head {name!r}: {e}", key=name) from e

        return self._map(head, list(names))

    def delete_chunks(self, names: Sequence[str]) -> None:
        """Delete objects (missing ones are fine); used by benchmarks and tests to clean up."""
        self._map(
            lambda n: self._s3_call(f"delete {n!r}", self._s3.delete_object, Bucket=self.bucket, Key=n), names
        )

    def _map(self, fn, items: list) -> list:
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def report_corrupt(self, name: str) -> bool:
        """Tell a gather server that ``name`` failed its checksum here (``POST /<bucket>/<key>?quarantine``);
        the server re-verifies the stored bytes and quarantines the object if they are bad, so later
        lookups miss.  Best effort: True if the server quarantined it, False otherwise (never raises)."""
        try:
            conn, resp = self._http.open("POST", object_path(self.bucket, name) + "?quarantine", {}, key=name)
            body = resp.read()
            self._http.finish(conn, resp)
            return resp.status == 200 and b"<Quarantined>true</Quarantined>" in body
        except (ObjectCacheError, OSError, http.client.HTTPException):
            return False

    # --- layer loading ------------------------------------------------------------------------------------
    def load_layers(
        self,
        names: Sequence[str],
        *,
        layer_start: int = 0,
        layer_end: int | None = None,
        out: Sequence | None = None,
        compute_per_layer_s: float | None = None,
        timings: dict | None = None,
    ) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(layer, payload)`` for ``layer_start <= layer < layer_end`` in order (see module doc).

        ``out``: optional writable buffers, ``out[i]`` for layer ``layer_start + i``, each at least
        ``len(names) * slice_bytes`` bytes; the payloads are read into them directly.  A buffer may repeat
        in ``out`` (a ring of pinned buffers) on the gather and ranged paths: the client then writes a buffer
        only after the consumer has asked for the layer after the one it last held.
        ``timings``: optional dict the gather path fills with ``time.monotonic()`` stamps: ``sent_s`` (the
        request is about to be sent), ``response_s`` (status and headers are in: the server has checked every
        object) and ``first_layer_s`` (layer ``layer_start`` is received and verified).
        """
        names = list(names)
        if not names:
            raise ValueError("load_layers needs at least one chunk name")
        if layer_start < 0 or (layer_end is not None and layer_end < layer_start):
            raise ValueError(f"bad layer range [{layer_start}, {layer_end})")
        if layer_end == layer_start:
            return
        mode = self.mode
        if mode == "auto":
            with _GATHER_SUPPORT_LOCK:
                known = _GATHER_SUPPORT.get(self.endpoint_url)
            mode = self.fallback_mode if known is False else "gather"
        if mode == "gather":
            try:
                stream = self._gather(names, layer_start, layer_end, out, compute_per_layer_s, timings)
                first = next(stream)  # the request is sent and answered before the first yield
            except GatherUnsupported:
                if self.mode == "gather":
                    raise
                with _GATHER_SUPPORT_LOCK:
                    _GATHER_SUPPORT[self.endpoint_url] = False
                mode = self.fallback_mode
            else:
                if self.mode == "auto":
                    with _GATHER_SUPPORT_LOCK:
                        _GATHER_SUPPORT[self.endpoint_url] = True
                self.last_path = "gather"
                yield first
                yield from stream
                return
        self.last_path = mode
        if mode == "ranged":
            yield from self._ranged(names, layer_start, layer_end, out)
        else:
            yield from self._whole(names, layer_start, layer_end, out)

    async def aload_layers(self, names: Sequence[str], **kwargs) -> AsyncIterator[tuple[int, memoryview]]:
        """``load_layers`` as an async iterator: the blocking reads run in a worker thread."""
        it = self.load_layers(names, **kwargs)
        sentinel = object()
        try:
            while True:
                item = await asyncio.to_thread(next, it, sentinel)
                if item is sentinel:
                    return
                yield item
        finally:
            await asyncio.to_thread(it.close)

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
