"""The write-back PUT path: chunk objects as parts over parallel streams, signed ``UNSIGNED-PAYLOAD`` with
``x-oc-verify: kvchunk``, the server checking the chunk header and every slice's xxh3 before the atomic
commit (``testbed.client.core.put_chunk``, ``testbed.objectstore.body``, ``testbed.wire.kvformat``)."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.geometry import get_model
from testbed.client.core import PUT_VERIFY, ObjectCacheClient
from testbed.client.signed import SignedHTTP, object_path
from testbed.wire.errors import ChecksumMismatch, ChunkMissing, CorruptObject
from testbed.wire.kvformat import ChunkVerifier, encode_chunk, encode_chunk_parts

TINY = get_model("tiny")


def layers_for(seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sb = TINY.kv_bytes_per_chunk_layer(256)
    return [rng.integers(0, 256, size=sb, dtype=np.uint8).tobytes() for _ in range(TINY.num_layers)]


def client(srv, bucket, **kw) -> ObjectCacheClient:
    return ObjectCacheClient(srv.url, bucket, srv.access_key, srv.secret_key, mode="gather", **kw)


def test_parts_are_the_encoded_object_and_the_verifier_takes_any_split():
    layers = layers_for(1)
    blob = encode_chunk(TINY, layers)
    parts = encode_chunk_parts(TINY, layers)
    assert b"".join(bytes(p) for p in parts) == blob
    assert parts[1].obj is layers[0]  # the layer buffers themselves, not copies
    for step in (1, 4095, 4096, 5000, 65536, len(blob)):
        v = ChunkVerifier("k")
        for i in range(0, len(blob), step):
            v.update(blob[i : i + step])
        assert v.verify().num_layers == TINY.num_layers


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda b: b[:-1], CorruptObject),  # short
        (lambda b: b + b"x", CorruptObject),  # long
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), ChecksumMismatch),  # a flipped payload bit
        (lambda b: b"nope" + b[4:], CorruptObject),  # not a chunk object
        (lambda b: b[:8] + (0).to_bytes(4, "little") + b[12:], CorruptObject),  # header_bytes 0
    ],
)
def test_the_verifier_rejects_bad_objects(mutate, error):
    blob = mutate(encode_chunk(TINY, layers_for(2)))
    v = ChunkVerifier("k")
    with pytest.raises(error):
        for i in range(0, len(blob), 10_000):
            v.update(blob[i : i + 10_000])
        v.verify()


def test_put_chunks_writes_parts_verified_and_idempotently(objectcache_server, objectcache_bucket):
    items = [(f"ns/put-{i}", encode_chunk_parts(TINY, layers_for(10 + i))) for i in range(6)]
    with client(objectcache_server, objectcache_bucket, put_streams=3) as c:
        assert c.put_chunks(items) == 6
        assert PUT_VERIFY.get(c.endpoint_url) is True  # the server confirmed the chunk check
        assert c.put_chunks(items) == 0  # all exist
        assert c.put_chunk(*items[0]) is False  # If-None-Match: * on the fast path
        got = [bytes(v) for _, v in c.load_layers([n for n, _ in items])]
        for layer in range(TINY.num_layers):
            assert got[layer] == b"".join(layers_for(10 + i)[layer] for i in range(6))
        # plain bytes still work (one part)
        assert c.put_chunk("ns/put-bytes", encode_chunk(TINY, layers_for(99))) is True


def test_a_chunk_put_is_named_by_its_header_and_a_plain_put_by_its_md5(
    objectcache_server, objectcache_bucket, objectcache_s3
):
    """A verified chunk PUT gets the composite ETag ``<MD5 of the header>-<slices>`` (no MD5 over the
    bytes on the write-back path; the dash tells S3 clients it is not the content MD5); the same bytes PUT
    without ``x-oc-verify`` get the content MD5, as S3."""
    import hashlib

    from testbed.wire.kvformat import declared_header_bytes

    blob = encode_chunk(TINY, layers_for(7))
    with client(objectcache_server, objectcache_bucket) as c:
        assert c.put_chunk("ns/etag-chunk", encode_chunk_parts(TINY, layers_for(7))) is True
    head = objectcache_s3.head_object(Bucket=objectcache_bucket, Key="ns/etag-chunk")
    header = blob[: declared_header_bytes(blob)]
    assert head["ETag"] == f'"{hashlib.md5(header).hexdigest()}-{TINY.num_layers}"'
    got = objectcache_s3.get_object(Bucket=objectcache_bucket, Key="ns/etag-chunk")["Body"].read()
    assert got == blob
    objectcache_s3.put_object(Bucket=objectcache_bucket, Key="ns/etag-plain", Body=blob)
    plain = objectcache_s3.head_object(Bucket=objectcache_bucket, Key="ns/etag-plain")
    assert plain["ETag"] == f'"{hashlib.md5(blob).hexdigest()}"'


def test_a_corrupt_body_is_rejected_before_commit(objectcache_server, objectcache_bucket):
    parts = encode_chunk_parts(TINY, layers_for(3))
    bad = bytearray(parts[2])
    bad[100] ^= 0xFF
    parts[2] = memoryview(bytes(bad))
    with client(objectcache_server, objectcache_bucket) as c:
        with pytest.raises(ChecksumMismatch):
            c.put_chunk("ns/corrupt", parts)
        assert c.exists(["ns/corrupt"]) == [False]
        with pytest.raises(ChunkMissing):
            list(c.load_layers(["ns/corrupt"]))


def test_an_unsigned_verify_header_is_refused(objectcache_server, objectcache_bucket):
    """``x-oc-verify`` must be covered by the signature: stripping it must not be possible unnoticed, and an
    unsigned one is refused."""
    http = SignedHTTP(objectcache_server.url, objectcache_server.access_key, objectcache_server.secret_key)
    try:
        blob = encode_chunk(TINY, layers_for(4))
        path = object_path(objectcache_bucket, "ns/unsigned-verify")
        signed = http.signed_headers("PUT", path, {}, b"", unsigned=True)
        conn, _ = http._conns.get()
        conn.request("PUT", path, body=blob, headers={**signed, "x-oc-verify": "kvchunk"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 403
    finally:
        http.close()


def test_large_chunk_puts_are_received_off_the_loop(objectcache_server, objectcache_bucket):
    """Bodies of 1 MiB and more (``read_body_direct``): written intact, a corrupt one refused before commit,
    and the connection closed after each (the client reconnects)."""
    big = get_model("llama-3.1-8b")
    sb = big.kv_bytes_per_chunk_layer(256)
    rng = np.random.default_rng(5)
    pool = [rng.integers(0, 256, size=sb, dtype=np.uint8).tobytes() for _ in range(4)]
    chunks = [[pool[(i + layer) % 4] for layer in range(big.num_layers)] for i in range(3)]
    with client(objectcache_server, objectcache_bucket, put_streams=2) as c:
        items = [(f"ns/big-{i}", encode_chunk_parts(big, chunks[i])) for i in range(2)]
        assert c.put_chunks(items) == 2
        assert c.put_chunk(*items[0]) is False
        layers = dict(c.load_layers([n for n, _ in items], layer_start=30))
        assert bytes(layers[31]) == chunks[0][31] + chunks[1][31]
        parts = encode_chunk_parts(big, chunks[2])
        bad = bytearray(parts[-1])
        bad[-1] ^= 1
        parts[-1] = memoryview(bytes(bad))
        with pytest.raises(ChecksumMismatch):
            c.put_chunk("ns/big-bad", parts)
        assert c.exists(["ns/big-bad", "ns/big-0"]) == [False, True]
        short = encode_chunk_parts(big, chunks[2])[:-1]  # a header that promises one more slice
        with pytest.raises(ChecksumMismatch):
            c.put_chunk("ns/big-short", short)
        assert c.put_chunk("ns/big-2", encode_chunk_parts(big, chunks[2])) is True
