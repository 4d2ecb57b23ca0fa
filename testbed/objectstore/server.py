"""The ObjectCache S3 server: an S3 API subset plus layer-major gather, on aiohttp.

Run ``python -m testbed.objectstore --data-dir DIR`` (or the console script ``objectcache-server``); it binds
127.0.0.1 by default.  Path-style addressing only (``http://host:port/<bucket>/<key>``).  See
docs/object_tier.md for the operations, flags, credentials and the gather protocol (``testbed.objectstore.gather``).

Request flow: every request is verified with SigV4 (``testbed.objectstore.auth``), its bucket and key are checked
against the credential's buckets and namespaces, and it is dispatched on method + sub-resource.  Request
bodies are decoded and verified here (``read_body``: signed SHA-256, ``aws-chunked``, checksums, MD5).
Errors are S3 XML documents; an unexpected exception is logged and answered ``500 InternalError`` without
internals.  Unauthenticated endpoints: ``GET /_objectcache/health`` (JSON) and ``GET /_objectcache/metrics``
(Prometheus text) -- names no bucket can have.

Layout: this module (``S3Server``: the app, request entry, auth, dispatch, body reading; ``serve``, ``main``),
``testbed.objectstore.objectops`` (bucket and object operations: GET/PUT/HEAD/DELETE/List), ``testbed.objectstore.multipart``
(multipart uploads), ``testbed.objectstore.kvops`` (gather, quarantine, pacer control) and ``testbed.objectstore.config``
(``ServerConfig``, ``parse_args``).  ``S3Server`` inherits the operations as mixins.  Names that moved there
stay importable from here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from testbed.objectstore import gather as gather_mod
from testbed.objectstore.auth import (
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    AuthResult,
    ChunkedDecoder,
    CredentialStore,
    checksum_b64,
    new_checksum,
    verify_request,
)
from testbed.objectstore.config import _BATCH_BYTES, parse_args
from testbed.objectstore.config import MiB as MiB
from testbed.objectstore.config import ServerConfig as ServerConfig
from testbed.objectstore.kvops import KVOps
from testbed.objectstore.metrics import Metrics
from testbed.objectstore.multipart import MultipartOps
from testbed.objectstore.objectops import ObjectOps
from testbed.objectstore.objectops import parse_range as parse_range
from testbed.objectstore.pacer import Pacer
from testbed.objectstore.store import (
    FilesystemStore,
    MultipartSpool,
    Store,
    validate_bucket_name,
    validate_key,
)
from testbed.wire import s3xml
from testbed.wire.errors import ObjectCacheError, S3Error

log = logging.getLogger("objectcache.server")

INTERNAL_PREFIX = "/_objectcache/"
_INLINE_HASH_BYTES = 64 * 1024  # bodies up to this size are hashed in the event loop
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHECKSUM_ALGS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


@dataclass
class Ctx:
    request: web.Request
    bucket: str
    key: str
    query: dict[str, str]
    auth: AuthResult

    @property
    def cred(self):
        return self.auth.credential


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Query pairs decoded with ``unquote`` (not ``unquote_plus``: S3 clients encode spaces as %20)."""
    out = []
    for part in raw_query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.append((unquote(k), unquote(v)))
    return out


class S3Server(ObjectOps, MultipartOps, KVOps):
    def __init__(self, config: ServerConfig, store: Store, credentials: CredentialStore) -> None:
        self.config = config
        self.store = store
        self.credentials = credentials
        egress_Bps = config.egress_gbps * 1e9 / 8 if config.egress_gbps else None
        self.pacer = Pacer(config.policy, egress_Bps)
        spool = config.spool_dir or os.path.join(config.data_dir, "multipart")
        self.spool = MultipartSpool(spool)
        self.executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="oc-io")
        # Sends block a thread for as long as the client takes to read: a pool of their own.
        self.send_executor = ThreadPoolExecutor(config.send_threads, thread_name_prefix="oc-send")
        self.metrics = Metrics()
        self._rid = itertools.count(1)
        self._rid_prefix = f"{os.getpid():x}"

    # --- plumbing -----------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_request_body_bytes)
        # [\s\S], not ".": a decoded path may hold a newline (%0A), which must get an S3 error, not aiohttp's 404.
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.handle)
        app.on_response_prepare.append(self._on_prepare)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-amz-request-id"] = request.get("rid", "")
        response.headers["Server"] = "ObjectCache"

    async def _on_cleanup(self, app: web.Application) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.send_executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def error_response(self, request: web.Request, err: ObjectCacheError) -> web.Response:
        code = getattr(err, "s3_code", "InternalError")
        status = getattr(err, "http_status", 500)
        self.metrics.errors[code] += 1
        extra = {}
        if getattr(err, "key", None):
            extra["Key"] = err.key
        body = s3xml.error_xml(code, str(err), request.path, request.get("rid", ""), **extra)
        resp = web.Response(status=status, body=None if request.method == "HEAD" else body)
        resp.content_type = "application/xml"
        if request.method == "HEAD":  # a HEAD reply has no body: carry the S3 error code in a header
            resp.headers["x-amz-error-code"] = code
        if status == 416 and "size" in request:
            resp.headers["Content-Range"] = f"bytes */{request['size']}"
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        request["t_pacer_s"] = self.pacer.now_s()  # when handling began, on the pacer's clock
        request["rid"] = f"{self._rid_prefix}-{next(self._rid):08x}"
        request["op"] = "unknown"
        try:
            resp = await self._dispatch(request)
        except ObjectCacheError as e:
            resp = self.error_response(request, e)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, TimeoutError):
            # The client went away (mid-body or mid-stream): nothing to answer, drop the connection.
            self.metrics.errors["ClientDisconnected"] += 1
            if request.transport is not None:
                request.transport.abort()
            resp = web.Response(status=499)  # never sent; aiohttp ignores the closed transport
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.exception("unexpected error in %s %s", request.method, request.path)
                e = S3Error("InternalError", "internal error", 500)
            else:  # a full disk is the operator's problem, not a bug: say so, keep serving reads
                log.warning("store is full: %s %s: %s", request.method, request.path, e)
                e = S3Error("InsufficientStorage", "the object store has no space left for this write", 507)
            resp = self.error_response(request, e)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            resp = self.error_response(request, S3Error("InternalError", "internal error", 500))
        status = resp.status
        self.metrics.observe(request["op"], status, time.perf_counter() - t0)
        return resp

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        if raw_path.startswith(INTERNAL_PREFIX):
            return await self._internal(request, raw_path[len(INTERNAL_PREFIX) :])
        query_pairs = parse_query(raw_query)
        auth = verify_request(
            request.method,
            raw_path,
            query_pairs,
            request.headers.items(),
            self.credentials,
            datetime.now(UTC),
        )
        bucket_raw, _, key_raw = raw_path.lstrip("/").partition("/")
        bucket, key = unquote(bucket_raw), unquote(key_raw)
        # Routing ignores presign parameters and botocore's informational ``x-id``.
        routing = {k: v for k, v in query_pairs if not k.startswith("X-Amz-") and k != "x-id"}
        ctx = Ctx(request, bucket, key, routing, auth)
        m, q = request.method, ctx.query
        if not bucket:
            if m == "GET":
                return await self._op(ctx, "ListBuckets", self.list_buckets)
            if m == "POST" and "objectcache-pacer" in q:
                return await self._op(ctx, "SetPacer", self.pacer_control)
            raise S3Error("MethodNotAllowed", f"{m} / is not supported", 405)
        validate_bucket_name(bucket)
        if not ctx.cred.allows_bucket(bucket):
            raise S3Error("AccessDenied", f"credential may not access bucket {bucket!r}", 403)
        if not key:
            if m == "POST" and "gather" in q:
                return await self._op(ctx, "Gather", self.gather)
            if m == "POST" and "delete" in q:
                return await self._op(ctx, "DeleteObjects", self.delete_objects)
            if m == "PUT" and not q:
                return await self._op(ctx, "CreateBucket", self.create_bucket)
            if m == "HEAD":
                return await self._op(ctx, "HeadBucket", self.head_bucket)
            if m == "DELETE" and not q:
                return await self._op(ctx, "DeleteBucket", self.delete_bucket)
            if m == "GET" and "location" in q:
                return await self._op(ctx, "GetBucketLocation", self.bucket_location)
            if m == "GET" and not (
                set(q)
                - {
                    "list-type",
                    "prefix",
                    "delimiter",
                    "max-keys",
                    "continuation-token",
                    "start-after",
                    "encoding-type",
                    "fetch-owner",
                    "marker",
                }
            ):
                return await self._op(ctx, "ListObjects", self.list_objects)
            raise S3Error("NotImplemented", f"{m} on a bucket with {sorted(q)} is not implemented", 501)
        validate_key(key)
        if not ctx.cred.allows_key(key):
            raise S3Error("AccessDenied", f"key {key!r} is outside the credential's namespaces", 403, key=key)
        if m == "PUT" and "uploadId" in q and "partNumber" in q:
            return await self._op(ctx, "UploadPart", self.upload_part)
        if m == "PUT" and "x-amz-copy-source" in request.headers:
            raise S3Error("NotImplemented", "CopyObject is not implemented", 501)
        if m == "PUT" and not q:
            return await self._op(ctx, "PutObject", self.put_object)
        if m in ("GET", "HEAD") and not ({"uploadId", "partNumber", "acl", "tagging"} & set(q)):
            return await self._op(ctx, "GetObject" if m == "GET" else "HeadObject", self.get_object)
        if m == "DELETE" and "uploadId" in q:
            return await self._op(ctx, "AbortMultipartUpload", self.abort_multipart)
        if m == "DELETE" and not q:
            return await self._op(ctx, "DeleteObject", self.delete_object)
        if m == "POST" and "uploads" in q:
            return await self._op(ctx, "CreateMultipartUpload", self.create_multipart)
        if m == "POST" and "quarantine" in q:
            return await self._op(ctx, "Quarantine", self.quarantine_report)
        if m == "POST" and "uploadId" in q:
            return await self._op(ctx, "CompleteMultipartUpload", self.complete_multipart)
        raise S3Error("NotImplemented", f"{m} on an object with {sorted(q)} is not implemented", 501)

    async def _op(self, ctx: Ctx, name: str, fn) -> web.StreamResponse:
        ctx.request["op"] = name
        return await fn(ctx)

    async def _internal(self, request: web.Request, what: str) -> web.Response:
        request["op"] = "internal"
        if request.method != "GET":
            raise S3Error("MethodNotAllowed", "internal endpoints are GET only", 405)
        if what == "health":
            body = {
                "status": "ok",
                "gather": gather_mod.GATHER_VERSION,
                "pid": os.getpid(),
                **self.pacer.settings(),
            }
            return web.json_response(body)
        if what == "metrics":
            return web.Response(
                text=self.metrics.render(self.pacer), content_type="text/plain", charset="utf-8"
            )
        raise S3Error("NoSuchKey", "unknown internal endpoint", 404)

    def _xml(self, body: bytes, status: int = 200) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/xml")

    def _sink(self, request: web.Request, resp: web.StreamResponse):
        transport = request.transport
        if gather_mod.SocketSink.usable(transport):
            return gather_mod.SocketSink(transport, self.send_executor)
        return gather_mod.WriterSink(resp.write)

    # --- request bodies -----------------------------------------------------------------------------------

    async def read_body(self, ctx: Ctx, max_bytes: int, sink=None) -> tuple[bytes, int, dict[str, str]]:
        """Read (and decode, verify) the body.  Returns (bytes if no sink, decoded size, checksums).

        Verifies: the signed SHA-256 (``x-amz-content-sha256`` hex), ``aws-chunked`` framing and chunk
        signatures, ``x-amz-checksum-*`` headers or trailers, and ``Content-MD5``.  With ``sink`` the
        decoded bytes go to ``await sink(batch)`` in batches of ~4 MiB instead of being returned.
        """
        request, auth = ctx.request, ctx.auth
        h = request.headers
        mode = auth.payload_hash
        chunked = mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER) or (
            "aws-chunked" in h.get("Content-Encoding", "")
        )
        if chunked:
            if mode.startswith("STREAMING-AWS4-ECDSA"):
                raise S3Error("NotImplemented", "SigV4a streaming payloads are not supported", 501)
            declared = h.get("x-amz-decoded-content-length")
        else:
            declared = h.get("Content-Length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                raise S3Error("InvalidArgument", "bad content length", 400) from None
            if declared_n > max_bytes:
                raise S3Error(
                    "EntityTooLarge", f"body of {declared_n} bytes exceeds the limit of {max_bytes}", 413
                )
        elif request.method == "PUT" and "chunked" not in h.get("Transfer-Encoding", ""):
            raise S3Error("MissingContentLength", "you must provide the Content-Length header", 411)
        decoder = ChunkedDecoder(auth, mode) if chunked else None
        sha = hashlib.sha256() if _HEX64.match(mode) else None
        md5 = hashlib.md5() if "Content-MD5" in h else None
        checks: dict[str, tuple[object, str | None]] = {}
        for alg in _CHECKSUM_ALGS:
            value = h.get(f"x-amz-checksum-{alg}")
            if value is not None:
                checks[alg] = (new_checksum(alg), value)
        trailer = h.get("x-amz-trailer", "").strip().lower()
        if trailer:
            if not trailer.startswith("x-amz-checksum-"):
                raise S3Error("InvalidRequest", f"unsupported trailer {trailer!r}", 400)
            checks.setdefault(trailer[len("x-amz-checksum-") :], (new_checksum(trailer[15:]), None))
        hashers = [c for c in (sha, md5) if c is not None] + [c for c, _ in checks.values()]

        def consume(batch: bytes) -> None:
            # Runs in the thread pool: hashing (GIL released for large buffers) overlaps network reads.
            for hsh in hashers:
                hsh.update(batch)
            if sink is not None:
                sink(batch)

        loop = asyncio.get_running_loop()
        kept = bytearray()
        chunks: list[bytes] = []
        pending = None
        size = 0
        async for data in request.content.iter_any():
            for piece in decoder.feed(data) if decoder else (data,):
                size += len(piece)
                if size > max_bytes:
                    raise S3Error("EntityTooLarge", f"body exceeds the limit of {max_bytes} bytes", 413)
                kept += piece
            if len(kept) >= _BATCH_BYTES:
                batch = bytes(kept)
                kept.clear()
                if sink is None:
                    chunks.append(batch)
                if pending is not None:
                    await pending
                pending = loop.run_in_executor(self.executor, consume, batch)
        trailers = decoder.finish() if decoder else {}
        batch = bytes(kept)
        if sink is None:
            chunks.append(batch)
        if pending is not None:
            await pending
        if sink is None and len(batch) <= _INLINE_HASH_BYTES:
            consume(batch)  # a small body (a gather request): cheaper than a hop to the busy thread pool
        else:
            await loop.run_in_executor(self.executor, consume, batch)
        body = b"".join(chunks)
        if declared is not None and size != int(declared):
            raise S3Error("IncompleteBody", f"received {size} bytes, expected {declared}", 400)
        if sha is not None and sha.hexdigest() != mode:
            raise S3Error("XAmzContentSHA256Mismatch", "the payload does not match x-amz-content-sha256", 400)
        if md5 is not None and base64.b64encode(md5.digest()).decode() != h["Content-MD5"].strip():
            raise S3Error("BadDigest", "the Content-MD5 you specified did not match what we received", 400)
        results = {}
        for alg, (c, expected) in checks.items():
            expected = expected if expected is not None else trailers.get(f"x-amz-checksum-{alg}")
            if expected is None:
                raise S3Error(
                    "InvalidRequest", f"trailer x-amz-checksum-{alg} was announced but not sent", 400
                )
            got = checksum_b64(c)
            if got != expected.strip():
                raise S3Error(
                    "BadDigest", f"the {alg.upper()} you specified did not match the calculated checksum", 400
                )
            results[f"x-amz-checksum-{alg}"] = got
        self.metrics.bytes_received[ctx.request["op"]] += size
        return body, size, results


# --- entry point ------------------------------------------------------------------------------------------


def make_store(config: ServerConfig) -> Store:
    if config.store == "fs":
        return FilesystemStore(os.path.join(config.data_dir, "store"), fsync=config.fsync)
    if config.store == "s3proxy":
        from testbed.objectstore.s3proxy import (
            S3ProxyStore,  # the S3-proxy backend (testbed/objectstore/s3proxy.py)
        )

        return S3ProxyStore(**config.store_options)
    raise ValueError(f"unknown store {config.store!r} (fs | s3proxy)")


def _raise_fd_limit() -> None:
    """A gather holds one descriptor per key while it streams: lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
            )
    except (ImportError, ValueError, OSError):
        pass


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Run the server until ``stop`` is set (or SIGTERM/SIGINT when run from ``main``)."""
    _raise_fd_limit()
    store = make_store(config)
    credentials = CredentialStore.default(
        config.credentials_file or os.environ.get("OBJECTCACHE_CREDENTIALS")
    )
    server = S3Server(config, store, credentials)
    if config.idle_timeout_s <= 0:
        raise ValueError("--idle-timeout-s must be > 0")
    runner = web.AppRunner(server.app(), access_log=None, keepalive_timeout=config.idle_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    await site.start()
    sock = site._server.sockets[0]  # the bound socket: the real port when --port 0
    host, port = sock.getsockname()[:2]
    if config.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s: reachable beyond loopback", config.host)
    log.info(
        "objectcache-server on http://%s:%d store=%s policy=%s egress=%s credentials=%d",
        host,
        port,
        config.store,
        config.policy,
        f"{config.egress_gbps} Gbps" if config.egress_gbps else "unpaced",
        len(credentials),
    )
    if config.ready_file:
        tmp = config.ready_file + ".tmp"
        Path(tmp).write_text(
            json.dumps({"host": host, "port": port, "pid": os.getpid(), "url": f"http://{host}:{port}"})
        )
        os.replace(tmp, config.ready_file)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.server").addFilter(_quiet_malformed_http)
    asyncio.run(serve(config))
    return 0


def _quiet_malformed_http(record: logging.LogRecord) -> bool:
    """aiohttp logs every request its HTTP parser rejects with a traceback at ERROR: a client can flood the
    log with them.  They are the client's fault: one INFO line instead."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "rejected malformed HTTP request: %s", (str(exc.message)[:200],)
        record.exc_info = record.exc_text = None
    return True


if __name__ == "__main__":
    sys.exit(main())
