"""Layer-major gather against a real server process: frames, order, checksums, errors before payload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from urllib.parse import quote

import numpy as np
import pytest

from scheduler.geometry import get_model
from scheduler.keys import KeyScope, chunk_keys, object_key
from testbed.objectstore import gather
from testbed.objectstore.pacer import Pacer
from testbed.objectstore.store import FilesystemStore
from testbed.wire import frames as wire_frames
from testbed.wire.errors import (
    ChecksumMismatch,
    ChunkMissing,
    GeometryMismatch,
    InvalidRequest,
    ProtocolError,
    RequestTooLarge,
)
from testbed.wire.kvformat import decode_chunk, encode_chunk, parse_header
from tests.fixtures.servers import TENANT_ACCESS_KEY, TENANT_SECRET_KEY, signed_request

TINY = get_model("tiny")  # 4 layers, slice 64 KiB with 256-token chunks


def make_chunks(n: int, namespace: str = "ns1", seed: int = 0, chunk_tokens: int = 256):
    """``n`` (object name, blob, per-layer bytes) of the tiny model with random KV."""
    rng = np.random.default_rng(seed)
    scope = KeyScope(TINY.fingerprint(), namespace)
    tokens = rng.integers(0, 500, size=n * chunk_tokens)
    out = []
    for key in chunk_keys(tokens, scope, chunk_tokens):
        slice_bytes = TINY.kv_bytes_per_chunk_layer(chunk_tokens)
        layers = [
            rng.integers(0, 256, size=slice_bytes, dtype=np.uint8).tobytes() for _ in range(TINY.num_layers)
        ]
        out.append((object_key(scope, key), encode_chunk(TINY, layers, chunk_tokens), layers))
    return out


def put_all(s3, bucket, chunks):
    for name, blob, _ in chunks:
        s3.put_object(Bucket=bucket, Key=name, Body=blob)


@contextlib.contextmanager
def server_with_chunks(data_dir, args, bucket: str, n: int, seed: int):
    """A real server started with ``args`` holding ``n`` tiny chunks in ``bucket``: (server, object names)."""
    from testbed.objectstore.launch import start_server
    from tests.fixtures.servers import TEST_CREDENTIALS

    srv = start_server(data_dir, args=["--no-fsync", *args], credentials=TEST_CREDENTIALS)
    try:
        s3 = srv.boto3_client()
        s3.create_bucket(Bucket=bucket)
        chunks = make_chunks(n, seed=seed)
        put_all(s3, bucket, chunks)
        yield srv, [c[0] for c in chunks]
    finally:
        srv.stop()


def do_gather(server, bucket, body, **kw):
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    return signed_request(
        server, "POST", f"/{bucket}?gather", body=raw, headers={"Content-Type": "application/json"}, **kw
    )


def read_frames(resp, keys):
    frames = list(wire_frames.iter_frames(resp.read))
    for f in frames:
        wire_frames.verify_frame(f, keys)
    return frames


def test_gather_all_layers_in_order(objectcache_server, objectcache_s3, objectcache_bucket):
    chunks = make_chunks(3)
    put_all(objectcache_s3, objectcache_bucket, chunks)
    keys = [c[0] for c in chunks]
    resp = do_gather(objectcache_server, objectcache_bucket, {"version": 1, "keys": keys, "layer_start": 0})
    assert resp.status == 200
    assert resp.getheader("Content-Type") == wire_frames.CONTENT_TYPE
    assert resp.getheader("x-oc-num-chunks") == "3"
    slice_bytes = TINY.kv_bytes_per_chunk_layer()
    assert resp.getheader("x-oc-slice-bytes") == str(slice_bytes)
    assert (resp.getheader("x-oc-layer-start"), resp.getheader("x-oc-layer-end")) == ("0", "4")
    frames = read_frames(resp, keys)
    assert [f.layer for f in frames] == [0, 1, 2, 3]
    for f in frames:
        assert f.slice_bytes == slice_bytes
        assert bytes(f.payload) == b"".join(c[2][f.layer] for c in chunks)  # key order
        assert f.checksums == tuple(parse_header(c[1]).checksums[f.layer] for c in chunks)


def test_gather_layer_subset_and_key_order(objectcache_server, objectcache_s3, objectcache_bucket):
    chunks = make_chunks(4, seed=1)
    put_all(objectcache_s3, objectcache_bucket, chunks)
    order = [chunks[2], chunks[0], chunks[3]]
    keys = [c[0] for c in order]
    body = {"version": 1, "keys": keys, "layer_start": 1, "layer_end": 3, "compute_per_layer_s": 0.001}
    resp = do_gather(objectcache_server, objectcache_bucket, body)
    assert resp.status == 200
    frames = read_frames(resp, keys)
    assert [f.layer for f in frames] == [1, 2]
    for f in frames:
        assert bytes(f.payload) == b"".join(c[2][f.layer] for c in order)


def test_missing_keys_reported_before_payload(objectcache_server, objectcache_s3, objectcache_bucket):
    chunks = make_chunks(3, seed=2)
    put_all(objectcache_s3, objectcache_bucket, chunks[:1])
    keys = [c[0] for c in chunks]
    resp = do_gather(objectcache_server, objectcache_bucket, {"version": 1, "keys": keys})
    body = resp.read()
    assert resp.status == 404
    assert body.startswith(b"<?xml") and b"OCLF" not in body
    assert b"<Code>NoSuchKey</Code>" in body
    assert keys[1].encode() in body and keys[2].encode() in body and b"2 of 3" in body


def test_geometry_mismatch_and_bad_requests(objectcache_server, objectcache_s3, objectcache_bucket):
    a = make_chunks(1, seed=3)
    b = make_chunks(1, seed=4, chunk_tokens=128)  # same model, other chunk size: other slice_bytes
    put_all(objectcache_s3, objectcache_bucket, a + b)
    srv, bucket = objectcache_server, objectcache_bucket
    resp = do_gather(srv, bucket, {"version": 1, "keys": [a[0][0], b[0][0]]})
    body = resp.read()
    assert resp.status == 400 and b"<Code>InvalidRequest</Code>" in body and b"geometry" in body
    for bad in (
        b"not json",
        {"version": 2, "keys": [a[0][0]]},
        {"version": 1, "keys": []},
        {"version": 1, "keys": [a[0][0]], "layer_start": 3, "layer_end": 2},
        {"version": 1, "keys": [a[0][0]], "layer_end": 5},  # the model has 4 layers
        {"version": 1, "keys": [a[0][0]], "compute_per_layer_s": "fast"},
    ):
        resp = do_gather(srv, bucket, bad)
        body = resp.read()
        assert resp.status == 400, bad
        assert b"<Code>InvalidRequest</Code>" in body, bad
    resp = do_gather(srv, bucket, {"version": 1, "keys": [f"ns1/x/{i}" for i in range(5000)]})
    assert resp.status == 413 and b"EntityTooLarge" in resp.read()
    objectcache_s3.put_object(Bucket=bucket, Key="ns1/not-a-chunk", Body=b"hello" * 2000)
    resp = do_gather(srv, bucket, {"version": 1, "keys": ["ns1/not-a-chunk"]})
    assert resp.status == 400 and b"not a KV chunk" in resp.read()


def test_gather_confined_to_namespace(objectcache_server, objectcache_s3, objectcache_bucket):
    mine = make_chunks(1, namespace="tenant-a", seed=5)
    theirs = make_chunks(1, namespace="tenant-b", seed=6)
    put_all(objectcache_s3, objectcache_bucket, mine + theirs)
    creds = {"access_key": TENANT_ACCESS_KEY, "secret_key": TENANT_SECRET_KEY}
    resp = do_gather(objectcache_server, objectcache_bucket, {"version": 1, "keys": [mine[0][0]]}, **creds)
    assert resp.status == 200 and len(read_frames(resp, [mine[0][0]])) == 4
    keys = [mine[0][0], theirs[0][0]]
    resp = do_gather(objectcache_server, objectcache_bucket, {"version": 1, "keys": keys}, **creds)
    assert resp.status == 403 and b"AccessDenied" in resp.read()
    resp = do_gather(objectcache_server, objectcache_bucket, {"version": 1, "keys": keys}, secret_key="wrong")
    assert resp.status == 403 and b"SignatureDoesNotMatch" in resp.read()


def test_corruption_in_storage_detected_end_to_end(objectcache_server, objectcache_s3, objectcache_bucket):
    chunks = make_chunks(2, seed=7)
    put_all(objectcache_s3, objectcache_bucket, chunks)
    # Flip one payload byte of chunk 1, layer 2, on disk behind the server's back.
    name, blob, _ = chunks[1]
    path = (
        objectcache_server.data_dir / "store" / "buckets" / objectcache_bucket / "obj" / quote(name, safe="")
    )
    start, _ = parse_header(blob).layer_range(2)
    with open(path, "r+b") as f:
        f.seek(start + 100)
        byte = f.read(1)
        f.seek(start + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    keys = [c[0] for c in chunks]
    resp = do_gather(objectcache_server, objectcache_bucket, {"version": 1, "keys": keys})
    assert resp.status == 200
    with pytest.raises(ChecksumMismatch) as err:
        read_frames(resp, keys)
    assert err.value.key == name and err.value.layer == 2
    assert name in str(err.value) and "layer 2" in str(err.value)


def test_truncated_stream_is_an_error():
    head = wire_frames.encode_layer_head(0, 4, [1]) + b"abcd"
    data = memoryview(head)
    pos = 0

    def read_exact(n):
        nonlocal pos
        out = bytes(data[pos : pos + n])
        pos += len(out)
        return out

    with pytest.raises(Exception, match="without an end frame"):
        list(wire_frames.iter_frames(read_exact))
    body = wire_frames.encode_layer_head(0, 4, [1]) + b"abcd" + wire_frames.encode_error_frame("disk on fire")
    data, pos = memoryview(body), 0
    with pytest.raises(Exception, match="disk on fire"):
        list(wire_frames.iter_frames(read_exact))


def test_parse_gather_body_limits():
    with pytest.raises(RequestTooLarge):
        gather.parse_gather_body(json.dumps({"keys": ["a"] * 11}).encode(), max_keys=10)
    with pytest.raises(InvalidRequest):
        gather.parse_gather_body(b"[1, 2]")
    req = gather.parse_gather_body(
        json.dumps({"keys": ["a", "b"], "layer_end": 2, "stream_id": "r1"}).encode()
    )
    assert req.keys == ("a", "b") and req.layer_start == 0 and req.layer_end == 2 and req.stream_id == "r1"


class _RecordingStore(FilesystemStore):
    """A filesystem store without file descriptors (forces the buffered path) that logs layer reads."""

    def __init__(self, root, events):
        super().__init__(root, fsync=False)
        self.events = events

    def open_object(self, bucket, key):
        handle = super().open_object(bucket, key)
        events, header_bytes = self.events, None

        class Handle(type(handle)):
            def read_into(self, offset, buf):
                if offset >= (header_bytes or 1 << 62):
                    events.append(("read", (offset - header_bytes) // len(buf)))
                return super().read_into(offset, buf)

            def fileno(self):
                return None

        handle.__class__ = Handle
        with open(self._obj_dir(bucket) / quote(key, safe=""), "rb") as f:
            header_bytes = parse_header(f.read(4096)).header_bytes
        return handle


def test_layer0_is_sent_before_later_layers_are_read(tmp_path):
    events: list = []
    store = _RecordingStore(tmp_path, events)
    store.create_bucket("bkt")
    chunks = make_chunks(2, seed=8)
    for name, blob, _ in chunks:
        w = store.begin_write("bkt", name)
        w.write(blob)
        w.commit()
    keys = tuple(c[0] for c in chunks)

    async def run():
        plan = await gather.prepare_gather(store, "bkt", gather.GatherRequest(keys, 0, None))
        pacer = Pacer()
        stream = pacer.open_stream(plan.layer_payload_bytes, plan.num_layers)
        sink = bytearray()

        async def write(data):
            if bytes(data[:4]) == wire_frames.LAYER_MAGIC:
                events.append(("send", int.from_bytes(bytes(data[4:8]), "little")))
            sink.extend(data)

        sent = await gather.stream_gather(plan, gather.WriterSink(write), pacer, stream)
        plan.close()
        return sent, bytes(sink)

    sent, body = asyncio.run(run())
    assert sent == 4
    first_send = events.index(("send", 0))
    later_reads = [i for i, e in enumerate(events) if e[0] == "read" and e[1] >= 2]
    assert later_reads and first_send < min(later_reads)
    # The buffered path produces the same frames as the sendfile path.
    frames = frames_of(body)
    assert [bytes(f.payload) for f in frames] == [b"".join(c[2][i] for c in chunks) for i in range(4)]


@pytest.mark.parametrize("inline", [False, True])
def test_prepare_gather_errors(tmp_path, inline):
    store = FilesystemStore(tmp_path, fsync=False)
    store.create_bucket("bkt")
    a, b = make_chunks(1, seed=9), make_chunks(1, seed=10, chunk_tokens=64)
    for name, blob, _ in a + b:
        w = store.begin_write("bkt", name)
        w.write(blob)
        w.commit()
    opened_in: set[int] = set()
    open_object = store.open_object

    def recording_open(bucket, key):
        opened_in.add(threading.get_ident())
        return open_object(bucket, key)

    store.open_object = recording_open

    async def prep(keys):
        req = gather.GatherRequest(tuple(keys), 0, None)
        return await gather.prepare_gather(store, "bkt", req, inline=inline)

    with pytest.raises(ChunkMissing) as err:
        asyncio.run(prep([a[0][0], "ns1/missing-1", "ns1/missing-2"]))
    assert err.value.keys == ["ns1/missing-1", "ns1/missing-2"]
    with pytest.raises(GeometryMismatch):
        asyncio.run(prep([a[0][0], b[0][0]]))
    plan = asyncio.run(prep([a[0][0]]))
    assert plan.content_length == 4 * (20 + 8 + TINY.kv_bytes_per_chunk_layer()) + 8
    header, layers = decode_chunk(a[0][1])
    assert [bytes(x) for x in layers] == a[0][2]
    plan.close()
    # Inline, the objects are opened in the event loop's thread (here the test's); else in the pool's.
    assert (opened_in == {threading.get_ident()}) == inline


# --- early streams: the first layer leaves before every object is checked ---------------------------------


class _GatedStore(FilesystemStore):
    """A filesystem store whose open of any key after the first ``free`` waits (at most ``wait_s``) until
    ``gate`` is set; ``timed_out`` counts opens that waited in vain."""

    def __init__(self, root, keys, free: int = 2, wait_s: float = 1.0):
        super().__init__(root, fsync=False)
        self.later = set(keys[free:])
        self.gate = threading.Event()
        self.wait_s = wait_s
        self.timed_out = 0

    def open_object(self, bucket, key):
        if key in self.later and not self.gate.wait(self.wait_s):
            self.timed_out += 1
        return super().open_object(bucket, key)


@pytest.mark.parametrize("early", [True, False])
def test_early_gather_sends_first_part_before_later_keys_are_opened(tmp_path, early):
    """The sink sees the first part's slices while the opens of keys 2.. are still blocked (they wait for
    that send).  Without ``stream_early`` the server opens every key first, so the opens time out."""
    chunks = make_chunks(20, seed=21)
    keys = tuple(c[0] for c in chunks)
    store = _GatedStore(tmp_path, keys)
    store.create_bucket("bkt")
    for name, blob, _ in chunks:
        w = store.begin_write("bkt", name)
        w.write(blob)
        w.commit()
    sb = TINY.kv_bytes_per_chunk_layer()

    async def run():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            req = gather.GatherRequest(keys, 0, None, stream_early=early)
            plan = await gather.prepare_gather(store, "bkt", req, pool)
            pacer = Pacer()
            stream = pacer.open_stream(plan.layer_payload_bytes, plan.num_layers)
            sink = bytearray()

            async def write(data):
                sink.extend(data)
                if len(sink) >= 2 * sb:  # some payload of the first layer has left
                    store.gate.set()

            try:
                await gather.stream_gather(plan, gather.WriterSink(write), pacer, stream, pool)
            finally:
                plan.close()
            return plan.content_length, bytes(sink)

    content_length, body = asyncio.run(run())
    assert store.timed_out == (0 if early else len(keys) - 2)
    assert len(body) == content_length
    assert body[:4] == (wire_frames.PARTS_MAGIC if early else wire_frames.LAYER_MAGIC)
    frames = frames_of(body)
    for f in frames:
        wire_frames.verify_frame(f, keys)
    assert [bytes(f.payload) for f in frames] == [b"".join(c[2][i] for c in chunks) for i in range(4)]


@pytest.mark.parametrize("paced", [False, True])
def test_early_gather_content_length_is_exact(tmp_path, paced):
    """Through a real server (sendfile; paced: in the send thread): the Content-Length announced before the
    first byte is the body's length, and the body is a parts frame, then plain frames, in order."""
    args = ["--egress-gbps", "2", "--piece-kib", "64"] if paced else []
    with server_with_chunks(tmp_path, args, "early", 20, seed=22) as (srv, keys):
        for lo, hi in ((0, None), (1, 3)):
            body = {"version": 1, "keys": keys, "layer_start": lo, "stream_early": True}
            if hi is not None:
                body["layer_end"] = hi
            resp = do_gather(srv, "early", body)
            assert resp.status == 200
            data = resp.read()
            assert len(data) == int(resp.getheader("Content-Length"))
            n_parts = len(wire_frames.early_parts(20))
            sb = TINY.kv_bytes_per_chunk_layer()
            assert n_parts == 3 and len(data) == wire_frames.stream_bytes((hi or 4) - lo, 20, sb, n_parts)
            assert data[:4] == wire_frames.PARTS_MAGIC
            pos = 0

            def read_exact(n, data=data):
                nonlocal pos
                pos += n
                return data[pos - n : pos]

            frames = list(wire_frames.iter_frames(read_exact))
            for f in frames:
                wire_frames.verify_frame(f, keys)
            assert [f.layer for f in frames] == list(range(lo, hi or 4))


def test_early_gather_late_missing_key_ends_with_error_frame(tmp_path):
    """A key missing from a later part: 200, the first part's slices, then an error frame naming the key
    (ChunkMissing to the decoder); the client raises ChunkMissing after the first byte arrived.  A key
    missing from the first part is still a 404 before any frame."""
    from testbed.client.core import ObjectCacheClient

    with server_with_chunks(tmp_path, [], "late", 20, seed=23) as (srv, keys):
        s3 = srv.boto3_client()
        s3.delete_object(Bucket="late", Key=keys[9])
        resp = do_gather(srv, "late", {"version": 1, "keys": keys, "stream_early": True})
        assert resp.status == 200
        try:
            data = resp.read()
        except Exception as e:  # the connection closes short of the Content-Length
            data = e.partial
        sb = TINY.kv_bytes_per_chunk_layer()
        assert data[:4] == wire_frames.PARTS_MAGIC and len(data) < int(resp.getheader("Content-Length"))
        err_at = 20 + 8 + 2 * 8 + 2 * sb  # parts head, first part head, 2 checksums, 2 slices
        assert data[err_at : err_at + 4] == wire_frames.ERROR_MAGIC and b"NoSuchKey" in data[err_at:]
        assert keys[9].encode() in data[err_at:]
        pos = 0

        def read_exact(n):
            nonlocal pos
            pos += n
            return data[pos - n : pos]

        with pytest.raises(ChunkMissing):
            list(wire_frames.iter_frames(read_exact))

        client = ObjectCacheClient(srv.url, "late", srv.access_key, srv.secret_key, mode="gather")
        try:
            stamps: dict = {}
            with pytest.raises(ChunkMissing) as err:
                list(client.load_layers(keys, timings=stamps))
            assert err.value.keys == [keys[9]]
            assert stamps["response_s"] <= stamps["first_byte_s"]  # the answer had begun
            assert "first_layer_s" not in stamps
            # Missing from the first part: refused before the answer, as without stream_early.
            s3.delete_object(Bucket="late", Key=keys[1])
            stamps = {}
            with pytest.raises(ChunkMissing):
                list(client.load_layers(keys, timings=stamps))
            assert "first_byte_s" not in stamps
        finally:
            client.close()


def test_early_gather_late_corrupt_key_is_an_error_frame_and_quarantined(tmp_path):
    with server_with_chunks(tmp_path, [], "bad", 20, seed=24) as (srv, keys):
        s3 = srv.boto3_client()
        good = s3.get_object(Bucket="bad", Key=keys[15])["Body"].read()
        s3.put_object(Bucket="bad", Key=keys[15], Body=good[:-10])  # shorter than its header says
        resp = do_gather(srv, "bad", {"version": 1, "keys": keys, "stream_early": True})
        assert resp.status == 200
        try:
            data = resp.read()
        except Exception as e:
            data = e.partial
        assert wire_frames.ERROR_MAGIC in data and b"InvalidObjectState" in data
        time.sleep(0.2)
        with pytest.raises(Exception, match="NoSuchKey|404|Not Found"):
            s3.head_object(Bucket="bad", Key=keys[15])


def test_parts_frame_decoder_rejects_malformed_parts():
    sb = 4
    good = (
        wire_frames.encode_parts_head(0, 3, sb)
        + wire_frames.encode_part_head([1, 2])
        + b"a" * 8
        + wire_frames.encode_part_head([3])
        + b"b" * 4
    )
    body = good + wire_frames.encode_end_frame(1)
    data, pos = memoryview(body), 0

    def read_exact(n):
        nonlocal pos
        out = bytes(data[pos : pos + n])
        pos += len(out)
        return out

    frames = list(wire_frames.iter_frames(read_exact))
    assert frames[0].checksums == (1, 2, 3) and bytes(frames[0].payload) == b"a" * 8 + b"b" * 4
    # A part claiming more slices than are left, and a plain frame inside a parts frame: protocol errors.
    for bad in (
        wire_frames.encode_parts_head(0, 1, sb) + wire_frames.encode_part_head([1, 2]) + b"a" * 8,
        wire_frames.encode_parts_head(0, 2, sb) + wire_frames.encode_layer_head(0, sb, [1]),
    ):
        data, pos = memoryview(bad + wire_frames.encode_end_frame(1)), 0
        with pytest.raises(ProtocolError):
            list(wire_frames.iter_frames(read_exact))


def frames_of(body: bytes) -> list:
    """The gather frames of a whole response body, through the client's decoder."""
    pos = 0

    def read_exact(n):
        nonlocal pos
        pos += n
        return body[pos - n : pos]

    return list(wire_frames.iter_frames(read_exact))
