"""AWS Signature V4 building blocks shared by request verification (``testbed.objectstore.auth``) and
``aws-chunked`` body decoding (``testbed.objectstore.chunked``): the algorithm and payload-mode names, the
signing key derivation, the HMAC, and the error they raise.
"""

from __future__ import annotations

import hashlib
import hmac

from testbed.wire.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
# What ``x-amz-content-sha256`` may say instead of the payload's hex SHA-256:
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"  # aws-chunked, every chunk signed
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"  # ... and a signed trailer
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"  # aws-chunked, unsigned, checksum trailer
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class S3AuthError(S3Error):
    """An authentication / authorization failure with its S3 error code (403 unless said otherwise)."""

    def __init__(self, code: str, message: str, http_status: int = 403) -> None:
        super().__init__(code, message, http_status)


def signing_key(secret_key: str, date: str, region: str, service: str = "s3") -> bytes:
    k = hmac.new(("AWS4" + secret_key).encode(), date.encode(), hashlib.sha256).digest()
    k = hmac.new(k, region.encode(), hashlib.sha256).digest()
    k = hmac.new(k, service.encode(), hashlib.sha256).digest()
    return hmac.new(k, b"aws4_request", hashlib.sha256).digest()


def hmac_hex(key: bytes, msg: str) -> str:
    return hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()
