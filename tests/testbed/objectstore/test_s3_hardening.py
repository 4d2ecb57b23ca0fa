"""The S3 server's defences, against live servers on loopback: start rules, authentication before any body,
SigV2 named as such, gather bounds and field checks, body and header timeouts, the per-client connection cap.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.objectstore import server as server_mod
from testbed.objectstore.auth import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, Credential, CredentialStore
from testbed.objectstore.config import parse_args
from testbed.objectstore.gather import GatherBudget, parse_gather_body
from testbed.objectstore.launch import start_server, write_credentials
from testbed.wire.errors import InvalidRequest, S3Error
from tests.fixtures.servers import TEST_CREDENTIALS, signed_request
from tests.testbed.objectstore.test_gather import do_gather, make_chunks, put_all, server_with_chunks

BUCKET = "hard"


def code_of(body: bytes) -> str:
    start = body.find(b"<Code>")
    return body[start + 6 : body.find(b"</Code>")].decode() if start >= 0 else ""


def signed_headers(
    srv, method: str, path: str, headers: dict, payload_hash: str = "UNSIGNED-PAYLOAD"
) -> dict:
    """SigV4 headers (botocore's signer) for a request the test then sends over a raw socket."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    req = AWSRequest(method=method, url=srv.url + path, data=b"", headers=dict(headers))

    class Signer(S3SigV4Auth):
        def payload(self, request):
            return payload_hash

    Signer(Credentials(srv.access_key, srv.secret_key), "s3", srv.region).add_auth(req)
    return dict(req.prepare().headers.items())


def raw_head(srv, method: str, path: str, headers: dict) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {srv.host}:{srv.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_until_closed(s: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout_s`` passes: a failure)."""
    s.settimeout(timeout_s)
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    else:
        pytest.fail(f"the server did not close the connection within {timeout_s} s; got {out[:200]!r}")
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(
        tmp_path_factory.mktemp("hardening"),
        credentials=TEST_CREDENTIALS,
        args=["--no-fsync", "--body-timeout-s", "1", "--min-body-kib-per-s", "1", "--idle-timeout-s", "2"],
    )
    s.boto3_client().create_bucket(Bucket=BUCKET)
    yield s
    s.stop()


# --- 1. start rules ---------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OBJECTCACHE_ACCESS_KEY", "OBJECTCACHE_SECRET_KEY", "OBJECTCACHE_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_no_start_beyond_loopback_without_credentials(tmp_path, capsys, clean_env, host):
    t0 = time.monotonic()
    rc = server_mod.main(["--host", host, "--port", "0", "--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to listen" in err and "--credentials" in err
    assert "--insecure-default-credentials" in err
    assert not (tmp_path / "d").exists()  # refused before the store (and long before binding)
    assert time.monotonic() - t0 < 5


def test_no_start_beyond_loopback_with_the_default_key_in_a_credentials_file(tmp_path, capsys, clean_env):
    creds = write_credentials(
        tmp_path / "c.json",
        [Credential("mine", "my-secret"), Credential(DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY)],
    )
    rc = server_mod.main(
        ["--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d")]
        + ["--credentials", str(creds)]
    )
    assert rc == 2 and DEFAULT_ACCESS_KEY in capsys.readouterr().err


def test_exposure_rules(tmp_path):
    own = CredentialStore([Credential("mine", "my-secret")])
    default = CredentialStore.default(None, env={})
    reused_secret = CredentialStore([Credential("mine", DEFAULT_SECRET_KEY)])
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        server_mod.check_exposure(parse_args(["--host", host]), default)  # loopback: the default is fine
    server_mod.check_exposure(parse_args(["--host", "0.0.0.0"]), own)
    server_mod.check_exposure(parse_args(["--host", "0.0.0.0", "--insecure-default-credentials"]), default)
    for store in (default, reused_secret):
        with pytest.raises(server_mod.StartRefused):
            server_mod.check_exposure(parse_args(["--host", "0.0.0.0"]), store)
    with pytest.raises(server_mod.StartRefused):
        server_mod.check_exposure(parse_args(["--host", ""]), default)  # every address


# --- 5. SigV2 and anonymous requests ----------------------------------------------------------------------


def test_sigv2_requests_are_told_to_use_sigv4(srv):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    conn.request(
        "GET",
        f"/{BUCKET}/k",
        headers={
            "Authorization": "AWS AKIDEXAMPLE:bWq2s1WEIj+Ydj0vQ697zp+IXMU=",
            "Date": "Tue, 27 Mar 2007 19:36:42 +0000",
        },
    )
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 400 and code_of(body) == "InvalidRequest"
    assert b"Signature Version 2 is not supported" in body and b"Signature Version 4" in body
    conn.request("GET", f"/{BUCKET}/k?AWSAccessKeyId=AKIDEXAMPLE&Expires=1175139620&Signature=abc%3D")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 400 and b"Signature Version 4" in body and b"anonymous" not in body
    conn.request("GET", f"/{BUCKET}/k")  # truly anonymous: still 403
    resp = conn.getresponse()
    assert resp.status == 403 and code_of(resp.read()) == "AccessDenied"
    conn.close()


def test_anonymous_put_with_expect_gets_403_without_100_continue(srv):
    head = {"Content-Length": "1000000", "Expect": "100-continue"}
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(raw_head(srv, "PUT", f"/{BUCKET}/anon", head))
        reply = read_until_closed(s, 10)
    assert reply.startswith(b"HTTP/1.1 403 "), reply[:100]
    assert b"100 Continue" not in reply and code_of(reply) == "AccessDenied"
    # A bad signature is refused the same way, before the body.
    signed = signed_headers(srv, "PUT", f"/{BUCKET}/bad", head)
    signed["Authorization"] = signed["Authorization"][:-1] + (
        "0" if signed["Authorization"][-1] != "0" else "1"
    )
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(raw_head(srv, "PUT", f"/{BUCKET}/bad", signed))
        reply = read_until_closed(s, 10)
    assert reply.startswith(b"HTTP/1.1 403 ") and code_of(reply) == "SignatureDoesNotMatch"


def test_signed_put_with_expect_gets_100_continue(srv):
    body = b"x" * 1000
    head = signed_headers(
        srv, "PUT", f"/{BUCKET}/expect", {"Content-Length": str(len(body)), "Expect": "100-continue"}
    )
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(raw_head(srv, "PUT", f"/{BUCKET}/expect", head))
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), first
        s.sendall(body)
        reply = first[25:]
        while b"\r\n\r\n" not in reply:
            reply += s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert srv.boto3_client().get_object(Bucket=BUCKET, Key="expect")["Body"].read() == body


# --- 2. gather bounds -------------------------------------------------------------------------------------


def test_gather_rejects_duplicate_keys(srv):
    s3 = srv.boto3_client()
    chunks = make_chunks(2, seed=3)
    put_all(s3, BUCKET, chunks)
    name = chunks[0][0]
    raw = json.dumps({"keys": [name] * 1024}).encode()
    resp = do_gather(srv, BUCKET, raw)
    body = resp.read()
    assert resp.status == 400 and code_of(body) == "InvalidRequest"
    assert f"<Key>{name}</Key>".encode() in body and b"more than once" in body
    resp = do_gather(srv, BUCKET, {"keys": [chunks[0][0], chunks[1][0], chunks[0][0]]})
    assert resp.status == 400 and code_of(resp.read()) == "InvalidRequest"


def test_gather_response_is_bounded_per_request(tmp_path):
    # A tiny chunk's whole-model gather is 4 layers x 64 KiB = 256 KiB of payload plus frame heads.
    with server_with_chunks(tmp_path, ["--max-gather-response-mib", "0.6"], "kvb", 3, seed=5) as (srv, names):
        resp = do_gather(srv, "kvb", {"keys": names[:2]})
        assert resp.status == 200
        resp.read()
        resp = do_gather(srv, "kvb", {"keys": names[:3]})
        body = resp.read()
        assert resp.status == 400 and code_of(body) == "InvalidRequest"
        assert b"the limit is 629145" in body
        resp = do_gather(srv, "kvb", {"keys": names[:3], "layer_end": 2})  # fewer layers fit
        assert resp.status == 200
        resp.read()


def test_gather_bytes_in_flight_are_bounded_per_tenant(tmp_path):
    # Paced at 2 Mbit/s, one chunk's 256 KiB gather streams for about a second: long enough to overlap.
    args = ["--max-tenant-gather-mib", "0.4", "--egress-gbps", "0.002", "--piece-kib", "4"]
    with server_with_chunks(tmp_path, args, "kvb", 2, seed=6) as (srv, names):
        first = do_gather(srv, "kvb", {"keys": names[:1]})
        assert first.status == 200  # headers out: its bytes are in flight until it ends
        second = do_gather(srv, "kvb", {"keys": names[1:2]})
        body = second.read()
        assert second.status == 503 and code_of(body) == "SlowDown" and b"in flight" in body
        first.read()
        deadline = time.monotonic() + 10
        while True:  # the server releases the bytes just after the last one is sent
            third = do_gather(srv, "kvb", {"keys": names[1:2]})
            third.read()
            if third.status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert third.status == 200


def test_gather_budget_accounting():
    b = GatherBudget(max_response_bytes=100, max_tenant_bytes=150)
    b.admit("a", 100)
    with pytest.raises(S3Error) as e:
        b.admit("a", 60)
    assert e.value.s3_code == "SlowDown" and e.value.http_status == 503
    b.admit("b", 100)  # another tenant's budget is its own
    with pytest.raises(InvalidRequest):
        b.admit("c", 101)
    b.release("a", 100)
    b.admit("a", 60)
    assert b.in_flight_bytes == {"a": 60, "b": 100}


# --- 3. malformed gather fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"keys": ["ns1/a"], "stream_id": "evil\r\nSet-Cookie: x=1"},
        {"keys": ["ns1/a"], "stream_id": "tab\there"},
        {"keys": ["ns1/a"], "stream_id": "\x00"},
        {"keys": ["ns1/a"], "stream_id": ""},
        {"keys": ["ns1/a"], "stream_id": "é"},
        {"keys": ["ns1/a"], "stream_id": 5},
        {"keys": ["ns1/a"], "pace_group": "evil\r\nx"},
        {"keys": ["ns1/a"], "pace_group": ["g"]},
        {"keys": ["ns1/a"], "layer_start": 10**300},
        {"keys": ["ns1/a"], "layer_start": [[[[1]]]]},
        {"keys": ["ns1/a"], "layer_end": 1e400},
        {"keys": ["ns1/a"], "compute_per_layer_s": 1e308},
        {"keys": ["ns1/a"], "compute_per_layer_s": "fast"},
        {"keys": ["ns1/a"], "version": {"a": [1]}},
        {"keys": "ns1/a"},
        {"keys": [["ns1/a"]]},
        {"keys": ["ns1/a\n"]},
        {"keys": ["ns1/" + "x" * 5000]},
        [1, 2],
        "keys",
        None,
        b"[" * 200_000,
        b'{"keys": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b"9" * 10_000,
        b"\xff\xfe",
        b"",
    ],
)
def test_malformed_gather_fields_get_400(srv, body):
    resp = do_gather(srv, BUCKET, body if isinstance(body, bytes) else json.dumps(body).encode())
    reply = resp.read()
    assert 400 <= resp.status < 500, (resp.status, reply[:300])
    assert code_of(reply), reply[:300]


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
_json = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


def _gather_body(names: list[str]):
    """Gather bodies whose every field may be missing, right, or wrong in type, size or content; keys are
    often real chunk objects, so a body can get as far as the response headers (where stream_id goes)."""
    key = st.one_of(st.sampled_from(names), st.text(max_size=60), _json)
    return st.fixed_dictionaries(
        {},
        optional={
            "version": st.one_of(st.just(1), _json),
            "keys": st.one_of(st.lists(key, min_size=1, max_size=6), st.just(names[:2]), _json),
            "layer_start": st.one_of(st.integers(min_value=-5, max_value=10), _json),
            "layer_end": st.one_of(st.none(), st.integers(min_value=-5, max_value=10), _json),
            "compute_per_layer_s": st.one_of(st.floats(), _json),
            "stream_id": st.one_of(st.text(max_size=200), _json),
            "pace_group": st.one_of(st.text(max_size=200), _json),
        },
    )


@pytest.fixture(scope="module")
def fuzz_names(srv) -> list[str]:
    chunks = make_chunks(3, seed=11)
    put_all(srv.boto3_client(), BUCKET, chunks)
    return [c[0] for c in chunks]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_gather_fields_never_5xx(srv, fuzz_names, data):
    doc = data.draw(_gather_body(fuzz_names))
    raw = json.dumps(doc).encode()  # NaN / Infinity too: Python's JSON (and the server's) accepts them
    resp = do_gather(srv, BUCKET, raw)
    reply = resp.read()
    assert resp.status < 500, (doc, resp.status, reply[:300])
    if resp.status != 200:
        assert code_of(reply), reply[:300]


def test_parse_gather_body_field_checks():
    for bad in (b"[" * 100_000, json.dumps({"keys": ["a"], "stream_id": "a\nb"}).encode()):
        with pytest.raises(InvalidRequest):
            parse_gather_body(bad)
    assert parse_gather_body(json.dumps({"keys": ["a"], "stream_id": "req 17/a#b"}).encode()).stream_id
    assert parse_gather_body(json.dumps({"keys": ["a"], "pace_group": "9f2c"}).encode()).pace_group == "9f2c"


# --- 4. timeouts and the per-client connection cap --------------------------------------------------------


def _put_head(srv, key: str, length: int) -> bytes:
    path = f"/{BUCKET}/{key}"
    return raw_head(srv, "PUT", path, signed_headers(srv, "PUT", path, {"Content-Length": str(length)}))


def test_stalled_body_is_timed_out(srv):
    """``--body-timeout-s 1``: a body that stops arriving gets ``400 RequestTimeout`` and the connection closes."""
    assert_stalled_request_times_out(srv, _put_head(srv, "stalled", 100_000) + b"x" * 10)


def assert_stalled_request_times_out(srv, sent: bytes) -> None:
    """Send ``sent`` and stop: the server answers ``400 RequestTimeout`` and closes, after 0.5-5 s."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(sent)
        t0 = time.monotonic()
        reply = read_until_closed(s, 10)
        waited_s = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 400 ") and code_of(reply) == "RequestTimeout", reply[:300]
    assert 0.5 < waited_s < 5


def test_trickled_body_is_timed_out(srv):
    """A body that keeps sending, but slower than ``--min-body-kib-per-s 1`` on average once the 1 s grace
    has passed, is cut off too (a per-read timeout alone would never fire)."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(_put_head(srv, "trickled", 100_000))
        stop = threading.Event()

        def trickle():
            with contextlib.suppress(OSError):
                while not stop.wait(0.1):
                    s.sendall(b"y" * 10)  # 100 bytes/s, far below 1 KiB/s

        t = threading.Thread(target=trickle, daemon=True)
        t0 = time.monotonic()
        t.start()
        try:
            reply = read_until_closed(s, 10)
        finally:
            stop.set()
            t.join(5)
        waited_s = time.monotonic() - t0
    assert code_of(reply) == "RequestTimeout", reply[:300]
    assert 0.8 < waited_s < 5


def test_trickled_request_head_is_closed(srv):
    """Request-head bytes that trickle in do not restart ``--idle-timeout-s`` (2 s here): slowloris."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        stop = threading.Event()

        def trickle():
            with contextlib.suppress(OSError):
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
                while not stop.wait(0.2):
                    s.sendall(b"X-A: b\r\n")

        t = threading.Thread(target=trickle, daemon=True)
        t0 = time.monotonic()
        t.start()
        try:
            reply = read_until_closed(s, 10)
        finally:
            stop.set()
            t.join(5)
    assert reply == b"" and 1.5 < time.monotonic() - t0 < 6


def test_connections_per_client_are_capped(tmp_path):
    with start_server(
        tmp_path, credentials=TEST_CREDENTIALS, args=["--max-connections-per-client", "3"]
    ) as srv:
        held = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.2)  # the server has accepted them
            with socket.create_connection((srv.host, srv.port), timeout=10) as s:
                reply = read_until_closed(s, 5)
            assert reply.startswith(b"HTTP/1.1 503 ") and code_of(reply) == "SlowDown", reply[:200]
            with socket.create_connection((srv.host, srv.port), timeout=10) as s:
                assert read_until_closed(s, 5).startswith(b"HTTP/1.1 503 ")
        finally:
            held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # one slot is free once the server has seen the close
            resp = signed_request(srv, "GET", "/")
            resp.read()
            if resp.status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert resp.status == 200
        assert 'objectcache_errors_total{code="SlowDown"} 2.0' in srv.metrics_text()
        for s in held:
            s.close()


def test_stalled_direct_chunk_body_is_timed_out(srv):
    """A large ``x-oc-verify: kvchunk`` PUT is received off the event loop (``read_body_direct``): the same
    body pace holds there."""
    path = f"/{BUCKET}/direct"
    head = signed_headers(srv, "PUT", path, {"Content-Length": str(2 << 20), "x-oc-verify": "kvchunk"})
    assert_stalled_request_times_out(srv, raw_head(srv, "PUT", path, head) + b"z" * 100)


def test_no_traceback_logged(srv):
    """Runs last (file order): none of the module's malformed, fuzzed, timed-out or refused requests logged
    a traceback."""
    text = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in text and " ERROR " not in text
