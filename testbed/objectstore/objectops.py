"""The ObjectCache S3 server's bucket and object operations: the plain S3 API subset.

Buckets (ListBuckets, CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation, ListObjects v1/v2,
DeleteObjects) and objects (PutObject with ``If-None-Match: *``, GetObject / HeadObject with conditional
headers and a single ``bytes=`` range, DeleteObject).  Each is an async function of the request's
``RequestContext`` (``testbed.objectstore.context``), mapped to its method and sub-resource by
``testbed.objectstore.routes``.  Blocking store calls run in the server's thread pool
(``ctx.run``); payload bytes go out with ``sendfile`` where the store has file descriptors.
The request-header helpers (``user_metadata``, ``if_none_match_star``, ``check_conditions``,
``parse_range``) are shared with the multipart operations.
"""

from __future__ import annotations

import base64
import re
from email.utils import parsedate_to_datetime
from urllib.parse import quote

from aiohttp import web

from testbed.objectstore.body import read_body_direct
from testbed.objectstore.config import BATCH_BYTES
from testbed.objectstore.context import RequestContext, xml_response
from testbed.objectstore.storeapi import ObjectHandle, Store, validate_key
from testbed.wire import s3xml
from testbed.wire.errors import CorruptObject, ObjectCacheError, S3Error


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


# --- buckets ------------------------------------------------------------------------------------------


async def list_buckets(ctx: RequestContext) -> web.Response:
    buckets = [b for b in await ctx.run(ctx.services.store.list_buckets) if ctx.cred.allows_bucket(b.name)]
    items = "".join(
        f"<Bucket>{s3xml.el('Name', b.name)}{s3xml.el('CreationDate', s3xml.iso8601(b.created_s))}</Bucket>"
        for b in buckets
    )
    return xml_response(s3xml.doc("ListAllMyBucketsResult", s3xml.owner() + f"<Buckets>{items}</Buckets>"))


async def create_bucket(ctx: RequestContext) -> web.Response:
    await ctx.read_body(ctx.services.config.max_request_body_bytes)
    await ctx.run(ctx.services.store.create_bucket, ctx.bucket)
    # us-east-1 semantics: re-creating your own bucket succeeds, so ensure_bucket() is idempotent.
    return web.Response(status=200, headers={"Location": f"/{ctx.bucket}"})


async def head_bucket(ctx: RequestContext) -> web.Response:
    if not await ctx.run(ctx.services.store.bucket_exists, ctx.bucket):
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    return web.Response(status=200, headers={"x-amz-bucket-region": ctx.services.config.region})


async def delete_bucket(ctx: RequestContext) -> web.Response:
    if not ctx.cred.is_admin:
        raise S3Error("AccessDenied", "only an admin credential may delete buckets", 403)
    await ctx.run(ctx.services.store.delete_bucket, ctx.bucket)
    return web.Response(status=204)


async def bucket_location(ctx: RequestContext) -> web.Response:
    if not await ctx.run(ctx.services.store.bucket_exists, ctx.bucket):
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    region = "" if ctx.services.config.region == "us-east-1" else ctx.services.config.region
    return xml_response(s3xml.doc("LocationConstraint", s3xml.escape(region)))


def list_entries(store: Store, bucket: str, prefix: str, delimiter: str, start_after: str, max_keys: int):
    """Up to ``max_keys`` entries after ``start_after``: ("obj", ObjectInfo) or ("cp", prefix); the
    cursor to continue from; and whether more entries follow."""
    entries: list[tuple[str, object]] = []
    cursor = start_after
    while len(entries) < max_keys:
        page = store.list_objects(bucket, prefix, cursor, min(1000, max_keys - len(entries) + 1))
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
    more = store.list_objects(bucket, prefix, cursor, 1).objects
    return entries, cursor, bool(more)


async def list_objects(ctx: RequestContext) -> web.Response:
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
    if not await ctx.run(ctx.services.store.bucket_exists, ctx.bucket):
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    entries, cursor, truncated = await ctx.run(
        list_entries, ctx.services.store, ctx.bucket, prefix, delimiter, start, max_keys
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
    return xml_response(s3xml.doc("ListBucketResult", "".join(parts)))


async def delete_objects(ctx: RequestContext) -> web.Response:
    body = (await ctx.read_body(ctx.services.config.max_request_body_bytes)).data
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
            await ctx.run(ctx.services.store.delete_object, ctx.bucket, key)
            if not quiet:
                out.append(f"<Deleted>{s3xml.el('Key', key)}</Deleted>")
        except ObjectCacheError as e:
            code = getattr(e, "s3_code", "InternalError")
            out.append(
                f"<Error>{s3xml.el('Key', key)}{s3xml.el('Code', code)}{s3xml.el('Message', str(e))}</Error>"
            )
    return xml_response(s3xml.doc("DeleteResult", "".join(out)))


# --- objects ------------------------------------------------------------------------------------------


def user_metadata(request: web.Request) -> dict[str, str]:
    meta = {}
    for k, v in request.headers.items():
        lk = k.lower()
        if lk.startswith("x-amz-meta-"):
            meta[lk[len("x-amz-meta-") :]] = v
    if sum(len(k) + len(v) for k, v in meta.items()) > 2048:
        raise S3Error("MetadataTooLarge", "user metadata exceeds 2 KiB", 400)
    return meta


def if_none_match_star(request: web.Request) -> bool:
    value = request.headers.get("If-None-Match")
    if value is None:
        return False
    if value.strip() != "*":
        raise S3Error("NotImplemented", "only 'If-None-Match: *' is supported on writes", 501)
    return True


async def copy_object(ctx: RequestContext) -> web.Response:
    """A PUT with ``x-amz-copy-source``: not implemented (it must not be taken for a PutObject)."""
    raise S3Error("NotImplemented", "CopyObject is not implemented", 501)


async def put_object(ctx: RequestContext) -> web.Response:
    request = ctx.request
    conditional = if_none_match_star(request)
    if conditional and await object_exists(ctx):
        # Fail fast: the final check is the atomic one in commit.
        raise S3Error(
            "PreconditionFailed",
            f"object {ctx.key!r} already exists (If-None-Match: *)",
            412,
            key=ctx.key,
        )
    content_type = request.headers.get("Content-Type", "application/octet-stream")
    writer = await ctx.run(
        lambda: ctx.services.store.begin_write(ctx.bucket, ctx.key, content_type, user_metadata(request))
    )
    try:
        max_bytes = ctx.services.config.max_object_bytes
        body = await read_body_direct(
            request, ctx.auth, max_bytes, ctx.services.executor, writer.write, _no_keepalive
        )
        if body is None:
            body = await ctx.read_body(max_bytes, sink=writer.write)
        else:
            ctx.services.metrics.add_bytes_received(request["op"], body.size_bytes)
        info = await ctx.run(writer.commit, conditional)
    except BaseException:
        await ctx.run(writer.abort)
        raise
    return web.Response(status=200, headers={"ETag": f'"{info.etag}"', **body.checksums})


def _no_keepalive(request: web.Request) -> None:
    """Answer this request with ``Connection: close`` and close the connection after it, whatever the answer
    (an error built elsewhere included): its body was read past aiohttp's HTTP parser.  aiohttp takes
    keep-alive from the request message (``should_close``); it has no public switch for that."""
    request._message = request._message._replace(should_close=True)


async def object_exists(ctx: RequestContext) -> bool:
    try:
        await ctx.run(ctx.services.store.head_object, ctx.bucket, ctx.key)
        return True
    except ObjectCacheError as e:
        if getattr(e, "s3_code", "") == "NoSuchKey":
            return False
        raise


def check_conditions(request: web.Request, etag: str, mtime_s: float) -> int | None:
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


async def get_object(ctx: RequestContext) -> web.StreamResponse:
    request = ctx.request
    try:
        handle = await ctx.run(ctx.services.store.open_object, ctx.bucket, ctx.key)
    except CorruptObject as e:  # the store's own framing is broken: stop serving it
        await ctx.run(ctx.services.store.quarantine, ctx.bucket, ctx.key, str(e))
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
        cond = check_conditions(request, info.etag, info.last_modified_s)
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
            await _send_range(ctx, resp, handle, start, count)
            ctx.services.metrics.add_bytes_served("GetObject", count)
        await resp.write_eof()
        return resp
    finally:
        handle.close()


async def _send_range(
    ctx: RequestContext, resp: web.StreamResponse, handle: ObjectHandle, start: int, count: int
) -> None:
    sink = ctx.sink(resp)
    fd = handle.fileno()
    if fd is not None and sink.can_sendfile:
        await sink.send([(fd, start, count)])
        return
    off = 0
    while off < count:
        n = min(BATCH_BYTES, count - off)
        buf = bytearray(n)
        got = await ctx.run(handle.read_into, start + off, memoryview(buf))
        if got != n:
            raise S3Error("InternalError", "short read from the store", 500)
        await sink.send([buf])
        off += n


async def delete_object(ctx: RequestContext) -> web.Response:
    await ctx.run(ctx.services.store.delete_object, ctx.bucket, ctx.key)
    return web.Response(status=204)
