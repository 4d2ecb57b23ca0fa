"""The object-tier client: put chunks, check existence, load a cached prefix layer by layer.

``ObjectCacheClient`` talks S3 to any S3-compatible service and uses ObjectCache's *gather* extension when the
endpoint has it.  ``load_layers`` reads a prefix by one of three paths: **gather** (one signed
``POST /<bucket>?gather`` streaming framed layers, ObjectCache's server; ``testbed.client.gather_path``),
**ranged** (ranged GETs per chunk header and per (chunk, layer) slice: plain S3 such as Ceph RGW, MinIO,
AWS) or **whole** (one streamed GET per chunk object; both in ``testbed.client.fallback_paths``).

All three return the same bytes: ``load_layers`` yields ``(layer, memoryview)`` pairs in layer order, each as
soon as that layer is complete and verified; the view holds ``n_chunks * slice_bytes`` bytes, chunk ``i``'s
slice at ``[i * slice_bytes, (i + 1) * slice_bytes)``.

``mode="auto"`` tries gather once per endpoint; if the service answers that it does not know the request (RGW
answers ``501 NotImplemented``), the process remembers that for the endpoint (``GATHER_SUPPORT``) and uses
``fallback_mode``.

Requests are signed with botocore's SigV4 signer; the data path uses ``http.client`` connections of its own
(``testbed.client.signed``: ``readinto`` into caller memory, no intermediate copies), the control path (PUT,
HEAD, bucket) uses boto3 (``make_boto3_client``).  Errors are ``testbed.wire.errors`` classes whose messages
name the object and layer.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from testbed.client.fallback_paths import FallbackReader
from testbed.client.gather_path import GatherReader
from testbed.client.signed import SignedHTTP, error_from_response, object_path
from testbed.wire.errors import GatherUnsupported, ObjectCacheError, StorageUnavailable, from_s3_error

MODES = ("auto", "gather", "ranged", "whole")


class GatherSupport:
    """What the process has learned about which endpoints speak gather (thread-safe).  Probing costs a round
    trip, so every client in the process shares one (``GATHER_SUPPORT``)."""

    def __init__(self) -> None:
        self._by_endpoint: dict[str, bool] = {}
        self._lock = threading.Lock()

    def get(self, endpoint_url: str) -> bool | None:
        """True / False once learned, None while unknown."""
        with self._lock:
            return self._by_endpoint.get(endpoint_url.rstrip("/"))

    def learn(self, endpoint_url: str, supported: bool) -> None:
        with self._lock:
            self._by_endpoint[endpoint_url.rstrip("/")] = supported

    def forget(self, endpoint_url: str | None = None) -> None:
        """Drop what was learned (of one endpoint, or of all)."""
        with self._lock:
            if endpoint_url is None:
                self._by_endpoint.clear()
            else:
                self._by_endpoint.pop(endpoint_url.rstrip("/"), None)


GATHER_SUPPORT = GatherSupport()
# Which endpoints verify a chunk PUT's body (``x-oc-verify: kvchunk``): False once one answered without
# ``x-oc-verified`` (plain S3), so later PUTs to it sign the payload's SHA-256 instead.
PUT_VERIFY = GatherSupport()
VERIFY_HEADER = "x-oc-verify"
VERIFY_KVCHUNK = "kvchunk"


def _parts(blob) -> list[memoryview]:
    """A PUT body as a list of byte views: one bytes-like object, or a sequence of them."""
    if isinstance(blob, bytes | bytearray | memoryview):
        return [memoryview(blob).cast("B")]
    return [memoryview(p).cast("B") for p in blob]


def forget_gather_support(endpoint_url: str | None = None) -> None:
    """Drop what the process learned about gather support (of one endpoint, or of all): call it after swapping
    the service behind a URL."""
    GATHER_SUPPORT.forget(endpoint_url)


def make_boto3_client(
    endpoint_url: str,
    access_key: str,
    secret_key: str,
    region: str,
    timeout_s: float,
    max_pool_connections: int,
    retries: int = 2,
):
    """A boto3 S3 client for any S3 service: path-style addressing, bounded timeouts and retries, and
    checksums only where S3 requires them (our own per-slice checksums cover the KV payload)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(
            max_pool_connections=max_pool_connections,
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": retries + 1, "mode": "standard"},
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


class ObjectCacheClient:
    """Client of the object tier (see the module docstring).

    ``max_concurrency`` bounds the concurrent requests of the fallback paths and of bulk PUT/HEAD;
    ``timeout_s`` bounds connecting and every single socket read or write (not a whole transfer).
    ``fallback_mode`` is what ``mode="auto"`` uses against a service without gather (``ranged``/``whole``).
    """

    accepts_parts = True  # put_chunk / put_chunks take an object as a sequence of parts (encode_chunk_parts)

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        mode: str = "auto",
        max_concurrency: int = 16,
        timeout_s: float = 30.0,
        fallback_mode: str = "ranged",
        retries: int = 2,
        put_streams: int = 8,
        fast_put: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if fallback_mode not in ("ranged", "whole"):
            raise ValueError(f"fallback_mode must be 'ranged' or 'whole', got {fallback_mode!r}")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        # What another process needs to build an equivalent client (the engine's reader process).
        self.init_kwargs = dict(
            endpoint_url=endpoint_url,
            bucket=bucket,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            mode=mode,
            max_concurrency=max_concurrency,
            timeout_s=timeout_s,
            fallback_mode=fallback_mode,
            retries=retries,
            put_streams=put_streams,
            fast_put=fast_put,
        )
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.mode = mode
        self.fallback_mode = fallback_mode
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.put_streams = max(1, min(put_streams, max_concurrency))
        self.fast_put = fast_put
        self.last_path: str | None = None  # path the last load_layers used: gather | ranged | whole
        self._http = SignedHTTP(
            self.endpoint_url, access_key, secret_key, region, timeout_s, max_concurrency + 2, retries
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="oc-client")
        self._s3 = make_boto3_client(
            self.endpoint_url, access_key, secret_key, region, timeout_s, max_concurrency + 2, retries
        )
        self._gather_reader = GatherReader(
            self._http, self._pool, bucket, self.endpoint_url, timeout_s, self.report_corrupt
        )
        self._fallback_reader = FallbackReader(self._http, self._pool, bucket, max_concurrency, self._map)

    # --- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
        self._s3.close()

    def __enter__(self) -> ObjectCacheClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- control path (boto3) -----------------------------------------------------------------------------
    def _s3_call(self, what: str, fn, key: str | None = None, **kwargs):
        try:
            return fn(**kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.get("Code") or str(status)
            raise from_s3_error(code, f"{what}: {err.get('Message') or code} (HTTP {status})", key=key) from e
        except (BotoCoreError, OSError) as e:
            raise StorageUnavailable(f"{what}: {self.endpoint_url} unreachable: {e}", key=key) from e

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise from_s3_error(str(e.response.get("Error", {}).get("Code")), str(e)) from e
        except (BotoCoreError, OSError) as e:
            raise StorageUnavailable(f"head bucket {self.bucket!r}: {e}") from e
        try:
            self._s3.create_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise from_s3_error(str(e.response["Error"].get("Code")), str(e)) from e

    def put_chunk(self, name: str, blob: bytes | memoryview | Sequence) -> bool:
        """Write one chunk object unless it exists (``If-None-Match: *``); False if it already existed.

        ``blob``: the object's bytes, or its parts to send back to back (``encode_chunk_parts``: the header,
        then the layer buffers, sent without joining them).  Against ObjectCache's server the body goes
        signed ``UNSIGNED-PAYLOAD`` with the signed header ``x-oc-verify: kvchunk``: the server checks the
        chunk header and every slice's xxh3 while it writes, before the atomic commit, instead of a SHA-256
        computed by both sides.  An endpoint that does not confirm that check (plain S3: no
        ``x-oc-verified`` in its answer) is remembered, and later PUTs to it go through boto3 with the
        payload's SHA-256 signed."""
        parts = _parts(blob)
        if (
            self.fast_put
            and PUT_VERIFY.get(self.endpoint_url) is not False
            and GATHER_SUPPORT.get(self.endpoint_url) is not False  # known plain S3: hash the payload
        ):
            return self._put_verified(name, parts)
        return self._put_boto3(name, parts)

    def _put_verified(self, name: str, parts: list[memoryview]) -> bool:
        status, body, verified = self._http.put_parts(
            object_path(self.bucket, name),
            {"If-None-Match": "*", VERIFY_HEADER: VERIFY_KVCHUNK, "Content-Type": "application/octet-stream"},
            parts,
            key=name,
        )
        if status == 200:
            PUT_VERIFY.learn(self.endpoint_url, verified)
            return True
        if status in (409, 412):  # it exists, or a concurrent conditional write of it won (same bytes)
            return False
        raise error_from_response(status, body, name)

    def _put_boto3(self, name: str, parts: list[memoryview]) -> bool:
        blob = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        try:
            self._s3.put_object(Bucket=self.bucket, Key=name, Body=blob, IfNoneMatch="*")
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: it exists.  409: a concurrent conditional write of the same key won; same bytes either way
            # (content-addressed), so it exists too.
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise from_s3_error(str(code), f"put {name!r}: {e}", key=name) from e
        except (BotoCoreError, OSError) as e:
            raise StorageUnavailable(f"put {name!r}: {self.endpoint_url} unreachable: {e}", key=name) from e

    def put_chunks(self, items: Sequence[tuple[str, bytes | memoryview | Sequence]]) -> int:
        """Write the chunks that do not exist yet over ``put_streams`` parallel PUT streams (pooled
        keep-alive connections); returns how many were written.  Items are as ``put_chunk``'s ``blob``."""
        items = list(items)
        present = self.exists([name for name, _ in items])
        todo = [(n, b) for (n, b), p in zip(items, present) if not p]
        if not todo:
            return 0
        lock, it = threading.Lock(), iter(todo)

        def stream() -> int:  # one PUT stream: the next object until none is left
            n = 0
            while True:
                with lock:
                    nb = next(it, None)
                if nb is None:
                    return n
                n += self.put_chunk(*nb)

        return sum(self._map(lambda _: stream(), list(range(min(self.put_streams, len(todo))))))

    def exists(self, names: Sequence[str]) -> list[bool]:
        """Existence of each object (parallel HEADs)."""

        def head(name: str) -> bool:
            try:
                self._s3.head_object(Bucket=self.bucket, Key=name)
                return True
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    return False
                code = str(e.response.get("Error", {}).get("Code") or status)
                # A HEAD reply has no body: botocore's "code" is then the status number.
                code = {"403": "AccessDenied", "503": "ServiceUnavailable"}.get(code, code)
                raise from_s3_error(code, str(e), key=name) from e
            except (BotoCoreError, OSError) as e:
                raise StorageUnavailable(f"head {name!r}: {e}", key=name) from e

        return self._map(head, list(names))

    def delete_chunks(self, names: Sequence[str]) -> None:
        """Delete objects (missing ones are fine); used by benchmarks and tests to clean up."""
        self._map(
            lambda n: self._s3_call(f"delete {n!r}", self._s3.delete_object, Bucket=self.bucket, Key=n), names
        )

    def _map(self, fn, items: list) -> list:
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def report_corrupt(self, name: str) -> bool:
        """Tell a gather server that ``name`` failed its checksum here (``POST /<bucket>/<key>?quarantine``);
        the server re-verifies the stored bytes and quarantines the object if they are bad, so later
        lookups miss.  Best effort: True if the server quarantined it, False otherwise (never raises)."""
        try:
            conn, resp = self._http.open("POST", object_path(self.bucket, name) + "?quarantine", {}, key=name)
            body = resp.read()
            self._http.finish(conn, resp)
            return resp.status == 200 and b"<Quarantined>true</Quarantined>" in body
        except (ObjectCacheError, OSError, http.client.HTTPException):
            return False

    # --- layer loading ------------------------------------------------------------------------------------
    def load_layers(
        self,
        names: Sequence[str],
        *,
        layer_start: int = 0,
        layer_end: int | None = None,
        out: Sequence | None = None,
        compute_per_layer_s: float | None = None,
        timings: dict | None = None,
        pace_group: str | None = None,
    ) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(layer, payload)`` for ``layer_start <= layer < layer_end`` in order (see module doc).

        ``out``: optional writable buffers, ``out[i]`` for layer ``layer_start + i``, each at least
        ``len(names) * slice_bytes`` bytes; the payloads are read into them directly.  A buffer may repeat
        in ``out`` (a ring of pinned buffers) on the gather and ranged paths: the client then writes a buffer
        only after the consumer has asked for the layer after the one it last held.
        ``timings``: optional dict the gather path fills with ``time.monotonic()`` stamps: ``sent_s`` (the
        request is about to be sent), ``response_s`` (status and headers are in: the server has checked every
        object, or for an early stream the first few), ``first_byte_s`` (the first layer frame's head is in:
        its payload follows) and ``first_layer_s`` (layer ``layer_start`` is received and verified).
        ``pace_group``: the gather streams of one request share this id (1-128 printable ASCII characters,
        unique per request), so a paced server gives them one flow's rate (``testbed.objectstore.pacer``);
        the fallback paths ignore it.
        """
        names = list(names)
        if not names:
            raise ValueError("load_layers needs at least one chunk name")
        if layer_start < 0 or (layer_end is not None and layer_end < layer_start):
            raise ValueError(f"bad layer range [{layer_start}, {layer_end})")
        if layer_end == layer_start:
            return
        mode = self.mode
        if mode == "auto":
            mode = self.fallback_mode if GATHER_SUPPORT.get(self.endpoint_url) is False else "gather"
        if mode == "gather":
            try:
                stream = self._gather_reader.layers(
                    names, layer_start, layer_end, out, compute_per_layer_s, timings, pace_group
                )
                first = next(stream)  # the request is sent and answered before the first yield
            except GatherUnsupported:
                if self.mode == "gather":
                    raise
                GATHER_SUPPORT.learn(self.endpoint_url, False)
                mode = self.fallback_mode
            else:
                if self.mode == "auto":
                    GATHER_SUPPORT.learn(self.endpoint_url, True)
                self.last_path = "gather"
                yield first
                yield from stream
                return
        self.last_path = mode
        if mode == "ranged":
            yield from self._fallback_reader.ranged(names, layer_start, layer_end, out)
        else:
            yield from self._fallback_reader.whole(names, layer_start, layer_end, out)

    async def aload_layers(self, names: Sequence[str], **kwargs) -> AsyncIterator[tuple[int, memoryview]]:
        """``load_layers`` as an async iterator: the blocking reads run in a worker thread."""
        it = self.load_layers(names, **kwargs)
        sentinel = object()
        try:
            while True:
                item = await asyncio.to_thread(next, it, sentinel)
                if item is sentinel:
                    return
                yield item
        finally:
            await asyncio.to_thread(it.close)
