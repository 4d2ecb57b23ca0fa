"""The filesystem store: the ObjectCache server's embedded ``Store`` (``testbed.objectstore.storeapi``).

``FilesystemStore`` keeps one file per object under ``<root>/buckets/<bucket>/obj/`` (the file format is
``testbed.objectstore.objectfile``: the object bytes, then a metadata trailer, so object byte ``i`` is file byte
``i`` and ranged GETs and gathers use ``sendfile``/``preadv`` on the file directly) and writes by temp file +
fsync + rename (``os.link`` for conditional writes, which fails atomically if the name exists), so it
survives a crash or restart.  Corrupt objects are moved to ``<root>/buckets/<bucket>/quarantine/``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import unquote

from testbed.objectstore.objectfile import file_name, info_from, read_trailer, trailer_bytes
from testbed.objectstore.storeapi import (
    BucketInfo,
    ListPage,
    ObjectHandle,
    ObjectInfo,
    ObjectWriter,
    Store,
    validate_bucket_name,
    validate_key,
)
from testbed.wire.errors import (
    BucketMissing,
    BucketNotEmpty,
    ChunkMissing,
    InvalidRequest,
    PreconditionFailed,
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
        self,
        store: FilesystemStore,
        bucket: str,
        key: str,
        content_type: str,
        metadata: dict,
        headers: dict,
        content_md5: bool = True,
    ) -> None:
        self._store = store
        self._bucket = bucket
        self._key = key
        self._final = store._obj_dir(bucket) / file_name(key)
        self._tmp = store._bucket_dir(bucket) / "tmp" / f"{uuid.uuid4().hex}.part"
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # The ETag, as the bytes stream in (no second pass); None: commit is given the ETag.
        self._md5 = hashlib.md5() if content_md5 else None
        self._size = 0
        self._meta = {"content_type": content_type, "metadata": dict(metadata or {})}
        if headers:
            self._meta["headers"] = dict(headers)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self._md5 is not None:
            self._md5.update(view)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._size += n

    def commit(
        self, if_none_match: bool = False, etag: str | None = None, checksums: dict[str, str] | None = None
    ) -> ObjectInfo:
        if etag is None and self._md5 is None:
            raise ValueError("begin_write(content_md5=False) needs commit(etag=...)")
        meta = dict(self._meta, etag=etag or self._md5.hexdigest(), mtime_s=time.time())
        if checksums:
            meta["checksums"] = dict(checksums)
        os.write(self._fd, trailer_bytes(meta))
        if self._store._fsync:  # --no-fsync (benchmarks only) skips the file's fsync too, not just the dir's
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
        return info_from(self._key, self._size, meta, meta["mtime_s"])

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
            self._root_s, "buckets", validate_bucket_name(bucket), "obj", file_name(validate_key(key))
        )
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._require_bucket(bucket)  # BucketMissing if that is why
            raise ChunkMissing(f"object {key!r} does not exist", key=key) from None
        try:
            st = os.fstat(fd)
            size, meta = read_trailer(fd, st.st_size, key)
            return _FileHandle(fd, info_from(key, size, meta, st.st_mtime))
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
        headers: dict[str, str] | None = None,
        content_md5: bool = True,
    ) -> ObjectWriter:
        self._require_bucket(bucket)
        validate_key(key)
        return _FileWriter(self, bucket, key, content_type, metadata or {}, headers or {}, content_md5)

    def quarantine(self, bucket: str, key: str, reason: str) -> bool:
        """Move a corrupt object's file to ``<bucket>/quarantine/`` (with a ``.reason`` note) so it is no
        longer served; True if it was there."""
        path = self._require_bucket(bucket) / file_name(validate_key(key))
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
        path = self._require_bucket(bucket) / file_name(validate_key(key))
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
