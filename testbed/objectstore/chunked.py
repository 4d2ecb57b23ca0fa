"""Request payloads: ``aws-chunked`` decoding and the ``x-amz-checksum-*`` algorithms.

``ChunkedDecoder`` decodes ``Content-Encoding: aws-chunked`` bodies incrementally (the ``STREAMING-*``
payload modes of ``testbed.objectstore.sigv4``), verifying each chunk's signature -- chained from the
request's seed signature -- and the trailer's.  ``new_checksum`` makes an incremental hasher for an
``x-amz-checksum-<algorithm>`` value; ``checksum_b64`` is its header form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import zlib
from typing import Protocol

from testbed.objectstore.sigv4 import (
    EMPTY_SHA256,
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    S3AuthError,
    hmac_hex,
)


class ChunkSigning(Protocol):
    """What chunk signatures chain from: the request's verified signature (``auth.AuthResult``)."""

    amz_date: str
    scope: str
    key: bytes  # the request's signing key
    seed_signature: str


# --- payload checksums ------------------------------------------------------------------------------------


class Crc32:
    """CRC-32 (zlib's) with the ``update`` / ``digest`` interface of ``hashlib``."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _crt_checksum(name: str):
    try:
        from awscrt import checksums  # optional: botocore uses it when installed
    except ImportError:
        return None
    fn = {"crc32c": (checksums.crc32c, 4), "crc64nvme": (checksums.crc64nvme, 8)}[name]

    class _Crt:
        def __init__(self) -> None:
            self.value = 0

        def update(self, data) -> None:
            self.value = fn[0](data, self.value)

        def digest(self) -> bytes:
            return self.value.to_bytes(fn[1], "big")

    return _Crt()


def new_checksum(algorithm: str):
    """Incremental checksum for an ``x-amz-checksum-<algorithm>`` value (base64 of the big-endian digest)."""
    algorithm = algorithm.lower()
    if algorithm == "crc32":
        return Crc32()
    if algorithm == "sha1":
        return hashlib.sha1()
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm in ("crc32c", "crc64nvme"):
        c = _crt_checksum(algorithm)
        if c is not None:
            return c
    raise S3AuthError(
        "InvalidRequest", f"checksum algorithm {algorithm!r} is not supported by this server", 400
    )


def checksum_b64(c) -> str:
    return base64.b64encode(c.digest()).decode()


# --- aws-chunked bodies -----------------------------------------------------------------------------------


class ChunkedDecoder:
    """Incremental decoder of ``Content-Encoding: aws-chunked`` bodies.

    ``feed(data)`` returns the payload bytes decoded so far; ``finish()`` checks the stream ended with the
    zero-length chunk and returns the trailers (e.g. ``x-amz-checksum-crc32``).  With a signed streaming
    mode each chunk signature is verified (chained from the request's seed signature), and so is the
    trailer signature of ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER``.
    """

    MAX_LINE_BYTES = 4096

    def __init__(self, auth: ChunkSigning | None, mode: str) -> None:
        self._auth = auth
        self._signed = mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
        self._prev_sig = auth.seed_signature if auth else ""
        self._buf = bytearray()
        self._state = "size"  # size -> data -> crlf -> size ... -> trailers -> done
        self._remaining = 0
        self._chunk_sig = ""
        self._chunk_hash = None
        self.trailers: dict[str, str] = {}
        self._trailer_lines: list[str] = []

    def _bad(self, msg: str) -> S3AuthError:
        return S3AuthError(
            "IncompleteBody" if "end" in msg else "InvalidRequest", f"aws-chunked body: {msg}", 400
        )

    def _check_chunk_signature(self) -> None:
        if not self._signed:
            return
        a = self._auth
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                a.amz_date,
                a.scope,
                self._prev_sig,
                EMPTY_SHA256,
                self._chunk_hash.hexdigest(),
            ]
        )
        expected = hmac_hex(a.key, to_sign)
        if not hmac.compare_digest(expected, self._chunk_sig):
            raise S3AuthError("SignatureDoesNotMatch", "aws-chunked chunk signature does not match")
        self._prev_sig = expected

    def feed(self, data: bytes) -> list[memoryview]:
        out: list[memoryview] = []
        self._buf += data
        pos = 0
        buf = self._buf
        while True:
            if self._state == "data":
                take = min(self._remaining, len(buf) - pos)
                if take == 0:
                    break
                piece = memoryview(bytes(buf[pos : pos + take]))
                if self._chunk_hash is not None:
                    self._chunk_hash.update(piece)
                out.append(piece)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "crlf"
                continue
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                if len(buf) - pos > self.MAX_LINE_BYTES:
                    raise self._bad("line too long")
                break
            line = bytes(buf[pos:nl]).decode("latin-1")
            pos = nl + 2
            if self._state == "crlf":
                if line:
                    raise self._bad("missing CRLF after chunk data")
                self._check_chunk_signature()
                self._state = "size"
            elif self._state == "size":
                size_str, _, ext = line.partition(";")
                try:
                    size = int(size_str, 16)
                except ValueError:
                    raise self._bad(f"bad chunk size line {line[:40]!r}") from None
                if self._signed:
                    name, _, sig = ext.partition("=")
                    if name.strip() != "chunk-signature":
                        raise S3AuthError("SignatureDoesNotMatch", "aws-chunked chunk without signature")
                    self._chunk_sig = sig.strip()
                    self._chunk_hash = hashlib.sha256()
                if size == 0:
                    self._check_chunk_signature()
                    self._state = "trailers"
                else:
                    self._remaining = size
                    self._state = "data"
            elif self._state == "trailers":
                if line == "":
                    self._state = "done"
                    continue
                name, _, value = line.partition(":")
                self._trailer_lines.append(line)
                self.trailers[name.strip().lower()] = value.strip()
            else:  # done: ignore trailing bytes only if empty
                if line:
                    raise self._bad("data after the final chunk")
        del buf[:pos]
        return out

    def finish(self) -> dict[str, str]:
        if self._state == "trailers" and not self._buf:
            # Some writers end the trailer section without the final blank line.
            self._state = "done"
        if self._state != "done":
            raise self._bad("stream ended before the final chunk")
        sig = self.trailers.pop("x-amz-trailer-signature", None)
        if self._signed and self._auth is not None and sig is not None:
            lines = [ln for ln in self._trailer_lines if not ln.lower().startswith("x-amz-trailer-signature")]
            trailer_text = "".join(ln.strip() + "\n" for ln in lines)
            to_sign = "\n".join(
                [
                    "AWS4-HMAC-SHA256-TRAILER",
                    self._auth.amz_date,
                    self._auth.scope,
                    self._prev_sig,
                    hashlib.sha256(trailer_text.encode()).hexdigest(),
                ]
            )
            if not hmac.compare_digest(hmac_hex(self._auth.key, to_sign), sig):
                raise S3AuthError("SignatureDoesNotMatch", "aws-chunked trailer signature does not match")
        return self.trailers
