"""The ObjectCache S3 server's multipart uploads: Create, UploadPart, Complete, Abort.

Parts are spooled to files by the server's ``MultipartSpool`` (``testbed.objectstore.store``; under ``--spool-dir``,
default ``DATA_DIR/multipart``) and assembled into the store on CompleteMultipartUpload, which checks the
part list (ascending, uploaded, ETags match, every part but the last at least ``--min-part-mib``) and the
object size limit, and answers the S3 multipart ETag.  They are methods of ``MultipartOps``, which
``S3Server`` (``testbed.objectstore.server``) inherits; they use its plumbing (``self.run``, ``self.read_body``,
``self._xml``, ``self.spool``, ``self.store``, ``self.config``) and ``ObjectOps``'s header helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from testbed.objectstore.config import _BATCH_BYTES, MiB
from testbed.objectstore.store import multipart_etag
from testbed.wire import s3xml
from testbed.wire.errors import S3Error

if TYPE_CHECKING:
    from testbed.objectstore.server import Ctx


class MultipartOps:
    """Multipart-upload operations of ``S3Server`` (a mixin: the state and plumbing are the server's)."""

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
