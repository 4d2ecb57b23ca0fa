"""The ``Store`` interface: what an object store behind the ObjectCache server implements.

Implement it to put the server in front of another backend.  All methods are *blocking* and must be thread-safe: the server calls them from a
thread pool, never on its event loop.  Errors are ``testbed.wire.errors`` classes: ``BucketMissing``,
``ChunkMissing`` (object missing), ``PreconditionFailed`` (conditional write lost), ``StorageUnavailable``.

    create_bucket(bucket) -> bool                    True if created, False if it already existed
    bucket_exists(bucket) -> bool
    list_buckets() -> list[BucketInfo]
    delete_bucket(bucket) -> None                    raises BucketNotEmpty
    head_object(bucket, key) -> ObjectInfo
    open_object(bucket, key) -> ObjectHandle         random-access reads (ranged GET, gather)
        handle.info: ObjectInfo
        handle.read_into(offset, buf) -> int          fill the writable buffer from object byte ``offset``
        handle.fileno() -> int | None                 a file descriptor whose byte i is object byte i, or None
        handle.close()                                (handles are context managers)
    begin_write(bucket, key, content_type=..., metadata=..., headers=...) -> ObjectWriter   streaming upload
        writer.write(data) ; writer.commit(if_none_match=False, etag=None, checksums=None) -> ObjectInfo
        writer.abort()
        commit is atomic: readers see the old object or the whole new one, never a torn one; with
        ``if_none_match`` it raises PreconditionFailed if the key exists (and never overwrites it).
        ``headers`` are the stored HTTP headers (``STORED_HEADERS``: Content-Encoding, Cache-Control, ...)
        and ``checksums`` the verified ``x-amz-checksum-*`` values (algorithm -> base64), both returned in
        ``ObjectInfo``.
    delete_object(bucket, key) -> None               deleting a missing key is not an error (S3 semantics)
    list_objects(bucket, prefix="", start_after="", max_keys=1000) -> ListPage   keys in UTF-8 byte order

The ETag is S3's: the hex MD5 of the object bytes, computed by the writer as the bytes stream in, or
``<MD5 of the parts' binary MD5s>-<n>`` for multipart objects (the server passes it as
``commit(etag=...)``, ``testbed.objectstore.spool.multipart_etag``).  A verified KV chunk PUT gets the
composite ``<MD5 of its header>-<slices>`` (``body.chunk_etag``): ``begin_write(content_md5=False)`` spares
the writer the MD5 and ``commit(etag=...)`` names it.  Clients (rclone, s3cmd, awscli)
compare a single-part ETag with the MD5 of what they sent.

Implementations: ``testbed.objectstore.store.FilesystemStore`` (the embedded default) and
``testbed.objectstore.s3proxy.S3ProxyStore``.  ``validate_bucket_name`` / ``validate_key`` are S3's naming
rules, checked by the server before any store call.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from testbed.wire.errors import ChunkMissing, CorruptObject, InvalidBucketName, InvalidRequest, KeyTooLong

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")
MAX_KEY_BYTES = 1024

# The HTTP headers of a PUT that S3 stores with the object and returns on GET / HEAD (besides Content-Type).
STORED_HEADERS = ("Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language", "Expires")


def validate_bucket_name(bucket: str) -> str:
    """S3's bucket naming rules (general purpose buckets): 3-63 characters of lowercase letters, digits,
    dots and hyphens, starting and ending with a letter or digit, no ``..``, ``.-`` or ``-.``, not shaped
    like an IPv4 address, no ``xn--`` or ``sthree-`` prefix, no ``-s3alias`` / ``--ol-s3`` suffix.  Raises
    ``InvalidBucketName`` (400)."""
    name = bucket or ""
    if (
        not _BUCKET_RE.match(name)
        or ".." in name
        or ".-" in name
        or "-." in name
        or _IPV4_RE.match(name)
        or name.startswith(("xn--", "sthree-"))
        or name.endswith(("-s3alias", "--ol-s3"))
    ):
        raise InvalidBucketName(f"invalid bucket name {bucket!r}")
    return bucket


def validate_key(key: str) -> str:
    raw = key.encode("utf-8", "surrogatepass")
    if not key or len(raw) > MAX_KEY_BYTES:
        raise KeyTooLong(f"object key must be 1..{MAX_KEY_BYTES} bytes", key=key[:80])
    if "\x00" in key:
        raise InvalidRequest("object key contains NUL", key=key[:80])
    return key


@dataclass
class BucketInfo:
    name: str
    created_s: float


@dataclass
class ObjectInfo:
    key: str
    size_bytes: int
    etag: str
    last_modified_s: float
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # STORED_HEADERS that the upload set
    checksums: dict[str, str] = field(default_factory=dict)  # algorithm ("crc32", ...) -> base64 value


@dataclass
class ListPage:
    objects: list[ObjectInfo]
    is_truncated: bool


class ObjectHandle(ABC):
    info: ObjectInfo

    @abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> int: ...

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> ObjectHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ObjectWriter(ABC):
    @abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    @abstractmethod
    def commit(
        self, if_none_match: bool = False, etag: str | None = None, checksums: dict[str, str] | None = None
    ) -> ObjectInfo: ...

    @abstractmethod
    def abort(self) -> None: ...


class Store(ABC):
    """See the module docstring for the contract of each method."""

    @abstractmethod
    def create_bucket(self, bucket: str) -> bool: ...

    @abstractmethod
    def bucket_exists(self, bucket: str) -> bool: ...

    @abstractmethod
    def list_buckets(self) -> list[BucketInfo]: ...

    @abstractmethod
    def delete_bucket(self, bucket: str) -> None: ...

    @abstractmethod
    def head_object(self, bucket: str, key: str) -> ObjectInfo: ...

    @abstractmethod
    def open_object(self, bucket: str, key: str) -> ObjectHandle: ...

    @abstractmethod
    def begin_write(
        self,
        bucket: str,
        key: str,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        content_md5: bool = True,
    ) -> ObjectWriter: ...

    @abstractmethod
    def delete_object(self, bucket: str, key: str) -> None: ...

    @abstractmethod
    def list_objects(
        self, bucket: str, prefix: str = "", start_after: str = "", max_keys: int = 1000
    ) -> ListPage: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def quarantine(self, bucket: str, key: str, reason: str) -> bool:
        """Stop serving a corrupt object (later lookups miss); True if it was there.  Stores that can keep
        it aside for inspection do (the filesystem store); the default deletes it."""
        try:
            self.head_object(bucket, key)
        except ChunkMissing:
            return False
        except CorruptObject:
            pass
        self.delete_object(bucket, key)
        return True
