"""The ObjectCache S3 server: an S3 API subset plus layer-major gather, on aiohttp.

Run ``python -m testbed.server --data-dir DIR`` (or the console script ``objectcache-server``); it binds
127.0.0.1 by default.  Path-style addressing only (``http://host:port/<bucket>/<key>``).  See
docs/object_tier.md for the operations, flags, credentials and the gather protocol (``testbed.gather``).

Request flow: every request is verified with SigV4 (``testbed.s3auth``), its bucket and key are checked
against the credential's buckets and namespaces, and it is dispatched on method + sub-resource.  Blocking
store calls run in a thread pool; payload bytes go out with ``sendfile`` where the store has file descriptors.
Errors are S3 XML documents; an unexpected exception is logged and answered ``500 InternalError`` without
internals.  One admin operation, ``POST /?objectcache-pacer`` (``pacer_control``), switches the pacer's
policy and egress rate without a restart.  Unauthenticated endpoints: ``GET /_objectcache/health`` (JSON) and
``GET /_objectcache/metrics`` (Prometheus text) -- names no bucket can have.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote, unquote

from aiohttp import web

from testbed import gather as gather_mod
from testbed import pacer as pacer_mod
from testbed import s3xml
from testbed.errors import CorruptObject, ObjectCacheError, S3Error
from testbed.metrics import Metrics
from testbed.pacer import DEFAULT_PIECE_BYTES, Pacer
from testbed.s3auth import (
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
from testbed.store import (
    FilesystemStore,
    MultipartSpool,
    Store,
    multipart_etag,
    validate_bucket_name,
    validate_key,
)

log = logging.getLogger("objectcache.server")

INTERNAL_PREFIX = "/_objectcache/"
MiB = 1 << 20
_BATCH_BYTES = 4 * MiB
_INLINE_HASH_BYTES = 64 * 1024  # bodies up to this size are hashed in the event loop
_INLINE_GATHER_KEYS = 64  # gathers of up to this many keys open their objects in the event loop
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHECKSUM_ALGS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    data_dir: str = "objectcache-data"
    store: str = "fs"  # fs | s3proxy
    store_options: dict[str, str] = field(default_factory=dict)
    spool_dir: str | None = None
    credentials_file: str | None = None
    region: str = "us-east-1"
    policy: str = "equal"
    egress_gbps: float | None = None  # None: unpaced
    piece_bytes: int = DEFAULT_PIECE_BYTES
    max_object_bytes: int = 5 * 1024 * MiB
    max_request_body_bytes: int = MiB  # XML / JSON bodies
    max_gather_keys: int = gather_mod.DEFAULT_MAX_KEYS
    min_part_bytes: int = 5 * MiB
    io_threads: int = 16
    send_threads: int = 64
    sendfile: bool = True  # False: gather payload is read into buffers and written (for A/B measurements)
    fsync: bool = True
    # The admin operation POST /?objectcache-pacer: off unless the operator asks (--allow-pacer-control).
    allow_pacer_control: bool = False
    ready_file: str | None = None
    log_level: str = "INFO"


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


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end] inclusive of a single ``bytes=`` range; None to serve the whole object (S3 ignores
    multi-range requests); raises InvalidRange when unsatisfiable."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m:
        if header.strip().startswith("bytes=") and "," in header:
            return None
        raise S3Error("InvalidRange", f"bad Range header {header!r}", 416)
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        raise S3Error("InvalidRange", f"bad Range header {header!r}", 416)
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise S3Error("InvalidRange", "the requested range is not satisfiable", 416)
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None  # syntactically invalid range: ignored, like S3
    if start >= size:
        raise S3Error("InvalidRange", "the requested range is not satisfiable", 416)
    return start, end


class S3Server:
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

    # --- buckets ------------------------------------------------------------------------------------------

    async def list_buckets(self, ctx: Ctx) -> web.Response:
        buckets = [b for b in await self.run(self.store.list_buckets) if ctx.cred.allows_bucket(b.name)]
        items = "".join(
            f"<Bucket>{s3xml.el('Name', b.name)}{s3xml.el('CreationDate', s3xml.iso8601(b.created_s))}</Bucket>"
            for b in buckets
        )
        return self._xml(s3xml.doc("ListAllMyBucketsResult", s3xml.owner() + f"<Buckets>{items}</Buckets>"))

    async def create_bucket(self, ctx: Ctx) -> web.Response:
        await self.read_body(ctx, self.config.max_request_body_bytes)
        await self.run(self.store.create_bucket, ctx.bucket)
        # us-east-1 semantics: re-creating your own bucket succeeds, so ensure_bucket() is idempotent.
        return web.Response(status=200, headers={"Location": f"/{ctx.bucket}"})

    async def head_bucket(self, ctx: Ctx) -> web.Response:
        if not await self.run(self.store.bucket_exists, ctx.bucket):
            raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
        return web.Response(status=200, headers={"x-amz-bucket-region": self.config.region})

    async def delete_bucket(self, ctx: Ctx) -> web.Response:
        if not ctx.cred.is_admin:
            raise S3Error("AccessDenied", "only an admin credential may delete buckets", 403)
        await self.run(self.store.delete_bucket, ctx.bucket)
        return web.Response(status=204)

    async def bucket_location(self, ctx: Ctx) -> web.Response:
        if not await self.run(self.store.bucket_exists, ctx.bucket):
            raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
        region = "" if self.config.region == "us-east-1" else self.config.region
        return self._xml(s3xml.doc("LocationConstraint", s3xml.escape(region)))

    def _list_entries(self, bucket: str, prefix: str, delimiter: str, start_after: str, max_keys: int):
        """Up to ``max_keys`` entries after ``start_after``: ("obj", ObjectInfo) or ("cp", prefix); the
        cursor to continue from; and whether more entries follow."""
        entries: list[tuple[str, object]] = []
        cursor = start_after
        while len(entries) < max_keys:
            page = self.store.list_objects(bucket, prefix, cursor, min(1000, max_keys - len(entries) + 1))
            if not page.objects:
                return entries, cursor, False
            restart = False
            for obj in page.objects:
                if len(entries) == max_keys:
                    return entries, cursor, True
                rest = obj.key[len(prefix) :]
                i = rest.find(delimiter) if delimiter else -1
                if i >= 0:
                    cp = prefix + rest[: i + len(delimiter)]
                    entries.append(("cp", cp))
                    cursor = cp + "\U0010ffff"  # skip every key under this common prefix
                    restart = True
                    break
                entries.append(("obj", obj))
                cursor = obj.key
            if not restart and not page.is_truncated:
                return entries, cursor, False
        more = self.store.list_objects(bucket, prefix, cursor, 1).objects
        return entries, cursor, bool(more)

    async def list_objects(self, ctx: Ctx) -> web.Response:
        q = ctx.query
        v2 = q.get("list-type") == "2"
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        if not ctx.cred.allows_prefix(prefix):
            raise S3Error("AccessDenied", f"prefix {prefix!r} is outside the credential's namespaces", 403)
        try:
            max_keys = max(0, min(1000, int(q.get("max-keys", "1000"))))
        except ValueError:
            raise S3Error("InvalidArgument", "max-keys must be an integer", 400) from None
        token = q.get("continuation-token")
        if v2 and token is not None:
            try:
                start = base64.urlsafe_b64decode(token.encode()).decode("utf-8", "surrogatepass")
            except (ValueError, UnicodeDecodeError):
                raise S3Error("InvalidArgument", "bad continuation token", 400) from None
        else:
            start = q.get("start-after", "") if v2 else q.get("marker", "")
        if not await self.run(self.store.bucket_exists, ctx.bucket):
            raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
        entries, cursor, truncated = await self.run(
            self._list_entries, ctx.bucket, prefix, delimiter, start, max_keys
        )
        url = q.get("encoding-type") == "url"

        def enc(s: str) -> str:
            return quote(s, safe="/") if url else s

        parts = [s3xml.el("Name", ctx.bucket), s3xml.el("Prefix", enc(prefix)), s3xml.el("MaxKeys", max_keys)]
        if delimiter:
            parts.append(s3xml.el("Delimiter", enc(delimiter)))
        if url:
            parts.append(s3xml.el("EncodingType", "url"))
        parts.append(s3xml.el("IsTruncated", "true" if truncated else "false"))
        if v2:
            parts.append(s3xml.el("KeyCount", len(entries)))
            if token is not None:
                parts.append(s3xml.el("ContinuationToken", token))
            if "start-after" in q:
                parts.append(s3xml.el("StartAfter", enc(q["start-after"])))
            if truncated:
                nxt = base64.urlsafe_b64encode(cursor.encode("utf-8", "surrogatepass")).decode()
                parts.append(s3xml.el("NextContinuationToken", nxt))
        else:
            parts.append(s3xml.el("Marker", enc(q.get("marker", ""))))
            if truncated and delimiter and entries:
                last = entries[-1]
                parts.append(s3xml.el("NextMarker", enc(last[1] if last[0] == "cp" else last[1].key)))
        for kind, item in entries:
            if kind == "obj":
                parts.append(
                    "<Contents>"
                    + s3xml.el("Key", enc(item.key))
                    + s3xml.el("LastModified", s3xml.iso8601(item.last_modified_s))
                    + s3xml.el("ETag", f'"{item.etag}"')
                    + s3xml.el("Size", item.size_bytes)
                    + s3xml.el("StorageClass", "STANDARD")
                    + "</Contents>"
                )
            else:
                parts.append(f"<CommonPrefixes>{s3xml.el('Prefix', enc(item))}</CommonPrefixes>")
        return self._xml(s3xml.doc("ListBucketResult", "".join(parts)))

    async def delete_objects(self, ctx: Ctx) -> web.Response:
        body, _, _ = await self.read_body(ctx, self.config.max_request_body_bytes)
        try:
            keys, quiet = s3xml.parse_delete_objects(body)
        except Exception:
            raise S3Error("MalformedXML", "the XML you provided was not well-formed", 400) from None
        if len(keys) > 1000:
            raise S3Error("MalformedXML", "at most 1000 keys per DeleteObjects request", 400)
        out = []
        for key in keys:
            try:
                validate_key(key)
                if not ctx.cred.allows_key(key):
                    raise S3Error("AccessDenied", "key outside the credential's namespaces", 403)
                await self.run(self.store.delete_object, ctx.bucket, key)
                if not quiet:
                    out.append(f"<Deleted>{s3xml.el('Key', key)}</Deleted>")
            except ObjectCacheError as e:
                code = getattr(e, "s3_code", "InternalError")
                out.append(
                    f"<Error>{s3xml.el('Key', key)}{s3xml.el('Code', code)}{s3xml.el('Message', str(e))}</Error>"
                )
        return self._xml(s3xml.doc("DeleteResult", "".join(out)))

    # --- objects ------------------------------------------------------------------------------------------

    def _user_metadata(self, request: web.Request) -> dict[str, str]:
        meta = {}
        for k, v in request.headers.items():
            lk = k.lower()
            if lk.startswith("x-amz-meta-"):
                meta[lk[len("x-amz-meta-") :]] = v
        if sum(len(k) + len(v) for k, v in meta.items()) > 2048:
            raise S3Error("MetadataTooLarge", "user metadata exceeds 2 KiB", 400)
        return meta

    def _if_none_match_star(self, request: web.Request) -> bool:
        value = request.headers.get("If-None-Match")
        if value is None:
            return False
        if value.strip() != "*":
            raise S3Error("NotImplemented", "only 'If-None-Match: *' is supported on writes", 501)
        return True

    async def put_object(self, ctx: Ctx) -> web.Response:
        request = ctx.request
        conditional = self._if_none_match_star(request)
        if conditional and await self._exists(ctx.bucket, ctx.key):
            # Fail fast: the final check is the atomic one in commit.
            raise S3Error(
                "PreconditionFailed",
                f"object {ctx.key!r} already exists (If-None-Match: *)",
                412,
                key=ctx.key,
            )
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        writer = await self.run(
            lambda: self.store.begin_write(ctx.bucket, ctx.key, content_type, self._user_metadata(request))
        )
        try:
            _, _, sums = await self.read_body(ctx, self.config.max_object_bytes, sink=writer.write)
            info = await self.run(writer.commit, conditional)
        except BaseException:
            await self.run(writer.abort)
            raise
        return web.Response(status=200, headers={"ETag": f'"{info.etag}"', **sums})

    async def _exists(self, bucket: str, key: str) -> bool:
        try:
            await self.run(self.store.head_object, bucket, key)
            return True
        except ObjectCacheError as e:
            if getattr(e, "s3_code", "") == "NoSuchKey":
                return False
            raise

    def _check_conditions(self, request: web.Request, etag: str, mtime_s: float) -> int | None:
        h = request.headers
        quoted = f'"{etag}"'
        if "If-Match" in h and h["If-Match"].strip() not in (quoted, etag, "*"):
            return 412
        if "If-None-Match" in h and h["If-None-Match"].strip() in (quoted, etag, "*"):
            return 304
        for name, cond in (("If-Unmodified-Since", 412), ("If-Modified-Since", 304)):
            if name in h and not ("If-Match" in h if cond == 412 else "If-None-Match" in h):
                try:
                    t = parsedate_to_datetime(h[name]).timestamp()
                except (TypeError, ValueError):
                    continue
                if (cond == 412 and int(mtime_s) > t) or (cond == 304 and int(mtime_s) <= t):
                    return cond
        return None

    async def get_object(self, ctx: Ctx) -> web.StreamResponse:
        request = ctx.request
        try:
            handle = await self.run(self.store.open_object, ctx.bucket, ctx.key)
        except CorruptObject as e:  # the store's own framing is broken: stop serving it
            await self.run(self.store.quarantine, ctx.bucket, ctx.key, str(e))
            raise
        try:
            info = handle.info
            request["size"] = info.size_bytes
            headers = {
                "ETag": f'"{info.etag}"',
                "Last-Modified": s3xml.http_date(info.last_modified_s),
                "Accept-Ranges": "bytes",
                "Content-Type": info.content_type,
            }
            for k, v in info.metadata.items():
                headers[f"x-amz-meta-{k}"] = v
            cond = self._check_conditions(request, info.etag, info.last_modified_s)
            if cond == 412:
                raise S3Error("PreconditionFailed", "at least one of the preconditions did not hold", 412)
            if cond == 304:
                return web.Response(status=304, headers={"ETag": headers["ETag"]})
            rng = None
            if "Range" in request.headers:
                rng = parse_range(request.headers["Range"], info.size_bytes)
            if rng is None:
                start, count, status = 0, info.size_bytes, 200
            else:
                start, count, status = rng[0], rng[1] - rng[0] + 1, 206
                headers["Content-Range"] = f"bytes {rng[0]}-{rng[1]}/{info.size_bytes}"
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = count
            await resp.prepare(request)
            if request.method == "GET" and count:
                await self._send_range(request, resp, handle, start, count)
                self.metrics.bytes_served["GetObject"] += count
            await resp.write_eof()
            return resp
        finally:
            handle.close()

    def _sink(self, request: web.Request, resp: web.StreamResponse):
        transport = request.transport
        if gather_mod.SocketSink.usable(transport):
            return gather_mod.SocketSink(transport, self.send_executor)
        return gather_mod.WriterSink(resp.write)

    async def _send_range(self, request, resp, handle, start: int, count: int) -> None:
        sink = self._sink(request, resp)
        fd = handle.fileno()
        if fd is not None and sink.can_sendfile:
            await sink.send([(fd, start, count)])
            return
        off = 0
        while off < count:
            n = min(_BATCH_BYTES, count - off)
            buf = bytearray(n)
            got = await self.run(handle.read_into, start + off, memoryview(buf))
            if got != n:
                raise S3Error("InternalError", "short read from the store", 500)
            await sink.send([buf])
            off += n

    async def delete_object(self, ctx: Ctx) -> web.Response:
        await self.run(self.store.delete_object, ctx.bucket, ctx.key)
        return web.Response(status=204)

    # --- multipart ----------------------------------------------------------------------------------------

    async def create_multipart(self, ctx: Ctx) -> web.Response:
        await self.read_body(ctx, self.config.max_request_body_bytes)
        if not await self.run(self.store.bucket_exists, ctx.bucket):
            raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
        content_type = ctx.request.headers.get("Content-Type", "application/octet-stream")
        info = await self.run(
            self.spool.create, ctx.bucket, ctx.key, content_type, self._user_metadata(ctx.request)
        )
        body = (
            s3xml.el("Bucket", ctx.bucket) + s3xml.el("Key", ctx.key) + s3xml.el("UploadId", info.upload_id)
        )
        return self._xml(s3xml.doc("InitiateMultipartUploadResult", body))

    async def upload_part(self, ctx: Ctx) -> web.Response:
        try:
            part_number = int(ctx.query["partNumber"])
        except ValueError:
            raise S3Error("InvalidArgument", "partNumber must be an integer", 400) from None
        if not 1 <= part_number <= 10000:
            raise S3Error("InvalidArgument", "partNumber must be in 1..10000", 400)
        upload_id = ctx.query["uploadId"]
        await self.run(self.spool.get, upload_id, ctx.bucket, ctx.key)
        writer = await self.run(self.spool.part_writer, upload_id, part_number)
        try:
            _, _, sums = await self.read_body(
                ctx, min(self.config.max_object_bytes, 5 * 1024 * MiB), sink=writer.write
            )
            etag = await self.run(writer.commit)
        except BaseException:
            await self.run(writer.abort)
            raise
        return web.Response(status=200, headers={"ETag": f'"{etag}"', **sums})

    async def complete_multipart(self, ctx: Ctx) -> web.Response:
        upload_id = ctx.query["uploadId"]
        conditional = self._if_none_match_star(ctx.request)
        body, _, _ = await self.read_body(ctx, self.config.max_request_body_bytes)
        upload = await self.run(self.spool.get, upload_id, ctx.bucket, ctx.key)
        try:
            wanted = s3xml.parse_complete_multipart(body)
        except Exception:
            raise S3Error("MalformedXML", "the XML you provided was not well-formed", 400) from None
        if not wanted:
            raise S3Error("MalformedXML", "CompleteMultipartUpload names no parts", 400)
        have = {n: (size, etag) for n, size, etag in await self.run(self.spool.parts, upload_id)}
        numbers = [n for n, _ in wanted]
        if numbers != sorted(set(numbers)):
            raise S3Error("InvalidPartOrder", "the list of parts was not in ascending order", 400)
        for i, (n, etag) in enumerate(wanted):
            if n not in have or have[n][1] != etag:
                raise S3Error("InvalidPart", f"part {n} was not uploaded or its ETag does not match", 400)
            if i < len(wanted) - 1 and have[n][0] < self.config.min_part_bytes:
                raise S3Error("EntityTooSmall", f"part {n} is smaller than the minimum part size", 400)
        total = sum(have[n][0] for n in numbers)
        if total > self.config.max_object_bytes:
            raise S3Error("EntityTooLarge", "the assembled object exceeds the size limit", 413)
        etag = multipart_etag([e for _, e in wanted])

        def assemble():
            writer = self.store.begin_write(ctx.bucket, ctx.key, upload.content_type, upload.metadata)
            try:
                for n in numbers:
                    with open(self.spool.part_path(upload_id, n), "rb") as f:
                        while block := f.read(_BATCH_BYTES):
                            writer.write(block)
                return writer.commit(conditional, etag)
            except BaseException:
                writer.abort()
                raise

        info = await self.run(assemble)
        await self.run(self.spool.remove, upload_id)
        body_xml = (
            s3xml.el("Location", f"/{ctx.bucket}/{ctx.key}")
            + s3xml.el("Bucket", ctx.bucket)
            + s3xml.el("Key", ctx.key)
            + s3xml.el("ETag", f'"{info.etag}"')
        )
        return self._xml(s3xml.doc("CompleteMultipartUploadResult", body_xml))

    async def abort_multipart(self, ctx: Ctx) -> web.Response:
        upload_id = ctx.query["uploadId"]
        await self.run(self.spool.get, upload_id, ctx.bucket, ctx.key)
        await self.run(self.spool.remove, upload_id)
        return web.Response(status=204)

    # --- pacer control -------------------------------------------------------------------------------------

    async def pacer_control(self, ctx: Ctx) -> web.Response:
        """``POST /?objectcache-pacer`` with ``{"policy": ..., "egress_gbps": ...}``: switch the pacer's policy
        and egress capacity (Gbps; 0 or null: unpaced) without restarting, so a coordinator can alternate
        policies between runs on a server it did not start.  Allowed only when the server runs with
        ``--allow-pacer-control`` *and* the caller signs with an admin credential (every namespace and
        bucket): it changes every tenant's service.  Refused with ``409 PacerBusy`` while gather streams are
        open, so a run never mixes two settings.  Answers the new settings as JSON."""
        if not self.config.allow_pacer_control:
            raise S3Error(
                "AccessDenied", "pacer control is off: start the server with --allow-pacer-control", 403
            )
        if not (ctx.cred.is_admin and ctx.cred.buckets is None):
            raise S3Error("AccessDenied", "pacer control needs an admin credential", 403)
        body, _, _ = await self.read_body(ctx, self.config.max_request_body_bytes)
        try:
            policy, egress_Bps = pacer_mod.parse_settings(body, self.pacer.settings())
        except ValueError as e:
            raise S3Error("InvalidArgument", str(e), 400) from None
        # No await from here on: the check and the change are one step of the event loop (streams open there).
        if self.pacer.streams:
            raise S3Error(
                "PacerBusy",
                f"{len(self.pacer.streams)} gather streams are open: change the pacer between runs",
                409,
            )
        self.pacer.configure(policy, egress_Bps)
        settings = self.pacer.settings()
        log.info(
            "pacer set by %s: policy=%s egress=%s Gbps", ctx.cred.access_key, policy, settings["egress_gbps"]
        )
        return web.json_response(settings)

    # --- quarantine ---------------------------------------------------------------------------------------

    def check_and_quarantine(self, bucket: str, key: str) -> str | None:
        """Verify a stored KV chunk object (header, size, every layer's checksum); if it is damaged, move it
        out of service (``store.quarantine``) and return why.  Objects that are not KV chunks at all (no
        ``OCKV`` magic) are left alone: not ours to judge.  Blocking; reads the whole object."""
        try:
            handle = self.store.open_object(bucket, key)
        except CorruptObject as e:
            reason = str(e)
        else:
            with handle:
                reason = _chunk_damage(handle, key)
        if reason is None:
            return None
        if self.store.quarantine(bucket, key, reason):
            log.warning("quarantined %s/%s: %s", bucket, key, reason)
            self.metrics.errors["Quarantined"] += 1
        return reason

    async def quarantine_report(self, ctx: Ctx) -> web.Response:
        """``POST /<bucket>/<key>?quarantine``: a client reports a checksum mismatch.  The server re-checks
        the stored bytes itself (a flip in flight, or a false report, must not take a good object away)."""
        await self.read_body(ctx, self.config.max_request_body_bytes)
        reason = await self.run(self.check_and_quarantine, ctx.bucket, ctx.key)
        body = s3xml.el("Key", ctx.key) + s3xml.el("Quarantined", "true" if reason else "false")
        if reason:
            body += s3xml.el("Reason", reason)
        return self._xml(s3xml.doc("QuarantineResult", body))

    # --- gather -------------------------------------------------------------------------------------------

    async def gather(self, ctx: Ctx) -> web.StreamResponse:
        request = ctx.request
        request_s = request.get("t_pacer_s", float("nan"))
        body, _, _ = await self.read_body(ctx, self.config.max_request_body_bytes)
        req = gather_mod.parse_gather_body(body, self.config.max_gather_keys)
        denied = [k for k in req.keys if not ctx.cred.allows_key(k)]
        if denied:
            raise S3Error(
                "AccessDenied",
                f"key {denied[0]!r} is outside the credential's namespaces",
                403,
                key=denied[0],
            )
        for k in req.keys:
            validate_key(k)
        # The open is on the critical path of every gather and the pool is busy reading the running
        # streams' layers: on a local store, check a small gather's objects in the event loop instead.
        inline = isinstance(self.store, FilesystemStore) and len(req.keys) <= _INLINE_GATHER_KEYS
        exists = (
            self.store.bucket_exists(ctx.bucket)
            if inline
            else await self.run(self.store.bucket_exists, ctx.bucket)
        )
        if not exists:
            raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
        try:
            plan = await gather_mod.prepare_gather(self.store, ctx.bucket, req, self.executor, inline=inline)
        except CorruptObject as e:
            if e.key:
                await self.run(self.check_and_quarantine, ctx.bucket, e.key)
            raise
        stream = self.pacer.open_stream(
            plan.layer_payload_bytes, plan.num_layers, req.compute_per_layer_s, req.stream_id
        )
        stream.request_s = request_s
        self.metrics.active_streams += 1
        self.metrics.gather_streams_total += 1
        try:
            resp = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": gather_mod.CONTENT_TYPE,
                    "x-oc-num-chunks": str(plan.n_slices),
                    "x-oc-slice-bytes": str(plan.slice_bytes),
                    "x-oc-layer-start": str(plan.layer_start),
                    "x-oc-layer-end": str(plan.layer_end),
                    "x-oc-stream-id": stream.stream_id,
                },
            )
            resp.content_length = plan.content_length
            await resp.prepare(request)
            sink = self._sink(request, resp)

            def account(n: int) -> None:
                self.metrics.bytes_served["Gather"] += n

            try:
                sent = await gather_mod.stream_gather(
                    plan,
                    sink,
                    self.pacer,
                    stream,
                    self.executor,
                    self.config.piece_bytes,
                    account,
                    allow_sendfile=self.config.sendfile,
                )
                self.metrics.gather_layers += sent
            except (ConnectionError, TimeoutError, asyncio.CancelledError):
                raise  # the client went away: ``handle`` drops the connection
            except Exception as e:  # after the headers: report in-band, then close the connection
                code = getattr(e, "s3_code", "InternalError")
                self.metrics.errors[code] += 1
                if not isinstance(e, ObjectCacheError):
                    log.exception("gather stream failed")
                msg = f"{code}: {e}" if isinstance(e, ObjectCacheError) else f"{code}: internal error"
                try:
                    await sink.send([gather_mod.error_frame(msg)])
                finally:
                    if request.transport is not None:
                        request.transport.close()
                return resp
            await resp.write_eof()
            return resp
        finally:
            self.pacer.close_stream(stream)
            self.metrics.active_streams -= 1
            plan.close()


def _chunk_damage(handle, key: str) -> str | None:
    """Why a stored object claiming to be a KV chunk is damaged, or None (intact, or not a chunk object)."""
    from testbed.kvformat import HEADER_PROBE_BYTES, MAGIC, parse_header, slice_checksum

    size = handle.info.size_bytes
    probe = bytearray(min(HEADER_PROBE_BYTES, size))
    handle.read_into(0, memoryview(probe))
    if bytes(probe[:4]) != MAGIC:
        return None
    try:
        header = parse_header(probe)
    except CorruptObject as e:
        return f"chunk {key}: {e}"
    if header.total_bytes != size:
        return f"chunk {key}: object is {size} bytes, header says {header.total_bytes}"
    buf = bytearray(header.slice_bytes)
    for layer in range(header.num_layers):
        got = handle.read_into(header.layer_range(layer)[0], memoryview(buf))
        if got != len(buf) or slice_checksum(buf) != header.checksums[layer]:
            return f"chunk {key} layer {layer}: checksum mismatch"
    return None


# --- entry point ------------------------------------------------------------------------------------------


def make_store(config: ServerConfig) -> Store:
    if config.store == "fs":
        return FilesystemStore(os.path.join(config.data_dir, "store"), fsync=config.fsync)
    if config.store == "s3proxy":
        from testbed.s3proxy import S3ProxyStore  # the S3-proxy backend (testbed/s3proxy.py)

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
    runner = web.AppRunner(server.app(), access_log=None)
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


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="objectcache-server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=9000, help="TCP port; 0 picks a free one (see --ready-file)")
    p.add_argument("--data-dir", default="objectcache-data", help="filesystem store and multipart spool")
    p.add_argument("--store", choices=["fs", "s3proxy"], default="fs")
    p.add_argument(
        "--store-option",
        action="append",
        default=[],
        metavar="K=V",
        help="keyword argument of the store (s3proxy: endpoint_url=..., bucket=..., ...)",
    )
    p.add_argument("--spool-dir", default=None, help="multipart part files (default DATA_DIR/multipart)")
    p.add_argument("--credentials", default=None, help="JSON credentials file (see docs/object_tier.md)")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--policy", default="equal", help="bandwidth policy of the pacer (scheduler.policies)")
    p.add_argument("--egress-gbps", type=float, default=None, help="egress capacity to share; unset: unpaced")
    p.add_argument(
        "--piece-kib",
        type=int,
        default=DEFAULT_PIECE_BYTES // 1024,
        help="smallest paced piece (a piece is ~1.5 ms of data at the stream's rate)",
    )
    p.add_argument("--max-object-mib", type=int, default=5 * 1024)
    p.add_argument("--max-gather-keys", type=int, default=gather_mod.DEFAULT_MAX_KEYS)
    p.add_argument("--min-part-mib", type=float, default=5.0, help="minimum multipart part size (not last)")
    p.add_argument("--io-threads", type=int, default=16)
    p.add_argument("--no-fsync", action="store_true", help="skip fsync on writes (benchmarks only)")
    p.add_argument("--no-sendfile", action="store_true", help="gather through buffers, not sendfile (A/B)")
    p.add_argument(
        "--allow-pacer-control",
        action="store_true",
        help="let admin credentials switch the pacer's policy and egress rate (POST /?objectcache-pacer)",
    )
    p.add_argument("--ready-file", default=None, help="write {host, port, pid, url} JSON here once listening")
    p.add_argument("--log-level", default=os.environ.get("OBJECTCACHE_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    opts = {}
    for item in a.store_option:
        k, sep, v = item.partition("=")
        if not sep:
            p.error(f"--store-option wants K=V, got {item!r}")
        opts[k] = v
    return ServerConfig(
        host=a.host,
        port=a.port,
        data_dir=a.data_dir,
        store=a.store,
        store_options=opts,
        spool_dir=a.spool_dir,
        credentials_file=a.credentials,
        region=a.region,
        policy=a.policy,
        egress_gbps=a.egress_gbps,
        piece_bytes=a.piece_kib * 1024,
        max_object_bytes=a.max_object_mib * MiB,
        max_gather_keys=a.max_gather_keys,
        min_part_bytes=int(a.min_part_mib * MiB),
        io_threads=a.io_threads,
        fsync=not a.no_fsync,
        sendfile=not a.no_sendfile,
        allow_pacer_control=a.allow_pacer_control,
        ready_file=a.ready_file,
        log_level=a.log_level,
    )


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
