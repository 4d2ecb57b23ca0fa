"""Object stores behind the ObjectCache server: the ``Store`` interface and the filesystem store.

The interface (implement it to put the server in front of another backend; ``testbed/objectstore/s3proxy.py`` keeps the
objects in any S3 service).  All methods are *blocking* and must be thread-safe: the server calls them from a
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
    begin_write(bucket, key, content_type=..., metadata=...) -> ObjectWriter   streaming upload
        writer.write(data) ; writer.commit(if_none_match=False, etag=None) -> ObjectInfo ; writer.abort()
        commit is atomic: readers see the old object or the whole new one, never a torn one; with
        ``if_none_match`` it raises PreconditionFailed if the key exists (and never overwrites it).
    delete_object(bucket, key) -> None               deleting a missing key is not an error (S3 semantics)
    list_objects(bucket, prefix="", start_after="", max_keys=1000) -> ListPage   keys in UTF-8 byte order

The ETag is the hex xxh3_128 of the object bytes (32 hex digits, like an MD5 ETag), or
``<xxh3_128 of the part ETags>-<n>`` for multipart objects (the server passes it as ``commit(etag=...)``): S3 clients treat ETags as opaque, and xxh3 is
~20x cheaper than MD5 on the upload path.

``FilesystemStore`` (the embedded default) keeps one file per object under ``<root>/buckets/<bucket>/obj/``
(the file name is the percent-encoded key) and writes by temp file + fsync + rename (``os.link`` for
conditional writes, which fails atomically if the name exists), so it survives a crash or restart.  Each file
is the object bytes followed by a small trailer (JSON metadata, its length, a magic), so object byte ``i`` is
file byte ``i``: ranged GETs and gather use ``sendfile``/``preadv`` on the file directly.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import xxhash

from testbed.wire.errors import (
    BucketMissing,
    BucketNotEmpty,
    ChunkMissing,
    CorruptObject,
    InvalidRequest,
    KeyTooLong,
    NoSuchUpload,
    PreconditionFailed,
)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MAX_KEY_BYTES = 1024


def validate_bucket_name(bucket: str) -> str:
    if not _BUCKET_RE.match(bucket or "") or ".." in bucket:
        raise InvalidRequest(f"invalid bucket name {bucket!r}")
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
    def commit(self, if_none_match: bool = False, etag: str | None = None) -> ObjectInfo: ...

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


# --- filesystem store -------------------------------------------------------------------------------------

_TRAILER_MAGIC = b"OCMETA01"
_TRAILER_TAIL = struct.Struct("<Q8s")  # json length, magic
_TAIL_READ_BYTES = 4096


def _file_name(key: str) -> str:
    name = quote(key, safe="")
    if name.startswith("."):  # "." and ".." must not name the directory itself or its parent
        name = "%2E" + name[1:]
    if len(name) > 250:
        raise KeyTooLong(
            "object key too long for the filesystem store (percent-encoded > 250 bytes)", key=key[:80]
        )
    return name


def _read_trailer(fd: int, file_size: int, key: str) -> tuple[int, dict]:
    """(object size, metadata dict) from the trailer at the end of an object file."""
    n = min(file_size, _TAIL_READ_BYTES)
    tail = os.pread(fd, n, file_size - n)
    if n < _TRAILER_TAIL.size:
        raise CorruptObject(f"object file of {key!r} has no trailer", key=key)
    json_len, magic = _TRAILER_TAIL.unpack_from(tail, n - _TRAILER_TAIL.size)
    if magic != _TRAILER_MAGIC or json_len + _TRAILER_TAIL.size > file_size:
        raise CorruptObject(f"object file of {key!r} has a bad trailer (truncated or overwritten)", key=key)
    start = n - _TRAILER_TAIL.size - json_len
    raw = (
        tail[start : n - _TRAILER_TAIL.size]
        if start >= 0
        else os.pread(fd, json_len, file_size - _TRAILER_TAIL.size - json_len)
    )
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CorruptObject(f"object file of {key!r} has unreadable metadata", key=key) from None
    return file_size - _TRAILER_TAIL.size - json_len, meta


def _info_from(key: str, size: int, meta: dict, mtime_s: float) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size_bytes=size,
        etag=meta.get("etag", ""),
        last_modified_s=meta.get("mtime_s", mtime_s),
        content_type=meta.get("content_type", "application/octet-stream"),
        metadata=dict(meta.get("metadata", {})),
    )


class _FileHandle(ObjectHandle):
    def __init__(self, fd: int, info: ObjectInfo) -> None:
        self._fd = fd
        self.info = info

    def read_into(self, offset: int, buf: memoryview) -> int:
        want = min(len(buf), max(0, self.info.size_bytes - offset))
        got = 0
        while got < want:
            n = os.preadv(self._fd, [buf[got:want]], offset + got)
            if n <= 0:
                break
            got += n
        return got

    def fileno(self) -> int | None:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _FileWriter(ObjectWriter):
    def __init__(
        self, store: FilesystemStore, bucket: str, key: str, content_type: str, metadata: dict
    ) -> None:
        self._store = store
        self._bucket = bucket
        self._key = key
        self._final = store._obj_dir(bucket) / _file_name(key)
        self._tmp = store._bucket_dir(bucket) / "tmp" / f"{uuid.uuid4().hex}.part"
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._hash = xxhash.xxh3_128()
        self._size = 0
        self._meta = {"content_type": content_type, "metadata": dict(metadata or {})}

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._hash.update(view)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._size += n

    def commit(self, if_none_match: bool = False, etag: str | None = None) -> ObjectInfo:
        meta = dict(self._meta, etag=etag or self._hash.hexdigest(), mtime_s=time.time())
        raw = json.dumps(meta, separators=(",", ":")).encode()
        os.write(self._fd, raw + _TRAILER_TAIL.pack(len(raw), _TRAILER_MAGIC))
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        try:
            if if_none_match:
                try:
                    os.link(self._tmp, self._final)  # atomic create-if-absent
                except FileExistsError:
                    raise PreconditionFailed(
                        f"object {self._key!r} already exists (If-None-Match: *)", key=self._key
                    ) from None
                os.unlink(self._tmp)
            else:
                os.replace(self._tmp, self._final)
            self._store._fsync_dir(self._final.parent)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()
        return _info_from(self._key, self._size, meta, meta["mtime_s"])

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)


class FilesystemStore(Store):
    """Objects as files under ``root``; see the module docstring for the layout and guarantees."""

    def __init__(self, root: str | os.PathLike, fsync: bool = True) -> None:
        self.root = Path(root)
        self._root_s = str(self.root)
        (self.root / "buckets").mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.Lock()
        # Uncommitted temp files of writes cut short by a crash: never visible, but they hold disk space.
        for tmp in (self.root / "buckets").glob("*/tmp/*.part"):
            tmp.unlink(missing_ok=True)

    # layout
    def _bucket_dir(self, bucket: str) -> Path:
        return self.root / "buckets" / validate_bucket_name(bucket)

    def _obj_dir(self, bucket: str) -> Path:
        return self._bucket_dir(bucket) / "obj"

    def _require_bucket(self, bucket: str) -> Path:
        d = self._obj_dir(bucket)
        if not d.is_dir():
            raise BucketMissing(f"bucket {bucket!r} does not exist")
        return d

    def _fsync_dir(self, path: Path) -> None:
        if not self._fsync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # buckets
    def create_bucket(self, bucket: str) -> bool:
        d = self._bucket_dir(bucket)
        with self._lock:
            if (d / "obj").is_dir():
                return False
            (d / "tmp").mkdir(parents=True, exist_ok=True)
            (d / "obj").mkdir(exist_ok=True)
            self._fsync_dir(d.parent)
        return True

    def bucket_exists(self, bucket: str) -> bool:
        try:
            return self._obj_dir(bucket).is_dir()
        except InvalidRequest:
            return False

    def list_buckets(self) -> list[BucketInfo]:
        out = []
        for entry in sorted(os.scandir(self.root / "buckets"), key=lambda e: e.name):
            if (Path(entry.path) / "obj").is_dir():
                out.append(BucketInfo(entry.name, entry.stat().st_mtime))
        return out

    def delete_bucket(self, bucket: str) -> None:
        d = self._require_bucket(bucket)
        with self._lock:
            if any(os.scandir(d)):
                raise BucketNotEmpty(f"bucket {bucket!r} is not empty")
            for leftover in (self._bucket_dir(bucket) / "tmp").iterdir():
                leftover.unlink(missing_ok=True)
            (self._bucket_dir(bucket) / "tmp").rmdir()
            qdir = self._bucket_dir(bucket) / "quarantine"
            if qdir.is_dir():
                for leftover in qdir.iterdir():
                    leftover.unlink(missing_ok=True)
                qdir.rmdir()
            d.rmdir()
            self._bucket_dir(bucket).rmdir()

    # objects
    def open_object(self, bucket: str, key: str) -> ObjectHandle:
        # A string path and no bucket check on the hit path: a gather opens hundreds of objects one after
        # another and pathlib's joins were most of the per-object cost (56 -> 33 us, results/bench/gather_open*.json).
        path = os.path.join(
            self._root_s, "buckets", validate_bucket_name(bucket), "obj", _file_name(validate_key(key))
        )
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._require_bucket(bucket)  # BucketMissing if that is why
            raise ChunkMissing(f"object {key!r} does not exist", key=key) from None
        try:
            st = os.fstat(fd)
            size, meta = _read_trailer(fd, st.st_size, key)
            return _FileHandle(fd, _info_from(key, size, meta, st.st_mtime))
        except BaseException:
            os.close(fd)
            raise

    def head_object(self, bucket: str, key: str) -> ObjectInfo:
        with self.open_object(bucket, key) as h:
            return h.info

    def begin_write(
        self,
        bucket: str,
        key: str,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectWriter:
        self._require_bucket(bucket)
        validate_key(key)
        return _FileWriter(self, bucket, key, content_type, metadata or {})

    def quarantine(self, bucket: str, key: str, reason: str) -> bool:
        """Move a corrupt object's file to ``<bucket>/quarantine/`` (with a ``.reason`` note) so it is no
        longer served; True if it was there."""
        path = self._require_bucket(bucket) / _file_name(validate_key(key))
        qdir = self._bucket_dir(bucket) / "quarantine"
        qdir.mkdir(exist_ok=True)
        dest = qdir / f"{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return False
        dest.with_name(dest.name + ".reason").write_text(reason)
        self._fsync_dir(path.parent)
        return True

    def delete_object(self, bucket: str, key: str) -> None:
        path = self._require_bucket(bucket) / _file_name(validate_key(key))
        try:
            path.unlink()
        except FileNotFoundError:
            return
        self._fsync_dir(path.parent)

    def list_objects(
        self, bucket: str, prefix: str = "", start_after: str = "", max_keys: int = 1000
    ) -> ListPage:
        d = self._require_bucket(bucket)
        keys = []
        for entry in os.scandir(d):
            key = unquote(entry.name)
            if key.startswith(prefix) and key.encode() > start_after.encode():
                keys.append(key)
        keys.sort(key=lambda k: k.encode())
        page, truncated = keys[:max_keys], len(keys) > max_keys
        objects = []
        for key in page:
            try:
                objects.append(self.head_object(bucket, key))
            except ChunkMissing:  # deleted while listing
                continue
        return ListPage(objects, truncated)


# --- multipart uploads ------------------------------------------------------------------------------------


@dataclass
class UploadInfo:
    upload_id: str
    bucket: str
    key: str
    content_type: str
    metadata: dict[str, str]
    initiated_s: float


class MultipartSpool:
    """Parts of in-progress multipart uploads, kept as files under ``root/<upload id>/`` until completion.

    Independent of the ``Store`` (it is the server's scratch space), so any store gets multipart uploads:
    on completion the server streams the parts, in order, into ``store.begin_write``.  Part files are
    written by temp file + rename, so a retried part replaces the old one atomically.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, upload_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id or ""):
            raise NoSuchUpload(f"upload {upload_id!r} does not exist")
        return self.root / upload_id

    def create(self, bucket: str, key: str, content_type: str, metadata: dict[str, str]) -> UploadInfo:
        info = UploadInfo(uuid.uuid4().hex, bucket, key, content_type, dict(metadata), time.time())
        d = self.root / info.upload_id
        d.mkdir()
        (d / "upload.json").write_text(json.dumps(info.__dict__))
        return info

    def get(self, upload_id: str, bucket: str, key: str) -> UploadInfo:
        try:
            doc = json.loads((self._dir(upload_id) / "upload.json").read_text())
        except FileNotFoundError:
            raise NoSuchUpload(f"upload {upload_id!r} does not exist") from None
        info = UploadInfo(**doc)
        if info.bucket != bucket or info.key != key:
            raise NoSuchUpload(f"upload {upload_id!r} does not belong to {bucket}/{key}")
        return info

    def part_writer(self, upload_id: str, part_number: int) -> _PartWriter:
        return _PartWriter(self._dir(upload_id), part_number)

    def part_path(self, upload_id: str, part_number: int) -> Path:
        return self._dir(upload_id) / f"{part_number:05d}.part"

    def part_etag(self, upload_id: str, part_number: int) -> str | None:
        try:
            return (self._dir(upload_id) / f"{part_number:05d}.etag").read_text()
        except FileNotFoundError:
            return None

    def parts(self, upload_id: str) -> list[tuple[int, int, str]]:
        """(part number, size, etag) of every uploaded part, in part order."""
        out = []
        for p in sorted(self._dir(upload_id).glob("*.part")):
            n = int(p.stem)
            out.append((n, p.stat().st_size, self.part_etag(upload_id, n) or ""))
        return out

    def remove(self, upload_id: str) -> None:
        d = self._dir(upload_id)
        if not d.is_dir():
            raise NoSuchUpload(f"upload {upload_id!r} does not exist")
        for p in d.iterdir():
            p.unlink(missing_ok=True)
        d.rmdir()


class _PartWriter:
    def __init__(self, upload_dir: Path, part_number: int) -> None:
        if not upload_dir.is_dir():
            raise NoSuchUpload(f"upload {upload_dir.name!r} does not exist")
        self._dir = upload_dir
        self._n = part_number
        self._tmp = upload_dir / f"{part_number:05d}.{uuid.uuid4().hex}.tmp"
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hash = xxhash.xxh3_128()
        self.size_bytes = 0

    def write(self, data) -> None:
        self._hash.update(data)
        self._f.write(data)
        self.size_bytes += memoryview(data).nbytes

    def commit(self) -> str:
        self._f.close()
        etag = self._hash.hexdigest()
        (self._dir / f"{self._n:05d}.etag").write_text(etag)
        os.replace(self._tmp, self._dir / f"{self._n:05d}.part")
        return etag

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def multipart_etag(part_etags: list[str]) -> str:
    """ETag of a completed multipart object: hash of the part ETags, dash, number of parts."""
    h = xxhash.xxh3_128()
    for e in part_etags:
        h.update(bytes.fromhex(e))
    return f"{h.hexdigest()}-{len(part_etags)}"
