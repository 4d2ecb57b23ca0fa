"""AWS Signature Version 4 verification of requests, and credentials bound to namespaces.

The server verifies every request the way S3 does (AWS SigV4, service ``s3``):

* header-signed requests (``Authorization: AWS4-HMAC-SHA256 Credential=AK/date/region/s3/aws4_request,
  SignedHeaders=..., Signature=...``), with ``x-amz-date`` within 15 minutes of the server clock;
* presigned URLs (``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``, ``X-Amz-Expires``,
  ``X-Amz-SignedHeaders``, ``X-Amz-Signature`` query parameters), valid until date + expires (<= 7 days);
* the payload: ``x-amz-content-sha256`` is a hex SHA-256 (checked against the body), ``UNSIGNED-PAYLOAD``,
  or one of the ``aws-chunked`` streaming modes decoded by ``testbed.objectstore.chunked.ChunkedDecoder``
  (signed chunks are verified chunk by chunk; trailing ``x-amz-checksum-*`` values are verified against the
  decoded body).  The SigV4 building blocks both use are ``testbed.objectstore.sigv4``'s.

Credentials (``Credential``) map an access key to a secret and the *namespaces* the key may touch: object
names ``<ns>/...``.  ``namespaces=None`` is an admin credential (all names); ``buckets=None`` allows all
buckets.  Secrets never appear in logs or errors (``Credential.__repr__`` hides them).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from testbed.objectstore.sigv4 import ALGORITHM, UNSIGNED_PAYLOAD, S3AuthError, hmac_hex, signing_key

MAX_SKEW_S = 15 * 60
MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600

DEFAULT_ACCESS_KEY = "objectcache"
DEFAULT_SECRET_KEY = "objectcache-secret"


# --- credentials ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    access_key: str
    secret_key: str = field(repr=False)
    namespaces: tuple[str, ...] | None = None  # None: admin, every object name
    buckets: tuple[str, ...] | None = None  # None: every bucket

    @property
    def is_admin(self) -> bool:
        return self.namespaces is None

    def allows_bucket(self, bucket: str) -> bool:
        return self.buckets is None or bucket in self.buckets

    def allows_key(self, key: str) -> bool:
        if self.namespaces is None:
            return True
        return any(key.startswith(ns + "/") for ns in self.namespaces)

    def allows_prefix(self, prefix: str) -> bool:
        """A listing prefix is allowed if every name it can match lies inside one namespace."""
        return self.allows_key(prefix) if self.namespaces is not None else True


class CredentialStore:
    """Access key -> ``Credential``.

    Sources: a JSON file ``{"credentials": [{"access_key": ..., "secret_key": ..., "namespaces": [...] or
    null, "buckets": [...] or null}, ...]}``, the environment (``OBJECTCACHE_ACCESS_KEY`` /
    ``OBJECTCACHE_SECRET_KEY`` add an admin credential), or the documented default test credential.
    """

    def __init__(self, credentials: Iterable[Credential]) -> None:
        self._by_key = {c.access_key: c for c in credentials}

    def get(self, access_key: str) -> Credential | None:
        return self._by_key.get(access_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def all(self) -> list[Credential]:
        return list(self._by_key.values())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CredentialStore:
        with open(path) as f:
            doc = json.load(f)
        creds = []
        for item in doc.get("credentials", []):
            ns = item.get("namespaces")
            buckets = item.get("buckets")
            creds.append(
                Credential(
                    str(item["access_key"]),
                    str(item["secret_key"]),
                    None if ns is None else tuple(str(n) for n in ns),
                    None if buckets is None else tuple(str(b) for b in buckets),
                )
            )
        return cls(creds)

    @classmethod
    def default(
        cls, path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
    ) -> CredentialStore:
        env = os.environ if env is None else env
        creds: list[Credential] = []
        if path:
            creds.extend(cls.from_json(path)._by_key.values())
        if env.get("OBJECTCACHE_ACCESS_KEY") and env.get("OBJECTCACHE_SECRET_KEY"):
            creds.append(Credential(env["OBJECTCACHE_ACCESS_KEY"], env["OBJECTCACHE_SECRET_KEY"]))
        if not creds:
            creds.append(Credential(DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY))
        return cls(creds)


# --- canonical request ------------------------------------------------------------------------------------


def _uri_encode(text: str, safe: str = "-_.~") -> str:
    return quote(text, safe=safe)


def canonical_uri(raw_path: str) -> str:
    """S3 canonical URI: the path, each byte URI-encoded once ('/' kept), no dot-segment normalization."""
    return _uri_encode(unquote(raw_path), safe="/-_.~")


def canonical_query(query: Iterable[tuple[str, str]], exclude: str | None = None) -> str:
    pairs = sorted((_uri_encode(k), _uri_encode(v)) for k, v in query if k != exclude)
    return "&".join(f"{k}={v}" for k, v in pairs)


_SPACES = re.compile(r"\s+")


def canonical_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]], signed: list[str]) -> str:
    items = headers.items() if isinstance(headers, Mapping) else headers
    values: dict[str, list[str]] = {}
    for k, v in items:
        values.setdefault(k.lower(), []).append(_SPACES.sub(" ", v.strip()))
    lines = []
    for name in signed:
        if name not in values:
            raise S3AuthError("SignatureDoesNotMatch", f"signed header {name!r} is missing from the request")
        lines.append(f"{name}:{','.join(values[name])}\n")
    return "".join(lines)


@dataclass
class AuthResult:
    """A verified request: who signed it and how its payload is to be checked."""

    credential: Credential
    payload_hash: str  # hex sha256, UNSIGNED-PAYLOAD or a STREAMING-* mode
    amz_date: str
    scope: str
    key: bytes  # the signing key, for chunk signatures
    seed_signature: str
    signed_headers: tuple[str, ...] = ()  # lower-case names the signature covers


def _parse_time(amz_date: str) -> datetime:
    try:
        return datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise S3AuthError("AccessDenied", f"bad X-Amz-Date {amz_date!r}") from None


@dataclass
class _Signature:
    """What a request's signature claims, from its ``Authorization`` header or presigned query."""

    credential: str  # AK/date/region/s3/aws4_request
    signed_headers: str  # ;-separated lower-case names
    signature: str  # hex
    amz_date: str
    payload_hash: str
    exclude_param: (
        str | None
    )  # the query parameter left out of the canonical query (presigned: the signature)


SIGV2_UNSUPPORTED = (
    "AWS Signature Version 2 is not supported; sign with AWS Signature Version 4 "
    "(AWS4-HMAC-SHA256; boto3/awscli: signature_version='s3v4')"
)


def _header_signature(lower: Mapping[str, str], now: datetime) -> _Signature:
    """The signature of a header-signed request; its ``x-amz-date`` must be within ``MAX_SKEW_S``."""
    auth = lower["authorization"]
    if auth.startswith("AWS "):
        raise S3AuthError("InvalidRequest", SIGV2_UNSUPPORTED, 400)
    if not auth.startswith(ALGORITHM + " "):
        raise S3AuthError("AccessDenied", "only AWS4-HMAC-SHA256 signatures are supported")
    parts = {}
    for piece in auth[len(ALGORITHM) + 1 :].split(","):
        name, _, value = piece.strip().partition("=")
        parts[name] = value
    try:
        credential_str, signed_str, signature = (
            parts["Credential"],
            parts["SignedHeaders"],
            parts["Signature"],
        )
    except KeyError:
        raise S3AuthError("AuthorizationHeaderMalformed", "malformed Authorization header", 400) from None
    amz_date = lower.get("x-amz-date", "")
    if not amz_date:
        raise S3AuthError("AccessDenied", "missing x-amz-date header")
    if abs((now - _parse_time(amz_date)).total_seconds()) > MAX_SKEW_S:
        raise S3AuthError("RequestTimeTooSkewed", "the request time differs too much from the server time")
    payload_hash = lower.get("x-amz-content-sha256", "")
    if not payload_hash:
        raise S3AuthError("InvalidRequest", "missing x-amz-content-sha256 header", 400)
    return _Signature(credential_str, signed_str, signature, amz_date, payload_hash, None)


def _presigned_signature(qdict: Mapping[str, str], now: datetime) -> _Signature:
    """The signature of a presigned URL; valid from ``X-Amz-Date`` (less ``MAX_SKEW_S``) for
    ``X-Amz-Expires`` seconds (at most ``MAX_PRESIGN_EXPIRES_S``)."""
    if qdict.get("X-Amz-Algorithm") != ALGORITHM:
        raise S3AuthError("AccessDenied", "only AWS4-HMAC-SHA256 presigned URLs are supported")
    try:
        credential_str = qdict["X-Amz-Credential"]
        signed_str = qdict["X-Amz-SignedHeaders"]
        signature = qdict["X-Amz-Signature"]
        amz_date = qdict["X-Amz-Date"]
        expires_s = int(qdict["X-Amz-Expires"])
    except (KeyError, ValueError):
        raise S3AuthError("AuthorizationQueryParametersError", "incomplete presigned URL", 400) from None
    if not 0 < expires_s <= MAX_PRESIGN_EXPIRES_S:
        raise S3AuthError("AuthorizationQueryParametersError", "X-Amz-Expires out of range", 400)
    age_s = (now - _parse_time(amz_date)).total_seconds()
    if age_s > expires_s:
        raise S3AuthError("AccessDenied", "Request has expired")
    if age_s < -MAX_SKEW_S:
        raise S3AuthError("AccessDenied", "Request is not yet valid")
    payload_hash = qdict.get("X-Amz-Content-Sha256", UNSIGNED_PAYLOAD)
    return _Signature(credential_str, signed_str, signature, amz_date, payload_hash, "X-Amz-Signature")


def verify_request(
    method: str,
    raw_path: str,
    query: list[tuple[str, str]],
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    credentials: CredentialStore,
    now: datetime,
) -> AuthResult:
    """Verify the SigV4 signature of a request (header-signed or presigned); raise ``S3AuthError``."""
    items = list(headers.items() if isinstance(headers, Mapping) else headers)
    lower = {k.lower(): v for k, v in items}
    qdict = dict(query)
    if "authorization" in lower:
        sig = _header_signature(lower, now)
    elif "X-Amz-Signature" in qdict:
        sig = _presigned_signature(qdict, now)
    elif "AWSAccessKeyId" in qdict or "Signature" in qdict:
        raise S3AuthError("InvalidRequest", SIGV2_UNSUPPORTED, 400)
    else:
        raise S3AuthError("AccessDenied", "anonymous requests are not allowed; sign with SigV4")
    scope_parts = sig.credential.split("/")
    if len(scope_parts) != 5 or scope_parts[3] != "s3" or scope_parts[4] != "aws4_request":
        raise S3AuthError("AuthorizationHeaderMalformed", "bad credential scope", 400)
    access_key, date, region = scope_parts[0], scope_parts[1], scope_parts[2]
    if not sig.amz_date.startswith(date):
        raise S3AuthError("AuthorizationHeaderMalformed", "credential date does not match x-amz-date", 400)
    cred = credentials.get(access_key)
    if cred is None:
        raise S3AuthError("InvalidAccessKeyId", "the access key id does not exist in our records")
    signed = sig.signed_headers.split(";")
    if "host" not in signed:
        raise S3AuthError("AccessDenied", "the host header must be signed")
    canonical = "\n".join(
        [
            method,
            canonical_uri(raw_path),
            canonical_query(query, sig.exclude_param),
            canonical_headers(items, signed),
            sig.signed_headers,
            sig.payload_hash,
        ]
    )
    scope = "/".join(scope_parts[1:])
    to_sign = "\n".join([ALGORITHM, sig.amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = signing_key(cred.secret_key, date, region)
    expected = hmac_hex(key, to_sign)
    if not hmac.compare_digest(expected, sig.signature):
        raise S3AuthError(
            "SignatureDoesNotMatch",
            "the request signature we calculated does not match the signature you provided",
        )
    return AuthResult(cred, sig.payload_hash, sig.amz_date, scope, key, sig.signature, tuple(signed))
