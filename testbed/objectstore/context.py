"""What an S3 operation works with: the server's shared resources and the context of one request.

Operations (``testbed.objectstore.objectops``, ``multipart``, ``kvops``) are plain async functions
``operation(ctx) -> response``; the routing table (``testbed.objectstore.routes``) picks one per request by
method and sub-resource.  Everything an operation uses comes through its ``RequestContext``: the aiohttp
request, its bucket, key and routing query, the verified credential, and ``ctx.services``, the resources
all requests share (store, multipart spool, pacer, metrics, configuration, thread pools).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from testbed.objectstore.auth import AuthResult, Credential
from testbed.objectstore.body import ReceivedBody, read_body
from testbed.objectstore.config import ServerConfig
from testbed.objectstore.gather import GatherBudget
from testbed.objectstore.gather_sinks import SocketSink, WriterSink
from testbed.objectstore.metrics import ServerMetrics
from testbed.objectstore.pacer import Pacer
from testbed.objectstore.spool import MultipartSpool
from testbed.objectstore.storeapi import Store


@dataclass
class Services:
    """The server-wide resources every operation shares.

    ``executor`` runs blocking store calls and body hashing; ``send_executor`` runs socket sends, which
    block a thread for as long as the client takes to read (a pool of their own, so slow readers never
    starve the store calls); ``gather_budget`` bounds gather responses per request and per tenant."""

    config: ServerConfig
    store: Store
    spool: MultipartSpool
    pacer: Pacer
    metrics: ServerMetrics
    executor: ThreadPoolExecutor
    send_executor: ThreadPoolExecutor
    gather_budget: GatherBudget

    async def run(self, fn: Callable, *args):
        """``fn(*args)`` in the I/O thread pool (store calls are blocking; never call them on the loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


@dataclass
class RequestContext:
    """One authenticated S3 request: path-style ``bucket`` and ``key`` (percent-decoded, empty when absent),
    ``query`` (the routing parameters: presign parameters and botocore's ``x-id`` left out) and ``auth``
    (the verified signature and its credential)."""

    request: web.Request
    bucket: str
    key: str
    query: dict[str, str]
    auth: AuthResult
    services: Services

    @property
    def cred(self) -> Credential:
        return self.auth.credential

    async def run(self, fn: Callable, *args):
        return await self.services.run(fn, *args)

    async def read_body(self, max_bytes: int, sink: Callable[[bytes], None] | None = None) -> ReceivedBody:
        """The request body decoded and verified (``testbed.objectstore.body.read_body``), at most
        ``max_bytes`` decoded bytes; with ``sink`` the bytes go there (from a pool thread) instead of into
        ``ReceivedBody.data``.  Counted in ``objectcache_bytes_received_total`` under this operation."""
        body = await read_body(self.request, self.auth, max_bytes, self.services.executor, sink)
        self.services.metrics.add_bytes_received(self.request["op"], body.size_bytes)
        return body

    def sink(self, resp: web.StreamResponse) -> SocketSink | WriterSink:
        """Where a prepared response's payload goes: the socket itself (``sendfile``, sends in the send pool)
        when the transport allows it, else the response's buffered writer."""
        transport = self.request.transport
        if SocketSink.usable(transport):
            return SocketSink(transport, self.services.send_executor)
        return WriterSink(resp.write)


def xml_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/xml", headers=headers)
