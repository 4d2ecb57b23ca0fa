"""The S3 data path's HTTP layer: SigV4-signed requests over pooled keep-alive connections, raw body reads.

``SignedHTTP`` signs requests with botocore's SigV4 signer and sends them over ``http.client`` connections of
its own (a small keep-alive pool per endpoint), so response bodies are read with ``readinto`` straight into
the caller's memory, with no intermediate copies.  It is the data path of the object-tier client (its read
paths, ``testbed.client.gather_path`` and ``testbed.client.fallback_paths``) and of the S3-proxy store
(``testbed.objectstore.s3proxy``); the control path (PUT, HEAD, bucket) uses boto3
(``testbed.client.core.make_boto3_client``).

``read_exact`` fills a buffer from a response body; ``RawBody`` reads a large response body of known length (a
gather stream) straight from the socket with ``recv_into(MSG_WAITALL)``, bypassing ``http.client``'s
buffered reader.  ``error_from_response`` turns an S3 XML error response into the ``testbed.wire.errors``
class of its code, with a message that names the object.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import queue
import re
import socket
import struct
import time
from urllib.parse import quote, urlsplit

import botocore.auth
import botocore.awsrequest
import botocore.credentials

from testbed.wire.errors import (
    CorruptObject,
    ObjectCacheError,
    ProtocolError,
    StorageUnavailable,
    TruncatedStream,
    from_s3_error,
)


def error_from_response(status: int, body: bytes, key: str | None) -> ObjectCacheError:
    """The ``testbed.wire.errors`` instance for an S3 error response (HTTP ``status``, XML ``body``); the
    message names the object (the body's ``<Key>``, else ``key``).  ``http_status_seen`` and ``s3_code_seen``
    record what the service answered."""
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


def read_exact(resp: http.client.HTTPResponse, view: memoryview, what: str) -> None:
    """Fill ``view`` from the response body, raising ``TruncatedStream`` if the body ends early."""
    got, n = 0, len(view)
    while got < n:
        k = resp.readinto(view[got:])
        if not k:
            raise TruncatedStream(f"{what}: stream ended after {got} of {n} bytes")
        got += k


class RawBody:
    """Reads a response body of known length straight from the connection's socket, bypassing
    ``http.client``'s buffered reader: large ``recv_into(MSG_WAITALL)`` calls into the caller's buffer, so
    one blocking system call (GIL released) fills most of a layer.  The bytes the buffered reader already
    holds (read along with the headers) are served first.  A receive that makes no progress for
    ``timeout_s`` raises ``TimeoutError``.  ``close`` restores the socket for keep-alive reuse.
    """

    WAITALL_BYTES = 64 << 20  # one recv per this many bytes at most (bounded time inside one call)

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, timeout_s: float):
        self._conn, self._resp, self._timeout_s = conn, resp, timeout_s
        self.remaining_bytes = resp.length if resp.length is not None else -1  # -1: unknown
        self._sock = conn.sock
        # Drain what the buffered reader already holds (never more than it has buffered, or one recv).
        self._pre = memoryview(resp.fp.read1(1 << 16) if self.remaining_bytes else b"")
        timeout_whole_s = max(1, int(math.ceil(timeout_s)))
        self._sock.settimeout(None)  # blocking, so MSG_WAITALL waits in the kernel; SO_RCVTIMEO bounds it
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", timeout_whole_s, 0))
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
        self.remaining_bytes -= got
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
        if self.remaining_bytes == 0 and not self._pre:
            self._resp.length = 0
            self._resp.close()  # the connection may be reused (``SignedHTTP.finish``)


_RCVBUF_BYTES = 16 << 20


def _grow_rcvbuf(sock: socket.socket, want_bytes: int = _RCVBUF_BYTES) -> None:
    """A large receive buffer, unless the kernel's autotuning already allows one (setting SO_RCVBUF turns
    autotuning off, so never set it lower than autotuning would reach)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem") as f:
            auto_max_bytes = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        auto_max_bytes = 0
    if auto_max_bytes >= want_bytes:
        return
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < want_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want_bytes)


_SNDBUF_BYTES = 4 << 20


def _grow_sndbuf(sock: socket.socket) -> None:
    """A 4 MiB send buffer for large request bodies (fewer wake-ups per object), unless already larger."""
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _SNDBUF_BYTES:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF_BYTES)


class _Signer(botocore.auth.S3SigV4Auth):
    """botocore's S3 SigV4 signer; a request whose context says ``unsigned_payload`` is signed with
    ``UNSIGNED-PAYLOAD`` instead of the body's SHA-256 (botocore always hashes bodies over plain HTTP)."""

    def payload(self, request):
        if request.context.get("unsigned_payload"):
            return botocore.auth.UNSIGNED_PAYLOAD
        return super().payload(request)


class _Connections:
    """A small pool of keep-alive ``http.client`` connections to one endpoint (thread-safe)."""

    def __init__(self, endpoint_url: str, timeout_s: float, max_idle: int) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint_url must be http(s)://host[:port], got {endpoint_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout_s = timeout_s
        self._idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue(maxsize=max(1, max_idle))

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
        self._signer = _Signer(botocore.credentials.Credentials(access_key, secret_key), "s3", region)
        self._conns = _Connections(self.endpoint_url, timeout_s, pool_size)

    def close(self) -> None:
        self._conns.close()

    def signed_headers(
        self, method: str, path_query: str, headers: dict[str, str], body: bytes, unsigned: bool = False
    ) -> dict:
        """``headers`` plus the SigV4 ones; ``unsigned``: ``x-amz-content-sha256: UNSIGNED-PAYLOAD`` (the
        body is not hashed; the caller has the server verify it otherwise)."""
        req = botocore.awsrequest.AWSRequest(
            method=method, url=self.endpoint_url + path_query, data=body, headers=headers
        )
        req.context["unsigned_payload"] = unsigned
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

    def put_parts(
        self, path_query: str, headers: dict[str, str], parts: list[memoryview], key=None
    ) -> tuple[int, bytes, bool]:
        """PUT a body given as parts sent back to back (no joined copy, no payload hash: the request is
        signed with ``UNSIGNED-PAYLOAD``, so ``headers`` must ask the server for another check of the body,
        ``x-oc-verify: kvchunk``).  Returns (status, response body, whether the answer confirms that check:
        ``x-oc-verified``); retries connection failures and 503s."""
        length = sum(p.nbytes for p in parts)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            conn, reused = self._conns.get()
            try:
                signed = self.signed_headers("PUT", path_query, headers, b"", unsigned=True)
                conn.putrequest("PUT", path_query, skip_accept_encoding=True)
                for k, v in signed.items():
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(length))
                conn.endheaders()
                _grow_sndbuf(conn.sock)
                try:
                    for p in parts:
                        conn.sock.sendall(p)
                except OSError:
                    # The server may have answered early (a 412 before reading the body) and closed.
                    resp = conn.getresponse()
                else:
                    resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                last = e
                if not reused:
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                continue
            self.finish(conn, resp)
            if resp.status == 503 and attempt < self.retries:
                time.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            return resp.status, body, resp.getheader("x-oc-verified") is not None
        raise StorageUnavailable(
            f"PUT {path_query[:120]}: {self.endpoint_url} unreachable after {self.retries + 1} tries: {last}",
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
                raise error_from_response(resp.status, body, name)
            if resp.status == 200 and start != 0:
                raise ProtocolError(f"{what}: {self.endpoint_url} ignored the Range header", key=name)
            length_bytes = resp.getheader("Content-Length")
            if resp.status == 206 and length_bytes is not None and int(length_bytes) != len(view):
                raise CorruptObject(
                    f"{what}: object {name!r} returned {length_bytes} bytes, expected {len(view)}", key=name
                )
            read_exact(resp, view, f"{what} ({name!r})")
            if resp.status == 200:
                resp.read()  # a 200 for a prefix range: drain the rest of the object
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise StorageUnavailable(f"{what}: reading {name!r}: {e}", key=name) from e
        except BaseException:
            conn.close()
            raise
        self.finish(conn, resp)
