"""The KV chunk object format: layout, round trip, and corruption detection."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.geometry import ModelSpec, get_model
from testbed.wire.errors import ChecksumMismatch, CorruptObject, GeometryMismatch
from testbed.wire.kvformat import (
    ALIGN_BYTES,
    HEADER_PROBE_BYTES,
    decode_chunk,
    encode_chunk,
    header_size,
    make_header,
    parse_header,
    slice_checksum,
    verify_slice,
)

TINY = get_model("tiny")


def random_layers(model: ModelSpec, chunk_tokens: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    n = model.kv_bytes_per_chunk_layer(chunk_tokens)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for _ in range(model.num_layers)]


def test_layout_matches_the_wire_contract():
    layers = random_layers(TINY, 16)
    blob = encode_chunk(TINY, layers, chunk_tokens=16)
    slice_bytes = 2 * 16 * TINY.num_kv_heads * TINY.head_dim * 4
    assert blob[:4] == b"OCKV"
    version, flags, header_bytes = struct.unpack_from("<HHI", blob, 4)
    assert (version, flags, header_bytes) == (1, 0, 4096)
    assert blob[12:28] == TINY.fingerprint().encode()
    assert struct.unpack_from("<IIII", blob, 28) == (16, TINY.num_layers, TINY.num_kv_heads, TINY.head_dim)
    assert blob[44] == 3 and blob[45:48] == b"\0\0\0"  # fp32, padding
    assert struct.unpack_from("<Q", blob, 48)[0] == slice_bytes == TINY.kv_bytes_per_chunk_layer(16)
    sums = struct.unpack_from(f"<{TINY.num_layers}Q", blob, 56)
    assert list(sums) == [xxhash.xxh3_64_intdigest(x) for x in layers]
    end = 56 + 8 * TINY.num_layers
    assert struct.unpack_from("<Q", blob, end)[0] == xxhash.xxh3_64_intdigest(blob[:end])
    assert blob[end + 8 : header_bytes] == bytes(header_bytes - end - 8)
    for layer, data in enumerate(layers):  # layer l is one byte range, K then V
        start = header_bytes + layer * slice_bytes
        assert blob[start : start + slice_bytes] == data
    assert len(blob) == header_bytes + TINY.num_layers * slice_bytes


def test_round_trip_and_header_fields():
    layers = random_layers(TINY, 256, seed=1)
    blob = encode_chunk(TINY, layers)
    header, views = decode_chunk(blob, key="k")
    assert [bytes(v) for v in views] == layers
    assert header.matches(TINY) and not header.matches(TINY, chunk_tokens=128)
    assert header.dtype == "fp32" and header.dtype_bytes == 4 and header.total_bytes == len(blob)
    assert header.layer_range(1) == (4096 + header.slice_bytes, 4096 + 2 * header.slice_bytes)
    assert parse_header(blob[:HEADER_PROBE_BYTES]) == header
    assert header.encode() == blob[: header.header_bytes]
    with pytest.raises(IndexError):
        header.layer_range(TINY.num_layers)


def test_large_models_keep_a_page_aligned_header():
    llama = get_model("llama-3.1-8b")
    h = make_header(llama, [0] * llama.num_layers)
    assert h.slice_bytes == 1 << 20 and h.dtype == "bf16" and h.header_bytes == 4096
    assert header_size(600) == 2 * ALIGN_BYTES  # 56 + 8*600 + 8 > 4096
    assert parse_header(h.encode()) == h


def test_corruption_is_detected():
    layers = random_layers(TINY, 32, seed=2)
    blob = bytearray(encode_chunk(TINY, layers, chunk_tokens=32))
    header = parse_header(blob)

    def flipped(pos: int) -> bytes:
        b = bytearray(blob)
        b[pos] ^= 0x01
        return bytes(b)

    with pytest.raises(CorruptObject, match="magic"):
        parse_header(flipped(0))
    with pytest.raises(CorruptObject, match="version"):
        parse_header(flipped(4))
    with pytest.raises(CorruptObject, match="header checksum"):
        parse_header(flipped(30))  # chunk_tokens: passes the sanity checks, caught by the header checksum
    with pytest.raises(CorruptObject, match="header checksum"):
        parse_header(flipped(56 + 8))  # a stored slice checksum
    with pytest.raises(CorruptObject, match="too short"):
        parse_header(blob[:20])
    with pytest.raises(CorruptObject):
        decode_chunk(bytes(blob[:-1]), key="k")
    start, _ = header.layer_range(2)
    with pytest.raises(ChecksumMismatch) as err:
        decode_chunk(flipped(start + 7), key="chunk-x")
    assert err.value.key == "chunk-x" and err.value.layer == 2 and "chunk-x layer 2" in str(err.value)
    _, views = decode_chunk(flipped(start + 7), verify=False)
    assert bytes(views[2]) != layers[2]
    verify_slice(header, 1, layers[1], key="k")
    with pytest.raises(ChecksumMismatch):
        verify_slice(header, 1, layers[1][:-1], key="k")


def test_geometry_errors_on_encode():
    layers = random_layers(TINY, 16)
    with pytest.raises(GeometryMismatch):
        encode_chunk(TINY, layers[:-1], chunk_tokens=16)
    with pytest.raises(GeometryMismatch):
        encode_chunk(TINY, layers, chunk_tokens=32)
    with pytest.raises(GeometryMismatch):
        encode_chunk(TINY, layers, chunk_tokens=16, dtype="bf16")  # tiny is fp32


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 6),
    kv_heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([4, 8]),
    dtype_bytes=st.sampled_from([1, 2, 4]),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(layers, kv_heads, head_dim, dtype_bytes, tokens, seed):
    spec = ModelSpec("p", layers, kv_heads, head_dim, dtype_bytes, hidden_size=8, num_heads=2 * kv_heads)
    data = random_layers(spec, tokens, seed)
    blob = encode_chunk(spec, data, chunk_tokens=tokens)
    header, views = decode_chunk(blob)
    assert [bytes(v) for v in views] == data
    assert header.header_bytes % ALIGN_BYTES == 0 and header.checksums == tuple(
        slice_checksum(d) for d in data
    )
