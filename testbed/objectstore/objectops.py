"""The ObjectCache S3 server's bucket and object operations: the plain S3 API subset.

Buckets (ListBuckets, CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation, GetBucketVersioning,
ListObjects v1/v2, ListObjectVersions, DeleteObjects) and objects (PutObject with ``If-None-Match: *``,
CopyObject, GetObject / HeadObject with conditional headers and a single ``bytes=`` range, DeleteObject).
Objects keep what S3 keeps: Content-Type, the ``STORED_HEADERS`` (Content-Encoding, Cache-Control, ...),
user metadata, the MD5 ETag and the ``x-amz-checksum-*`` values verified on upload (returned when the
request says ``x-amz-checksum-mode: ENABLED``).  Versioning is never enabled: a bucket's objects are
listed as their only version, ``VersionId`` "null".  Each is an async function of the request's
``RequestContext`` (``testbed.objectstore.context``), mapped to its method and sub-resource by
``testbed.objectstore.routes``.  Blocking store calls run in the server's thread pool
(``ctx.run``); payload bytes go out with ``sendfile`` where the store has file descriptors.
The request-header helpers (``user_metadata``, ``stored_headers``, ``if_none_match_star``,
``check_conditions``, ``parse_range``, ``copy_source``) are shared with the multipart operations.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from urllib.parse import quote, unquote

from aiohttp import web

from testbed.objectstore.body import VERIFY_HEADER, read_body_direct
from testbed.objectstore.config import BATCH_BYTES
from testbed.objectstore.context import RequestContext, xml_response
from testbed.objectstore.storeapi import (
    STORED_HEADERS,
    ObjectHandle,
    ObjectInfo,
    Store,
    validate_bucket_name,
    validate_key,
)
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
    if delimiter and start_after.startswith(prefix):
        # A marker inside (or equal to) a common prefix: that prefix was already returned, skip all of it.
        i = start_after.find(delimiter, len(prefix))
        if i >= 0:
            cursor = start_after[: i + len(delimiter)] + "\U0010ffff"
    if max_keys == 0:
        return entries, cursor, False
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


def _list_scope(ctx: RequestContext) -> tuple[str, str, int]:
    """A listing's prefix (inside the credential's namespaces), delimiter and max-keys (0..1000)."""
    q = ctx.query
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    if not ctx.cred.allows_prefix(prefix):
        raise S3Error("AccessDenied", f"prefix {prefix!r} is outside the credential's namespaces", 403)
    return prefix, delimiter, max(0, min(1000, int_param(q, "max-keys", 1000)))


async def _list_page(ctx: RequestContext, prefix: str, delimiter: str, start: str, max_keys: int):
    """``list_entries`` of an existing bucket, in the I/O pool."""
    if not await ctx.run(ctx.services.store.bucket_exists, ctx.bucket):
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    return await ctx.run(list_entries, ctx.services.store, ctx.bucket, prefix, delimiter, start, max_keys)


def _key_encoder(ctx: RequestContext) -> Callable[[str], str]:
    """Keys and prefixes as the listing shows them: URL-encoded with ``encoding-type=url``."""
    if ctx.query.get("encoding-type") == "url":
        return lambda s: quote(s, safe="/")
    return lambda s: s


async def list_objects(ctx: RequestContext) -> web.Response:
    q = ctx.query
    v2 = q.get("list-type") == "2"
    prefix, delimiter, max_keys = _list_scope(ctx)
    token = q.get("continuation-token")
    if v2 and token is not None:
        try:
            start = base64.urlsafe_b64decode(token.encode()).decode("utf-8", "surrogatepass")
        except (ValueError, UnicodeDecodeError):
            raise S3Error("InvalidArgument", "bad continuation token", 400) from None
    else:
        start = q.get("start-after", "") if v2 else q.get("marker", "")
    entries, cursor, truncated = await _list_page(ctx, prefix, delimiter, start, max_keys)
    enc = _key_encoder(ctx)

    parts = [s3xml.el("Name", ctx.bucket), s3xml.el("Prefix", enc(prefix)), s3xml.el("MaxKeys", max_keys)]
    if delimiter:
        parts.append(s3xml.el("Delimiter", enc(delimiter)))
    if ctx.query.get("encoding-type") == "url":
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
        parts.insert(2, s3xml.el("Marker", enc(q.get("marker", ""))))
        if truncated and delimiter and entries:
            last = entries[-1]
            parts.append(s3xml.el("NextMarker", enc(last[1] if last[0] == "cp" else last[1].key)))
    owner = s3xml.owner() if not v2 or q.get("fetch-owner") == "true" else ""
    for kind, item in entries:
        if kind == "obj":
            parts.append(
                "<Contents>"
                + s3xml.el("Key", enc(item.key))
                + s3xml.el("LastModified", s3xml.iso8601(item.last_modified_s))
                + s3xml.el("ETag", f'"{item.etag}"')
                + s3xml.el("Size", item.size_bytes)
                + owner
                + s3xml.el("StorageClass", "STANDARD")
                + "</Contents>"
            )
        else:
            parts.append(f"<CommonPrefixes>{s3xml.el('Prefix', enc(item))}</CommonPrefixes>")
    return xml_response(s3xml.doc("ListBucketResult", "".join(parts)))


async def bucket_versioning(ctx: RequestContext) -> web.Response:
    """GetBucketVersioning: never enabled (an empty ``VersioningConfiguration``, as S3 answers for a bucket
    whose versioning was never switched on)."""
    if not await ctx.run(ctx.services.store.bucket_exists, ctx.bucket):
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    return xml_response(s3xml.doc("VersioningConfiguration", ""))


async def list_object_versions(ctx: RequestContext) -> web.Response:
    """ListObjectVersions (``GET /bucket?versions``): every object is its only version, ``VersionId``
    "null", latest; no delete markers.  ``key-marker`` continues after a key (one version per key, so
    ``version-id-marker`` adds nothing)."""
    prefix, delimiter, max_keys = _list_scope(ctx)
    key_marker = ctx.query.get("key-marker", "")
    entries, _, truncated = await _list_page(ctx, prefix, delimiter, key_marker, max_keys)
    enc = _key_encoder(ctx)

    parts = [
        s3xml.el("Name", ctx.bucket),
        s3xml.el("Prefix", enc(prefix)),
        s3xml.el("KeyMarker", enc(key_marker)),
        s3xml.el("VersionIdMarker", ctx.query.get("version-id-marker", "")),
        s3xml.el("MaxKeys", max_keys),
    ]
    if delimiter:
        parts.append(s3xml.el("Delimiter", enc(delimiter)))
    if ctx.query.get("encoding-type") == "url":
        parts.append(s3xml.el("EncodingType", "url"))
    parts.append(s3xml.el("IsTruncated", "true" if truncated else "false"))
    if truncated and entries:
        kind, last = entries[-1]
        parts.append(s3xml.el("NextKeyMarker", enc(last if kind == "cp" else last.key)))
        parts.append(s3xml.el("NextVersionIdMarker", "null"))
    for kind, item in entries:
        if kind == "obj":
            parts.append(
                "<Version>"
                + s3xml.el("Key", enc(item.key))
                + s3xml.el("VersionId", "null")
                + s3xml.el("IsLatest", "true")
                + s3xml.el("LastModified", s3xml.iso8601(item.last_modified_s))
                + s3xml.el("ETag", f'"{item.etag}"')
                + s3xml.el("Size", item.size_bytes)
                + s3xml.owner()
                + s3xml.el("StorageClass", "STANDARD")
                + "</Version>"
            )
        else:
            parts.append(f"<CommonPrefixes>{s3xml.el('Prefix', enc(item))}</CommonPrefixes>")
    return xml_response(s3xml.doc("ListVersionsResult", "".join(parts)))


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


def int_param(query: Mapping[str, str], name: str, default: int) -> int:
    """An integer query parameter (``max-keys``, ``partNumber``, ...); InvalidArgument if it is not one."""
    try:
        return int(query.get(name, default))
    except ValueError:
        raise S3Error("InvalidArgument", f"{name} must be an integer", 400) from None


def user_metadata(request: web.Request) -> dict[str, str]:
    """The ``x-amz-meta-*`` headers, names lowercased, values exactly as sent (an RFC 2047 encoded word or
    raw UTF-8 alike: they are returned byte for byte)."""
    meta = {}
    for k, v in request.headers.items():
        lk = k.lower()
        if lk.startswith("x-amz-meta-"):
            try:
                v.encode()
            except UnicodeEncodeError:  # aiohttp keeps undecodable bytes as surrogates
                raise S3Error("InvalidArgument", f"header {k} is not valid UTF-8", 400) from None
            meta[lk[len("x-amz-meta-") :]] = v
    if sum(len(k.encode()) + len(v.encode()) for k, v in meta.items()) > 2048:
        raise S3Error("MetadataTooLarge", "user metadata exceeds 2 KiB", 400)
    return meta


def stored_headers(request: web.Request) -> dict[str, str]:
    """The ``STORED_HEADERS`` a write sets, as S3 keeps them (``aws-chunked``, a transfer framing, is not
    part of the stored Content-Encoding)."""
    out = {}
    for name in STORED_HEADERS:
        value = request.headers.get(name)
        if value is None:
            continue
        if name == "Content-Encoding":
            value = ",".join(c.strip() for c in value.split(",") if c.strip() and c.strip() != "aws-chunked")
            if not value:
                continue
        out[name] = value
    return out


# ``x-amz-checksum-<algorithm>`` -> the XML element that carries it (CompleteMultipartUpload, ListParts).
CHECKSUM_ELEMENTS = {
    "crc32": "ChecksumCRC32",
    "crc32c": "ChecksumCRC32C",
    "crc64nvme": "ChecksumCRC64NVME",
    "sha1": "ChecksumSHA1",
    "sha256": "ChecksumSHA256",
}


def body_checksums(verified: Mapping[str, str]) -> dict[str, str]:
    """algorithm -> base64 value of the ``x-amz-checksum-*`` a body was verified against (what is stored)."""
    prefix = "x-amz-checksum-"
    return {k[len(prefix) :]: v for k, v in verified.items() if k.startswith(prefix)}


def checksum_element(algorithm: str, value: str) -> str:
    return s3xml.el(CHECKSUM_ELEMENTS[algorithm], value) if algorithm in CHECKSUM_ELEMENTS else ""


def checksum_headers(checksums: Mapping[str, str]) -> dict[str, str]:
    """The response headers of stored checksums: each value, and ``x-amz-checksum-type`` (COMPOSITE for a
    multipart object's ``<checksum of part checksums>-<n>``, else FULL_OBJECT)."""
    out = {f"x-amz-checksum-{alg}": v for alg, v in checksums.items()}
    if out:
        out["x-amz-checksum-type"] = (
            "COMPOSITE" if any("-" in v for v in checksums.values()) else "FULL_OBJECT"
        )
    return out


def copy_source(ctx: RequestContext) -> tuple[str, str]:
    """The (bucket, key) of ``x-amz-copy-source`` (``[/]bucket/key``, percent-encoded, optionally
    ``?versionId=null``), checked against S3's naming rules and the credential."""
    raw = ctx.request.headers["x-amz-copy-source"]
    path, _, query = raw.partition("?")
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    if query:
        name, _, version = query.partition("=")
        if name != "versionId" or version != "null":
            raise S3Error("InvalidArgument", "invalid version id specified in x-amz-copy-source", 400)
    if not bucket or not key:
        raise S3Error("InvalidArgument", "x-amz-copy-source must name a bucket and a key", 400)
    validate_bucket_name(bucket)
    validate_key(key)
    if not ctx.cred.allows_bucket(bucket) or not ctx.cred.allows_key(key):
        raise S3Error("AccessDenied", f"the credential may not read {bucket}/{key}", 403, key=key)
    return bucket, key


def if_none_match_star(request: web.Request) -> bool:
    value = request.headers.get("If-None-Match")
    if value is None:
        return False
    if value.strip() != "*":
        raise S3Error("NotImplemented", "only 'If-None-Match: *' is supported on writes", 501)
    return True


def copy_source_conditions(headers: Mapping[str, str], info: ObjectInfo) -> None:
    """The ``x-amz-copy-source-if-*`` preconditions on the source object; PreconditionFailed if one fails."""
    cond = {
        name[len("x-amz-copy-source-") :]: value
        for name, value in headers.items()
        if name.lower().startswith("x-amz-copy-source-if-")
    }
    renamed = {k.title(): v for k, v in cond.items()}  # if-none-match -> If-None-Match
    if check_conditions(renamed, info.etag, info.last_modified_s) is not None:
        raise S3Error("PreconditionFailed", "at least one of the copy source preconditions did not hold", 412)


async def copy_object(ctx: RequestContext) -> web.Response:
    """CopyObject (a PUT with ``x-amz-copy-source``): the source's bytes into this key, within the
    credential's buckets and namespaces.  ``x-amz-metadata-directive: COPY`` (the default) keeps the
    source's Content-Type, stored headers, metadata and checksums; ``REPLACE`` takes them from this request.
    Copying an object onto itself is only allowed with REPLACE (S3's rule)."""
    request = ctx.request
    await ctx.read_body(ctx.services.config.max_request_body_bytes)
    src_bucket, src_key = copy_source(ctx)
    directive = request.headers.get("x-amz-metadata-directive", "COPY").strip().upper()
    if directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", f"unknown x-amz-metadata-directive {directive!r}", 400)
    if (src_bucket, src_key) == (ctx.bucket, ctx.key) and directive == "COPY":
        raise S3Error(
            "InvalidRequest",
            "This copy request is illegal because it is trying to copy an object to itself without "
            "changing the object's metadata, storage class, website redirect location or encryption "
            "attributes.",
            400,
        )
    conditional = if_none_match_star(request)
    handle = await ctx.run(ctx.services.store.open_object, src_bucket, src_key)
    try:
        src = handle.info
        copy_source_conditions(request.headers, src)
        if src.size_bytes > ctx.services.config.max_object_bytes:
            raise S3Error("EntityTooLarge", "the source object exceeds the size limit", 400)
        if directive == "COPY":
            content_type, metadata, headers = src.content_type, src.metadata, src.headers
        else:
            content_type = request.headers.get("Content-Type", "application/octet-stream")
            metadata, headers = user_metadata(request), stored_headers(request)
        # A composite checksum describes the source's parts; the copy is one part.
        checksums = {a: v for a, v in src.checksums.items() if "-" not in v}

        def copy() -> ObjectInfo:
            writer = ctx.services.store.begin_write(ctx.bucket, ctx.key, content_type, metadata, headers)
            try:
                off = 0
                while off < src.size_bytes:
                    buf = bytearray(min(BATCH_BYTES, src.size_bytes - off))
                    got = handle.read_into(off, memoryview(buf))
                    if got != len(buf):
                        raise S3Error("InternalError", "short read from the store", 500)
                    writer.write(buf)
                    off += got
                return writer.commit(conditional, None, checksums)
            except BaseException:
                writer.abort()
                raise

        info = await ctx.run(copy)
    finally:
        handle.close()
    body = s3xml.el("LastModified", s3xml.iso8601(info.last_modified_s)) + s3xml.el("ETag", f'"{info.etag}"')
    return xml_response(s3xml.doc("CopyObjectResult", body))


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
    metadata, headers = user_metadata(request), stored_headers(request)
    # A KV chunk body is verified slice by slice and named by its header (``chunk_etag``): no content MD5.
    content_md5 = VERIFY_HEADER not in request.headers
    writer = await ctx.run(
        lambda: ctx.services.store.begin_write(
            ctx.bucket, ctx.key, content_type, metadata, headers, content_md5
        )
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
        info = await ctx.run(writer.commit, conditional, body.etag, body_checksums(body.checksums))
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


def check_conditions(h: Mapping[str, str], etag: str, mtime_s: float) -> int | None:
    """The status the conditional headers ``h`` (If-Match, If-None-Match, If-Modified-Since,
    If-Unmodified-Since) call for against an object's ETag and mtime: 412, 304, or None to go on."""
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
            **info.headers,
        }
        for k, v in info.metadata.items():
            headers[f"x-amz-meta-{k}"] = v
        # A presigned GET may choose the answer's headers (``response-content-disposition=...``).
        for name in ("Content-Type", *STORED_HEADERS):
            override = ctx.query.get("response-" + name.lower())
            if override is not None:
                headers[name] = override
        cond = check_conditions(request.headers, info.etag, info.last_modified_s)
        if cond == 412:
            raise S3Error("PreconditionFailed", "at least one of the preconditions did not hold", 412)
        if cond == 304:
            return web.Response(status=304, headers={"ETag": headers["ETag"]})
        rng = None
        if "Range" in request.headers:
            rng = parse_range(request.headers["Range"], info.size_bytes)
        if rng is None:
            start, count, status = 0, info.size_bytes, 200
            if request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
                headers.update(checksum_headers(info.checksums))
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
