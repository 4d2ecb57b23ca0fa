"""S3 compatibility of the ObjectCache server, driven by boto3 against a real server process."""

from __future__ import annotations

import io
import threading
import urllib.error
import urllib.request

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from testbed.objectstore.launch import start_server
from tests.fixtures.servers import (
    TENANT_ACCESS_KEY,
    TENANT_SECRET_KEY,
    TEST_CREDENTIALS,
    signed_request,
    wait_for_metrics,
)

MiB = 1 << 20


def code_of(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


def test_put_get_head_delete(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    body = bytes(range(256)) * 4096  # 1 MiB: boto3 sends Expect: 100-continue
    put = s3.put_object(
        Bucket=b, Key="ns/obj one", Body=body, ContentType="application/x-kv", Metadata={"m": "v"}
    )
    head = s3.head_object(Bucket=b, Key="ns/obj one")
    assert head["ContentLength"] == len(body) and head["ETag"] == put["ETag"]
    assert head["ContentType"] == "application/x-kv" and head["Metadata"] == {"m": "v"}
    got = s3.get_object(Bucket=b, Key="ns/obj one")
    assert got["Body"].read() == body and got["ETag"] == put["ETag"]
    s3.delete_object(Bucket=b, Key="ns/obj one")
    s3.delete_object(Bucket=b, Key="ns/obj one")  # deleting a missing key succeeds, like S3
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket=b, Key="ns/obj one")
    assert code_of(err) == "NoSuchKey"
    with pytest.raises(ClientError) as err:
        s3.head_object(Bucket=b, Key="ns/obj one")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket="no-such-bucket", Key="k")
    assert code_of(err) == "NoSuchBucket"
    s3.put_object(Bucket=b, Key="empty", Body=b"")
    assert s3.get_object(Bucket=b, Key="empty")["Body"].read() == b""


def test_ranges(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    body = bytes(i % 251 for i in range(10000))
    s3.put_object(Bucket=b, Key="r", Body=body)
    for rng, expected, content_range in [
        ("bytes=0-9", body[:10], "bytes 0-9/10000"),
        ("bytes=9990-", body[9990:], "bytes 9990-9999/10000"),
        ("bytes=-5", body[-5:], "bytes 9995-9999/10000"),
        ("bytes=-20000", body, "bytes 0-9999/10000"),
        ("bytes=9000-20000", body[9000:], "bytes 9000-9999/10000"),
    ]:
        got = s3.get_object(Bucket=b, Key="r", Range=rng)
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206, rng
        assert got["ContentRange"] == content_range and got["Body"].read() == expected, rng
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket=b, Key="r", Range="bytes=10000-")
    assert code_of(err) == "InvalidRange"
    assert err.value.response["ResponseMetadata"]["HTTPHeaders"]["content-range"] == "bytes */10000"


def test_list_v2_continuation_prefix_delimiter(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    keys = [f"ns/a/{i:02d}" for i in range(7)] + ["ns/b/x", "ns/b/y", "ns/top", "other/z"]
    for k in keys:
        s3.put_object(Bucket=b, Key=k, Body=k.encode())
    seen, token, pages = [], None, 0
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=b, Prefix="ns/", MaxKeys=3, **kw)
        pages += 1
        seen += [o["Key"] for o in page.get("Contents", [])]
        assert page["KeyCount"] == len(page.get("Contents", []))
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert seen == sorted(k for k in keys if k.startswith("ns/")) and pages == 4
    page = s3.list_objects_v2(Bucket=b, Prefix="ns/", Delimiter="/")
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["ns/a/", "ns/b/"]
    assert [o["Key"] for o in page["Contents"]] == ["ns/top"]
    page = s3.list_objects_v2(Bucket=b, Delimiter="/", MaxKeys=1)
    assert page["IsTruncated"] and [p["Prefix"] for p in page["CommonPrefixes"]] == ["ns/"]
    page = s3.list_objects_v2(Bucket=b, Delimiter="/", ContinuationToken=page["NextContinuationToken"])
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["other/"] and not page["IsTruncated"]
    page = s3.list_objects_v2(Bucket=b, StartAfter="ns/b/x")
    assert [o["Key"] for o in page["Contents"]] == ["ns/b/y", "ns/top", "other/z"]
    assert [o["Key"] for o in s3.list_objects(Bucket=b, Prefix="ns/b/")["Contents"]] == ["ns/b/x", "ns/b/y"]
    paginator = s3.get_paginator("list_objects_v2")
    assert (
        sum(
            len(p.get("Contents", [])) for p in paginator.paginate(Bucket=b, PaginationConfig={"PageSize": 2})
        )
        == 11
    )
    assert b in [x["Name"] for x in s3.list_buckets()["Buckets"]]
    res = s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": k} for k in keys[:3]]})
    assert sorted(d["Key"] for d in res["Deleted"]) == keys[:3]
    assert s3.list_objects_v2(Bucket=b)["KeyCount"] == len(keys) - 3


def test_multipart_upload(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    parts_data = [b"a" * MiB, b"b" * MiB, b"tail"]
    up = s3.create_multipart_upload(Bucket=b, Key="mp", ContentType="application/x-test")
    parts = []
    for i, data in enumerate(parts_data, 1):
        r = s3.upload_part(Bucket=b, Key="mp", UploadId=up["UploadId"], PartNumber=i, Body=data)
        parts.append({"PartNumber": i, "ETag": r["ETag"]})
    with pytest.raises(ClientError) as err:
        s3.complete_multipart_upload(
            Bucket=b, Key="mp", UploadId=up["UploadId"], MultipartUpload={"Parts": [parts[1], parts[0]]}
        )
    assert code_of(err) == "InvalidPartOrder"
    bad = [dict(parts[0], ETag='"' + "0" * 32 + '"')] + parts[1:]
    with pytest.raises(ClientError) as err:
        s3.complete_multipart_upload(
            Bucket=b, Key="mp", UploadId=up["UploadId"], MultipartUpload={"Parts": bad}
        )
    assert code_of(err) == "InvalidPart"
    done = s3.complete_multipart_upload(
        Bucket=b, Key="mp", UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert done["ETag"].endswith('-3"')
    got = s3.get_object(Bucket=b, Key="mp")
    assert got["Body"].read() == b"".join(parts_data) and got["ContentType"] == "application/x-test"
    with pytest.raises(ClientError) as err:
        s3.upload_part(Bucket=b, Key="mp", UploadId=up["UploadId"], PartNumber=1, Body=b"x")
    assert code_of(err) == "NoSuchUpload"
    # A small non-last part is refused; an aborted upload is gone.
    up2 = s3.create_multipart_upload(Bucket=b, Key="mp2")
    small = [
        {
            "PartNumber": i,
            "ETag": s3.upload_part(Bucket=b, Key="mp2", UploadId=up2["UploadId"], PartNumber=i, Body=b"x")[
                "ETag"
            ],
        }
        for i in (1, 2)
    ]
    with pytest.raises(ClientError) as err:
        s3.complete_multipart_upload(
            Bucket=b, Key="mp2", UploadId=up2["UploadId"], MultipartUpload={"Parts": small}
        )
    assert code_of(err) == "EntityTooSmall"
    s3.abort_multipart_upload(Bucket=b, Key="mp2", UploadId=up2["UploadId"])
    with pytest.raises(ClientError) as err:
        s3.abort_multipart_upload(Bucket=b, Key="mp2", UploadId=up2["UploadId"])
    assert code_of(err) == "NoSuchUpload"
    # boto3's managed transfer: concurrent parts (s3transfer rounds parts up to 5 MiB).
    data = bytes(range(256)) * (40 * 1024 + 7)
    cfg = TransferConfig(multipart_threshold=MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    s3.upload_fileobj(io.BytesIO(data), b, "managed", Config=cfg)
    assert s3.head_object(Bucket=b, Key="managed")["ETag"].endswith('-3"')
    out = io.BytesIO()
    s3.download_fileobj(b, "managed", out, Config=cfg)
    assert out.getvalue() == data


def test_conditional_put_never_clobbers(objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    s3.put_object(Bucket=b, Key="c", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=b, Key="c", Body=b"second", IfNoneMatch="*")
    assert code_of(err) == "PreconditionFailed"
    assert s3.get_object(Bucket=b, Key="c")["Body"].read() == b"first"
    # Racing writers of one chunk: exactly one wins and its bytes are what is stored.
    results: dict[int, str] = {}

    def writer(i: int) -> None:
        try:
            s3.put_object(Bucket=b, Key="race", Body=bytes([i]) * (256 * 1024), IfNoneMatch="*")
            results[i] = "ok"
        except ClientError as e:
            results[i] = e.response["Error"]["Code"]

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [i for i, r in results.items() if r == "ok"]
    assert len(winners) == 1 and sorted(results.values()).count("PreconditionFailed") == 7
    assert s3.get_object(Bucket=b, Key="race")["Body"].read() == bytes([winners[0]]) * (256 * 1024)


def test_presigned_urls(objectcache_server, objectcache_s3, objectcache_bucket):
    s3, b = objectcache_s3, objectcache_bucket
    put_url = s3.generate_presigned_url("put_object", Params={"Bucket": b, "Key": "p/q r"}, ExpiresIn=60)
    req = urllib.request.Request(put_url, data=b"presigned body", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    get_url = s3.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "p/q r"}, ExpiresIn=60)
    with urllib.request.urlopen(get_url, timeout=10) as r:
        assert r.read() == b"presigned body"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(get_url.replace("q%20r", "q%20s"), timeout=10)
    assert err.value.code == 403 and b"SignatureDoesNotMatch" in err.value.read()


def test_auth_errors_and_namespaces(objectcache_server, objectcache_s3, objectcache_bucket):
    srv, b = objectcache_server, objectcache_bucket
    with pytest.raises(ClientError) as err:
        srv.boto3_client(secret_key="not-the-secret").list_objects_v2(Bucket=b)
    assert code_of(err) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as err:
        srv.boto3_client(access_key="nobody", secret_key="x").list_objects_v2(Bucket=b)
    assert code_of(err) == "InvalidAccessKeyId"
    tenant = srv.boto3_client(access_key=TENANT_ACCESS_KEY, secret_key=TENANT_SECRET_KEY)
    tenant.put_object(Bucket=b, Key="tenant-a/fp/k1", Body=b"mine")
    assert tenant.get_object(Bucket=b, Key="tenant-a/fp/k1")["Body"].read() == b"mine"
    assert tenant.list_objects_v2(Bucket=b, Prefix="tenant-a/")["KeyCount"] == 1
    objectcache_s3.put_object(Bucket=b, Key="tenant-b/fp/k1", Body=b"theirs")
    for call in (
        lambda: tenant.get_object(Bucket=b, Key="tenant-b/fp/k1"),
        lambda: tenant.put_object(Bucket=b, Key="tenant-b/fp/k2", Body=b"x"),
        lambda: tenant.put_object(Bucket=b, Key="tenant-ab/fp/k2", Body=b"x"),
        lambda: tenant.delete_object(Bucket=b, Key="tenant-b/fp/k1"),
        lambda: tenant.list_objects_v2(Bucket=b),
        lambda: tenant.list_objects_v2(Bucket=b, Prefix="tenant-"),
        lambda: tenant.delete_bucket(Bucket=b),
        lambda: tenant.create_multipart_upload(Bucket=b, Key="tenant-b/x"),
    ):
        with pytest.raises(ClientError) as err:
            call()
        assert code_of(err) == "AccessDenied"
    resp = signed_request(srv, "GET", f"/{b}/tenant-b/fp/k1")  # no Authorization at all is anonymous:
    assert resp.status == 200 and resp.read() == b"theirs"  # (this one is signed by the admin)
    import http.client

    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    conn.request("GET", f"/{b}/tenant-b/fp/k1")
    anon = conn.getresponse()
    assert anon.status == 403 and b"AccessDenied" in anon.read()


def test_payload_integrity_checks(objectcache_server, objectcache_bucket):
    from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

    srv, b = objectcache_server, objectcache_bucket
    data = bytes(range(256)) * 3000
    # boto3 >= 1.36 sends aws-chunked bodies with a trailing CRC32 over TLS; the same bytes here.
    encoded = AwsChunkedWrapper(
        io.BytesIO(data), checksum_cls=Crc32Checksum, checksum_name="x-amz-checksum-crc32"
    ).read()
    headers = {
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)),
        "x-amz-trailer": "x-amz-checksum-crc32",
    }
    resp = _put_raw(srv, f"/{b}/chunked", encoded, headers)
    assert resp.status == 200, resp.read()
    assert resp.getheader("x-amz-checksum-crc32") is not None
    assert srv.boto3_client().get_object(Bucket=b, Key="chunked")["Body"].read() == data
    corrupt = encoded.replace(b"\x10\x11\x12", b"\x10\x11\x13", 1)
    resp = _put_raw(srv, f"/{b}/chunked2", corrupt, headers)
    assert resp.status == 400 and b"BadDigest" in resp.read()
    # A signed payload hash that does not match the body.
    resp = signed_request(srv, "PUT", f"/{b}/x", body=b"abc", payload_hash="0" * 64)
    assert resp.status == 400 and b"XAmzContentSHA256Mismatch" in resp.read()
    resp = signed_request(srv, "PUT", f"/{b}/x", body=b"abc", headers={"x-amz-checksum-crc32": "AAAAAA=="})
    assert resp.status == 400 and b"BadDigest" in resp.read()
    with pytest.raises(ClientError) as err:
        srv.boto3_client().get_object(Bucket=b, Key="chunked2")
    assert code_of(err) == "NoSuchKey"  # a failed upload leaves nothing behind


def _put_raw(srv, path, body, headers):
    """PUT whose signed x-amz-content-sha256 is the streaming mode named in ``headers``."""
    return signed_request(
        srv, "PUT", path, body=body, headers=headers, payload_hash=headers["x-amz-content-sha256"]
    )


def test_bad_input_gets_s3_errors_not_500(objectcache_server, objectcache_bucket):
    srv, b = objectcache_server, objectcache_bucket
    cases = [
        ("GET", "/A_Bad_Bucket/k", 400),
        ("GET", f"/{b}/k?partNumber=abc", 501),
        ("PUT", f"/{b}/k?partNumber=0&uploadId=zzz", 400),
        ("PUT", f"/{b}/k?partNumber=1&uploadId=zzz", 404),
        ("POST", f"/{b}?delete", 400),
        ("PATCH", f"/{b}/k", 501),
        ("GET", f"/{b}/" + "k" * 1100, 400),
        ("GET", f"/{b}?list-type=2&max-keys=many", 400),
        ("GET", f"/{b}?list-type=2&continuation-token=%21%21notbase64", 400),
    ]
    for method, path, status in cases:
        resp = signed_request(srv, method, path, body=b"<not xml" if method == "POST" else b"")
        body = resp.read()
        assert resp.status == status, (method, path, resp.status, body)
        assert body.startswith(b"<?xml") and b"<Code>" in body and b"Traceback" not in body
    assert "Traceback" not in srv.log_tail(100000)


def test_limits_restart_and_metrics(tmp_path, start_objectcache_server):
    srv = start_objectcache_server(["--max-object-mib", "1"])
    s3 = srv.boto3_client()
    s3.create_bucket(Bucket="lim")
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket="lim", Key="big", Body=b"x" * (MiB + 1))
    assert code_of(err) == "EntityTooLarge"
    # Objects survive a restart of the filesystem store.
    data_dir = tmp_path / "persist"
    with start_server(data_dir, credentials=TEST_CREDENTIALS) as one:
        c = one.boto3_client()
        c.create_bucket(Bucket="keep")
        c.put_object(Bucket="keep", Key="k", Body=b"durable")
    with start_server(data_dir, credentials=TEST_CREDENTIALS) as two:
        c = two.boto3_client()
        assert c.get_object(Bucket="keep", Key="k")["Body"].read() == b"durable"
        needles = [
            'objectcache_requests_total{op="GetObject",status="200"} 1',
            'objectcache_bytes_served_total{op="GetObject"} 7',
            "objectcache_active_streams 0",
            'objectcache_request_duration_seconds_count{op="GetObject"} 1',
        ]
        text = wait_for_metrics(two, needles)
    for needle in needles:
        assert needle in text


def test_filesystem_store_keys_cannot_escape(tmp_path):
    from testbed.objectstore.store import FilesystemStore

    store = FilesystemStore(tmp_path / "s", fsync=False)
    store.create_bucket("bkt")
    for key in ["..", ".", "../../etc/passwd", ".hidden", "a/../b", "%2E%2E"]:
        w = store.begin_write("bkt", key)
        w.write(key.encode())
        w.commit()
    keys = [o.key for o in store.list_objects("bkt").objects]
    assert sorted(keys) == sorted(["..", ".", "../../etc/passwd", ".hidden", "a/../b", "%2E%2E"])
    for key in keys:
        with store.open_object("bkt", key) as h:
            buf = bytearray(h.info.size_bytes)
            h.read_into(0, memoryview(buf))
            assert buf == key.encode()
    # Everything stayed inside the bucket's object directory.
    assert sorted(p.name for p in (tmp_path / "s").rglob("*") if p.is_file()) == sorted(
        p.name for p in (tmp_path / "s" / "buckets" / "bkt" / "obj").iterdir()
    )


def test_idle_and_half_sent_connections_are_closed(tmp_path):
    """A connection that sends nothing, or never finishes its request headers (slowloris), is closed after
    ``--idle-timeout-s``; a keep-alive connection idle that long too, and clients reconnect transparently."""
    import socket
    import time
    from urllib.parse import urlsplit

    with start_server(tmp_path / "idle", args=["--idle-timeout-s", "1"], credentials=TEST_CREDENTIALS) as srv:
        u = urlsplit(srv.url)

        def closed_after(payload: bytes) -> float:
            t0 = time.monotonic()
            with socket.create_connection((u.hostname, u.port), timeout=10) as s:
                if payload:
                    s.sendall(payload)
                assert s.recv(1024) == b""  # EOF: the server closed it (a timeout here raises)
            return time.monotonic() - t0

        assert 0.5 < closed_after(b"") < 6
        assert 0.5 < closed_after(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ") < 6
        c = srv.boto3_client()
        c.create_bucket(Bucket="idle")
        c.put_object(Bucket="idle", Key="k", Body=b"v")
        time.sleep(2.5)  # the pooled keep-alive connection is closed by now
        assert c.get_object(Bucket="idle", Key="k")["Body"].read() == b"v"
    with pytest.raises(SystemExit):
        from testbed.objectstore.config import parse_args

        parse_args(["--idle-timeout-s", "x"])
