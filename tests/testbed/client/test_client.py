"""The object-tier client against real services: our server (gather) and Ceph RGW (ranged / whole fallbacks).

The same chunks are written to both; every path must return the same bytes, errors must name the chunk and
layer.  Wire-level failure cases of the gather stream (truncation, error frames, bad checksums) use a tiny
in-process HTTP server that replays a crafted response.
"""

from __future__ import annotations

import asyncio
import http.server
import threading

import numpy as np
import pytest

from scheduler.geometry import ModelSpec, get_model
from scheduler.keys import KeyScope, chunk_keys, object_key
from testbed.client import core as client_mod
from testbed.client.core import ObjectCacheClient
from testbed.wire import frames
from testbed.wire.errors import (
    ChecksumMismatch,
    ChunkMissing,
    GatherUnsupported,
    GeometryMismatch,
    InvalidRequest,
    ObjectCacheError,
    StorageUnavailable,
    TruncatedStream,
)
from testbed.wire.kvformat import encode_chunk, parse_header, slice_checksum

TINY = get_model("tiny")  # 4 layers, 64 KiB slices with 256-token chunks
CHUNK_TOKENS = 256


def make_chunks(n: int, namespace: str, seed: int, model: ModelSpec = TINY):
    """``n`` chunks: (object name, object blob, list of per-layer slice bytes)."""
    rng = np.random.default_rng(seed)
    scope = KeyScope(model.fingerprint(), namespace)
    sb = model.kv_bytes_per_chunk_layer(CHUNK_TOKENS)
    out = []
    for key in chunk_keys(rng.integers(0, 1000, size=n * CHUNK_TOKENS), scope):
        layers = [rng.integers(0, 256, size=sb, dtype=np.uint8).tobytes() for _ in range(model.num_layers)]
        out.append((object_key(scope, key), encode_chunk(model, layers), layers))
    return out


def expected_layer(chunks, layer: int) -> bytes:
    return b"".join(c[2][layer] for c in chunks)


def rgw_client(rgw, bucket, **kw) -> ObjectCacheClient:
    return ObjectCacheClient(rgw.endpoint_url, bucket, rgw.access_key, rgw.secret_key, **kw)


def server_client(srv, bucket, **kw) -> ObjectCacheClient:
    return ObjectCacheClient(srv.url, bucket, srv.access_key, srv.secret_key, **kw)


@pytest.fixture(scope="module")
def chunks():
    return make_chunks(5, "client-test", seed=1)


@pytest.fixture
def both(rgw, rgw_bucket, objectcache_server, objectcache_bucket, chunks):
    """Clients factory for (server, rgw) with the same chunks written to both."""
    made = []

    def make(target: str, **kw) -> ObjectCacheClient:
        c = (
            server_client(objectcache_server, objectcache_bucket, **kw)
            if target == "server"
            else rgw_client(rgw, rgw_bucket, **kw)
        )
        made.append(c)
        return c

    for target in ("server", "rgw"):
        c = make(target)
        assert c.put_chunks([(n, b) for n, b, _ in chunks]) == len(chunks)
    yield make
    for c in made:
        c.close()


@pytest.mark.rgw
@pytest.mark.parametrize(
    "target,mode,path",
    [
        ("server", "auto", "gather"),
        ("server", "ranged", "ranged"),
        ("rgw", "auto", "ranged"),
        ("rgw", "whole", "whole"),
    ],
)
def test_same_bytes_from_every_path(both, chunks, target, mode, path):
    c = both(target, mode=mode, max_concurrency=3)
    names = [n for n, _, _ in chunks]
    got = [(layer, bytes(v)) for layer, v in c.load_layers(names)]
    assert c.last_path == path
    assert [layer for layer, _ in got] == list(range(TINY.num_layers))
    for layer, payload in got:
        assert payload == expected_layer(chunks, layer)
    # A layer subset, a different key order, caller-provided buffers (numpy arrays) read in place.
    order = [chunks[i] for i in (3, 0, 4)]
    sb = TINY.kv_bytes_per_chunk_layer(CHUNK_TOKENS)
    out = [np.zeros(3 * sb + 7, dtype=np.uint8) for _ in range(2)]
    got = list(c.load_layers([n for n, _, _ in order], layer_start=1, layer_end=3, out=out))
    assert [layer for layer, _ in got] == [1, 2]
    for i, (layer, view) in enumerate(got):
        assert view.obj is out[i].data.obj or np.shares_memory(np.frombuffer(view, np.uint8), out[i])
        assert out[i][: 3 * sb].tobytes() == expected_layer(order, layer)
    assert list(c.load_layers(names, layer_start=2, layer_end=2)) == []
    with pytest.raises(InvalidRequest):  # past the model's layers: the same error on every path
        list(c.load_layers(names, layer_start=1, layer_end=TINY.num_layers + 1))


@pytest.mark.rgw
def test_auto_learns_that_rgw_has_no_gather(rgw, rgw_bucket, chunks):
    client_mod.forget_gather_support(rgw.endpoint_url)
    with rgw_client(rgw, rgw_bucket) as c:
        c.put_chunks([(n, b) for n, b, _ in chunks[:2]])
        list(c.load_layers([chunks[0][0]], layer_end=1))
        assert c.last_path == "ranged"
        assert client_mod.GATHER_SUPPORT.get(rgw.endpoint_url) is False
    with (
        rgw_client(rgw, rgw_bucket, mode="gather") as c,
        pytest.raises(GatherUnsupported, match="no gather"),
    ):
        list(c.load_layers([chunks[0][0]]))


@pytest.mark.rgw
@pytest.mark.parametrize("target", ["server", "rgw"])
def test_put_is_idempotent_and_exists(rgw, rgw_bucket, objectcache_server, objectcache_bucket, target):
    mine = make_chunks(3, "put-test", seed=7)
    make = server_client if target == "server" else rgw_client
    srv = objectcache_server if target == "server" else rgw
    with make(srv, objectcache_bucket if target == "server" else rgw_bucket) as c:
        names = [n for n, _, _ in mine]
        assert c.exists(names) == [False] * 3
        assert c.put_chunk(names[0], mine[0][1]) is True
        assert c.put_chunk(names[0], mine[0][1]) is False  # If-None-Match: *
        assert c.put_chunks([(n, b) for n, b, _ in mine]) == 2
        assert c.put_chunks([(n, b) for n, b, _ in mine]) == 0
        assert c.exists(names + [names[0] + "-nope"]) == [True, True, True, False]


@pytest.mark.rgw
@pytest.mark.parametrize("target,mode", [("server", "gather"), ("rgw", "ranged"), ("rgw", "whole")])
def test_missing_chunk_is_named(both, chunks, target, mode):
    c = both(target, mode=mode)
    missing = chunks[0][0][:-4] + "beef"
    with pytest.raises(ChunkMissing) as info:
        list(c.load_layers([chunks[0][0], missing]))
    assert missing in str(info.value)


@pytest.mark.rgw
@pytest.mark.parametrize("target,mode", [("server", "gather"), ("rgw", "ranged"), ("rgw", "whole")])
def test_corrupt_slice_raises_naming_chunk_and_layer(
    rgw, rgw_s3, rgw_bucket, objectcache_server, objectcache_s3, objectcache_bucket, target, mode
):
    (name, blob, _), good = make_chunks(2, f"corrupt-{mode}", seed=3)
    header = parse_header(blob)
    start, _ = header.layer_range(2)
    bad = bytearray(blob)
    bad[start + 100] ^= 0xFF  # header intact, layer 2's bytes no longer match its stored checksum
    s3, bucket, srv = (
        (objectcache_s3, objectcache_bucket, objectcache_server)
        if target == "server"
        else (rgw_s3, rgw_bucket, rgw)
    )
    s3.put_object(Bucket=bucket, Key=name, Body=bytes(bad))
    s3.put_object(Bucket=bucket, Key=good[0], Body=good[1])
    make = server_client if target == "server" else rgw_client
    with make(srv, bucket, mode=mode) as c:
        it = c.load_layers([good[0], name])
        assert [layer for layer, _ in zip(range(2), it)] == [0, 1]  # layers before the damage arrive
        with pytest.raises(ChecksumMismatch) as info:
            next(it)
    assert info.value.key == name and info.value.layer == 2
    assert name in str(info.value) and "layer 2" in str(info.value)


def test_gather_verifies_large_payloads_piecewise(
    objectcache_server, objectcache_s3, objectcache_bucket, monkeypatch
):
    """With one slice per verification piece (pool-verified while the next piece arrives), good bytes pass
    and a damaged slice in the middle of a layer is still reported with its chunk key and layer."""
    from testbed.client import gather_path

    monkeypatch.setattr(gather_path, "VERIFY_PIECE_BYTES", 1)
    chunks = make_chunks(4, "piecewise", seed=8)
    name, blob, _ = chunks[2]
    bad = bytearray(blob)
    bad[parse_header(blob).layer_range(1)[0] + 7] ^= 0x01
    for n, b, _ in chunks:
        objectcache_s3.put_object(Bucket=objectcache_bucket, Key=n, Body=bytes(bad) if n == name else b)
    names = [c[0] for c in chunks]
    with server_client(objectcache_server, objectcache_bucket, mode="gather") as c:
        it = c.load_layers(names)
        layer, view = next(it)
        sb = len(view) // 4
        assert layer == 0 and all(bytes(view[i * sb : (i + 1) * sb]) == chunks[i][2][0] for i in range(4))
        with pytest.raises(ChecksumMismatch) as info:
            next(it)
    assert info.value.key == name and info.value.layer == 1


@pytest.mark.rgw
def test_geometry_mismatch_on_fallback(rgw, rgw_bucket):
    other = ModelSpec("tiny-wide", 4, 2, 32, 4, 64, 4, 128, 512)
    a = make_chunks(1, "geo", seed=4)[0]
    b = make_chunks(1, "geo", seed=5, model=other)[0]
    with rgw_client(rgw, rgw_bucket, mode="ranged") as c:
        c.put_chunks([(a[0], a[1]), (b[0], b[1])])
        with pytest.raises(GeometryMismatch, match=b[0]):
            list(c.load_layers([a[0], b[0]]))


@pytest.mark.rgw
@pytest.mark.parametrize("target,mode", [("server", "gather"), ("rgw", "ranged")])
def test_ring_of_buffers(both, chunks, target, mode):
    """``out`` may repeat a buffer (a ring of pinned buffers): each yielded layer is intact when seen."""
    c = both(target, mode=mode, max_concurrency=8)
    names = [n for n, _, _ in chunks]
    sb = TINY.kv_bytes_per_chunk_layer(CHUNK_TOKENS)
    ring = [bytearray(len(names) * sb) for _ in range(2)]
    for layer, view in c.load_layers(names, out=[ring[i % 2] for i in range(TINY.num_layers)]):
        assert bytes(view) == expected_layer(chunks, layer)


@pytest.mark.rgw
def test_async_iterator(both, chunks):
    c = both("server")
    names = [n for n, _, _ in chunks]

    async def collect():
        return [(layer, bytes(v)) async for layer, v in c.aload_layers(names, layer_start=1)]

    got = asyncio.run(collect())
    assert [layer for layer, _ in got] == [1, 2, 3]
    assert all(p == expected_layer(chunks, layer) for layer, p in got)


def test_unreachable_endpoint_is_storage_unavailable():
    from testbed.harness.rgw import free_ports

    (port,) = free_ports(1)
    with ObjectCacheClient(f"http://127.0.0.1:{port}", "bkt", "a", "b", timeout_s=2, retries=0) as c:
        with pytest.raises(StorageUnavailable, match=f"127.0.0.1:{port}"):
            list(c.load_layers(["x/y/z"]))
        with pytest.raises(StorageUnavailable):
            c.exists(["x/y/z"])


# --- gather stream parsing against crafted responses ----------------------------------------------------------


class _Replay(http.server.BaseHTTPRequestHandler):
    """Answers every POST with ``self.server.reply`` (status, headers, body); ignores auth."""

    def do_POST(self):  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, headers, body = self.server.reply
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def replay():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Replay)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _frames(chunks, layers, corrupt_layer=None, end=True, error=None, claim_end=None):
    sb = len(chunks[0][2][0])
    body = b""
    for layer in layers:
        sums = [slice_checksum(c[2][layer]) for c in chunks]
        payload = expected_layer(chunks, layer)
        if layer == corrupt_layer:
            payload = payload[:-1] + bytes([payload[-1] ^ 1])
        body += frames.encode_layer_head(layer, sb, sums) + payload
    if error:
        body += frames.encode_error_frame(error)
    elif end:
        body += frames.encode_end_frame(len(layers))
    headers = {
        "Content-Type": frames.CONTENT_TYPE,
        frames.NUM_CHUNKS_HEADER: str(len(chunks)),
        frames.SLICE_BYTES_HEADER: str(sb),
        frames.LAYER_START_HEADER: str(layers[0]),
        frames.LAYER_END_HEADER: str(claim_end or layers[-1] + 1),
    }
    return 200, headers, body


@pytest.mark.parametrize(
    "kind,exc,match",
    [
        ("ok", None, None),
        ("no-end", TruncatedStream, "end frame"),
        ("cut", TruncatedStream, "layer 2 payload: stream ended"),
        ("error-frame", TruncatedStream, "disk on fire"),
        ("bad-sum", ChecksumMismatch, "layer 1"),
    ],
)
def test_gather_stream_parsing(replay, chunks, kind, exc, match):
    two = chunks[:2]
    status, headers, body = _frames(
        two,
        [0, 1] if kind == "error-frame" else [0, 1, 2, 3],
        claim_end=4,
        corrupt_layer=1 if kind == "bad-sum" else None,
        end=kind != "no-end",
        error="InternalError: disk on fire" if kind == "error-frame" else None,
    )
    if kind == "cut":
        body = body[: len(body) // 2 + 1000]  # inside layer 2's payload
    replay.reply = (status, headers, body)
    names = [n for n, _, _ in two]
    with ObjectCacheClient(f"http://127.0.0.1:{replay.server_port}", "bkt", "a", "b", mode="gather") as c:
        if exc is None:
            got = [(layer, bytes(v)) for layer, v in c.load_layers(names)]
            assert got == [(layer, expected_layer(two, layer)) for layer in range(4)]
            return
        with pytest.raises(exc, match=match) as info:
            list(c.load_layers(names))
        assert isinstance(info.value, ObjectCacheError)
        if kind == "bad-sum":
            assert info.value.key == names[1] and info.value.layer == 1


def test_gather_unsupported_answers_are_recognised(replay):
    replay.reply = (501, {"Content-Type": "application/xml"}, b"<Error><Code>NotImplemented</Code></Error>")
    with (
        ObjectCacheClient(f"http://127.0.0.1:{replay.server_port}", "bkt", "a", "b", mode="gather") as c,
        pytest.raises(GatherUnsupported),
    ):
        list(c.load_layers(["a/b/c"]))
    replay.reply = (
        404,
        {"Content-Type": "application/xml"},
        b"<Error><Code>NoSuchKey</Code><Key>a/b/c</Key></Error>",
    )
    with (
        ObjectCacheClient(f"http://127.0.0.1:{replay.server_port}", "bkt", "a", "b", mode="auto") as c,
        pytest.raises(ChunkMissing, match="a/b/c"),
    ):
        list(c.load_layers(["a/b/c"]))


def test_layer_buffers_allocate_each_layer_on_first_use():
    """Without ``out`` the client reads each layer into its own buffer, made when the layer is reached: a
    whole request allocated (and zeroed) up front held the GIL for tens of ms and stalled other readers."""
    from testbed.client.buffers import LayerBuffers

    bufs = LayerBuffers(4, 1 << 20)
    assert len(bufs) == 4 and not bufs._views
    v1 = bufs[1]
    assert len(v1) == 1 << 20 and v1.nbytes == 1 << 20 and not v1.readonly
    assert list(bufs._views) == [1]
    assert bufs[1] is v1 and bufs[-3] is v1  # the same layer, the same buffer
    assert bufs[2].obj is not v1.obj
    assert len(bufs[0:2]) == 2
    with pytest.raises(IndexError):
        bufs[4]
