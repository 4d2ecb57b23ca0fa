"""The multipart spool: parts of in-progress multipart uploads, kept as files until completion.

Independent of the ``Store`` (it is the server's scratch space under ``--spool-dir``, default
``DATA_DIR/multipart``), so every store gets multipart uploads: on completion the server streams the parts,
in order, into ``store.begin_write`` (``testbed.objectstore.multipart``).  A multipart object's ETag is
``multipart_etag`` of its part ETags (each the hex xxh3_128 of the part's bytes).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import xxhash

from testbed.wire.errors import NoSuchUpload


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

    def part_writer(self, upload_id: str, part_number: int) -> PartWriter:
        return PartWriter(self._dir(upload_id), part_number)

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


class PartWriter:
    """One part being uploaded: a temp file renamed into place (with its ETag beside it) on ``commit``."""

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
