"""Bad input: property-based fuzzing (hypothesis) of the server's request handling, and its size and
slow-client limits.

In-process (fast, many cases): the gather request parser, SigV4 verification, ``aws-chunked`` decoding,
``Range`` parsing, the KV header parser, the gather frame parser, and key validation plus the filesystem
store's file naming (path traversal).  Each must either accept the input or raise the object tier's own
4xx error -- never another exception.  Against a live server (fewer cases): signed requests with fuzzed
paths, queries, headers and bodies, and signed gathers with malformed, oversized, unicode, traversal,
duplicate and missing keys and absurd geometries; every reply is a success or a well-formed S3 XML error
that is not a 5xx, and the server survives.  Raw bytes that are not HTTP at all are answered by aiohttp's
HTTP parser (plain-text 400, connection closed) before the S3 layer sees them.

Case counts are printed (``pytest -s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.bench import faults
from testbed.objectstore import gather
from testbed.objectstore.auth import CredentialStore, verify_request
from testbed.objectstore.chunked import ChunkedDecoder
from testbed.objectstore.objectops import parse_range
from testbed.objectstore.store import FilesystemStore
from testbed.objectstore.storeapi import validate_bucket_name, validate_key
from testbed.wire import frames as wire_frames
from testbed.wire import kvformat
from testbed.wire.errors import ObjectCacheError, S3Error
from tests.fixtures.servers import signed_request
from tests.testbed.bench.test_faults import CT, WIDE, wide_chunks

CASES: Counter = Counter()
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIVE = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _client_error(e: BaseException) -> bool:
    return isinstance(e, ObjectCacheError) and 400 <= getattr(e, "http_status", 500) < 500


@pytest.fixture(scope="module", autouse=True)
def _case_counts():
    """Print how many cases each fuzz target ran (quoted in docs/reliability.md)."""
    yield
    print("\n[fuzz] cases run: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items())))


# --- in-process parsers -----------------------------------------------------------------------------------

keys_st = st.one_of(
    st.text(min_size=0, max_size=40),
    st.sampled_from(
        ["../../etc/passwd", "a/../../b", "/abs", "ns/\x00nul", "ns/ünï/ç", "." * 300, "%2e%2e/x"]
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
gather_docs = st.fixed_dictionaries(
    {},
    optional={
        "version": st.one_of(st.just(1), json_values),
        "keys": st.one_of(st.lists(keys_st, max_size=20), json_values),
        "layer_start": st.one_of(st.integers(-5, 2**40), json_values),
        "layer_end": st.one_of(st.integers(-5, 2**40), json_values),
        "compute_per_layer_s": st.one_of(st.floats(), json_values),
        "stream_id": st.one_of(st.text(max_size=200), json_values),
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(st.binary(max_size=200), gather_docs.map(lambda d: json.dumps(d).encode())))
def test_fuzz_gather_body_parser(body):
    CASES["gather_body"] += 1
    try:
        req = gather.parse_gather_body(body, max_keys=16)
    except Exception as e:
        assert _client_error(e), repr(e)
        return
    assert req.keys and len(req.keys) <= 16 and all(isinstance(k, str) and k for k in req.keys)
    assert req.layer_start >= 0 and (req.layer_end is None or req.layer_end > req.layer_start)


header_names = st.sampled_from(
    ["authorization", "x-amz-date", "x-amz-content-sha256", "host", "x-amz-security-token", "Authorization"]
)
auth_values = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda cred, signed, sig: (
            f"AWS4-HMAC-SHA256 Credential={cred}, SignedHeaders={signed}, Signature={sig}"
        ),
        st.one_of(st.text(max_size=60), st.just("objectcache/20260101/us-east-1/s3/aws4_request")),
        st.one_of(st.text(max_size=30), st.just("host;x-amz-date")),
        st.text(alphabet="0123456789abcdef", max_size=64),
    ),
)


@FAST
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "HEAD", "DELETE", "\u00e9"]),
    path=st.text(max_size=60),
    query=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=8),
    headers=st.lists(st.tuples(header_names, auth_values), max_size=6),
    presign=st.booleans(),
)
def test_fuzz_sigv4_verification(method, path, query, headers, presign):
    CASES["sigv4"] += 1
    if presign:
        query = query + [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Signature", "0" * 64),
            ("X-Amz-Credential", "objectcache/20260101/us-east-1/s3/aws4_request"),
        ]
    store = CredentialStore.default(env={})
    with pytest.raises(S3Error) as err:  # nothing random can carry a valid signature
        verify_request(method, "/" + path, query, headers, store, datetime.now(UTC))
    assert 400 <= err.value.http_status < 500


def _aws_chunked(payload: bytes, sizes: list[int]) -> bytes:
    out, pos = bytearray(), 0
    for n in sizes:
        piece = payload[pos : pos + n]
        if not piece:
            break
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        pos += len(piece)
    if pos < len(payload):
        out += f"{len(payload) - pos:x}\r\n".encode() + payload[pos:] + b"\r\n"
    return bytes(out + b"0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n")


@FAST
@given(
    payload=st.binary(max_size=300),
    sizes=st.lists(st.integers(1, 64), max_size=10),
    splits=st.lists(st.integers(0, 400), max_size=6),
    mutate=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.integers(0, 255))),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzz_aws_chunked_decoder(payload, sizes, splits, mutate, cut):
    """Well-formed streams decode to the payload however the bytes arrive; damaged ones fail cleanly."""
    CASES["aws_chunked"] += 1
    raw = bytearray(_aws_chunked(payload, sizes))
    damaged = mutate is not None or cut is not None
    if mutate is not None:
        raw[mutate[0] % len(raw)] = mutate[1]
    if cut is not None:
        del raw[cut % len(raw) :]
    dec = ChunkedDecoder(None, "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
    out = bytearray()
    bounds = sorted({0, len(raw), *(min(s, len(raw)) for s in splits)})
    try:
        for a, b in zip(bounds, bounds[1:]):
            for piece in dec.feed(bytes(raw[a:b])):
                out += piece
        trailers = dec.finish()
    except Exception as e:
        assert _client_error(e) and damaged, repr(e)
        return
    if not damaged:
        assert bytes(out) == payload and trailers["x-amz-checksum-crc32"] == "AAAAAA=="


@FAST
@given(
    header=st.one_of(
        st.text(max_size=30),
        st.builds(
            lambda a, b: f"bytes={a}-{b}",
            st.integers(0, 2**64) | st.just(""),
            st.integers(0, 2**64) | st.just(""),
        ),
    ),
    size=st.integers(0, 2**40),
)
def test_fuzz_range_header(header, size):
    CASES["range"] += 1
    try:
        rng = parse_range(header, size)
    except Exception as e:
        assert _client_error(e) and e.http_status == 416, repr(e)
        return
    if rng is not None:
        assert 0 <= rng[0] <= rng[1] < size


_VALID_HEADER = kvformat.make_header(WIDE, list(range(WIDE.num_layers)), CT).encode()


@FAST
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID_HEADER) - 1), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, len(_VALID_HEADER))),
    reseal=st.booleans(),
)
def test_fuzz_kv_header_parser(edits, cut, reseal):
    """Damaged headers are rejected as CorruptObject; re-sealed (checksum recomputed) absurd geometries too,
    or they parse to a geometry whose sizes are consistent."""
    CASES["kv_header"] += 1
    buf = bytearray(_VALID_HEADER)
    for off, val in edits:
        buf[off] = val
    if reseal:
        layers = int.from_bytes(buf[32:36], "little")
        end = 56 + 8 * layers
        if end + 8 <= len(buf):
            import xxhash

            buf[end : end + 8] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(buf[:end])))
    if cut is not None:
        del buf[cut:]
    try:
        h = kvformat.parse_header(buf)
    except Exception as e:
        assert isinstance(e, kvformat.CorruptObject), repr(e)
        return
    assert h.slice_bytes == 2 * h.chunk_tokens * h.num_kv_heads * h.head_dim * h.dtype_bytes
    assert h.header_bytes % kvformat.ALIGN_BYTES == 0 and len(h.checksums) == h.num_layers


@FAST
@given(data=st.binary(max_size=400), prefix_frames=st.integers(0, 2))
def test_fuzz_gather_frame_parser(data, prefix_frames):
    CASES["frames"] += 1
    valid = b"".join(
        wire_frames.encode_layer_head(i, 4, [kvformat.slice_checksum(b"abcd")]) + b"abcd"
        for i in range(prefix_frames)
    )
    stream = memoryview(valid + data)
    pos = [0]

    def read_exact(n: int) -> bytes:
        chunk = bytes(stream[pos[0] : pos[0] + n])
        pos[0] += len(chunk)
        return chunk

    try:
        for frame in wire_frames.iter_frames(read_exact):
            wire_frames.verify_frame(frame, ["k"] * len(frame.checksums))
    except (ObjectCacheError, struct.error, MemoryError) as e:
        assert not isinstance(e, MemoryError)
        assert isinstance(e, ObjectCacheError), repr(e)


@FAST
@given(key=st.one_of(keys_st, st.text(min_size=1, max_size=300)), bucket=st.text(max_size=70))
def test_fuzz_keys_never_escape_the_store(tmp_path_factory, key, bucket):
    CASES["keys"] += 1
    try:
        validate_bucket_name(bucket)
    except Exception as e:
        assert _client_error(e), repr(e)
    store = _STORE.setdefault("s", FilesystemStore(tmp_path_factory.mktemp("fuzzstore")))
    store.create_bucket("fuzz")
    try:
        validate_key(key)
        w = store.begin_write("fuzz", key)
        w.write(b"x")
        w.commit()
    except Exception as e:
        assert _client_error(e), repr(e)
        return
    obj_dir = store.root / "buckets" / "fuzz" / "obj"
    files = [p for p in obj_dir.iterdir()]
    assert all(p.parent == obj_dir for p in files)
    assert store.head_object("fuzz", key).size_bytes == 1
    assert [o.key for o in store.list_objects("fuzz", prefix=key).objects][:1] == [key]
    store.delete_object("fuzz", key)


_STORE: dict = {}


# --- live server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from testbed.objectstore.launch import start_server
    from tests.fixtures.servers import TEST_CREDENTIALS

    srv = start_server(
        tmp_path_factory.mktemp("fuzz-live"), credentials=TEST_CREDENTIALS, args=["--max-gather-keys", "64"]
    )
    s3 = srv.boto3_client()
    s3.create_bucket(Bucket="fuzz")
    items = wide_chunks(3, seed=11, namespace="fz")
    for name, blob in items:
        s3.put_object(Bucket="fuzz", Key=name, Body=blob)
    srv.names = [n for n, _ in items]
    yield srv
    log_text = srv.log_tail(1 << 22)
    assert "Traceback" not in log_text, log_text[-4000:]
    assert "rejected malformed HTTP request" in log_text  # the raw-bytes test's garbage, one line each
    srv.stop()


def _check_reply(status: int, ctype: str, body: bytes, error_code: str | None = None) -> None:
    # 501 NotImplemented is S3's answer for an operation it does not have; any other 5xx is a server bug.
    # A HEAD reply has no body, so its error code comes in the x-amz-error-code header.
    not_implemented = b"<Code>NotImplemented</Code>" in body or error_code == "NotImplemented"
    assert status < 500 or (status == 501 and not_implemented), (status, error_code, body[:300])
    if status >= 400 and body:  # HEAD errors have no body
        assert ctype.startswith("application/xml") and body.startswith(b"<?xml"), body[:200]
        assert b"<Code>" in body and b"<Message>" in body and b"Traceback" not in body


@LIVE
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "HEAD", "DELETE", "OPTIONS", "PATCH"]),
    path=st.one_of(
        st.text(max_size=40), st.sampled_from(["fuzz/../../etc/passwd", "fuzz/%2e%2e/x", "fuzz/ü/ñ", "fuzz"])
    ),
    query=st.sampled_from(
        [
            "",
            "?gather",
            "?uploads",
            "?delete",
            "?uploadId=zz&partNumber=0",
            "?list-type=2&max-keys=-1",
            "?acl",
            "?quarantine",
            "?location",
            "?x-id=GetObject",
        ]
    ),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "Range",
                "If-None-Match",
                "Content-MD5",
                "x-amz-checksum-crc32",
                "Content-Type",
                "x-amz-meta-a",
                "x-amz-copy-source",
            ]
        ),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
        max_size=3,
    ),
    body=st.binary(max_size=300),
)
def test_fuzz_live_signed_requests(fuzz_server, method, path, query, headers, body):
    CASES["live_requests"] += 1
    from urllib.parse import quote

    target = "/" + quote(path, safe="/%") + query
    r = signed_request(
        fuzz_server, method, target, body=body if method in ("PUT", "POST") else b"", headers=headers
    )
    data = r.read()
    _check_reply(r.status, r.getheader("Content-Type", ""), data, r.getheader("x-amz-error-code"))


@LIVE
@given(
    keys=st.lists(
        st.one_of(
            st.sampled_from(["fz-missing/x", "../../x", "fuzz/ü", "", "fz/" + "a" * 2000]),
            st.text(max_size=30),
            # A stored object's name (by index): a tuple, so no random text can be mistaken for one.
            st.integers(0, 2).map(lambda i: ("stored", i)),
        ),
        min_size=0,
        max_size=80,
    ),
    layer_start=st.one_of(st.integers(-3, 12), st.just(2**40), st.text(max_size=3)),
    layer_end=st.one_of(st.none(), st.integers(-3, 12), st.just(2**63)),
    extra=st.dictionaries(
        st.sampled_from(["version", "compute_per_layer_s", "stream_id"]), json_values, max_size=2
    ),
)
def test_fuzz_live_gather(fuzz_server, keys, layer_start, layer_end, extra):
    CASES["live_gather"] += 1
    names = fuzz_server.names
    keys = [names[k[1]] if isinstance(k, tuple) else k for k in keys]
    doc = {"version": 1, "keys": keys, "layer_start": layer_start, **extra}
    if layer_end is not None:
        doc["layer_end"] = layer_end
    r = signed_request(
        fuzz_server,
        "POST",
        "/fuzz?gather",
        body=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    data = r.read()
    if r.status == 200:
        pos = [0]

        def read_exact(n: int) -> bytes:
            chunk = data[pos[0] : pos[0] + n]
            pos[0] += len(chunk)
            return chunk

        frames = list(wire_frames.iter_frames(read_exact))
        for f in frames:
            wire_frames.verify_frame(f, keys)
        assert all(k in names for k in keys)
    else:
        _check_reply(r.status, r.getheader("Content-Type", ""), data, r.getheader("x-amz-error-code"))
        if any(k not in names for k in keys if isinstance(k, str) and k.startswith("fz-missing/")):
            assert r.status in (400, 403, 404, 413)


def test_fuzz_live_raw_bytes_and_survival(fuzz_server):
    """Not-HTTP bytes: the parser answers 400 (or closes); the server keeps serving."""
    rng = random.Random(5)
    samples = [
        b"GARBAGE\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\x00" * 100,
        b"GET / HTTP/9.9\r\n\r\n",
    ]
    samples += [
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\r\n\r\n" for _ in range(40)
    ]
    for raw in samples:
        CASES["live_raw"] += 1
        with socket.create_connection((fuzz_server.host, fuzz_server.port), timeout=5) as s:
            s.sendall(raw)
            try:
                reply = s.recv(200)
            except (ConnectionResetError, TimeoutError):
                reply = b""
        if reply:
            status = int(reply.split(b" ", 2)[1])
            assert 400 <= status < 500, reply
    r = signed_request(fuzz_server, "GET", f"/fuzz/{fuzz_server.names[0]}")
    assert r.status == 200 and len(r.read()) > 0
    print(
        f"\n[fuzz] live: {CASES['live_requests']} signed requests, {CASES['live_gather']} gathers, "
        f"{CASES['live_raw']} raw byte strings"
    )


# --- limits -----------------------------------------------------------------------------------------------


def test_request_size_limits(fuzz_server):
    srv = fuzz_server
    big = json.dumps({"version": 1, "keys": ["fz/" + "k" * 1000] * 1100}).encode()  # > 1 MiB body
    r = signed_request(srv, "POST", "/fuzz?gather", body=big)
    body = r.read()
    assert r.status == 413 and b"<Code>EntityTooLarge</Code>" in body
    many = json.dumps({"version": 1, "keys": [srv.names[0]] * 65}).encode()  # server limit: 64 keys
    r = signed_request(srv, "POST", "/fuzz?gather", body=many)
    assert r.status == 413 and b"EntityTooLarge" in r.read()
    # A PUT announcing more than the object limit is refused from its headers, before its body is read.
    headers = faults.signed_put_headers(srv, "/fuzz/huge", 6 << 30)
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(
            (
                f"PUT /fuzz/huge HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "host")
                + "\r\n"
            ).encode()
        )
        t0 = time.monotonic()
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413") and b"EntityTooLarge" in reply and time.monotonic() - t0 < 5
    # Oversized header block: refused by the HTTP parser.
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    conn.request("GET", "/fuzz/x", headers={"X-Big": "a" * 20000})
    assert conn.getresponse().status in (400, 431)


def test_clients_that_stop_reading_do_not_pin_server_memory(tmp_path_factory):
    """16 gathers of 18 MiB each whose clients never read: the server's RSS stays far below the 288 MiB
    they ask for (payload goes out by sendfile from the page cache, not through buffers), other clients
    are served meanwhile, and every descriptor is released once they hang up."""
    from testbed.objectstore.launch import start_server
    from tests.fixtures.servers import TEST_CREDENTIALS

    srv = start_server(tmp_path_factory.mktemp("slow"), credentials=TEST_CREDENTIALS)
    try:
        s3 = srv.boto3_client()
        s3.create_bucket(Bucket="slow")
        items = wide_chunks(32, seed=12, namespace="slow")
        for name, blob in items:
            s3.put_object(Bucket="slow", Key=name, Body=blob)
        names = [n for n, _ in items]
        time.sleep(0.2)
        rss0, fds0 = faults.process_rss_bytes(srv.pid), faults.process_fds(srv.pid)
        socks = []
        body = json.dumps({"version": 1, "keys": names}).encode()
        for _ in range(16):
            r = signed_request(srv, "POST", "/slow?gather", body=body)
            assert r.status == 200
            socks.append(r)  # never read beyond the headers
        time.sleep(1.0)
        rss1 = faults.process_rss_bytes(srv.pid)
        t0 = time.monotonic()
        assert s3.get_object(Bucket="slow", Key=names[0])["Body"].read() == items[0][1]
        other_s = time.monotonic() - t0
        for r in socks:
            r.close()
        deadline = time.monotonic() + 10
        while faults.process_fds(srv.pid) > fds0 + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        fds2 = faults.process_fds(srv.pid)
        print(
            f"\n[limits] 16 stalled gathers: RSS +{(rss1 - rss0) / 2**20:.1f} MiB, other GET {other_s * 1e3:.0f} ms, fds {fds0}->{fds2}"
        )
        assert rss1 - rss0 < 64 * 2**20
        assert other_s < 2.0
        assert fds2 <= fds0 + 2
    finally:
        srv.stop()
