"""Real S3 clients against a live ObjectCache server: awscli, s3cmd, rclone, minio (Python) and s3fs.

Each client puts, gets, lists and deletes an object, uploads a file large enough to go multipart, and (where
the client can) makes a presigned URL that a plain HTTP GET then reads.  The ETags the server answers are
checked against the MD5 the clients compute (rclone and s3cmd verify them themselves, and fail an upload
whose ETag is not the MD5 of what they sent).

The clients come from ``./dev test``: awscli and minio from pyproject's ``dev`` extra, rclone and s3cmd as
Debian packages, s3fs in its own venv (``.venv-s3fs``, pyproject's ``s3fs-venv`` list: s3fs's aiobotocore
pins an older botocore than the project's boto3).  A missing client skips its test, saying which and how
to get it.  Every client command runs with a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from testbed import REPO_ROOT

MiB = 1 << 20
COMMAND_TIMEOUT_S = 120
BIG_BYTES = 12 * MiB  # above every client's multipart threshold as configured here (5 MiB parts)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# Variables of the calling environment that would reach into the clients' own configuration (rclone reads
# AWS_CA_BUNDLE and fails on a plain-HTTP endpoint with it set).
_CLIENT_ENV_DROPPED = ("AWS_CA_BUNDLE", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN")


def run(cmd: list[str], env: dict[str, str] | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run a client command; its stdout, or a test failure that shows what it said."""
    base = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROPPED}
    proc = subprocess.run(
        cmd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    return proc.stdout


def find_binary(name: str, how: str) -> str:
    """The client's executable: next to this Python (pip-installed console scripts), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (neither next to {sys.executable} nor on PATH): {how}")
    return found


@pytest.fixture
def files(tmp_path):
    """A small and a multipart-sized file with distinct content."""
    small = bytes(range(256)) * 40 + b"tail"
    big = os.urandom(BIG_BYTES)
    (tmp_path / "small.bin").write_bytes(small)
    (tmp_path / "big.bin").write_bytes(big)
    return tmp_path, small, big


def check_stored(s3, bucket: str, key: str, data: bytes, multipart: bool) -> None:
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    if multipart:
        assert head["ETag"].rstrip('"').split("-")[-1].isdigit() and "-" in head["ETag"], head["ETag"]
    else:
        assert head["ETag"] == f'"{md5_hex(data)}"'


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def test_awscli(objectcache_server, objectcache_s3, objectcache_bucket, files):
    aws = find_binary("aws", "pip install the awscli pinned in pyproject's dev extra")
    tmp, small, big = files
    srv, b = objectcache_server, objectcache_bucket
    # Path-style addressing and SigV4 presigning: awscli v1 presigns with SigV2 unless told s3v4.
    (tmp / "config").write_text(
        textwrap.dedent(
            f"""\
            [default]
            region = {srv.region}
            s3 =
              addressing_style = path
              signature_version = s3v4
              multipart_threshold = 5MB
              multipart_chunksize = 5MB
            """
        )
    )
    env = {
        "AWS_CONFIG_FILE": str(tmp / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-credentials"),
        "AWS_ACCESS_KEY_ID": srv.access_key,
        "AWS_SECRET_ACCESS_KEY": srv.secret_key,
    }
    cli = [aws, "--endpoint-url", srv.url]
    run([*cli, "s3", "cp", str(tmp / "small.bin"), f"s3://{b}/dir/small.bin"], env)
    run([*cli, "s3", "cp", str(tmp / "big.bin"), f"s3://{b}/dir/big.bin"], env)
    check_stored(objectcache_s3, b, "dir/small.bin", small, multipart=False)
    check_stored(objectcache_s3, b, "dir/big.bin", big, multipart=True)
    listing = run([*cli, "s3", "ls", f"s3://{b}/dir/"], env)
    assert "small.bin" in listing and "big.bin" in listing
    assert "PRE dir/" in run([*cli, "s3", "ls", f"s3://{b}/"], env)
    run([*cli, "s3", "cp", f"s3://{b}/dir/big.bin", str(tmp / "big.out")], env)
    assert (tmp / "big.out").read_bytes() == big
    url = run([*cli, "s3", "presign", f"s3://{b}/dir/small.bin", "--expires-in", "300"], env).strip()
    assert "X-Amz-Signature=" in url and http_get(url) == small
    # mv: CopyObject (UploadPartCopy for the big file), then delete.
    run([*cli, "s3", "mv", f"s3://{b}/dir/small.bin", f"s3://{b}/moved/small.bin"], env)
    run([*cli, "s3", "mv", f"s3://{b}/dir/big.bin", f"s3://{b}/moved/big.bin"], env)
    run([*cli, "s3", "cp", f"s3://{b}/moved/big.bin", str(tmp / "moved.out")], env)
    assert (tmp / "moved.out").read_bytes() == big
    assert "dir/" not in run([*cli, "s3", "ls", f"s3://{b}/"], env)
    out = json.loads(run([*cli, "s3api", "head-object", "--bucket", b, "--key", "moved/small.bin"], env))
    assert out["ETag"] == f'"{md5_hex(small)}"'
    run([*cli, "s3", "rm", "--recursive", f"s3://{b}/moved/"], env)
    assert objectcache_s3.list_objects_v2(Bucket=b)["KeyCount"] == 0


def test_s3cmd(objectcache_server, objectcache_s3, objectcache_bucket, files):
    s3cmd = find_binary("s3cmd", "apt-get install s3cmd (./dev test does)")
    tmp, small, big = files
    srv, b = objectcache_server, objectcache_bucket
    cfg = tmp / "s3cfg"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            [default]
            access_key = {srv.access_key}
            secret_key = {srv.secret_key}
            host_base = {srv.host}:{srv.port}
            host_bucket = {srv.host}:{srv.port}
            bucket_location = {srv.region}
            use_https = False
            signature_v2 = False
            multipart_chunk_size_mb = 5
            """
        )
    )
    cmd = [s3cmd, "-c", str(cfg), "--no-progress"]
    run([*cmd, "put", str(tmp / "small.bin"), f"s3://{b}/small.bin"])  # s3cmd checks the ETag is the MD5
    run([*cmd, "put", str(tmp / "big.bin"), f"s3://{b}/big.bin"])
    check_stored(objectcache_s3, b, "small.bin", small, multipart=False)
    check_stored(objectcache_s3, b, "big.bin", big, multipart=True)
    listing = run([*cmd, "ls", f"s3://{b}/"])
    assert f"s3://{b}/small.bin" in listing and f"s3://{b}/big.bin" in listing
    run([*cmd, "get", f"s3://{b}/big.bin", str(tmp / "big.out")])
    run([*cmd, "get", f"s3://{b}/small.bin", str(tmp / "small.out")])
    assert (tmp / "big.out").read_bytes() == big and (tmp / "small.out").read_bytes() == small
    # No presign: s3cmd's signurl signs with SigV2, which the server does not accept.
    run([*cmd, "del", f"s3://{b}/small.bin", f"s3://{b}/big.bin"])
    assert objectcache_s3.list_objects_v2(Bucket=b)["KeyCount"] == 0


def test_rclone(objectcache_server, objectcache_s3, objectcache_bucket, files):
    rclone = find_binary("rclone", "apt-get install rclone (./dev test does)")
    tmp, small, big = files
    srv, b = objectcache_server, objectcache_bucket
    (tmp / "rclone.conf").write_text("")
    env = {
        "RCLONE_CONFIG": str(tmp / "rclone.conf"),
        "RCLONE_CONFIG_OC_TYPE": "s3",
        "RCLONE_CONFIG_OC_PROVIDER": "Other",
        "RCLONE_CONFIG_OC_ACCESS_KEY_ID": srv.access_key,
        "RCLONE_CONFIG_OC_SECRET_ACCESS_KEY": srv.secret_key,
        "RCLONE_CONFIG_OC_ENDPOINT": srv.url,
        "RCLONE_CONFIG_OC_REGION": srv.region,
        "RCLONE_CONFIG_OC_FORCE_PATH_STYLE": "true",
    }
    cmd = [rclone, "--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M", "--retries", "1"]
    run([*cmd, "copyto", str(tmp / "small.bin"), f"oc:{b}/small.bin"], env)  # rclone checks the MD5 ETag
    run([*cmd, "copyto", str(tmp / "big.bin"), f"oc:{b}/big.bin"], env)
    check_stored(objectcache_s3, b, "small.bin", small, multipart=False)
    check_stored(objectcache_s3, b, "big.bin", big, multipart=True)
    assert sorted(run([*cmd, "lsf", f"oc:{b}"], env).split()) == ["big.bin", "small.bin"]
    assert md5_hex(small) in run([*cmd, "md5sum", f"oc:{b}/small.bin"], env)
    run([*cmd, "copyto", f"oc:{b}/big.bin", str(tmp / "big.out")], env)
    assert (tmp / "big.out").read_bytes() == big
    url = run([*cmd, "link", "--expire", "1h", f"oc:{b}/small.bin"], env).strip()
    assert http_get(url) == small
    run([*cmd, "deletefile", f"oc:{b}/small.bin"], env)
    run([*cmd, "deletefile", f"oc:{b}/big.bin"], env)
    assert objectcache_s3.list_objects_v2(Bucket=b)["KeyCount"] == 0


def test_minio(objectcache_server, objectcache_s3, objectcache_bucket, files):
    minio = pytest.importorskip("minio", reason="minio is not installed: pip install pyproject's dev extra")
    tmp, small, big = files
    srv, b = objectcache_server, objectcache_bucket
    mc = minio.Minio(
        f"{srv.host}:{srv.port}",
        access_key=srv.access_key,
        secret_key=srv.secret_key,
        secure=False,
        region=srv.region,
    )
    r = mc.fput_object(b, "small.bin", str(tmp / "small.bin"))
    assert r.etag == md5_hex(small)
    mc.fput_object(b, "big.bin", str(tmp / "big.bin"), part_size=5 * MiB)
    check_stored(objectcache_s3, b, "small.bin", small, multipart=False)
    check_stored(objectcache_s3, b, "big.bin", big, multipart=True)
    assert sorted(o.object_name for o in mc.list_objects(b)) == ["big.bin", "small.bin"]
    resp = mc.get_object(b, "big.bin")
    try:
        assert resp.read() == big
    finally:
        resp.close()
        resp.release_conn()
    assert http_get(mc.presigned_get_object(b, "small.bin")) == small
    mc.remove_object(b, "small.bin")
    mc.remove_object(b, "big.bin")
    assert list(mc.list_objects(b)) == []


S3FS_SCRIPT = """
import hashlib, json, sys, urllib.request
import s3fs
url, key, secret, region, bucket, small_path, big_path = sys.argv[1:]
fs = s3fs.S3FileSystem(
    key=key, secret=secret, client_kwargs={"endpoint_url": url, "region_name": region},
    # signature_version s3v4: botocore presigns S3 URLs with SigV2 unless told (sign() below).
    config_kwargs={"signature_version": "s3v4", "s3": {"addressing_style": "path"}},
    default_block_size=5 * 2**20,
)
small, big = open(small_path, "rb").read(), open(big_path, "rb").read()
fs.pipe(f"{bucket}/small.bin", small)
with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * 2**20) as f:  # written in 5 MiB parts: multipart
    for i in range(0, len(big), 2**20):
        f.write(big[i : i + 2**20])
out = {"ls": sorted(fs.ls(bucket, refresh=True))}
out["small_ok"] = fs.cat(f"{bucket}/small.bin") == small
out["big_ok"] = fs.cat(f"{bucket}/big.bin") == big
out["small_etag"] = fs.info(f"{bucket}/small.bin")["ETag"]
out["presigned_ok"] = urllib.request.urlopen(fs.sign(f"{bucket}/small.bin", expiration=300)).read() == small
fs.rm(f"{bucket}/small.bin")
fs.rm(f"{bucket}/big.bin")
out["ls_after"] = fs.ls(bucket, refresh=True)
print(json.dumps(out))
"""


def s3fs_python() -> str:
    """A Python that can import s3fs: this one, else the ``.venv-s3fs`` venv that ``./dev test`` makes."""
    if (
        subprocess.run([sys.executable, "-c", "import s3fs"], capture_output=True, check=False).returncode
        == 0
    ):
        return sys.executable
    venv = Path(os.environ.get("OBJECTCACHE_S3FS_VENV", REPO_ROOT / ".venv-s3fs"))
    py = venv / "bin" / "python"
    if not py.exists():
        pytest.skip(f"s3fs is not installed: no {py} (./dev test makes it from pyproject's s3fs-venv list)")
    return str(py)


def test_s3fs(objectcache_server, objectcache_s3, objectcache_bucket, files):
    py = s3fs_python()
    tmp, small, big = files
    srv, b = objectcache_server, objectcache_bucket
    args = [
        srv.url,
        srv.access_key,
        srv.secret_key,
        srv.region,
        b,
        str(tmp / "small.bin"),
        str(tmp / "big.bin"),
    ]
    # The venv's own packages only: the project's PYTHONPATH would mix in another botocore.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and k not in _CLIENT_ENV_DROPPED}
    proc = subprocess.run(
        [py, "-c", S3FS_SCRIPT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ls"] == [f"{b}/big.bin", f"{b}/small.bin"]
    assert out["small_ok"] and out["big_ok"] and out["presigned_ok"]
    assert out["small_etag"] == f'"{md5_hex(small)}"' and out["ls_after"] == []
