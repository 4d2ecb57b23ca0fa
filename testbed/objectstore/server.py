"""The ObjectCache S3 server: an S3 API subset plus layer-major gather, on aiohttp.

Run ``python -m testbed.objectstore --data-dir DIR`` (or the console script ``objectcache-server``); it binds
127.0.0.1 by default.  Path-style addressing only (``http://host:port/<bucket>/<key>``).  See
docs/object_tier.md for the operations, flags, credentials and the gather protocol (``testbed.objectstore.gather``).

Request flow (``S3Server.handle``): every request is verified with SigV4 (``testbed.objectstore.auth``), its
bucket and key are checked against the credential's buckets and namespaces, and the routing table
(``testbed.objectstore.routes``) picks the operation by scope, method and sub-resource; the operation gets a
``RequestContext`` (``testbed.objectstore.context``) with the server's shared ``Services``.  Errors are S3
XML documents; an unexpected exception is logged and answered ``500 InternalError`` without internals.
A request with ``Expect: 100-continue`` is authenticated from its headers before the server invites its
body (``S3Server._expect``).  Request bodies keep a minimum pace (``testbed.objectstore.body.BodyPace``);
connections per client address are capped (``ClientConnectionCap``); the server refuses to listen beyond
loopback with the documented default credential (``check_exposure``).
Unauthenticated endpoints: ``GET /_objectcache/health`` (JSON) and ``GET /_objectcache/metrics``
(Prometheus text, ``testbed.objectstore.metrics``) -- names no bucket can have.

This module holds the application (``S3Server``) and the process entry (``serve``, ``main``); the flags are
``testbed.objectstore.config``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from testbed.objectstore import routes
from testbed.objectstore.auth import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    AuthResult,
    CredentialStore,
    verify_request,
)
from testbed.objectstore.body import BODY_PACE, BodyPace
from testbed.objectstore.config import ServerConfig, parse_args
from testbed.objectstore.context import RequestContext, Services
from testbed.objectstore.gather import GatherBudget
from testbed.objectstore.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from testbed.objectstore.metrics import ServerMetrics
from testbed.objectstore.pacer import Pacer
from testbed.objectstore.spool import MultipartSpool
from testbed.objectstore.store import FilesystemStore
from testbed.objectstore.storeapi import Store, validate_bucket_name, validate_key
from testbed.wire import s3xml
from testbed.wire.errors import ObjectCacheError, S3Error
from testbed.wire.frames import GATHER_VERSION

log = logging.getLogger("objectcache.server")

INTERNAL_PREFIX = "/_objectcache/"


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Query pairs decoded with ``unquote`` (not ``unquote_plus``: S3 clients encode spaces as %20)."""
    out = []
    for part in raw_query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.append((unquote(k), unquote(v)))
    return out


class S3Server:
    """The aiohttp application: request entry, authentication, routing, error answers, internal endpoints."""

    def __init__(self, config: ServerConfig, store: Store, credentials: CredentialStore) -> None:
        self.credentials = credentials
        egress_Bps = config.egress_Gbps * 1e9 / 8 if config.egress_Gbps else None
        pacer = Pacer(config.policy, egress_Bps, policy_kwargs=config.policy_kwargs)
        self.services = Services(
            config=config,
            store=store,
            spool=MultipartSpool(
                config.spool_dir or os.path.join(config.data_dir, "multipart"), config.multipart_expiry_s
            ),
            pacer=pacer,
            metrics=ServerMetrics(pacer),
            executor=ThreadPoolExecutor(config.io_threads, thread_name_prefix="oc-io"),
            send_executor=ThreadPoolExecutor(config.send_threads, thread_name_prefix="oc-send"),
            gather_budget=GatherBudget(config.max_gather_response_bytes, config.max_tenant_gather_bytes),
        )
        self._rid = itertools.count(1)
        self._rid_prefix = f"{os.getpid():x}"
        self._body_pace = BodyPace(config.body_timeout_s, config.min_body_bytes_per_s)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.services.config.max_request_body_bytes)
        # [\s\S], not ".": a decoded path may hold a newline (%0A), which must get an S3 error, not aiohttp's 404.
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.handle, expect_handler=self._expect)
        app.on_response_prepare.append(self._on_prepare)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-amz-request-id"] = request.get("rid", "")
        response.headers["Server"] = "ObjectCache"

    async def _on_cleanup(self, app: web.Application) -> None:
        self.services.executor.shutdown(wait=False, cancel_futures=True)
        self.services.send_executor.shutdown(wait=False, cancel_futures=True)
        self.services.store.close()

    def error_response(self, request: web.Request, err: ObjectCacheError) -> web.Response:
        code = getattr(err, "s3_code", "InternalError")
        status = getattr(err, "http_status", 500)
        self.services.metrics.count_error(code)
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
        """Answer one request, whatever happens: S3 errors as XML, a vanished client by dropping the
        connection, a full disk as ``507 InsufficientStorage``, anything else as ``500 InternalError``."""
        t0 = time.perf_counter()
        request["t_pacer_s"] = self.services.pacer.now_s()  # when handling began, on the pacer's clock
        request["rid"] = f"{self._rid_prefix}-{next(self._rid):08x}"
        request["op"] = "unknown"
        request[BODY_PACE] = self._body_pace
        try:
            resp = await self._dispatch(request)
        except ObjectCacheError as e:
            resp = self.error_response(request, e)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, TimeoutError):
            # The client went away (mid-body or mid-stream): nothing to answer, drop the connection.
            self.services.metrics.count_error("ClientDisconnected")
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
        if request.get("close_connection"):
            resp.force_close()
        self.services.metrics.observe(request["op"], resp.status, time.perf_counter() - t0)
        return resp

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: authenticate from the headers first, so a request that will be refused
        is answered (and its connection closed) before the client sends its body; only a verified
        request gets ``100 Continue``."""
        raw_path, _, raw_query = request.raw_path.partition("?")
        try:
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise S3Error("ExpectationFailed", "only Expect: 100-continue is supported", 417)
            if not raw_path.startswith(INTERNAL_PREFIX):
                request["auth"] = self._authenticate(request, raw_path, raw_query)
        except ObjectCacheError as e:
            request["rid"] = f"{self._rid_prefix}-{next(self._rid):08x}"
            self.services.metrics.observe("unknown", getattr(e, "http_status", 500), 0.0)
            resp = self.error_response(request, e)
            resp.force_close()
            request.content.feed_eof()  # the body was not invited: no lingering read, close after the answer
            return resp
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the 100 is not part of the answer's size
        return None

    def _authenticate(self, request: web.Request, raw_path: str, raw_query: str) -> AuthResult:
        return verify_request(
            request.method,
            raw_path,
            parse_query(raw_query),
            request.headers.items(),
            self.credentials,
            datetime.now(UTC),
        )

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        """Authenticate, check the bucket and key against the credential, route, run the operation."""
        raw_path, _, raw_query = request.raw_path.partition("?")
        if raw_path.startswith(INTERNAL_PREFIX):
            return await self._internal(request, raw_path[len(INTERNAL_PREFIX) :])
        query_pairs = parse_query(raw_query)
        auth = request.get("auth") or self._authenticate(request, raw_path, raw_query)
        bucket_raw, _, key_raw = raw_path.lstrip("/").partition("/")
        bucket, key = unquote(bucket_raw), unquote(key_raw)
        # Routing ignores presign parameters and botocore's informational ``x-id``.
        query = {k: v for k, v in query_pairs if not k.startswith("X-Amz-") and k != "x-id"}
        ctx = RequestContext(request, bucket, key, query, auth, self.services)
        if bucket:
            validate_bucket_name(bucket)
            if not ctx.cred.allows_bucket(bucket):
                raise S3Error("AccessDenied", f"credential may not access bucket {bucket!r}", 403)
        if key:
            validate_key(key)
            if not ctx.cred.allows_key(key):
                raise S3Error(
                    "AccessDenied", f"key {key!r} is outside the credential's namespaces", 403, key=key
                )
        route = routes.resolve(routes.scope_of(bucket, key), request.method, query, request.headers)
        request["op"] = route.name
        return await route.operation(ctx)

    async def _internal(self, request: web.Request, what: str) -> web.Response:
        request["op"] = "internal"
        if request.method != "GET":
            raise S3Error("MethodNotAllowed", "internal endpoints are GET only", 405)
        if what == "health":
            body = {
                "status": "ok",
                "gather": GATHER_VERSION,
                "pid": os.getpid(),
                **self.services.pacer.settings(),
            }
            return web.json_response(body)
        if what == "metrics":
            return web.Response(
                body=self.services.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE}
            )
        raise S3Error("NoSuchKey", "unknown internal endpoint", 404)


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


class StartRefused(Exception):
    """The server will not start with this configuration (the message says why and what to do)."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every address) or a name: assume it reaches beyond this machine


def check_exposure(config: ServerConfig, credentials: CredentialStore) -> None:
    """Refuse (``StartRefused``) to listen beyond loopback with the documented default credential: without
    explicit credentials the server falls back to that publicly known admin key pair, and a credentials
    file may name it too.  ``--insecure-default-credentials`` is the one explicit override."""
    if is_loopback(config.host) or config.insecure_default_credentials:
        return
    if any(
        c.access_key == DEFAULT_ACCESS_KEY or c.secret_key == DEFAULT_SECRET_KEY for c in credentials.all()
    ):
        raise StartRefused(
            f"refusing to listen on {config.host!r} (beyond loopback) with the documented default "
            f"credential {DEFAULT_ACCESS_KEY!r}, which anyone can sign with: give --credentials FILE (or "
            "OBJECTCACHE_CREDENTIALS / OBJECTCACHE_ACCESS_KEY + OBJECTCACHE_SECRET_KEY) with keys of your "
            "own, or, on a network private to this machine only, --insecure-default-credentials"
        )


class ClientConnectionCap:
    """At most ``max_per_client`` open connections per client IP address; one more is answered
    ``503 SlowDown`` (S3 XML, ``Connection: close``) and closed before it is read.

    aiohttp has no per-peer limit and no public hook on accepted connections: ``install`` wraps the
    ``connection_made`` / ``connection_lost`` callbacks of the runner's ``web.Server`` (every connection's
    ``RequestHandler`` reports to them)."""

    LOG_EVERY_S = 10.0  # a flood of refused connections is one log line per this many seconds

    def __init__(self, max_per_client: int, metrics: ServerMetrics | None = None) -> None:
        self.max_per_client = max_per_client
        self.metrics = metrics
        self.open: dict[str, int] = {}
        self.refused = 0
        self._peer: dict[object, str] = {}  # admitted handler -> its client address
        self._logged_s = -float("inf")

    def install(self, server: web.Server) -> None:
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler, transport) -> None:
            made(handler, transport)
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) and peer else str(peer)
            if self.open.get(ip, 0) >= self.max_per_client:
                self._refuse(transport, ip)
                return
            self.open[ip] = self.open.get(ip, 0) + 1
            self._peer[handler] = ip

        def connection_lost(handler, exc=None) -> None:
            ip = self._peer.pop(handler, None)
            if ip is not None:
                self.open[ip] -= 1
                if not self.open[ip]:
                    del self.open[ip]
            lost(handler, exc)

        server.connection_made = connection_made
        server.connection_lost = connection_lost

    def _refuse(self, transport, ip: str) -> None:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.count_error("SlowDown")
        now_s = time.monotonic()
        if now_s - self._logged_s >= self.LOG_EVERY_S:
            self._logged_s = now_s
            log.info(
                "refused a connection from %s: %d open (--max-connections-per-client); %d refused in all",
                ip,
                self.open[ip],
                self.refused,
            )
        body = s3xml.error_xml(
            "SlowDown",
            f"too many open connections from {ip} (at most {self.max_per_client}); reuse connections",
            "/",
            "",
        )
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
        )
        transport.write(head.encode() + body)
        transport.close()


def load_credentials(config: ServerConfig) -> CredentialStore:
    return CredentialStore.default(config.credentials_file or os.environ.get("OBJECTCACHE_CREDENTIALS"))


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Run the server until ``stop`` is set (or SIGTERM/SIGINT when run from ``main``).  Raises
    ``StartRefused`` before binding when the configuration is unsafe (``check_exposure``)."""
    credentials = load_credentials(config)
    check_exposure(config, credentials)
    for name in ("idle_timeout_s", "body_timeout_s", "max_connections_per_client"):
        if getattr(config, name) <= 0:
            raise StartRefused(f"--{name.replace('_', '-')} must be > 0")
    _raise_fd_limit()
    store = make_store(config)
    server = S3Server(config, store, credentials)
    # auto_decompress=False: a body sent with Content-Encoding: gzip is stored as sent, like S3 does.
    runner = web.AppRunner(
        server.app(), access_log=None, keepalive_timeout=config.idle_timeout_s, auto_decompress=False
    )
    await runner.setup()
    ClientConnectionCap(config.max_connections_per_client, server.services.metrics).install(runner.server)
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    await site.start()
    sock = site._server.sockets[0]  # the bound socket: the real port when --port 0
    host, port = sock.getsockname()[:2]
    if not is_loopback(config.host):
        log.warning("listening on %s: reachable beyond loopback", config.host)
    if config.insecure_default_credentials and not is_loopback(config.host):
        log.warning("--insecure-default-credentials: anyone who can reach %s may sign requests", config.host)
    log.info(
        "objectcache-server on http://%s:%d store=%s policy=%s %s egress=%s credentials=%d",
        host,
        port,
        config.store,
        config.policy,
        config.policy_kwargs,
        f"{config.egress_Gbps} Gbps" if config.egress_Gbps else "unpaced",
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
    try:
        asyncio.run(serve(config))
    except StartRefused as e:
        print(f"objectcache-server: error: {e}", file=sys.stderr)
        return 2
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
