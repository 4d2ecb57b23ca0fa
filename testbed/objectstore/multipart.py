"""The ObjectCache S3 server's multipart uploads: Create, UploadPart, UploadPartCopy, Complete, Abort,
ListParts and ListMultipartUploads.

Parts are spooled to files by the server's ``MultipartSpool`` (``testbed.objectstore.spool``; under ``--spool-dir``,
default ``DATA_DIR/multipart``) and assembled into the store on CompleteMultipartUpload, which checks the
part list (ascending, uploaded, ETags match, every part but the last at least ``--min-part-mib``) and the
object size limit, and answers the S3 multipart ETag.  Uploading a part number again replaces the part; a
Complete retried after it succeeded answers the same ETag again (the spool keeps a record); uploads left
unfinished expire after ``--multipart-expiry-s``.  When the Create named an ``x-amz-checksum-algorithm``
and every part carried that checksum, the object gets S3's composite checksum (the checksum of the parts'
binary checksums, ``-<n>``).  Each is an async function of the request's ``RequestContext``
(``testbed.objectstore.context``); the write-header helpers are ``objectops``'s.
"""

from __future__ import annotations

import base64

from aiohttp import web

from testbed.objectstore.chunked import checksum_b64, new_checksum
from testbed.objectstore.config import BATCH_BYTES, MiB
from testbed.objectstore.context import RequestContext, xml_response
from testbed.objectstore.objectops import (
    body_checksums,
    checksum_element,
    copy_source,
    if_none_match_star,
    int_param,
    stored_headers,
    user_metadata,
)
from testbed.objectstore.spool import PartInfo, UploadInfo, multipart_etag
from testbed.wire import s3xml
from testbed.wire.errors import NoSuchUpload, S3Error

MAX_PART_BYTES = 5 * 1024 * MiB  # S3's largest part


async def create_multipart(ctx: RequestContext) -> web.Response:
    await ctx.read_body(ctx.services.config.max_request_body_bytes)
    if not await ctx.run(ctx.services.store.bucket_exists, ctx.bucket):
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    await ctx.run(ctx.services.spool.maybe_sweep)
    headers = ctx.request.headers
    content_type = headers.get("Content-Type", "application/octet-stream")
    algorithm = headers.get("x-amz-checksum-algorithm", "").strip().lower()
    if algorithm:
        new_checksum(algorithm)  # InvalidRequest for one the server cannot compute
    info = await ctx.run(
        lambda: ctx.services.spool.create(
            ctx.bucket,
            ctx.key,
            content_type,
            user_metadata(ctx.request),
            stored_headers(ctx.request),
            algorithm,
        )
    )
    body = s3xml.el("Bucket", ctx.bucket) + s3xml.el("Key", ctx.key) + s3xml.el("UploadId", info.upload_id)
    extra = {"x-amz-checksum-algorithm": algorithm.upper()} if algorithm else {}
    return xml_response(s3xml.doc("InitiateMultipartUploadResult", body), headers=extra)


def _part_number(ctx: RequestContext) -> int:
    part_number = int_param(ctx.query, "partNumber", 0)
    if not 1 <= part_number <= 10000:
        raise S3Error("InvalidArgument", "partNumber must be in 1..10000", 400)
    return part_number


async def upload_part(ctx: RequestContext) -> web.Response:
    if "x-amz-copy-source" in ctx.request.headers:
        return await upload_part_copy(ctx)
    part_number = _part_number(ctx)
    upload_id = ctx.query["uploadId"]
    await ctx.run(ctx.services.spool.get, upload_id, ctx.bucket, ctx.key)
    writer = await ctx.run(ctx.services.spool.part_writer, upload_id, part_number)
    try:
        max_part_bytes = min(ctx.services.config.max_object_bytes, MAX_PART_BYTES)
        sums = (await ctx.read_body(max_part_bytes, sink=writer.write)).checksums
        etag = await ctx.run(writer.commit, body_checksums(sums))
    except BaseException:
        await ctx.run(writer.abort)
        raise
    return web.Response(status=200, headers={"ETag": f'"{etag}"', **sums})


async def upload_part_copy(ctx: RequestContext) -> web.Response:
    """UploadPartCopy: a part's bytes from (a ``x-amz-copy-source-range`` of) an existing object."""
    part_number = _part_number(ctx)
    upload_id = ctx.query["uploadId"]
    await ctx.run(ctx.services.spool.get, upload_id, ctx.bucket, ctx.key)
    await ctx.read_body(ctx.services.config.max_request_body_bytes)
    src_bucket, src_key = copy_source(ctx)
    handle = await ctx.run(ctx.services.store.open_object, src_bucket, src_key)
    try:
        size = handle.info.size_bytes
        start, end = 0, size - 1
        rng = ctx.request.headers.get("x-amz-copy-source-range")
        if rng is not None:
            try:
                first, _, last = rng.strip().removeprefix("bytes=").partition("-")
                start, end = int(first), int(last)
            except ValueError:
                raise S3Error("InvalidArgument", f"bad x-amz-copy-source-range {rng!r}", 400) from None
            if not 0 <= start <= end < size:
                raise S3Error("InvalidRange", "the x-amz-copy-source-range is not satisfiable", 416)
        if end - start + 1 > MAX_PART_BYTES:
            raise S3Error("EntityTooLarge", "a part is at most 5 GiB", 400)

        def copy() -> str:
            writer = ctx.services.spool.part_writer(upload_id, part_number)
            try:
                off = start
                while off <= end:
                    buf = bytearray(min(BATCH_BYTES, end + 1 - off))
                    got = handle.read_into(off, memoryview(buf))
                    if got != len(buf):
                        raise S3Error("InternalError", "short read from the store", 500)
                    writer.write(buf)
                    off += got
                return writer.commit()
            except BaseException:
                writer.abort()
                raise

        etag = await ctx.run(copy)
        modified_s = handle.info.last_modified_s
    finally:
        handle.close()
    body = s3xml.el("ETag", f'"{etag}"') + s3xml.el("LastModified", s3xml.iso8601(modified_s))
    return xml_response(s3xml.doc("CopyPartResult", body))


def composite_checksum(algorithm: str, parts: list[PartInfo]) -> str | None:
    """S3's composite checksum of a multipart object (base64 of the checksum of the parts' binary
    checksums, ``-<number of parts>``); None unless every part carries ``algorithm``'s checksum."""
    if not algorithm or any(algorithm not in p.checksums for p in parts):
        return None
    h = new_checksum(algorithm)
    for p in parts:
        h.update(base64.b64decode(p.checksums[algorithm]))
    return f"{checksum_b64(h)}-{len(parts)}"


def _complete_result(ctx: RequestContext, etag: str, checksums: dict[str, str]) -> web.Response:
    body_xml = (
        s3xml.el("Location", f"/{ctx.bucket}/{ctx.key}")
        + s3xml.el("Bucket", ctx.bucket)
        + s3xml.el("Key", ctx.key)
        + s3xml.el("ETag", f'"{etag}"')
        + "".join(checksum_element(alg, v) for alg, v in checksums.items())
    )
    return xml_response(s3xml.doc("CompleteMultipartUploadResult", body_xml))


async def complete_multipart(ctx: RequestContext) -> web.Response:
    upload_id = ctx.query["uploadId"]
    conditional = if_none_match_star(ctx.request)
    body = (await ctx.read_body(ctx.services.config.max_request_body_bytes)).data
    try:
        upload: UploadInfo = await ctx.run(ctx.services.spool.get, upload_id, ctx.bucket, ctx.key)
    except NoSuchUpload:
        # A retry of a Complete that succeeded (its answer lost on the way): the same answer again.
        etag = await ctx.run(ctx.services.spool.completed_etag, upload_id, ctx.bucket, ctx.key)
        if etag is None:
            raise
        return _complete_result(ctx, etag, {})
    try:
        wanted = s3xml.parse_complete_multipart(body)
    except Exception:
        raise S3Error("MalformedXML", "the XML you provided was not well-formed", 400) from None
    if not wanted:
        raise S3Error("MalformedXML", "CompleteMultipartUpload names no parts", 400)
    have = {p.part_number: p for p in await ctx.run(ctx.services.spool.parts, upload_id)}
    numbers = [n for n, _ in wanted]
    if numbers != sorted(set(numbers)):
        raise S3Error("InvalidPartOrder", "the list of parts was not in ascending order", 400)
    for i, (n, etag) in enumerate(wanted):
        if n not in have or have[n].etag != etag:
            raise S3Error("InvalidPart", f"part {n} was not uploaded or its ETag does not match", 400)
        if i < len(wanted) - 1 and have[n].size_bytes < ctx.services.config.min_part_bytes:
            raise S3Error("EntityTooSmall", f"part {n} is smaller than the minimum part size", 400)
    total = sum(have[n].size_bytes for n in numbers)
    if total > ctx.services.config.max_object_bytes:
        raise S3Error("EntityTooLarge", "the assembled object exceeds the size limit", 413)
    etag = multipart_etag([e for _, e in wanted])
    composite = composite_checksum(upload.checksum_algorithm, [have[n] for n in numbers])
    checksums = {upload.checksum_algorithm: composite} if composite else {}

    def assemble():
        writer = ctx.services.store.begin_write(
            ctx.bucket, ctx.key, upload.content_type, upload.metadata, upload.headers
        )
        try:
            for n in numbers:
                with open(ctx.services.spool.part_path(upload_id, n), "rb") as f:
                    while block := f.read(BATCH_BYTES):
                        writer.write(block)
            return writer.commit(conditional, etag, checksums)
        except BaseException:
            writer.abort()
            raise

    info = await ctx.run(assemble)
    await ctx.run(ctx.services.spool.complete, upload_id, ctx.bucket, ctx.key, info.etag)
    return _complete_result(ctx, info.etag, checksums)


async def abort_multipart(ctx: RequestContext) -> web.Response:
    upload_id = ctx.query["uploadId"]
    await ctx.run(ctx.services.spool.get, upload_id, ctx.bucket, ctx.key)
    await ctx.run(ctx.services.spool.remove, upload_id)
    return web.Response(status=204)


async def list_parts(ctx: RequestContext) -> web.Response:
    """ListParts (``GET /bucket/key?uploadId``): the uploaded parts after ``part-number-marker``, at most
    ``max-parts`` (1000) of them."""
    upload_id = ctx.query["uploadId"]
    upload = await ctx.run(ctx.services.spool.get, upload_id, ctx.bucket, ctx.key)
    max_parts = max(0, min(1000, int_param(ctx.query, "max-parts", 1000)))
    marker = int_param(ctx.query, "part-number-marker", 0)
    parts = [p for p in await ctx.run(ctx.services.spool.parts, upload_id) if p.part_number > marker]
    page, truncated = parts[:max_parts], len(parts) > max_parts
    out = [
        s3xml.el("Bucket", ctx.bucket),
        s3xml.el("Key", ctx.key),
        s3xml.el("UploadId", upload_id),
        s3xml.initiator(),
        s3xml.owner(),
        s3xml.el("StorageClass", "STANDARD"),
        s3xml.el("PartNumberMarker", marker),
        s3xml.el("NextPartNumberMarker", page[-1].part_number if page else marker),
        s3xml.el("MaxParts", max_parts),
        s3xml.el("IsTruncated", "true" if truncated else "false"),
    ]
    if upload.checksum_algorithm:
        out.append(s3xml.el("ChecksumAlgorithm", upload.checksum_algorithm.upper()))
    for p in page:
        out.append(
            "<Part>"
            + s3xml.el("PartNumber", p.part_number)
            + s3xml.el("LastModified", s3xml.iso8601(p.last_modified_s))
            + s3xml.el("ETag", f'"{p.etag}"')
            + s3xml.el("Size", p.size_bytes)
            + "".join(checksum_element(alg, v) for alg, v in p.checksums.items())
            + "</Part>"
        )
    return xml_response(s3xml.doc("ListPartsResult", "".join(out)))


async def list_multipart_uploads(ctx: RequestContext) -> web.Response:
    """ListMultipartUploads (``GET /bucket?uploads``): the bucket's live uploads the credential may see, by
    key then initiation time, after ``key-marker`` / ``upload-id-marker``, at most ``max-uploads`` (1000),
    with ``prefix`` and ``delimiter`` as in ListObjects."""
    q = ctx.query
    if not await ctx.run(ctx.services.store.bucket_exists, ctx.bucket):
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    await ctx.run(ctx.services.spool.maybe_sweep)
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    key_marker, id_marker = q.get("key-marker", ""), q.get("upload-id-marker", "")
    max_uploads = max(0, min(1000, int_param(q, "max-uploads", 1000)))
    uploads = [
        u
        for u in await ctx.run(ctx.services.spool.uploads, ctx.bucket)
        if u.key.startswith(prefix) and ctx.cred.allows_key(u.key)
    ]
    marker_b = key_marker.encode("utf-8", "surrogatepass")
    # Uploads of the marker key continue after ``upload-id-marker`` (in initiation order); without it,
    # the marker key is done.
    same_key_ids = [u.upload_id for u in uploads if u.key == key_marker]
    skip_ids = set(
        same_key_ids[: same_key_ids.index(id_marker) + 1] if id_marker in same_key_ids else same_key_ids
    )
    entries: list[tuple[str, object]] = []
    seen_prefixes: set[str] = set()
    truncated = False
    for u in uploads:
        if key_marker and (u.key.encode("utf-8", "surrogatepass") < marker_b or u.upload_id in skip_ids):
            continue
        rest = u.key[len(prefix) :]
        i = rest.find(delimiter) if delimiter else -1
        if i >= 0:
            cp = prefix + rest[: i + len(delimiter)]
            if cp in seen_prefixes or (key_marker and cp.encode() <= marker_b):
                continue
            item: tuple[str, object] = ("cp", cp)
            seen_prefixes.add(cp)
        else:
            item = ("upload", u)
        if len(entries) == max_uploads:
            truncated = True
            break
        entries.append(item)
    out = [
        s3xml.el("Bucket", ctx.bucket),
        s3xml.el("KeyMarker", key_marker),
        s3xml.el("UploadIdMarker", id_marker),
        s3xml.el("Prefix", prefix),
        s3xml.el("MaxUploads", max_uploads),
        s3xml.el("IsTruncated", "true" if truncated else "false"),
    ]
    if delimiter:
        out.append(s3xml.el("Delimiter", delimiter))
    if truncated and entries:
        kind, last = entries[-1]
        out.append(s3xml.el("NextKeyMarker", last if kind == "cp" else last.key))
        out.append(s3xml.el("NextUploadIdMarker", "" if kind == "cp" else last.upload_id))
    for kind, item in entries:
        if kind == "cp":
            out.append(f"<CommonPrefixes>{s3xml.el('Prefix', item)}</CommonPrefixes>")
            continue
        out.append(
            "<Upload>"
            + s3xml.el("Key", item.key)
            + s3xml.el("UploadId", item.upload_id)
            + s3xml.initiator()
            + s3xml.owner()
            + s3xml.el("StorageClass", "STANDARD")
            + s3xml.el("Initiated", s3xml.iso8601(item.initiated_s))
            + (
                s3xml.el("ChecksumAlgorithm", item.checksum_algorithm.upper())
                if item.checksum_algorithm
                else ""
            )
            + "</Upload>"
        )
    return xml_response(s3xml.doc("ListMultipartUploadsResult", "".join(out)))
