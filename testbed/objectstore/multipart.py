"""The ObjectCache S3 server's multipart uploads: Create, UploadPart, Complete, Abort.

Parts are spooled to files by the server's ``MultipartSpool`` (``testbed.objectstore.spool``; under ``--spool-dir``,
default ``DATA_DIR/multipart``) and assembled into the store on CompleteMultipartUpload, which checks the
part list (ascending, uploaded, ETags match, every part but the last at least ``--min-part-mib``) and the
object size limit, and answers the S3 multipart ETag.  Each is an async function of the request's
``RequestContext`` (``testbed.objectstore.context``); the write-header helpers are ``objectops``'s.
"""

from __future__ import annotations

from aiohttp import web

from testbed.objectstore.config import BATCH_BYTES, MiB
from testbed.objectstore.context import RequestContext, xml_response
from testbed.objectstore.objectops import if_none_match_star, user_metadata
from testbed.objectstore.spool import multipart_etag
from testbed.wire import s3xml
from testbed.wire.errors import S3Error

MAX_PART_BYTES = 5 * 1024 * MiB  # S3's largest part


async def create_multipart(ctx: RequestContext) -> web.Response:
    await ctx.read_body(ctx.services.config.max_request_body_bytes)
    if not await ctx.run(ctx.services.store.bucket_exists, ctx.bucket):
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    content_type = ctx.request.headers.get("Content-Type", "application/octet-stream")
    info = await ctx.run(
        ctx.services.spool.create, ctx.bucket, ctx.key, content_type, user_metadata(ctx.request)
    )
    body = s3xml.el("Bucket", ctx.bucket) + s3xml.el("Key", ctx.key) + s3xml.el("UploadId", info.upload_id)
    return xml_response(s3xml.doc("InitiateMultipartUploadResult", body))


async def upload_part(ctx: RequestContext) -> web.Response:
    try:
        part_number = int(ctx.query["partNumber"])
    except ValueError:
        raise S3Error("InvalidArgument", "partNumber must be an integer", 400) from None
    if not 1 <= part_number <= 10000:
        raise S3Error("InvalidArgument", "partNumber must be in 1..10000", 400)
    upload_id = ctx.query["uploadId"]
    await ctx.run(ctx.services.spool.get, upload_id, ctx.bucket, ctx.key)
    writer = await ctx.run(ctx.services.spool.part_writer, upload_id, part_number)
    try:
        max_part_bytes = min(ctx.services.config.max_object_bytes, MAX_PART_BYTES)
        sums = (await ctx.read_body(max_part_bytes, sink=writer.write)).checksums
        etag = await ctx.run(writer.commit)
    except BaseException:
        await ctx.run(writer.abort)
        raise
    return web.Response(status=200, headers={"ETag": f'"{etag}"', **sums})


async def complete_multipart(ctx: RequestContext) -> web.Response:
    upload_id = ctx.query["uploadId"]
    conditional = if_none_match_star(ctx.request)
    body = (await ctx.read_body(ctx.services.config.max_request_body_bytes)).data
    upload = await ctx.run(ctx.services.spool.get, upload_id, ctx.bucket, ctx.key)
    try:
        wanted = s3xml.parse_complete_multipart(body)
    except Exception:
        raise S3Error("MalformedXML", "the XML you provided was not well-formed", 400) from None
    if not wanted:
        raise S3Error("MalformedXML", "CompleteMultipartUpload names no parts", 400)
    have = {n: (size, etag) for n, size, etag in await ctx.run(ctx.services.spool.parts, upload_id)}
    numbers = [n for n, _ in wanted]
    if numbers != sorted(set(numbers)):
        raise S3Error("InvalidPartOrder", "the list of parts was not in ascending order", 400)
    for i, (n, etag) in enumerate(wanted):
        if n not in have or have[n][1] != etag:
            raise S3Error("InvalidPart", f"part {n} was not uploaded or its ETag does not match", 400)
        if i < len(wanted) - 1 and have[n][0] < ctx.services.config.min_part_bytes:
            raise S3Error("EntityTooSmall", f"part {n} is smaller than the minimum part size", 400)
    total = sum(have[n][0] for n in numbers)
    if total > ctx.services.config.max_object_bytes:
        raise S3Error("EntityTooLarge", "the assembled object exceeds the size limit", 413)
    etag = multipart_etag([e for _, e in wanted])

    def assemble():
        writer = ctx.services.store.begin_write(ctx.bucket, ctx.key, upload.content_type, upload.metadata)
        try:
            for n in numbers:
                with open(ctx.services.spool.part_path(upload_id, n), "rb") as f:
                    while block := f.read(BATCH_BYTES):
                        writer.write(block)
            return writer.commit(conditional, etag)
        except BaseException:
            writer.abort()
            raise

    info = await ctx.run(assemble)
    await ctx.run(ctx.services.spool.remove, upload_id)
    body_xml = (
        s3xml.el("Location", f"/{ctx.bucket}/{ctx.key}")
        + s3xml.el("Bucket", ctx.bucket)
        + s3xml.el("Key", ctx.key)
        + s3xml.el("ETag", f'"{info.etag}"')
    )
    return xml_response(s3xml.doc("CompleteMultipartUploadResult", body_xml))


async def abort_multipart(ctx: RequestContext) -> web.Response:
    upload_id = ctx.query["uploadId"]
    await ctx.run(ctx.services.spool.get, upload_id, ctx.bucket, ctx.key)
    await ctx.run(ctx.services.spool.remove, upload_id)
    return web.Response(status=204)
