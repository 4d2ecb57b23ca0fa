"""The multipart spool: parts of in-progress multipart uploads, kept as files until completion.

Independent of the ``Store`` (it is the server's scratch space under ``--spool-dir``, default
``DATA_DIR/multipart``), so every store gets multipart uploads: on completion the server streams the parts,
in order, into ``store.begin_write`` (``testbed.objectstore.multipart``).  A part's ETag is the hex MD5 of
its bytes; a multipart object's ETag is ``multipart_etag`` of its part ETags, as S3 computes it.

Uploads nobody completes or aborts expire: ``sweep`` removes those initiated more than ``expiry_s`` ago
(the server sweeps lazily, at most every ``SWEEP_INTERVAL_S``), and ``get`` treats an expired upload as
gone.  A completed upload leaves a small record (``completed/<upload id>.json``: bucket, key, ETag) for
``COMPLETED_RECORD_S``, so a client that retries CompleteMultipartUpload after a lost answer gets the same
answer instead of ``NoSuchUpload``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from testbed.wire.errors import NoSuchUpload

DEFAULT_EXPIRY_S = 7 * 86400.0
SWEEP_INTERVAL_S = 600.0
COMPLETED_RECORD_S = 86400.0
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class UploadInfo:
    upload_id: str
    bucket: str
    key: str
    content_type: str
    metadata: dict[str, str]
    initiated_s: float
    headers: dict[str, str] = field(default_factory=dict)  # storeapi.STORED_HEADERS of the Create request
    checksum_algorithm: str = ""  # x-amz-checksum-algorithm of the Create request ("crc32", ...), or ""


@dataclass
class PartInfo:
    part_number: int
    size_bytes: int
    etag: str
    last_modified_s: float
    checksums: dict[str, str] = field(default_factory=dict)  # algorithm -> base64, as verified on upload


class MultipartSpool:
    """Parts of in-progress multipart uploads, kept as files under ``root/<upload id>/`` until completion.

    Part files are written by temp file + rename, so a retried part replaces the old one atomically.
    """

    def __init__(self, root: str | os.PathLike, expiry_s: float = DEFAULT_EXPIRY_S) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "completed").mkdir(exist_ok=True)
        self.expiry_s = expiry_s
        self._last_sweep_s = 0.0
        self._sweep_lock = threading.Lock()
        self.maybe_sweep()  # uploads that expired while the server was down

    def _dir(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.fullmatch(upload_id or ""):
            raise NoSuchUpload(f"upload {upload_id!r} does not exist")
        return self.root / upload_id

    def create(
        self,
        bucket: str,
        key: str,
        content_type: str,
        metadata: dict[str, str],
        headers: dict[str, str] | None = None,
        checksum_algorithm: str = "",
    ) -> UploadInfo:
        info = UploadInfo(
            uuid.uuid4().hex,
            bucket,
            key,
            content_type,
            dict(metadata),
            time.time(),
            dict(headers or {}),
            checksum_algorithm,
        )
        d = self.root / info.upload_id
        d.mkdir()
        (d / "upload.json").write_text(json.dumps(info.__dict__))
        return info

    def _load(self, upload_id: str) -> UploadInfo | None:
        try:
            doc = json.loads((self._dir(upload_id) / "upload.json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        info = UploadInfo(**doc)
        if time.time() - info.initiated_s > self.expiry_s:
            return None
        return info

    def get(self, upload_id: str, bucket: str, key: str) -> UploadInfo:
        info = self._load(upload_id)
        if info is None:
            raise NoSuchUpload(f"upload {upload_id!r} does not exist")
        if info.bucket != bucket or info.key != key:
            raise NoSuchUpload(f"upload {upload_id!r} does not belong to {bucket}/{key}")
        return info

    def uploads(self, bucket: str) -> list[UploadInfo]:
        """Every live upload into ``bucket``, ordered by key (UTF-8 bytes), then by initiation time."""
        out = []
        for entry in os.scandir(self.root):
            if _UPLOAD_ID.fullmatch(entry.name):
                info = self._load(entry.name)
                if info is not None and info.bucket == bucket:
                    out.append(info)
        out.sort(key=lambda u: (u.key.encode("utf-8", "surrogatepass"), u.initiated_s, u.upload_id))
        return out

    def part_writer(self, upload_id: str, part_number: int) -> PartWriter:
        return PartWriter(self._dir(upload_id), part_number)

    def part_path(self, upload_id: str, part_number: int) -> Path:
        return self._dir(upload_id) / f"{part_number:05d}.part"

    def parts(self, upload_id: str) -> list[PartInfo]:
        """Every uploaded part, in part order."""
        out = []
        for p in sorted(self._dir(upload_id).glob("*.part")):
            try:
                doc = _part_doc(p)
                st = p.stat()
            except (FileNotFoundError, ValueError):  # replaced or removed meanwhile
                continue
            out.append(PartInfo(int(p.stem), st.st_size, doc["etag"], st.st_mtime, doc.get("checksums", {})))
        return out

    def remove(self, upload_id: str) -> None:
        d = self._dir(upload_id)
        if not d.is_dir():
            raise NoSuchUpload(f"upload {upload_id!r} does not exist")
        shutil.rmtree(d, ignore_errors=True)

    def complete(self, upload_id: str, bucket: str, key: str, etag: str) -> None:
        """Remove a completed upload's parts, keeping the record that answers a retried Complete."""
        record = {"bucket": bucket, "key": key, "etag": etag, "completed_s": time.time()}
        (self.root / "completed" / f"{upload_id}.json").write_text(json.dumps(record))
        self.remove(upload_id)

    def completed_etag(self, upload_id: str, bucket: str, key: str) -> str | None:
        """The ETag a recently completed upload produced, or None (not completed here, or too long ago)."""
        if not _UPLOAD_ID.fullmatch(upload_id or ""):
            return None
        try:
            doc = json.loads((self.root / "completed" / f"{upload_id}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if (
            doc["bucket"] != bucket
            or doc["key"] != key
            or time.time() - doc["completed_s"] > COMPLETED_RECORD_S
        ):
            return None
        return doc["etag"]

    def sweep(self, now_s: float | None = None) -> int:
        """Remove uploads initiated more than ``expiry_s`` ago and completion records older than
        ``COMPLETED_RECORD_S``; the number of uploads removed."""
        now_s = time.time() if now_s is None else now_s
        removed = 0
        for entry in os.scandir(self.root):
            if not _UPLOAD_ID.fullmatch(entry.name):
                continue
            try:
                initiated_s = json.loads(Path(entry.path, "upload.json").read_text())["initiated_s"]
            except (FileNotFoundError, ValueError, KeyError):
                initiated_s = entry.stat().st_mtime  # a Create cut short: judge by the directory's age
            if now_s - initiated_s > self.expiry_s:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        for entry in os.scandir(self.root / "completed"):
            if now_s - entry.stat().st_mtime > COMPLETED_RECORD_S:
                Path(entry.path).unlink(missing_ok=True)
        return removed

    def maybe_sweep(self) -> None:
        """``sweep`` if the last one is more than ``SWEEP_INTERVAL_S`` old (the first call always sweeps)."""
        now_s = time.time()
        with self._sweep_lock:
            if now_s - self._last_sweep_s < min(SWEEP_INTERVAL_S, self.expiry_s):
                return
            self._last_sweep_s = now_s
        self.sweep(now_s)


def _part_doc(part_path: Path) -> dict:
    """A part's ETag and checksums (its JSON file; parts spooled by older servers have a bare ``.etag``)."""
    try:
        return json.loads(part_path.with_suffix(".json").read_text())
    except FileNotFoundError:
        return {"etag": part_path.with_suffix(".etag").read_text()}


class PartWriter:
    """One part being uploaded: a temp file renamed into place (its ETag and checksums in a JSON file
    beside it) on ``commit``."""

    def __init__(self, upload_dir: Path, part_number: int) -> None:
        if not upload_dir.is_dir():
            raise NoSuchUpload(f"upload {upload_dir.name!r} does not exist")
        self._dir = upload_dir
        self._n = part_number
        self._tmp = upload_dir / f"{part_number:05d}.{uuid.uuid4().hex}.tmp"
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._md5 = hashlib.md5()
        self.size_bytes = 0

    def write(self, data) -> None:
        self._md5.update(data)
        self._f.write(data)
        self.size_bytes += memoryview(data).nbytes

    def commit(self, checksums: dict[str, str] | None = None) -> str:
        """Put the part in place (replacing an earlier upload of the same number); its ETag."""
        self._f.close()
        etag = self._md5.hexdigest()
        doc = json.dumps({"etag": etag, "checksums": dict(checksums or {})})
        meta_tmp = self._tmp.with_suffix(".jsontmp")
        meta_tmp.write_text(doc)
        # The part's JSON first: a reader that sees the new part file also sees its ETag.
        os.replace(meta_tmp, self._dir / f"{self._n:05d}.json")
        os.replace(self._tmp, self._dir / f"{self._n:05d}.part")
        return etag

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def multipart_etag(part_etags: list[str]) -> str:
    """S3's ETag of a completed multipart object: hex MD5 of the concatenated binary part MD5s, dash, the
    number of parts."""
    h = hashlib.md5()
    for e in part_etags:
        h.update(bytes.fromhex(e))
    return f"{h.hexdigest()}-{len(part_etags)}"
