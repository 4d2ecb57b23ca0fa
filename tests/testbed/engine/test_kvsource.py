"""KV sources on the CPU: the DRAM tier's slots and eviction, the layer copier's layout change, and the
ObjectCache source's background stream, error delivery and reuse.

``MemoryObjectClient`` is an in-process object tier with the client's contract (``exists``, ``put_chunks``,
``load_layers`` yielding verified layer payloads in order, ``testbed.wire.errors`` on failure), built on the real
chunk object format, so these tests need no server process; tests/testbed/engine/test_prefill.py also runs the
engine against the real server and client.
"""

from __future__ import annotations

import threading

import pytest
import torch

from scheduler.geometry import get_model
from scheduler.keys import KeyScope
from testbed.engine.dram import DramSource, DramTier
from testbed.engine.kvload import KVLoadError, LayerCopier, LoadRequest
from testbed.engine.objectsource import ObjectCacheSource
from testbed.engine.reader import (
    CancelCommand,
    GatherGroup,
    LayerReady,
    LoadCommand,
    LoadDone,
    LoadFailed,
    ReaderTimings,
    StopCommand,
    decode_error,
    encode_error,
)
from testbed.wire import kvformat
from testbed.wire.errors import ChecksumMismatch, ChunkMissing, S3Error, StorageUnavailable

SPEC = get_model("tiny")
CT = 8


class MemoryObjectClient:
    """Objects in a dict; ``load_layers`` reads each layer's slices into ``out`` and verifies checksums."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.fail_after_layers: int | None = None  # simulate a dropped stream
        self.calls = 0
        self.pace_groups: list[str | None] = []  # each call's pace group

    def exists(self, names):
        return [n in self.objects for n in names]

    def put_chunks(self, items):
        written = 0
        for name, blob in items:
            if name not in self.objects:
                self.objects[name] = bytes(blob)
                written += 1
        return written

    def load_layers(
        self,
        names,
        *,
        layer_start=0,
        layer_end=None,
        out=None,
        compute_per_layer_s=None,
        timings=None,
        pace_group=None,
    ):
        self.calls += 1
        self.pace_groups.append(pace_group)
        missing = [n for n in names if n not in self.objects]
        if missing:
            raise ChunkMissing(f"NoSuchKey: {missing[0]}", keys=missing)
        headers = [kvformat.parse_header(self.objects[n]) for n in names]
        sb = headers[0].slice_bytes
        end = headers[0].num_layers if layer_end is None else layer_end
        for layer in range(layer_start, end):
            if self.fail_after_layers is not None and layer >= self.fail_after_layers:
                raise StorageUnavailable(f"stream dropped at layer {layer}", layer=layer)
            buf = (
                memoryview(out[layer - layer_start]).cast("B")
                if out is not None
                else memoryview(bytearray(sb * len(names)))
            )
            for i, (n, h) in enumerate(zip(names, headers)):
                lo, hi = h.layer_range(layer)
                data = memoryview(self.objects[n])[lo:hi]
                kvformat.verify_slice(h, layer, data, key=n)
                buf[i * sb : (i + 1) * sb] = data
            yield layer, buf[: sb * len(names)]


def random_slices(n_chunks: int, seed: int) -> list[torch.Tensor]:
    """Per-layer chunk-major payloads ([n, 2, CT, H, D] float32) as flat uint8 tensors."""
    g = torch.Generator().manual_seed(seed)
    shape = (n_chunks, 2, CT, SPEC.num_kv_heads, SPEC.head_dim)
    return [torch.randn(shape, generator=g).view(torch.uint8).reshape(-1) for _ in range(SPEC.num_layers)]


def token_major(payload: torch.Tensor, n: int) -> torch.Tensor:
    return (
        payload.view(torch.float32)
        .view(n, 2, CT, SPEC.num_kv_heads, SPEC.head_dim)
        .permute(1, 0, 2, 3, 4)
        .reshape(2, n * CT, SPEC.num_kv_heads, SPEC.head_dim)
    )


def empty_kv(tokens: int) -> list[torch.Tensor]:
    return [
        torch.full((2, tokens, SPEC.num_kv_heads, SPEC.head_dim), float("nan"))
        for _ in range(SPEC.num_layers)
    ]


def copier(max_chunks=4) -> LayerCopier:
    return LayerCopier(SPEC, CT, torch.device("cpu"), max_chunks, torch.float32)


def test_dram_tier_slots_runs_and_lru_eviction():
    tier = DramTier(SPEC, 5, chunk_tokens=CT)
    keys = [f"{i:064x}" for i in range(7)]
    tier.put(keys[:3], [p.numpy().tobytes() for p in random_slices(3, 1)])
    assert tier.lookup(keys) == 3 and tier.runs(keys[:3]) == [(0, 0, 3)]
    tier.lookup(keys[:1])  # chunk 0 becomes most recent: chunk 1 is now the least recently used
    tier.put(keys[3:6], [p.numpy().tobytes() for p in random_slices(3, 2)])  # 2 free slots: evicts one
    assert keys[0] in tier and keys[1] not in tier and keys[2] in tier and len(tier) == 5
    assert tier.lookup(keys) == 1  # the hole at chunk 1 ends the usable prefix
    with pytest.raises(MemoryError):
        tier.allocate(6)


def test_dram_source_restores_token_major_layout_whole_and_layerwise():
    tier = DramTier(SPEC, 8, chunk_tokens=CT)
    keys = [f"{i:064x}" for i in range(3)]
    payloads = random_slices(3, 7)
    tier.put(keys, [p.numpy().tobytes() for p in payloads])
    for layerwise in (True, False):
        src = DramSource(tier, copier(), layerwise=layerwise)
        assert src.lookup(keys + ["f" * 64]) == 3
        kv = empty_kv(3 * CT + 5)
        src.start_load(LoadRequest(keys, kv))
        for layer in range(SPEC.num_layers):
            src.wait_for_layer(layer)
            assert torch.equal(kv[layer][:, : 3 * CT], token_major(payloads[layer], 3))
            assert torch.isnan(kv[layer][:, 3 * CT :]).all()  # rows of new tokens untouched
        assert src.finish_load().bytes_loaded == 3 * SPEC.num_layers * tier.slice_bytes


def _store_objects(client: MemoryObjectClient, scope: KeyScope, keys, payloads) -> None:
    n = len(keys)
    sb = SPEC.kv_bytes_per_chunk_layer(CT)
    for i, k in enumerate(keys):
        layers = [
            payloads[layer][i * sb : (i + 1) * sb].numpy().tobytes() for layer in range(SPEC.num_layers)
        ]
        client.put_chunks(
            [(f"{scope.namespace}/{scope.model_fingerprint}/{k}", kvformat.encode_chunk(SPEC, layers, CT))]
        )
    assert len(client.objects) >= n


@pytest.mark.parametrize("streams", [1, 2, 5])
def test_objectcache_source_streams_layers_into_kv(streams):
    client = MemoryObjectClient()
    scope = KeyScope(SPEC.fingerprint(), "t1")
    keys = [f"{i + 10:064x}" for i in range(3)]
    payloads = random_slices(3, 11)
    _store_objects(client, scope, keys, payloads)
    src = ObjectCacheSource(client, scope, copier(), streams=streams, min_stream_bytes=0)
    assert src.lookup(keys + ["e" * 64]) == 3
    for _ in range(2):  # the pinned receive buffers and the copier are reused across requests
        kv = empty_kv(3 * CT)
        src.start_load(LoadRequest(keys, kv))
        for layer in range(SPEC.num_layers):
            src.wait_for_layer(layer)
            assert torch.equal(kv[layer], token_major(payloads[layer], 3))
        stats = src.finish_load()
        assert stats.bytes_loaded == 3 * SPEC.num_layers * SPEC.kv_bytes_per_chunk_layer(CT)
        assert len(stats.wait_s) == SPEC.num_layers
    assert client.calls == 2 * min(streams, 3)  # one gather per group of chunks per request
    # A request's streams share one pace group (the server paces them as one flow); requests differ.
    groups = client.pace_groups
    if streams == 1:
        assert groups == [None, None]
    else:
        first, second = set(groups[: len(groups) // 2]), set(groups[len(groups) // 2 :])
        assert len(first) == len(second) == 1 and first != second and None not in first
    assert not [t for t in threading.enumerate() if t.name.startswith("objectcache-load")]


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("failure", ["missing", "corrupt", "dropped"])
def test_objectcache_source_delivers_storage_errors_at_wait(failure, streams):
    client = MemoryObjectClient()
    scope = KeyScope(SPEC.fingerprint(), "t1")
    keys = [f"{i + 20:064x}" for i in range(2)]
    _store_objects(client, scope, keys, random_slices(2, 3))
    name = f"t1/{scope.model_fingerprint}/{keys[1]}"
    if failure == "missing":
        del client.objects[name]
    elif failure == "corrupt":
        blob = bytearray(client.objects[name])
        blob[-1] ^= 0xFF  # last byte of the last layer's slice
        client.objects[name] = bytes(blob)
    else:
        client.fail_after_layers = 2
    src = ObjectCacheSource(client, scope, copier(), check_exists=False, streams=streams, min_stream_bytes=0)
    src.start_load(LoadRequest(keys, empty_kv(2 * CT)))
    with pytest.raises((ChunkMissing, StorageUnavailable, KVLoadError, kvformat.ChecksumMismatch)) as info:
        for layer in range(SPEC.num_layers):
            src.wait_for_layer(layer)
    src.abort()
    msg = str(info.value)
    if failure != "dropped":
        assert keys[1] in msg  # the error names the chunk
    if failure == "corrupt":
        assert f"layer {SPEC.num_layers - 1}" in msg


def test_lookup_stops_at_first_hole_and_survives_storage_down():
    client = MemoryObjectClient()
    scope = KeyScope(SPEC.fingerprint(), "t1")
    keys = [f"{i + 30:064x}" for i in range(3)]
    _store_objects(client, scope, [keys[0], keys[2]], random_slices(2, 5))
    src = ObjectCacheSource(client, scope, copier())
    assert src.lookup(keys) == 1

    class Down(MemoryObjectClient):
        def exists(self, names):
            raise StorageUnavailable("endpoint unreachable")

    assert ObjectCacheSource(Down(), scope, copier()).lookup(keys) == 0


@pytest.mark.parametrize(
    "exc",
    [
        ChunkMissing("NoSuchKey: ns/fp/abc", keys=["ns/fp/abc", "ns/fp/def"]),
        ChecksumMismatch("chunk 'ns/fp/abc' layer 3: bad", key="ns/fp/abc", layer=3),
        S3Error("SlowDown", "too fast", 503, key="k"),
        StorageUnavailable("gather from http://127.0.0.1:1: refused", layer=0),
    ],
)
def test_reader_errors_cross_the_process_boundary_as_the_same_class(exc):
    import pickle

    # What the reader process sends is plain data (pickled through a pipe).
    back = decode_error(pickle.loads(pickle.dumps(encode_error(exc))), KVLoadError)
    assert type(back) is type(exc) and str(back) == str(exc)
    assert vars(back) == vars(exc)


def test_reader_messages_are_named_picklable_dataclasses():
    import pickle

    cmd = LoadCommand(
        req_id=3,
        client_kwargs={"endpoint": "http://127.0.0.1:1"},
        segment_path="/proc/1/fd/5",
        segment_generation=2,
        segment_bytes=1 << 20,
        layer_stride_bytes=1 << 18,
        groups=[GatherGroup(["a", "b"], 0, 8192), GatherGroup(["c"], 8192, 4096)],
        num_layers=4,
        compute_per_layer_s=1.5e-3,
        sent_monotonic_s=12.5,
    )
    done = LoadDone(3, ReaderTimings(engine_sent_s=12.5, recv_s=12.6, end_s=[13.0, None]))
    for msg in (
        cmd,
        CancelCommand(3),
        StopCommand(),
        LayerReady(3, 1),
        LoadFailed(3, encode_error(KeyError("k"))),
        done,
    ):
        assert pickle.loads(pickle.dumps(msg)) == msg


def test_unknown_reader_errors_become_load_errors():
    back = decode_error(encode_error(ZeroDivisionError("boom")), KVLoadError)
    assert isinstance(back, KVLoadError) and "ZeroDivisionError" in str(back) and "boom" in str(back)


def test_stream_count_scales_with_the_prefix():
    """Short prefixes get fewer gather streams (one per ``min_stream_bytes``, at least ``MIN_STREAMS`` = 4),
    long ones up to ``streams``, never more than the chunks; ``min_stream_bytes=0`` keeps the count."""
    cp = copier()
    per_chunk = cp.slice_bytes * SPEC.num_layers
    src = ObjectCacheSource(MemoryObjectClient(), KeyScope(SPEC.fingerprint(), "t"), cp, streams=8,
                            min_stream_bytes=4 * per_chunk)  # fmt: skip
    chunks = (0, 1, 3, 4, 8, 16, 20, 31, 32, 64, 1000)
    assert [src.stream_count(n) for n in chunks] == [0, 1, 3, 4, 4, 4, 5, 7, 8, 8, 8]
    src.min_stream_bytes = 0
    assert [src.stream_count(n) for n in (1, 3, 16)] == [1, 3, 8]
    with pytest.raises(ValueError):
        ObjectCacheSource(MemoryObjectClient(), KeyScope(SPEC.fingerprint(), "t"), cp, min_stream_bytes=-1)
