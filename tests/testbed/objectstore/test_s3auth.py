"""SigV4 verification against AWS's published examples and botocore's signer; aws-chunked decoding."""

from __future__ import annotations

import hashlib
import zlib
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from testbed.objectstore.auth import Credential, CredentialStore, verify_request
from testbed.objectstore.chunked import ChunkedDecoder, checksum_b64, new_checksum
from testbed.objectstore.server import parse_query
from testbed.objectstore.sigv4 import STREAMING_SIGNED, STREAMING_UNSIGNED_TRAILER, S3AuthError

# The credentials and request of AWS's "Signature Calculations for the Authorization Header" examples.
AK, SK = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EXAMPLE_TIME = datetime(2013, 5, 24, tzinfo=UTC)
EMPTY = hashlib.sha256(b"").hexdigest()
STORE = CredentialStore([Credential(AK, SK)])


def test_aws_example_get_object_header_signed():
    headers = {
        "Host": "examplebucket.s3.amazonaws.com",
        "Range": "bytes=0-9",
        "x-amz-content-sha256": EMPTY,
        "x-amz-date": "20130524T000000Z",
        "Authorization": (
            f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request,"
            "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        ),
    }
    res = verify_request("GET", "/test.txt", [], headers, STORE, EXAMPLE_TIME)
    assert res.credential.access_key == AK and res.payload_hash == EMPTY
    with pytest.raises(S3AuthError) as err:
        verify_request("GET", "/test.txt", [], dict(headers, Range="bytes=0-10"), STORE, EXAMPLE_TIME)
    assert err.value.s3_code == "SignatureDoesNotMatch"
    with pytest.raises(S3AuthError) as err:
        verify_request("GET", "/test.txt", [], headers, STORE, EXAMPLE_TIME + timedelta(hours=1))
    assert err.value.s3_code == "RequestTimeTooSkewed"
    with pytest.raises(S3AuthError) as err:
        verify_request(
            "GET", "/test.txt", [], headers, CredentialStore([Credential("other", SK)]), EXAMPLE_TIME
        )
    assert err.value.s3_code == "InvalidAccessKeyId"


def test_aws_example_presigned_url():
    query = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", f"{AK}/20130524/us-east-1/s3/aws4_request"),
        ("X-Amz-Date", "20130524T000000Z"),
        ("X-Amz-Expires", "86400"),
        ("X-Amz-SignedHeaders", "host"),
        ("X-Amz-Signature", "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"),
    ]
    headers = {"Host": "examplebucket.s3.amazonaws.com"}
    verify_request("GET", "/test.txt", query, headers, STORE, EXAMPLE_TIME + timedelta(hours=2))
    with pytest.raises(S3AuthError, match="expired"):
        verify_request("GET", "/test.txt", query, headers, STORE, EXAMPLE_TIME + timedelta(days=2))
    with pytest.raises(S3AuthError) as err:
        verify_request("GET", "/other.txt", query, headers, STORE, EXAMPLE_TIME)
    assert err.value.s3_code == "SignatureDoesNotMatch"


def _split(req):
    parts = urlsplit(req.url)
    return parts.path, parse_query(parts.query)


@pytest.mark.parametrize("key", ["plain", "a b/c+d", "ümlaut/%41~x", "semi;colon=eq&amp"])
def test_botocore_signed_requests_verify(key):
    from urllib.parse import quote

    url = "http://127.0.0.1:9000/bucket/" + quote(key, safe="/~")
    now = datetime.now(UTC)
    req = AWSRequest(
        "PUT", url + "?partNumber=1&uploadId=x%20y", data=b"body", headers={"x-amz-meta-k": " a  b "}
    )
    S3SigV4Auth(Credentials(AK, SK), "s3", "us-east-1").add_auth(req)
    path, query = _split(req)
    headers = list(req.headers.items()) + [("Host", "127.0.0.1:9000")]
    res = verify_request("PUT", path, query, headers, STORE, now)
    assert res.payload_hash == hashlib.sha256(b"body").hexdigest()
    with pytest.raises(S3AuthError):
        verify_request("PUT", path, query, headers, CredentialStore([Credential(AK, "wrong")]), now)

    pre = AWSRequest("GET", url)
    S3SigV4QueryAuth(Credentials(AK, SK), "s3", "us-east-1", expires=60).add_auth(pre)
    path, query = _split(pre)
    verify_request("GET", path, query, [("Host", "127.0.0.1:9000")], STORE, now)
    with pytest.raises(S3AuthError, match="expired"):
        verify_request("GET", path, query, [("Host", "127.0.0.1:9000")], STORE, now + timedelta(seconds=120))


def test_anonymous_and_malformed_requests_are_denied():
    with pytest.raises(S3AuthError) as err:
        verify_request("GET", "/b/k", [], {"Host": "h"}, STORE, EXAMPLE_TIME)
    assert err.value.s3_code == "AccessDenied"
    bad = {"Host": "h", "Authorization": "AWS4-HMAC-SHA256 garbage", "x-amz-date": "20130524T000000Z"}
    with pytest.raises(S3AuthError) as err:
        verify_request("GET", "/b/k", [], bad, STORE, EXAMPLE_TIME)
    assert err.value.http_status == 400


def test_namespaces_and_credential_files(tmp_path):
    tenant = Credential("t", "s", namespaces=("tenant-a",), buckets=("kv",))
    assert tenant.allows_key("tenant-a/fp/abc") and not tenant.allows_key("tenant-ab/fp/abc")
    assert not tenant.allows_key("tenant-a") and not tenant.allows_key("../tenant-a/x")
    assert tenant.allows_bucket("kv") and not tenant.allows_bucket("other")
    assert Credential("a", "b").allows_key("anything")
    assert "topsecret" not in repr(Credential("t", "topsecret"))
    path = tmp_path / "creds.json"
    path.write_text('{"credentials": [{"access_key": "t", "secret_key": "s", "namespaces": ["tenant-a"]}]}')
    store = CredentialStore.default(path, env={})
    assert store.get("t").namespaces == ("tenant-a",) and store.get("objectcache") is None
    env_store = CredentialStore.default(
        None, env={"OBJECTCACHE_ACCESS_KEY": "x", "OBJECTCACHE_SECRET_KEY": "y"}
    )
    assert env_store.get("x").is_admin and len(env_store) == 1
    assert CredentialStore.default(None, env={}).get("objectcache").is_admin


# AWS's "Signature Calculations for the Authorization Header: Transferring Payload in Multiple Chunks" example:
# PUT /examplebucket/chunkObject.txt, 66560 bytes of 'a' in chunks of 64 KiB, 1 KiB and 0.
SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
CHUNK_SIGS = [
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
]


def _signed_chunked_body(sigs) -> bytes:
    out = b""
    for size, sig in zip([65536, 1024, 0], sigs):
        out += f"{size:x};chunk-signature={sig}\r\n".encode() + b"a" * size + b"\r\n"
    return out


def _aws_chunked_auth():
    headers = {
        "Host": "s3.amazonaws.com",
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": STREAMING_SIGNED,
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560",
        "Content-Length": "66824",
        "Authorization": (
            f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request,"
            "SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
            f"x-amz-decoded-content-length;x-amz-storage-class,Signature={SEED}"
        ),
    }
    return verify_request("PUT", "/examplebucket/chunkObject.txt", [], headers, STORE, EXAMPLE_TIME)


def test_aws_example_signed_chunks():
    auth = _aws_chunked_auth()
    body = _signed_chunked_body(CHUNK_SIGS)
    assert len(body) == 66824
    dec = ChunkedDecoder(auth, STREAMING_SIGNED)
    out = b""
    for i in range(0, len(body), 1000):  # arbitrary network fragmentation
        out += b"".join(bytes(p) for p in dec.feed(body[i : i + 1000]))
    assert dec.finish() == {} and out == b"a" * 66560
    tampered = _signed_chunked_body([CHUNK_SIGS[0], CHUNK_SIGS[0], CHUNK_SIGS[2]])
    with pytest.raises(S3AuthError) as err:
        ChunkedDecoder(_aws_chunked_auth(), STREAMING_SIGNED).feed(tampered)
    assert err.value.s3_code == "SignatureDoesNotMatch"


def test_botocore_aws_chunked_unsigned_trailer():
    from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

    data = bytes(range(256)) * 1000
    wrapped = AwsChunkedWrapper(
        __import__("io").BytesIO(data), checksum_cls=Crc32Checksum, checksum_name="x-amz-checksum-crc32"
    ).read()
    dec = ChunkedDecoder(None, STREAMING_UNSIGNED_TRAILER)
    out = b"".join(bytes(p) for p in dec.feed(wrapped))
    trailers = dec.finish()
    assert out == data
    c = new_checksum("crc32")
    c.update(data)
    assert trailers["x-amz-checksum-crc32"] == checksum_b64(c)
    assert int.from_bytes(c.digest(), "big") == zlib.crc32(data)
    with pytest.raises(S3AuthError):
        ChunkedDecoder(None, STREAMING_UNSIGNED_TRAILER).finish()  # ended before the final chunk
    with pytest.raises(S3AuthError):
        ChunkedDecoder(None, STREAMING_UNSIGNED_TRAILER).feed(b"zz\r\n")
