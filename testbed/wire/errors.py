"""Exceptions of the object tier, shared by the server, the client and the engine.

Every error the object tier raises on purpose is an ``ObjectCacheError``; callers that only want to know
"the object tier failed, fall back to recompute" catch that one class.  Subclasses say *what* failed, and
their messages name the chunk key (object name) and, where it applies, the layer, so a log line is enough to
find the bad object.

The server maps some of them to S3 error codes (``s3_code`` / ``http_status``); the client maps S3 error
responses back to them (``from_s3_error``).
"""

from __future__ import annotations


class ObjectCacheError(Exception):
    """Base class of every object-tier error."""

    s3_code = "InternalError"
    http_status = 500

    def __init__(self, message: str, *, key: str | None = None, layer: int | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.layer = layer


class S3Error(ObjectCacheError):
    """An error with an explicit S3 code and HTTP status (the server's generic error)."""

    def __init__(self, code: str, message: str, http_status: int = 400, *, key: str | None = None) -> None:
        super().__init__(message, key=key)
        self.s3_code = code
        self.http_status = http_status


class ChunkMissing(ObjectCacheError):
    """A chunk object (or several) does not exist.  ``keys`` lists the missing object names."""

    s3_code = "NoSuchKey"
    http_status = 404

    def __init__(self, message: str, *, key: str | None = None, keys: list[str] | None = None) -> None:
        super().__init__(message, key=key if key is not None else (keys[0] if keys else None))
        self.keys = list(keys) if keys else ([key] if key else [])


class BucketMissing(ObjectCacheError):
    s3_code = "NoSuchBucket"
    http_status = 404


class ChecksumMismatch(ObjectCacheError):
    """A layer slice's bytes do not hash to its stored checksum (corruption in storage or in flight)."""

    s3_code = "BadDigest"
    http_status = 400


class CorruptObject(ObjectCacheError):
    """An object is not a valid KV chunk (bad magic, version, header checksum, size)."""

    s3_code = "InvalidObjectState"
    http_status = 400


class GeometryMismatch(ObjectCacheError):
    """Chunks of one request disagree on geometry, or a chunk does not match the expected model."""

    s3_code = "InvalidRequest"
    http_status = 400


class InvalidRequest(ObjectCacheError):
    """A request is malformed (bad gather body, bad layer range, ...)."""

    s3_code = "InvalidRequest"
    http_status = 400


class InvalidBucketName(InvalidRequest):
    """A bucket name that breaks S3's naming rules (``storeapi.validate_bucket_name``)."""

    s3_code = "InvalidBucketName"


class RequestTooLarge(ObjectCacheError):
    s3_code = "EntityTooLarge"
    http_status = 413


class AccessDenied(ObjectCacheError):
    """Bad credentials or a key outside the credential's namespaces."""

    s3_code = "AccessDenied"
    http_status = 403


class PreconditionFailed(ObjectCacheError):
    """A conditional write (``If-None-Match: *``) found the key already present."""

    s3_code = "PreconditionFailed"
    http_status = 412


class BucketNotEmpty(ObjectCacheError):
    s3_code = "BucketNotEmpty"
    http_status = 409


class KeyTooLong(ObjectCacheError):
    s3_code = "KeyTooLongError"
    http_status = 400


class NoSuchUpload(ObjectCacheError):
    s3_code = "NoSuchUpload"
    http_status = 404


class StorageUnavailable(ObjectCacheError):
    """The object store could not be reached or answered 5xx / timed out."""

    s3_code = "ServiceUnavailable"
    http_status = 503


class TruncatedStream(ObjectCacheError):
    """A gather stream ended without its end frame, or sent an error frame."""

    s3_code = "InternalError"
    http_status = 500


class ProtocolError(ObjectCacheError):
    """A gather stream does not follow the frame format."""

    s3_code = "InternalError"
    http_status = 500


class GatherUnsupported(ObjectCacheError):
    """The endpoint does not implement the gather extension (a plain S3 service)."""


_BY_S3_CODE: dict[str, type[ObjectCacheError]] = {
    "NoSuchKey": ChunkMissing,
    "NoSuchBucket": BucketMissing,
    "BadDigest": ChecksumMismatch,
    "InvalidObjectState": CorruptObject,
    "InvalidRequest": InvalidRequest,
    "InvalidBucketName": InvalidBucketName,
    "EntityTooLarge": RequestTooLarge,
    "AccessDenied": AccessDenied,
    "InvalidAccessKeyId": AccessDenied,
    "SignatureDoesNotMatch": AccessDenied,
    "PreconditionFailed": PreconditionFailed,
    "BucketNotEmpty": BucketNotEmpty,
    "KeyTooLongError": KeyTooLong,
    "NoSuchUpload": NoSuchUpload,
    "ServiceUnavailable": StorageUnavailable,
    "SlowDown": StorageUnavailable,
    "InternalError": StorageUnavailable,
}


def from_s3_error(code: str, message: str, *, key: str | None = None) -> ObjectCacheError:
    """Map an S3 error code (from an XML error body) to the matching ``ObjectCacheError`` instance."""
    cls = _BY_S3_CODE.get(code, ObjectCacheError)
    text = f"{code}: {message}" if message else code
    if cls is ChunkMissing:
        return ChunkMissing(text, key=key)
    return cls(text, key=key)
