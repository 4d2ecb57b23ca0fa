"""``S3ProxyStore``: the ObjectCache server in front of any S3 service (Ceph RGW in the tests).

The server keeps no objects itself; every ``Store`` call becomes S3 requests to the backend, and gather reads
the layer slices from the backend with ranged GETs.  Deployed next to the storage (same host or rack), the
server turns the many small per-(chunk, layer) ranged reads into local traffic and sends one layer-major
stream over the long link to the GPU node.

Bucket ``b`` of the server is bucket ``<bucket_prefix>b`` of the backend.  Control operations use boto3; the
read path uses ``testbed.client.signed.SignedHTTP`` (SigV4, keep-alive, ``readinto`` into the server's buffers).

Readahead.  The server's gather reads, for layer ``l``, the slice of chunk 0, then of chunk 1, ... one after
another; against a remote backend each read is a round trip.  The handles therefore prefetch: reading a KV
chunk header schedules the first ``readahead_slices`` layer slices of that chunk, and reading any range
schedules the next ``readahead_slices`` ranges of the same size (the next layers).  Prefetches run on a
store-wide pool of ``max_concurrency`` threads, so the slices of all chunks are fetched in parallel and a
layer's reads are mostly memory copies.  A prefetched range is used once and dropped.

Start the server with it::

    objectcache-server --store s3proxy --store-option endpoint_url=http://127.0.0.1:7480 \\
        --store-option access_key=... --store-option secret_key=... [--store-option bucket_prefix=oc-]
"""

from __future__ import annotations

import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from botocore.exceptions import BotoCoreError, ClientError

from testbed.client.core import make_boto3_client
from testbed.client.signed import SignedHTTP
from testbed.objectstore.storeapi import BucketInfo, ListPage, ObjectHandle, ObjectInfo, ObjectWriter, Store
from testbed.wire import kvformat
from testbed.wire.errors import (
    BucketMissing,
    BucketNotEmpty,
    ChunkMissing,
    ObjectCacheError,
    PreconditionFailed,
    StorageUnavailable,
    from_s3_error,
)

_SPOOL_MEMORY_BYTES = 64 << 20  # uploads bigger than this spill to a temp file before the PUT
# boto3's put_object parameter of each stored header (``storeapi.STORED_HEADERS``).
_PUT_PARAM = {
    "Cache-Control": "CacheControl",
    "Content-Disposition": "ContentDisposition",
    "Content-Encoding": "ContentEncoding",
    "Content-Language": "ContentLanguage",
}


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or _status(e))


class S3ProxyStore(Store):
    """A ``Store`` whose objects live in an S3 service (see the module docstring).

    Options arrive as strings from ``--store-option K=V``; numbers are converted here.
    """

    def __init__(
        self,
        endpoint_url: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        bucket_prefix: str = "",
        max_concurrency: int | str = 32,
        timeout_s: float | str = 30.0,
        readahead_slices: int | str = 4,
    ) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket_prefix = bucket_prefix
        self.max_concurrency = int(max_concurrency)
        self.readahead_slices = int(readahead_slices)
        self._http = SignedHTTP(
            self.endpoint_url, access_key, secret_key, region, float(timeout_s), self.max_concurrency * 2
        )
        # Three attempts in all, as before: retries=2.
        self._s3 = make_boto3_client(
            self.endpoint_url, access_key, secret_key, region, float(timeout_s), self.max_concurrency, 2
        )
        self._prefetch = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3proxy-prefetch")

    def close(self) -> None:
        self._prefetch.shutdown(wait=True, cancel_futures=True)
        self._http.close()
        self._s3.close()

    # --- helpers -------------------------------------------------------------------------------------------
    def backend_bucket(self, bucket: str) -> str:
        return self.bucket_prefix + bucket

    def _call(self, what: str, fn, *, bucket: str | None = None, key: str | None = None, **kwargs):
        try:
            return fn(**kwargs)
        except ClientError as e:
            code, status = _code(e), _status(e)
            if code == "NoSuchBucket" or (status == 404 and key is None):
                raise BucketMissing(f"bucket {bucket!r} does not exist") from e
            if status == 404:
                raise ChunkMissing(f"object {key!r} does not exist", key=key) from e
            if status == 412 or code == "PreconditionFailed":
                raise PreconditionFailed(f"object {key!r} already exists (If-None-Match: *)", key=key) from e
            if code == "BucketNotEmpty":
                raise BucketNotEmpty(f"bucket {bucket!r} is not empty") from e
            raise from_s3_error(code, f"{what} on {self.endpoint_url}: {e}", key=key) from e
        except (BotoCoreError, OSError) as e:
            raise StorageUnavailable(f"{what}: backend {self.endpoint_url} unreachable: {e}", key=key) from e

    # --- buckets -------------------------------------------------------------------------------------------
    def create_bucket(self, bucket: str) -> bool:
        # Some services (RGW, AWS us-east-1) answer 200 to re-creating one's own bucket: ask first.
        if self.bucket_exists(bucket):
            return False
        try:
            self._call(
                "create bucket", self._s3.create_bucket, bucket=bucket, Bucket=self.backend_bucket(bucket)
            )
            return True
        except ObjectCacheError as e:
            if "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e):
                return False
            raise

    def bucket_exists(self, bucket: str) -> bool:
        try:
            self._call("head bucket", self._s3.head_bucket, bucket=bucket, Bucket=self.backend_bucket(bucket))
            return True
        except BucketMissing:
            return False

    def list_buckets(self) -> list[BucketInfo]:
        resp = self._call("list buckets", self._s3.list_buckets)
        p = self.bucket_prefix
        return [
            BucketInfo(b["Name"][len(p) :], b["CreationDate"].timestamp())
            for b in sorted(resp.get("Buckets", []), key=lambda b: b["Name"])
            if b["Name"].startswith(p)
        ]

    def delete_bucket(self, bucket: str) -> None:
        self._call("delete bucket", self._s3.delete_bucket, bucket=bucket, Bucket=self.backend_bucket(bucket))

    # --- objects -------------------------------------------------------------------------------------------
    def head_object(self, bucket: str, key: str) -> ObjectInfo:
        r = self._call(
            "head object",
            self._s3.head_object,
            bucket=bucket,
            key=key,
            Bucket=self.backend_bucket(bucket),
            Key=key,
        )
        return ObjectInfo(
            key=key,
            size_bytes=int(r["ContentLength"]),
            etag=str(r.get("ETag", "")).strip('"'),
            last_modified_s=r["LastModified"].timestamp() if r.get("LastModified") else 0.0,
            content_type=r.get("ContentType") or "application/octet-stream",
            metadata=dict(r.get("Metadata") or {}),
        )

    def open_object(self, bucket: str, key: str) -> ObjectHandle:
        return _ProxyHandle(self, bucket, key, self.head_object(bucket, key))

    def begin_write(
        self,
        bucket: str,
        key: str,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        content_md5: bool = True,
    ) -> ObjectWriter:
        # content_md5 does not apply: the backend computes the ETag of what it stores.
        if not self.bucket_exists(bucket):
            raise BucketMissing(f"bucket {bucket!r} does not exist")
        return _ProxyWriter(self, bucket, key, content_type, dict(metadata or {}), dict(headers or {}))

    def delete_object(self, bucket: str, key: str) -> None:
        self._call(
            "delete object",
            self._s3.delete_object,
            bucket=bucket,
            key=key,
            Bucket=self.backend_bucket(bucket),
            Key=key,
        )

    def list_objects(
        self, bucket: str, prefix: str = "", start_after: str = "", max_keys: int = 1000
    ) -> ListPage:
        kwargs = {"Bucket": self.backend_bucket(bucket), "Prefix": prefix, "MaxKeys": max_keys}
        if start_after:
            kwargs["StartAfter"] = start_after
        r = self._call("list objects", self._s3.list_objects_v2, bucket=bucket, **kwargs)
        objects = [
            ObjectInfo(
                key=o["Key"],
                size_bytes=int(o["Size"]),
                etag=str(o.get("ETag", "")).strip('"'),
                last_modified_s=o["LastModified"].timestamp(),
            )
            for o in r.get("Contents", [])
        ]
        return ListPage(objects, bool(r.get("IsTruncated")))

    # --- ranged reads (used by handles) ------------------------------------------------------------------------
    def read_range_into(self, bucket: str, key: str, offset: int, view: memoryview) -> None:
        self._http.get_range_into(self.backend_bucket(bucket), key, offset, view, "s3proxy read")


class _ProxyHandle(ObjectHandle):
    """Random-access reads of one backend object, with readahead of the next ranges (module docstring)."""

    def __init__(self, store: S3ProxyStore, bucket: str, key: str, info: ObjectInfo) -> None:
        self._store = store
        self._bucket = bucket
        self._key = key
        self.info = info
        self._lock = threading.Lock()
        self._ahead: dict[tuple[int, int], Future] = {}  # (offset, length) -> future of a bytearray

    def _fetch(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self._store.read_range_into(self._bucket, self._key, offset, memoryview(buf))
        return buf

    def _schedule(self, offset: int, length: int, count: int) -> None:
        with self._lock:
            for i in range(count):
                start = offset + i * length
                if start + length > self.info.size_bytes:
                    break
                if (start, length) not in self._ahead:
                    self._ahead[(start, length)] = self._store._prefetch.submit(self._fetch, start, length)

    def read_into(self, offset: int, buf: memoryview) -> int:
        view = memoryview(buf).cast("B")
        want = min(len(view), max(0, self.info.size_bytes - offset))
        if want <= 0:
            return 0
        with self._lock:
            fut = self._ahead.pop((offset, want), None)
        if fut is not None:
            try:
                view[:want] = fut.result()
            except ObjectCacheError:
                self._store.read_range_into(self._bucket, self._key, offset, view[:want])
        else:
            self._store.read_range_into(self._bucket, self._key, offset, view[:want])
        n = self._store.readahead_slices
        if n > 0:
            if offset == 0 and bytes(view[:4]) == kvformat.MAGIC and want >= 56:
                # A chunk header: prefetch the first layers, the reads gather is about to make.
                try:
                    header = kvformat.parse_header(view[:want])
                    self._schedule(header.header_bytes, header.slice_bytes, n)
                except ObjectCacheError:
                    pass
            else:
                self._schedule(offset + want, want, n)
        return want

    def close(self) -> None:
        with self._lock:
            pending, self._ahead = list(self._ahead.values()), {}
        for f in pending:
            f.cancel()


class _ProxyWriter(ObjectWriter):
    """Spools the upload (memory, then a temp file) and PUTs it on commit (atomic on any S3 service)."""

    def __init__(
        self, store: S3ProxyStore, bucket: str, key: str, content_type: str, metadata: dict, headers: dict
    ) -> None:
        self._store = store
        self._headers = headers
        self._bucket = bucket
        self._key = key
        self._content_type = content_type
        self._metadata = metadata
        self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY_BYTES)  # noqa: SIM115 - closed on commit/abort
        self._size = 0
        self.etag: str | None = None

    def write(self, data: bytes | memoryview) -> None:
        self._size += self._spool.write(data)

    def commit(
        self, if_none_match: bool = False, etag: str | None = None, checksums: dict[str, str] | None = None
    ) -> ObjectInfo:
        """PUT the spooled bytes; the backend computes the ETag and stores the headers (``etag`` and
        ``checksums`` are the backend's business: it answers its own)."""
        self._spool.seek(0)
        kwargs = dict(
            Bucket=self._store.backend_bucket(self._bucket),
            Key=self._key,
            Body=self._spool,
            ContentLength=self._size,
            ContentType=self._content_type,
            Metadata=self._metadata,
            **{_PUT_PARAM[h]: v for h, v in self._headers.items() if h in _PUT_PARAM},
        )
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        try:
            self._store._call(
                "put object", self._store._s3.put_object, bucket=self._bucket, key=self._key, **kwargs
            )
        finally:
            self._spool.close()
        return self._store.head_object(self._bucket, self._key)

    def abort(self) -> None:
        self._spool.close()
