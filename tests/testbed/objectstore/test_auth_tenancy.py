"""Authentication and tenant isolation of the ObjectCache server.

* Every way a signature can be wrong is rejected with the S3 error code AWS uses: unknown key
  (``InvalidAccessKeyId``), wrong secret / tampered signature / tampered request (``SignatureDoesNotMatch``),
  expired presigned URL (``AccessDenied``, "Request has expired"), clock skew beyond 15 minutes
  (``RequestTimeTooSkewed``), no signature at all (``AccessDenied``), a malformed header (400).
* Tenants: chunk keys are salted per tenant, and a credential bound to namespaces gets ``AccessDenied`` for
  any other tenant's name *before the store is consulted*: the answer is byte-identical (but for the request
  id) whether the object exists or not, and even whether the bucket exists, so neither hit/miss nor the
  latency of a lookup leaks.  Sharing is a namespace granted to several credentials.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import urllib.error
import urllib.request

import botocore.auth
import pytest
from botocore.exceptions import ClientError

from scheduler.keys import KeyScope, chunk_keys, object_key
from testbed.client.core import ObjectCacheClient
from testbed.objectstore.auth import MAX_SKEW_S, Credential, CredentialStore, verify_request
from testbed.objectstore.sigv4 import S3AuthError
from testbed.wire.errors import AccessDenied
from tests.fixtures.servers import ADMIN_ACCESS_KEY, ADMIN_SECRET_KEY, signed_request

FP = "0123456789abcdef"
TENANTS = [
    Credential(ADMIN_ACCESS_KEY, ADMIN_SECRET_KEY),
    Credential("key-a", "secret-a", namespaces=("tenant-a", "shared")),
    Credential("key-b", "secret-b", namespaces=("tenant-b", "shared")),
]


@pytest.fixture(scope="module")
def tenancy_server(tmp_path_factory):
    from testbed.objectstore.launch import start_server

    srv = start_server(tmp_path_factory.mktemp("tenancy"), credentials=TENANTS)
    srv.boto3_client().create_bucket(Bucket="kvb")
    yield srv
    srv.stop()


def code_of(err) -> str:
    return err.value.response["Error"]["Code"]


def _strip_request_id(body: bytes) -> bytes:
    return re.sub(rb"<RequestId>[^<]*</RequestId>", b"", body)


# --- authentication ---------------------------------------------------------------------------------------


def test_wrong_key_wrong_secret_unsigned_and_malformed(tenancy_server):
    srv = tenancy_server
    with pytest.raises(ClientError) as err:
        srv.boto3_client(access_key="nobody", secret_key="x").head_bucket(Bucket="kvb")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as err:
        srv.boto3_client(access_key="nobody", secret_key="x").list_objects_v2(Bucket="kvb")
    assert code_of(err) == "InvalidAccessKeyId"
    with pytest.raises(ClientError) as err:
        srv.boto3_client(access_key="key-a", secret_key="secret-b").list_objects_v2(
            Bucket="kvb", Prefix="tenant-a/"
        )
    assert code_of(err) == "SignatureDoesNotMatch"
    # Unsigned: anonymous requests are refused.
    with pytest.raises(urllib.error.HTTPError) as herr:
        urllib.request.urlopen(f"{srv.url}/kvb/tenant-a/x", timeout=10)
    assert herr.value.code == 403 and b"<Code>AccessDenied</Code>" in herr.value.read()
    # A malformed Authorization header is a 400, not a crash.
    req = urllib.request.Request(
        f"{srv.url}/kvb/tenant-a/x",
        headers={"Authorization": "AWS4-HMAC-SHA256 Credential=key-a", "x-amz-date": "20260101T000000Z"},
    )
    with pytest.raises(urllib.error.HTTPError) as herr:
        urllib.request.urlopen(req, timeout=10)
    assert herr.value.code == 400 and b"<Code>AuthorizationHeaderMalformed</Code>" in herr.value.read()


def test_tampered_signature_and_tampered_request(tenancy_server):
    srv = tenancy_server
    srv.boto3_client().put_object(Bucket="kvb", Key="tenant-a/fp/obj", Body=b"payload")
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    def signed(path: str) -> dict:
        req = AWSRequest(method="GET", url=srv.url + path)
        S3SigV4Auth(Credentials("key-a", "secret-a"), "s3", srv.region).add_auth(req)
        return dict(req.headers.items())

    import http.client

    def get(path: str, headers: dict) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()

    headers = signed("/kvb/tenant-a/fp/obj")
    assert get("/kvb/tenant-a/fp/obj", headers) == (200, b"payload")
    sig = headers["Authorization"][-64:]
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    tampered = dict(headers, Authorization=headers["Authorization"][:-64] + flipped)
    status, body = get("/kvb/tenant-a/fp/obj", tampered)
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body
    # The signature is fine but the request was changed after signing (another object).
    status, body = get("/kvb/tenant-a/fp/other", headers)
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body
    # A signed header changed after signing.
    status, body = get("/kvb/tenant-a/fp/obj", dict(headers, **{"x-amz-content-sha256": "UNSIGNED-PAYLOAD"}))
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body


def _set_signing_clock(monkeypatch, when: dt.datetime) -> None:
    """Make boto3 sign as if the time were ``when``: botocore's own SigV4 signer and, with awscrt
    installed (boto3 then signs S3 requests with the CRT signer), the CRT one."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: when)
    try:
        import botocore.crt.auth as crt_auth
    except ImportError:
        return
    monkeypatch.setattr(crt_auth, "get_current_datetime", lambda remove_tzinfo=True: when)


def test_clock_skew_beyond_window_is_rejected(tenancy_server, monkeypatch):
    srv = tenancy_server
    real_now = dt.datetime.now(dt.UTC)
    for skew_s, ok in ((-(MAX_SKEW_S - 60), True), (-(MAX_SKEW_S + 60), False), (MAX_SKEW_S + 60, False)):
        _set_signing_clock(monkeypatch, real_now + dt.timedelta(seconds=skew_s))
        s3 = srv.boto3_client(access_key="key-a", secret_key="secret-a")
        if ok:
            s3.list_objects_v2(Bucket="kvb", Prefix="tenant-a/")
        else:
            with pytest.raises(ClientError) as err:
                s3.list_objects_v2(Bucket="kvb", Prefix="tenant-a/")
            assert code_of(err) == "RequestTimeTooSkewed", skew_s


def test_expired_presigned_url(tenancy_server, monkeypatch):
    srv = tenancy_server
    srv.boto3_client().put_object(Bucket="kvb", Key="tenant-a/fp/p", Body=b"presigned")
    s3 = srv.boto3_client(access_key="key-a", secret_key="secret-a")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": "kvb", "Key": "tenant-a/fp/p"}, ExpiresIn=60
    )
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == b"presigned"
    # Signed two minutes ago, valid for 60 s: expired.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120)
    _set_signing_clock(monkeypatch, past)
    old = s3.generate_presigned_url(
        "get_object", Params={"Bucket": "kvb", "Key": "tenant-a/fp/p"}, ExpiresIn=60
    )
    with pytest.raises(urllib.error.HTTPError) as herr:
        urllib.request.urlopen(old, timeout=10)
    body = herr.value.read()
    assert herr.value.code == 403 and b"<Code>AccessDenied</Code>" in body and b"expired" in body
    # In-process: the same URL is valid until date + expires, and not after.
    query = [tuple(p.split("=", 1)) for p in old.split("?", 1)[1].split("&")]
    from urllib.parse import unquote, urlsplit

    query = [(unquote(k), unquote(v)) for k, v in query]
    path = urlsplit(old).path
    store = CredentialStore(TENANTS)
    headers = {"host": f"{srv.host}:{srv.port}"}
    verify_request("GET", path, query, headers, store, past + dt.timedelta(seconds=59))
    with pytest.raises(S3AuthError, match="expired"):
        verify_request("GET", path, query, headers, store, past + dt.timedelta(seconds=61))


# --- tenancy ----------------------------------------------------------------------------------------------


def test_chunk_keys_are_salted_per_tenant():
    tokens = list(range(512))
    base = chunk_keys(tokens, KeyScope(FP, "tenant-a"), 256)
    salted = chunk_keys(tokens, KeyScope(FP, "tenant-a", salt=b"secret-1"), 256)
    other_salt = chunk_keys(tokens, KeyScope(FP, "tenant-a", salt=b"secret-2"), 256)
    other_tenant = chunk_keys(tokens, KeyScope(FP, "tenant-b", salt=b"secret-1"), 256)
    assert len({*base, *salted, *other_salt, *other_tenant}) == 8  # all distinct
    assert salted == chunk_keys(tokens, KeyScope(FP, "tenant-a", salt=b"secret-1"), 256)  # deterministic
    name = object_key(KeyScope(FP, "tenant-b"), other_tenant[0])
    assert name.startswith("tenant-b/") and not Credential("k", "s", namespaces=("tenant-a",)).allows_key(
        name
    )


def test_tenant_cannot_read_write_or_probe_another_tenants_prefix(tenancy_server):
    srv = tenancy_server
    scope_b = KeyScope(FP, "tenant-b", salt=b"b-secret")
    names_b = [object_key(scope_b, k) for k in chunk_keys(list(range(1024)), scope_b, 256)]
    b = srv.boto3_client(access_key="key-b", secret_key="secret-b")
    b.put_object(Bucket="kvb", Key=names_b[0], Body=b"b's kv")
    present, absent = names_b[0], names_b[1]
    a = srv.boto3_client(access_key="key-a", secret_key="secret-a")
    for op in (
        lambda k: a.head_object(Bucket="kvb", Key=k),
        lambda k: a.get_object(Bucket="kvb", Key=k),
        lambda k: a.put_object(Bucket="kvb", Key=k, Body=b"x"),
        lambda k: a.delete_object(Bucket="kvb", Key=k),
    ):
        statuses = []
        for key in (present, absent):
            with pytest.raises(ClientError) as err:
                op(key)
            statuses.append(err.value.response["ResponseMetadata"]["HTTPStatusCode"])
        assert statuses == [403, 403]
    with pytest.raises(ClientError) as err:
        a.list_objects_v2(Bucket="kvb", Prefix="tenant-b/")
    assert code_of(err) == "AccessDenied"
    assert b.head_object(Bucket="kvb", Key=present)["ContentLength"] == 6  # still there, untouched

    # Raw replies are identical for an existing name, a missing name, and a name in a missing bucket: the
    # namespace check happens before any store lookup.
    bodies = set()
    for path in (f"/kvb/{present}", f"/kvb/{absent}", f"/no-such-bucket/{present}"):
        r = signed_request(srv, "GET", path, access_key="key-a", secret_key="secret-a")
        assert r.status == 403
        bodies.add(_strip_request_id(r.read()).replace(present.encode(), b"K").replace(absent.encode(), b"K"))
        bodies = {re.sub(rb"<Resource>[^<]*</Resource>", b"", x) for x in bodies}
    assert len(bodies) == 1 and b"<Code>AccessDenied</Code>" in bodies.pop()

    # The client's existence check and gather give no hit/miss signal either.
    with ObjectCacheClient(srv.url, "kvb", "key-a", "secret-a", mode="gather", timeout_s=10) as client:
        for key in (present, absent):
            with pytest.raises(AccessDenied):
                client.exists([key])
            with pytest.raises(AccessDenied):
                list(client.load_layers([key]))
    # Latency of denied probes: recorded, not asserted (the code path is the same: see above).
    lat = {}
    for label, key in (("present", present), ("absent", absent)):
        samples = []
        for _ in range(20):
            t0 = time.perf_counter()
            signed_request(srv, "HEAD", f"/kvb/{key}", access_key="key-a", secret_key="secret-a").read()
            samples.append(time.perf_counter() - t0)
        lat[label] = sorted(samples)[len(samples) // 2] * 1e3
    print(f"\n[tenancy] denied HEAD median: present {lat['present']:.2f} ms, absent {lat['absent']:.2f} ms")


def test_sharing_is_a_namespace_granted_to_both_tenants(tenancy_server):
    srv = tenancy_server
    a = srv.boto3_client(access_key="key-a", secret_key="secret-a")
    b = srv.boto3_client(access_key="key-b", secret_key="secret-b")
    a.put_object(Bucket="kvb", Key="shared/fp/common", Body=b"system prompt kv")
    assert b.get_object(Bucket="kvb", Key="shared/fp/common")["Body"].read() == b"system prompt kv"
    with ObjectCacheClient(srv.url, "kvb", "key-b", "secret-b", timeout_s=10) as client:
        assert client.exists(["shared/fp/common", "shared/fp/missing"]) == [True, False]
