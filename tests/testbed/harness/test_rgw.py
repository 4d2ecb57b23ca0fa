"""The project's Ceph RGW launcher, and the plain-S3 behaviour of RGW that the client's fallback relies on."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from testbed.harness import rgw as rgw_mod
from testbed.harness.rgw import RGWUnavailable, free_ports, start_rgw


@pytest.mark.rgw
def test_rgw_speaks_the_s3_the_client_needs(rgw, rgw_s3, rgw_bucket):
    body = bytes(range(256)) * 64
    rgw_s3.put_object(Bucket=rgw_bucket, Key="ns/fp/obj", Body=body)
    r = rgw_s3.get_object(Bucket=rgw_bucket, Key="ns/fp/obj", Range="bytes=4096-8191")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206 and r["Body"].read() == body[4096:8192]
    with pytest.raises(ClientError) as info:
        rgw_s3.put_object(Bucket=rgw_bucket, Key="ns/fp/obj", Body=b"x", IfNoneMatch="*")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    # The gather extension is unknown to RGW: the answer the client's auto mode recognises.
    req_body = json.dumps({"version": 1, "keys": ["ns/fp/obj"]}).encode()
    url = f"{rgw.endpoint_url}/{rgw_bucket}?gather"
    req = AWSRequest(method="POST", url=url, data=req_body, headers={"Content-Type": "application/json"})
    req.headers["x-amz-content-sha256"] = hashlib.sha256(req_body).hexdigest()
    S3SigV4Auth(Credentials(rgw.access_key, rgw.secret_key), "s3", rgw.region).add_auth(req)
    conn = http.client.HTTPConnection("127.0.0.1", rgw.port, timeout=10)
    conn.request("POST", f"/{rgw_bucket}?gather", body=req_body, headers=dict(req.headers.items()))
    resp = conn.getresponse()
    assert resp.status == 501 and b"NotImplemented" in resp.read()
    conn.close()


@pytest.mark.rgw
def test_start_and_stop_a_second_instance(rgw, tmp_path):
    """A second instance on other ports next to the session one; stop kills exactly its daemons."""
    other = start_rgw(tmp_path / "second", store_bytes=256 << 20, timeout_s=60)
    try:
        assert other.port != rgw.port
        pids = other.pids()
        assert {"mon.a", "osd.0", "client.rgw.a"} <= set(pids)
        s3 = other.boto3_client()
        s3.create_bucket(Bucket="second-instance")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["second-instance"]
    finally:
        other.stop(wipe=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids.values())
    assert not (tmp_path / "second").exists()
    assert rgw.pids() and all(_alive(p) for p in rgw.pids().values())  # the session instance is untouched


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


def test_missing_packages_give_a_clear_reason(monkeypatch):
    monkeypatch.setattr(rgw_mod.shutil, "which", lambda cmd: None)
    reason = rgw_mod.unavailable_reason()
    assert "radosgw" in reason and "apt-get install" in reason
    with pytest.raises(RGWUnavailable, match="not installed"):
        start_rgw()


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(3)
    assert len(set(ports)) == 3
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
    assert os.path.exists(rgw_mod.SCRIPTS / "start-rgw.sh") and os.path.exists(
        rgw_mod.SCRIPTS / "stop-rgw.sh"
    )
