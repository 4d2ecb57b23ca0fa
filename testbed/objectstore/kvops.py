"""The ObjectCache S3 server's KV-specific operations: gather, quarantine, pacer control.

* **gather** (``POST /<bucket>?gather``): the layer-major gather of many KV chunk objects (protocol in
  ``testbed.objectstore.gather``), paced by the server's ``Pacer``; an error after the headers is reported in-band.
* **quarantine** (``POST /<bucket>/<key>?quarantine``): a client reports a checksum mismatch; the server
  re-checks the stored chunk (``check_and_quarantine``) and moves a damaged one out of service.  Gathers and
  GETs that meet a corrupt object quarantine it the same way.
* **pacer control** (``POST /?objectcache-pacer``, admin only, ``--allow-pacer-control``): switches the pacer's
  policy and egress rate without a restart.

Each is an async function of the request's ``RequestContext`` (``testbed.objectstore.context``), mapped to
its method and sub-resource by ``testbed.objectstore.routes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from aiohttp import web

from testbed.objectstore import gather as gather_mod
from testbed.objectstore import pacer as pacer_mod
from testbed.objectstore.context import RequestContext, xml_response
from testbed.objectstore.metrics import ServerMetrics
from testbed.objectstore.store import FilesystemStore
from testbed.objectstore.storeapi import Store, validate_key
from testbed.wire import frames, s3xml
from testbed.wire.errors import CorruptObject, InvalidRequest, ObjectCacheError, S3Error

log = logging.getLogger("objectcache.server")

# Gathers of up to this many keys open their objects in the event loop (a few hundred microseconds; a hop
# to the busy I/O pool could wait tens of ms on 2 cores); larger ones open in the pool, in parallel with the
# other gathers of the same prefill: on the H100 host 8 gathers of 30 keys opened inline one after another
# (~5 ms each), so the last stream of a 60K-token prefill opened ~50 ms after the first (docs/engine.md).
_INLINE_GATHER_KEYS = 16


async def pacer_control(ctx: RequestContext) -> web.Response:
    """``POST /?objectcache-pacer`` with ``{"policy": ..., "policy_kwargs": {...}, "egress_gbps": ...}``:
    switch the pacer's policy, its tunables and the egress capacity (Gbps; 0 or null: unpaced) without
    restarting (``testbed.objectstore.pacer.parse_settings`` says what a left-out key means), so a
    coordinator can alternate policies between runs on a server it did not start.  Allowed only when the server runs with
    ``--allow-pacer-control`` *and* the caller signs with an admin credential (every namespace and
    bucket): it changes every tenant's service.  Refused with ``409 PacerBusy`` while gather streams are
    open, so a run never mixes two settings.  Answers the new settings as JSON."""
    svc = ctx.services
    if not svc.config.allow_pacer_control:
        raise S3Error(
            "AccessDenied", "pacer control is off: start the server with --allow-pacer-control", 403
        )
    if not (ctx.cred.is_admin and ctx.cred.buckets is None):
        raise S3Error("AccessDenied", "pacer control needs an admin credential", 403)
    body = (await ctx.read_body(svc.config.max_request_body_bytes)).data
    try:
        new = pacer_mod.parse_settings(body, svc.pacer.settings())
    except ValueError as e:
        raise S3Error("InvalidArgument", str(e), 400) from None
    # No await from here on: the check and the change are one step of the event loop (streams open there).
    if svc.pacer.streams:
        raise S3Error(
            "PacerBusy",
            f"{len(svc.pacer.streams)} gather streams are open: change the pacer between runs",
            409,
        )
    svc.pacer.configure(new.policy, new.egress_Bps, new.policy_kwargs)
    settings = svc.pacer.settings()
    log.info(
        "pacer set by %s: policy=%s %s egress=%s Gbps",
        ctx.cred.access_key,
        new.policy,
        new.policy_kwargs,
        settings["egress_gbps"],
    )
    return web.json_response(settings)


# --- quarantine ---------------------------------------------------------------------------------------


def check_and_quarantine(store: Store, metrics: ServerMetrics, bucket: str, key: str) -> str | None:
    """Verify a stored KV chunk object (header, size, every layer's checksum); if it is damaged, move it
    out of service (``store.quarantine``) and return why.  Objects that are not KV chunks at all (no
    ``OCKV`` magic) are left alone: not ours to judge.  Blocking; reads the whole object."""
    try:
        handle = store.open_object(bucket, key)
    except CorruptObject as e:
        reason = str(e)
    else:
        with handle:
            reason = _chunk_damage(handle, key)
    if reason is None:
        return None
    if store.quarantine(bucket, key, reason):
        log.warning("quarantined %s/%s: %s", bucket, key, reason)
        metrics.count_error("Quarantined")
    return reason


async def quarantine_report(ctx: RequestContext) -> web.Response:
    """``POST /<bucket>/<key>?quarantine``: a client reports a checksum mismatch.  The server re-checks
    the stored bytes itself (a flip in flight, or a false report, must not take a good object away)."""
    svc = ctx.services
    await ctx.read_body(svc.config.max_request_body_bytes)
    reason = await ctx.run(check_and_quarantine, svc.store, svc.metrics, ctx.bucket, ctx.key)
    body = s3xml.el("Key", ctx.key) + s3xml.el("Quarantined", "true" if reason else "false")
    if reason:
        body += s3xml.el("Reason", reason)
    return xml_response(s3xml.doc("QuarantineResult", body))


# --- gather -------------------------------------------------------------------------------------------


async def gather(ctx: RequestContext) -> web.StreamResponse:
    """``POST /<bucket>?gather``: check the request and open every object (S3 errors before any frame; an
    early gather: the first part's objects, the others while its first layer streams), register the stream
    with the pacer, then stream the layer frames (``_stream_frames``)."""
    svc = ctx.services
    request = ctx.request
    request_s = request.get("t_pacer_s", float("nan"))
    body = (await ctx.read_body(svc.config.max_request_body_bytes)).data
    req = gather_mod.parse_gather_body(body, svc.config.max_gather_keys)
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
    local = isinstance(svc.store, FilesystemStore)
    inline = local and len(req.keys) <= _INLINE_GATHER_KEYS
    # An early gather's first part (2 keys) is opened in the event loop on a local store, whatever its size:
    # its first byte then never waits for the busy pool.
    first_inline = local and req.stream_early
    exists = (
        svc.store.bucket_exists(ctx.bucket)
        if inline or first_inline
        else await ctx.run(svc.store.bucket_exists, ctx.bucket)
    )
    if not exists:
        raise S3Error("NoSuchBucket", f"bucket {ctx.bucket!r} does not exist", 404)
    try:
        plan = await gather_mod.prepare_gather(
            svc.store, ctx.bucket, req, svc.executor, inline=inline, first_inline=first_inline
        )
    except CorruptObject as e:
        if e.key:
            await ctx.run(check_and_quarantine, svc.store, svc.metrics, ctx.bucket, e.key)
        raise
    tenant, response_bytes = ctx.cred.access_key, plan.content_length
    try:
        svc.gather_budget.admit(tenant, response_bytes)
    except BaseException:
        plan.close()
        raise
    try:
        stream = svc.pacer.open_stream(
            plan.layer_payload_bytes,
            plan.num_layers,
            req.compute_per_layer_s,
            req.stream_id,
            group=req.pace_group,
            tenant=tenant,
        )
    except ValueError as e:
        svc.gather_budget.release(tenant, response_bytes)
        plan.close()
        raise InvalidRequest(str(e)) from None
    stream.request_s = request_s
    if math.isnan(stream.flow.request_s):
        stream.flow.request_s = request_s
    svc.metrics.active_streams.inc()
    svc.metrics.gather_streams.inc()
    try:
        return await _stream_frames(ctx, plan, stream)
    finally:
        svc.pacer.close_stream(stream)
        svc.metrics.active_streams.dec()
        svc.gather_budget.release(tenant, response_bytes)
        plan.close()


async def _stream_frames(
    ctx: RequestContext, plan: gather_mod.GatherPlan, stream: pacer_mod.PacedStream
) -> web.StreamResponse:
    """Send the gather's headers and its layer frames, paced; an error after the headers is reported
    in-band (an error frame), then the connection is closed."""
    svc, request = ctx.services, ctx.request
    resp = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": frames.CONTENT_TYPE,
            frames.NUM_CHUNKS_HEADER: str(plan.n_slices),
            frames.SLICE_BYTES_HEADER: str(plan.slice_bytes),
            frames.LAYER_START_HEADER: str(plan.layer_start),
            frames.LAYER_END_HEADER: str(plan.layer_end),
            frames.STREAM_ID_HEADER: stream.stream_id,
        },
    )
    resp.content_length = plan.content_length
    await resp.prepare(request)
    sink = ctx.sink(resp)

    def account(n_bytes: int) -> None:
        svc.metrics.add_bytes_served("Gather", n_bytes)

    try:
        sent = await gather_mod.stream_gather(
            plan,
            sink,
            svc.pacer,
            stream,
            svc.executor,
            svc.config.piece_bytes,
            account,
            allow_sendfile=svc.config.sendfile,
        )
        svc.metrics.gather_layers.inc(sent)
    except (ConnectionError, TimeoutError, asyncio.CancelledError):
        raise  # the client went away: the server's request handler drops the connection
    except Exception as e:
        code = getattr(e, "s3_code", "InternalError")
        svc.metrics.count_error(code)
        if isinstance(e, CorruptObject) and e.key and plan.first_parts is not None:
            # A damaged object found after an early gather's answer had begun: as before the answer.
            with contextlib.suppress(Exception):
                await ctx.run(check_and_quarantine, svc.store, svc.metrics, ctx.bucket, e.key)
        if not isinstance(e, ObjectCacheError):
            log.exception("gather stream failed")
        msg = f"{code}: {e}" if isinstance(e, ObjectCacheError) else f"{code}: internal error"
        try:
            await sink.send([frames.encode_error_frame(msg)])
        finally:
            if request.transport is not None:
                request.transport.close()
        return resp
    await resp.write_eof()
    return resp


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
