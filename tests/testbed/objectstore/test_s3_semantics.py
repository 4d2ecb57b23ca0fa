"""S3 semantics of the ObjectCache server that real clients rely on, driven against a live server over
loopback: MD5 ETags, listing pagination, multipart retries and listings, stored headers and checksums,
CopyObject, versioning answers and bucket naming."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import zlib

import pytest
from botocore.exceptions import ClientError

from testbed.objectstore.objectfile import TRAILER_MAGIC, trailer_bytes
from testbed.objectstore.spool import COMPLETED_RECORD_S, MultipartSpool, multipart_etag
from testbed.objectstore.store import FilesystemStore
from testbed.objectstore.storeapi import validate_bucket_name
from testbed.wire.errors import InvalidBucketName
from tests.fixtures.servers import TENANT_ACCESS_KEY, TENANT_SECRET_KEY, signed_request

MiB = 1 << 20


def code_of(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --- 1. ETags -----------------------------------------------------------------------------------------------


def test_single_part_etag_is_the_md5_of_the_content(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    for size in (0, 1, 5 * MiB + 3):  # empty, tiny, and a body that arrives in several batches
        body = bytes(i % 253 for i in range(size))
        put = s3.put_object(Bucket=b, Key=f"e{size}", Body=body)
        assert put["ETag"] == f'"{md5_hex(body)}"'
        assert s3.head_object(Bucket=b, Key=f"e{size}")["ETag"] == put["ETag"]
        listed = s3.list_objects_v2(Bucket=b, Prefix=f"e{size}")["Contents"][0]["ETag"]
        assert listed == put["ETag"]


def test_multipart_etag_is_md5_of_part_md5s(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    datas = [b"a" * MiB, b"b" * MiB, b"tail"]
    up = s3.create_multipart_upload(Bucket=b, Key="mp")["UploadId"]
    parts = []
    for i, data in enumerate(datas, 1):
        r = s3.upload_part(Bucket=b, Key="mp", UploadId=up, PartNumber=i, Body=data)
        assert r["ETag"] == f'"{md5_hex(data)}"'
        parts.append({"PartNumber": i, "ETag": r["ETag"]})
    done = s3.complete_multipart_upload(Bucket=b, Key="mp", UploadId=up, MultipartUpload={"Parts": parts})
    expected = hashlib.md5(b"".join(hashlib.md5(d).digest() for d in datas)).hexdigest() + "-3"
    assert done["ETag"] == f'"{expected}"' and multipart_etag([md5_hex(d) for d in datas]) == expected
    assert s3.head_object(Bucket=b, Key="mp")["ETag"] == f'"{expected}"'


def test_object_files_of_older_servers_stay_readable(tmp_path):
    """An object file written before MD5 ETags and stored headers (an xxh3 ETag, no ``headers`` or
    ``checksums`` in its trailer) still opens, with its stored ETag."""
    store = FilesystemStore(tmp_path)
    store.create_bucket("old-bucket")
    meta = {"content_type": "text/plain", "metadata": {"m": "v"}, "etag": "ab" * 16, "mtime_s": 1.0e9}
    (tmp_path / "buckets" / "old-bucket" / "obj" / "k").write_bytes(b"payload" + trailer_bytes(meta))
    info = store.head_object("old-bucket", "k")
    assert (info.size_bytes, info.etag, info.metadata, info.headers, info.checksums) == (
        7,
        "ab" * 16,
        {"m": "v"},
        {},
        {},
    )
    assert TRAILER_MAGIC == b"OCMETA01"  # the format itself is unchanged


# --- 2. Listing pagination ----------------------------------------------------------------------------------


def test_list_v1_marker_at_a_common_prefix_moves_past_it(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    keys = ["a/1", "a/2", "b", "c/1", "c/2", "d"]
    for k in keys:
        s3.put_object(Bucket=b, Key=k, Body=b"x")
    page = s3.list_objects(Bucket=b, Delimiter="/", Marker="a/")
    assert [p["Prefix"] for p in page.get("CommonPrefixes", [])] == ["c/"]
    assert [o["Key"] for o in page["Contents"]] == ["b", "d"]
    # Page by page with NextMarker: every entry once, then the end.
    seen, marker, pages = [], "", 0
    while True:
        page = s3.list_objects(Bucket=b, Delimiter="/", MaxKeys=1, Marker=marker)
        pages += 1
        assert pages < 10, "listing does not advance"
        got = [o["Key"] for o in page.get("Contents", [])] + [
            p["Prefix"] for p in page.get("CommonPrefixes", [])
        ]
        seen += got
        if not page["IsTruncated"]:
            break
        assert page["NextMarker"] == got[-1]
        marker = page["NextMarker"]
    assert seen == ["a/", "b", "c/", "d"]
    # Without a delimiter there is no NextMarker: the client continues from the last key.
    page = s3.list_objects(Bucket=b, MaxKeys=2)
    assert page["IsTruncated"] and "NextMarker" not in page
    assert [o["Key"] for o in s3.list_objects(Bucket=b, Marker="a/2")["Contents"]] == keys[2:]


def test_list_max_keys_zero_returns_nothing_and_is_not_truncated(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    s3.put_object(Bucket=b, Key="k", Body=b"x")
    for page in (s3.list_objects(Bucket=b, MaxKeys=0), s3.list_objects_v2(Bucket=b, MaxKeys=0)):
        assert "Contents" not in page and page["IsTruncated"] is False
    assert s3.list_objects_v2(Bucket=b, MaxKeys=0)["KeyCount"] == 0


def test_list_v2_start_after_and_continuation_with_delimiter(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    for k in ["p/a/1", "p/a/2", "p/b", "p/c/1", "p/d"]:
        s3.put_object(Bucket=b, Key=k, Body=b"x")
    page = s3.list_objects_v2(Bucket=b, Prefix="p/", Delimiter="/", StartAfter="p/a/1")
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["p/c/"]
    assert [o["Key"] for o in page["Contents"]] == ["p/b", "p/d"]
    seen, token = [], None
    for _ in range(10):
        kw = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=b, Prefix="p/", Delimiter="/", MaxKeys=1, **kw)
        seen += [o["Key"] for o in page.get("Contents", [])] + [
            p["Prefix"] for p in page.get("CommonPrefixes", [])
        ]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert seen == ["p/a/", "p/b", "p/c/", "p/d"]


# --- 3. Multipart as clients retry it -----------------------------------------------------------------------


def test_multipart_part_replaced_listed_and_complete_retried(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    up = s3.create_multipart_upload(Bucket=b, Key="dir/mp")["UploadId"]
    other = s3.create_multipart_upload(Bucket=b, Key="zz")["UploadId"]
    s3.upload_part(Bucket=b, Key="dir/mp", UploadId=up, PartNumber=1, Body=b"old" * MiB)
    first = s3.upload_part(Bucket=b, Key="dir/mp", UploadId=up, PartNumber=1, Body=b"n" * MiB)["ETag"]
    last = s3.upload_part(Bucket=b, Key="dir/mp", UploadId=up, PartNumber=2, Body=b"end")["ETag"]
    listed = s3.list_parts(Bucket=b, Key="dir/mp", UploadId=up)
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in listed["Parts"]] == [
        (1, first, MiB),
        (2, last, 3),
    ]
    page = s3.list_parts(Bucket=b, Key="dir/mp", UploadId=up, MaxParts=1)
    assert page["IsTruncated"] and page["NextPartNumberMarker"] == 1
    page = s3.list_parts(Bucket=b, Key="dir/mp", UploadId=up, PartNumberMarker=1)
    assert [p["PartNumber"] for p in page["Parts"]] == [2] and not page["IsTruncated"]
    uploads = s3.list_multipart_uploads(Bucket=b)["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [("dir/mp", up), ("zz", other)]
    page = s3.list_multipart_uploads(Bucket=b, Delimiter="/")
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["dir/"] and len(page["Uploads"]) == 1
    page = s3.list_multipart_uploads(Bucket=b, MaxUploads=1)
    assert page["IsTruncated"] and page["NextKeyMarker"] == "dir/mp"
    page = s3.list_multipart_uploads(Bucket=b, KeyMarker="dir/mp", UploadIdMarker=up)
    assert [u["Key"] for u in page["Uploads"]] == ["zz"]
    parts = {"Parts": [{"PartNumber": 1, "ETag": first}, {"PartNumber": 2, "ETag": last}]}
    done = s3.complete_multipart_upload(Bucket=b, Key="dir/mp", UploadId=up, MultipartUpload=parts)
    again = s3.complete_multipart_upload(Bucket=b, Key="dir/mp", UploadId=up, MultipartUpload=parts)
    assert again["ETag"] == done["ETag"]
    assert s3.get_object(Bucket=b, Key="dir/mp")["Body"].read() == b"n" * MiB + b"end"
    with pytest.raises(ClientError) as err:  # the record answers only the same bucket and key
        s3.complete_multipart_upload(Bucket=b, Key="other", UploadId=up, MultipartUpload=parts)
    assert code_of(err) == "NoSuchUpload"
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=b)["Uploads"]] == ["zz"]


def test_tenant_lists_only_its_own_uploads(objectcache_server, objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    s3.create_multipart_upload(Bucket=b, Key="tenant-a/x")
    s3.create_multipart_upload(Bucket=b, Key="tenant-b/y")
    tenant = objectcache_server.boto3_client(TENANT_ACCESS_KEY, TENANT_SECRET_KEY)
    assert [u["Key"] for u in tenant.list_multipart_uploads(Bucket=b)["Uploads"]] == ["tenant-a/x"]


def test_stale_multipart_uploads_expire(start_objectcache_server):
    srv = start_objectcache_server(["--multipart-expiry-s", "1"])
    s3 = srv.boto3_client()
    s3.create_bucket(Bucket="exp")
    up = s3.create_multipart_upload(Bucket="exp", Key="k")["UploadId"]
    assert len(s3.list_multipart_uploads(Bucket="exp")["Uploads"]) == 1
    time.sleep(1.5)
    with pytest.raises(ClientError) as err:
        s3.upload_part(Bucket="exp", Key="k", UploadId=up, PartNumber=1, Body=b"x")
    assert code_of(err) == "NoSuchUpload"
    assert "Uploads" not in s3.list_multipart_uploads(Bucket="exp")
    assert not (srv.data_dir / "multipart" / up).exists()  # swept from the spool, not just hidden


# --- 4. Stored headers, metadata, checksums -----------------------------------------------------------------


def test_stored_headers_and_metadata_round_trip(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    gz = zlib.compress(b"hello " * 100)
    meta = {"plain": "v", "encoded": "=?UTF-8?B?" + base64.b64encode("café ✓ 日本".encode()).decode() + "?="}
    s3.put_object(
        Bucket=b,
        Key="h",
        Body=gz,
        ContentEncoding="deflate",
        CacheControl="max-age=60",
        Expires="Wed, 21 Oct 2037 07:28:00 GMT",
        ContentDisposition='attachment; filename="x.txt"',
        ContentLanguage="de-CH",
        ContentType="text/plain",
        Metadata=meta,
    )
    for r in (s3.head_object(Bucket=b, Key="h"), s3.get_object(Bucket=b, Key="h")):
        assert r["ContentEncoding"] == "deflate" and r["CacheControl"] == "max-age=60"
        assert r["ExpiresString"] == "Wed, 21 Oct 2037 07:28:00 GMT"
        assert r["ContentDisposition"] == 'attachment; filename="x.txt"' and r["ContentLanguage"] == "de-CH"
        assert r["Metadata"] == meta and r["ContentType"] == "text/plain"
    assert s3.get_object(Bucket=b, Key="h")["Body"].read() == gz  # stored as sent, not decoded


def test_raw_utf8_metadata_round_trips(objectcache_server, objectcache_bucket):
    """A client that sends user metadata as raw UTF-8 bytes (signed as UTF-8) gets the same bytes back."""
    import http.client

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    srv, value = objectcache_server, "café ✓ 日本"
    url = f"{srv.url}/{objectcache_bucket}/raw"
    req = AWSRequest(method="PUT", url=url, data=b"x", headers={"x-amz-meta-name": value})
    S3SigV4Auth(Credentials(srv.access_key, srv.secret_key), "s3", srv.region).add_auth(req)
    headers = {k: (v.encode() if k.lower() == "x-amz-meta-name" else v) for k, v in req.headers.items()}
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("PUT", f"/{objectcache_bucket}/raw", body=b"x", headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp = signed_request(srv, "HEAD", f"/{objectcache_bucket}/raw")
    resp.read()
    assert resp.getheader("x-amz-meta-name").encode("latin-1") == value.encode()


CHECKSUMS = {
    "CRC32": lambda d: zlib.crc32(d).to_bytes(4, "big"),
    "SHA1": lambda d: hashlib.sha1(d).digest(),
    "SHA256": lambda d: hashlib.sha256(d).digest(),
}


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"])
def test_checksums_verified_stored_and_returned(objectcache_s3, objectcache_bucket, algorithm):
    if algorithm in ("CRC32C", "CRC64NVME"):
        pytest.importorskip("awscrt", reason="CRC32C / CRC64NVME need awscrt (pyproject's dev extra)")
    s3, b = objectcache_s3, objectcache_bucket
    body = b"checksummed " * 1000
    put = s3.put_object(Bucket=b, Key="c", Body=body, ChecksumAlgorithm=algorithm)
    field = f"Checksum{algorithm}"
    assert put[field]
    if algorithm in CHECKSUMS:
        assert put[field] == base64.b64encode(CHECKSUMS[algorithm](body)).decode()
    head = s3.head_object(Bucket=b, Key="c", ChecksumMode="ENABLED")
    assert head[field] == put[field] and head["ChecksumType"] == "FULL_OBJECT"
    got = s3.get_object(Bucket=b, Key="c", ChecksumMode="ENABLED")
    assert got[field] == put[field] and got["Body"].read() == body
    assert field not in s3.get_object(Bucket=b, Key="c", Range="bytes=0-9")  # not for a range


def test_checksum_mismatch_is_bad_digest(objectcache_server, objectcache_bucket):
    path = f"/{objectcache_bucket}/bad"
    wrong = base64.b64encode(zlib.crc32(b"other").to_bytes(4, "big")).decode()
    resp = signed_request(
        objectcache_server, "PUT", path, body=b"data", headers={"x-amz-checksum-crc32": wrong}
    )
    assert resp.status == 400 and b"<Code>BadDigest</Code>" in resp.read()
    resp = signed_request(
        objectcache_server, "PUT", path, body=b"data", headers={"x-amz-checksum-md4": "AAAA"}
    )
    assert resp.status in (200, 400)
    resp.read()
    resp = signed_request(objectcache_server, "HEAD", path)
    resp.read()
    assert resp.status in (200, 404)


def test_multipart_composite_checksum(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    datas = [b"p" * MiB, b"q" * 100]
    up = s3.create_multipart_upload(Bucket=b, Key="cm", ChecksumAlgorithm="SHA256")["UploadId"]
    parts = []
    for i, d in enumerate(datas, 1):
        r = s3.upload_part(Bucket=b, Key="cm", UploadId=up, PartNumber=i, Body=d, ChecksumAlgorithm="SHA256")
        parts.append({"PartNumber": i, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]})
    listed = s3.list_parts(Bucket=b, Key="cm", UploadId=up)["Parts"]
    assert [p["ChecksumSHA256"] for p in listed] == [p["ChecksumSHA256"] for p in parts]
    done = s3.complete_multipart_upload(Bucket=b, Key="cm", UploadId=up, MultipartUpload={"Parts": parts})
    expected = base64.b64encode(hashlib.sha256(b"".join(hashlib.sha256(d).digest() for d in datas)).digest())
    assert done["ChecksumSHA256"] == expected.decode() + "-2"
    head = s3.head_object(Bucket=b, Key="cm", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == done["ChecksumSHA256"] and head["ChecksumType"] == "COMPOSITE"


# --- 5. CopyObject, versioning, bucket names ----------------------------------------------------------------


def test_copy_object_directives_and_move(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    s3.put_object(
        Bucket=b,
        Key="src",
        Body=b"copied",
        ContentType="text/x",
        Metadata={"a": "1"},
        CacheControl="no-cache",
    )
    r = s3.copy_object(Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "src"})
    assert r["CopyObjectResult"]["ETag"] == f'"{md5_hex(b"copied")}"'
    head = s3.head_object(Bucket=b, Key="dst")
    assert (head["ContentType"], head["Metadata"], head["CacheControl"]) == ("text/x", {"a": "1"}, "no-cache")
    s3.copy_object(
        Bucket=b,
        Key="dst",
        CopySource=f"{b}/src",
        MetadataDirective="REPLACE",
        ContentType="text/y",
        Metadata={"b": "2"},
    )
    head = s3.head_object(Bucket=b, Key="dst")
    assert (head["ContentType"], head["Metadata"], head.get("CacheControl")) == ("text/y", {"b": "2"}, None)
    with pytest.raises(ClientError) as err:
        s3.copy_object(Bucket=b, Key="src", CopySource={"Bucket": b, "Key": "src"})
    assert code_of(err) == "InvalidRequest"
    s3.copy_object(Bucket=b, Key="src", CopySource={"Bucket": b, "Key": "src"}, MetadataDirective="REPLACE")
    with pytest.raises(ClientError) as err:
        s3.copy_object(Bucket=b, Key="x", CopySource={"Bucket": b, "Key": "missing"})
    assert code_of(err) == "NoSuchKey"
    with pytest.raises(ClientError) as err:
        s3.copy_object(Bucket=b, Key="x", CopySource={"Bucket": b, "Key": "src"}, CopySourceIfMatch='"nope"')
    assert code_of(err) == "PreconditionFailed"
    # A move (``aws s3 mv``): copy, then delete the source.
    s3.copy_object(Bucket=b, Key="moved", CopySource={"Bucket": b, "Key": "dst"})
    s3.delete_object(Bucket=b, Key="dst")
    assert s3.get_object(Bucket=b, Key="moved")["Body"].read() == b"copied"
    # Multipart copy (UploadPartCopy), as managed transfers copy large objects.
    big = bytes(range(256)) * 8192
    s3.put_object(Bucket=b, Key="big", Body=big)
    up = s3.create_multipart_upload(Bucket=b, Key="big2")["UploadId"]
    parts = []
    for i, rng in enumerate(["bytes=0-1048575", f"bytes=1048576-{len(big) - 1}"], 1):
        r = s3.upload_part_copy(
            Bucket=b, Key="big2", UploadId=up, PartNumber=i, CopySource=f"{b}/big", CopySourceRange=rng
        )
        parts.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
    s3.complete_multipart_upload(Bucket=b, Key="big2", UploadId=up, MultipartUpload={"Parts": parts})
    assert s3.get_object(Bucket=b, Key="big2")["Body"].read() == big


def test_copy_stays_inside_the_tenants_namespace(objectcache_server, objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    s3.put_object(Bucket=b, Key="tenant-b/secret", Body=b"s")
    s3.put_object(Bucket=b, Key="tenant-a/mine", Body=b"m")
    tenant = objectcache_server.boto3_client(TENANT_ACCESS_KEY, TENANT_SECRET_KEY)
    with pytest.raises(ClientError) as err:
        tenant.copy_object(
            Bucket=b, Key="tenant-a/stolen", CopySource={"Bucket": b, "Key": "tenant-b/secret"}
        )
    assert code_of(err) == "AccessDenied"
    tenant.copy_object(Bucket=b, Key="tenant-a/copy", CopySource={"Bucket": b, "Key": "tenant-a/mine"})
    assert tenant.get_object(Bucket=b, Key="tenant-a/copy")["Body"].read() == b"m"


def test_versioning_is_never_enabled(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    s3.put_object(Bucket=b, Key="v/1", Body=b"one")
    s3.put_object(Bucket=b, Key="v/2", Body=b"two")
    v = s3.get_bucket_versioning(Bucket=b)
    assert "Status" not in v and "MFADelete" not in v
    listed = s3.list_object_versions(Bucket=b)
    assert [(x["Key"], x["VersionId"], x["IsLatest"]) for x in listed["Versions"]] == [
        ("v/1", "null", True),
        ("v/2", "null", True),
    ]
    assert listed["Versions"][0]["ETag"] == f'"{md5_hex(b"one")}"'
    page = s3.list_object_versions(Bucket=b, MaxKeys=1)
    assert page["IsTruncated"] and page["NextKeyMarker"] == "v/1"
    page = s3.list_object_versions(Bucket=b, KeyMarker="v/1")
    assert [x["Key"] for x in page["Versions"]] == ["v/2"]
    with pytest.raises(ClientError) as err:
        s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    assert code_of(err) == "NotImplemented"


@pytest.mark.parametrize(
    "name",
    [
        "ab",
        "a" * 64,
        "Upper",
        "192.168.5.123",
        "foo.-bar",
        "foo-.bar",
        "a..b",
        "xn--abc",
        "bucket-s3alias",
        "-ab",
        "ab-",
        "a_b",
    ],
)
def test_invalid_bucket_names_are_refused(objectcache_server, name):
    with pytest.raises(InvalidBucketName):
        validate_bucket_name(name)
    resp = signed_request(objectcache_server, "PUT", f"/{name}")
    body = resp.read()
    assert resp.status == 400 and b"<Code>InvalidBucketName</Code>" in body, body


def test_valid_bucket_names(objectcache_s3):
    for name in ("abc", "a" * 63, "my.bucket-1", "192.168.5.bucket"):
        assert validate_bucket_name(name) == name
    objectcache_s3.create_bucket(Bucket="my.dotted-bucket")
    objectcache_s3.head_bucket(Bucket="my.dotted-bucket")


def test_checksum_json_is_what_the_trailer_holds(tmp_path):
    store = FilesystemStore(tmp_path)
    store.create_bucket("bkt")
    w = store.begin_write("bkt", "k", "text/plain", {}, {"Cache-Control": "no-store"})
    w.write(b"abc")
    info = w.commit(False, None, {"crc32": "NSRBwg=="})
    assert info.etag == md5_hex(b"abc") and info.headers == {"Cache-Control": "no-store"}
    raw = (tmp_path / "buckets" / "bkt" / "obj" / "k").read_bytes()
    doc = json.loads(raw[3:-16])
    assert doc["checksums"] == {"crc32": "NSRBwg=="} and doc["headers"] == {"Cache-Control": "no-store"}


def test_spool_sweeps_expired_uploads_at_start_and_forgets_old_completions(tmp_path):
    old = MultipartSpool(tmp_path)
    stale = old.create("bkt", "stale", "text/plain", {})
    live = old.create("bkt", "live", "text/plain", {})
    doc = json.loads((tmp_path / stale.upload_id / "upload.json").read_text())
    doc["initiated_s"] -= 2 * 86400
    (tmp_path / stale.upload_id / "upload.json").write_text(json.dumps(doc))
    old.complete(live.upload_id, "bkt", "live", "e" * 32 + "-1")
    assert old.completed_etag(live.upload_id, "bkt", "live") == "e" * 32 + "-1"
    restarted = MultipartSpool(tmp_path, expiry_s=86400)  # a server start sweeps
    assert not (tmp_path / stale.upload_id).exists()
    assert restarted.uploads("bkt") == []
    later_s = time.time() + COMPLETED_RECORD_S + 1
    restarted.sweep(now_s=later_s)
    assert not (tmp_path / "completed" / f"{live.upload_id}.json").exists()
