"""The ObjectCache S3 server's KV-specific operations: gather, quarantine, pacer control.

* **gather** (``POST /<bucket>?gather``): the layer-major gather of many KV chunk objects (protocol in
  ``testbed.objectstore.gather``), paced by the server's ``Pacer``; an error after the headers is reported in-band.
* **quarantine** (``POST /<bucket>/<key>?quarantine``): a client reports a checksum mismatch; the server
  re-checks the stored chunk (``check_and_quarantine``) and moves a damaged one out of service.  Gathers and
  GETs that meet a corrupt object quarantine it the same way.
* **pacer control** (``POST /?objectcache-pacer``, admin only, ``--allow-pacer-control``): switches the pacer's
  policy and egress rate without a restart.

They are methods of ``KVOps``, which ``S3Server`` (``testbed.objectstore.server``) inherits; they use its plumbing
(``self.run``, ``self.read_body``, ``self._xml``, ``self._sink``, ``self.store``, ``self.pacer``,
``self.executor``, ``self.config``, ``self.metrics``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from testbed.objectstore import gather as gather_mod
from testbed.objectstore import pacer as pacer_mod
from testbed.objectstore.store import FilesystemStore, validate_key
from testbed.wire import s3xml
from testbed.wire.errors import CorruptObject, ObjectCacheError, S3Error

if TYPE_CHECKING:
    from testbed.objectstore.server import Ctx

log = logging.getLogger("objectcache.server")

# Gathers of up to this many keys open their objects in the event loop (a few hundred microseconds; a hop
# to the busy I/O pool could wait tens of ms on 2 cores); larger ones open in the pool, in parallel with the
# other gathers of the same prefill: on the H100 host 8 gathers of 30 keys opened inline one after another
# (~5 ms each), so the last stream of a 60K-token prefill opened ~50 ms after the first (docs/engine.md).
_INLINE_GATHER_KEYS = 16


class KVOps:
    """Gather, quarantine and pacer-control operations of ``S3Server`` (a mixin: the state is the server's)."""

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
    from testbed.wire.kvformat import HEADER_PROBE_BYTES, MAGIC, parse_header, slice_checksum

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
