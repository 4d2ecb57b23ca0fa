"""The filesystem store's object file: the object bytes, then a trailer with the object's metadata.

One file per object, named by ``file_name`` (the percent-encoded key).  The file is the object bytes followed
by the metadata as compact JSON (``etag``, ``mtime_s``, ``content_type``, user ``metadata``, and, when the
upload set them, the stored HTTP ``headers`` and the verified ``checksums``), the JSON's length and a magic (``TRAILER_TAIL``: little-endian u64 length, 8-byte ``TRAILER_MAGIC``).  Object byte
``i`` is file byte ``i``, so ranged GETs and gathers ``sendfile`` / ``preadv`` the file directly.

A missing JSON field reads as its empty default, so files written before a field existed stay readable.
Files written before ETags were MD5s keep the ETag they were stored with (an xxh3_128, 32 hex digits):
it still identifies the bytes for conditional requests, but MD5-checking clients see a mismatch until the
object is rewritten.
"""

from __future__ import annotations

import json
import os
import struct
from urllib.parse import quote

from testbed.objectstore.storeapi import ObjectInfo
from testbed.wire.errors import CorruptObject, KeyTooLong

TRAILER_MAGIC = b"OCMETA01"
TRAILER_TAIL = struct.Struct("<Q8s")  # json length, magic
TAIL_READ_BYTES = 4096


def file_name(key: str) -> str:
    name = quote(key, safe="")
    if name.startswith("."):  # "." and ".." must not name the directory itself or its parent
        name = "%2E" + name[1:]
    if len(name) > 250:
        raise KeyTooLong(
            "object key too long for the filesystem store (percent-encoded > 250 bytes)", key=key[:80]
        )
    return name


def read_trailer(fd: int, file_size: int, key: str) -> tuple[int, dict]:
    """(object size, metadata dict) from the trailer at the end of an object file."""
    n = min(file_size, TAIL_READ_BYTES)
    tail = os.pread(fd, n, file_size - n)
    if n < TRAILER_TAIL.size:
        raise CorruptObject(f"object file of {key!r} has no trailer", key=key)
    json_len, magic = TRAILER_TAIL.unpack_from(tail, n - TRAILER_TAIL.size)
    if magic != TRAILER_MAGIC or json_len + TRAILER_TAIL.size > file_size:
        raise CorruptObject(f"object file of {key!r} has a bad trailer (truncated or overwritten)", key=key)
    start = n - TRAILER_TAIL.size - json_len
    raw = (
        tail[start : n - TRAILER_TAIL.size]
        if start >= 0
        else os.pread(fd, json_len, file_size - TRAILER_TAIL.size - json_len)
    )
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CorruptObject(f"object file of {key!r} has unreadable metadata", key=key) from None
    return file_size - TRAILER_TAIL.size - json_len, meta


def info_from(key: str, size: int, meta: dict, mtime_s: float) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size_bytes=size,
        etag=meta.get("etag", ""),
        last_modified_s=meta.get("mtime_s", mtime_s),
        content_type=meta.get("content_type", "application/octet-stream"),
        metadata=dict(meta.get("metadata", {})),
        headers=dict(meta.get("headers", {})),
        checksums=dict(meta.get("checksums", {})),
    )


def trailer_bytes(meta: dict) -> bytes:
    """The trailer that follows the object bytes (``read_trailer`` reads it back)."""
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return raw + TRAILER_TAIL.pack(len(raw), TRAILER_MAGIC)
