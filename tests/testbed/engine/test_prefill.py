"""The layerwise prefill engine (tiny float32 model on the CPU): any split of a prompt into cached prefix and
new tokens gives the logits and KV of a full recompute; failures fall back to recompute with the same
answer; the save path fills the DRAM tier and the object tier in the object format.  GPU versions (bf16,
CUDA streams and events) run on the device machine with ``pytest -m gpu``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.engine.dram import DramSource, DramTier
from testbed.engine.kvload import LayerCopier
from testbed.engine.model import build_model
from testbed.engine.objectsource import ObjectCacheSource
from testbed.engine.prefill import PrefillEngine, kv_rel_err, rel_err
from testbed.engine.save import KVSaver
from testbed.wire import kvformat
from tests.testbed.engine.test_kvsource import MemoryObjectClient

CT = 16
MODEL = build_model("tiny", seed=11)
SPEC = MODEL.spec
TOL = 1e-4


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def make(model=MODEL, capacity=64, client=None, namespace="t1"):
    dev = model.device
    tier = DramTier(model.spec, capacity, chunk_tokens=CT, device=dev)
    engine = PrefillEngine(model, chunk_tokens=CT, namespace=namespace)
    engine.saver = KVSaver(tier, object_client=client, scope=engine.scope)
    cp = LayerCopier(model.spec, CT, dev, 8, model.lm_head.weight.dtype)
    return engine, tier, cp


def reference(ids, model=MODEL):
    return PrefillEngine(model, chunk_tokens=CT).prefill(ids)


def check_same(result, ref, tol=TOL):
    assert rel_err(result.logits, ref.logits) <= tol
    assert kv_rel_err(result.kv, ref.kv) <= tol


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix_tokens=st.integers(1, 120),
    new_tokens=st.integers(1, 40),
    layerwise=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_any_split_equals_full_recompute(prefix_tokens, new_tokens, layerwise, seed):
    engine, tier, cp = make()
    first = prompt(prefix_tokens, seed)
    engine.prefill(first)  # saves the prefix's full chunks to DRAM
    ids = torch.cat([first, prompt(new_tokens, seed + 1)])
    result = engine.prefill(ids, DramSource(tier, cp, layerwise=layerwise))
    expected_cached = min(prefix_tokens // CT, (len(ids) - 1) // CT)
    assert result.cached_tokens == expected_cached * CT
    assert result.source == (
        "recompute" if expected_cached == 0 else DramSource(tier, cp, layerwise=layerwise).name
    )
    check_same(result, reference(ids))


def test_fully_cached_prompt_still_computes_its_last_chunk():
    engine, tier, cp = make()
    ids = prompt(4 * CT, 1)
    engine.prefill(ids)
    result = engine.prefill(ids, DramSource(tier, cp))
    assert result.cached_tokens == 3 * CT and result.new_tokens == CT and result.saved_keys == []
    check_same(result, reference(ids))


def test_cached_kv_is_really_used():
    """Overwrite the DRAM copy of the prefix: the answer must change (the engine did not recompute it)."""
    engine, tier, cp = make()
    ids = prompt(3 * CT + 5, 2)
    engine.prefill(ids)
    for pool in tier.pools:
        pool.view(torch.float32).mul_(-1.0)
    result = engine.prefill(ids, DramSource(tier, cp))
    assert result.cached_tokens == 3 * CT
    assert rel_err(result.logits, reference(ids).logits) > 1e-2


def test_save_path_writes_dram_and_object_tier_in_object_format():
    client = MemoryObjectClient()
    engine, tier, _ = make(client=client)
    ids = prompt(5 * CT + 3, 3)
    result = engine.prefill(ids)
    assert engine.saver.flush() == 5
    assert result.saved_keys == result.keys == engine.keys(ids) and len(result.keys) == 5
    for c, key in enumerate(result.keys):
        name = f"t1/{SPEC.fingerprint()}/{key}"
        header, layers = kvformat.decode_chunk(client.objects[name], key=name)
        assert header.matches(SPEC, CT)
        for layer in range(SPEC.num_layers):
            expected = result.kv[layer][:, c * CT : (c + 1) * CT].contiguous()
            got = torch.frombuffer(bytearray(layers[layer]), dtype=torch.float32).view(expected.shape)
            assert torch.equal(got, expected)
            assert bytes(tier.chunk_layers(key)[layer]) == bytes(layers[layer])
    # Saving again is idempotent: nothing new to write.
    assert engine.prefill(ids).saved_keys == [] and engine.saver.flush() == 0


def test_objectcache_source_equals_recompute_and_falls_back_on_corruption_and_misses():
    client = MemoryObjectClient()
    writer, _, _ = make(client=client)
    first = prompt(6 * CT, 4)
    writer.prefill(first)
    writer.saver.flush()
    # A second node: empty DRAM, same object tier.
    engine, tier, cp = make(client=None)
    src = ObjectCacheSource(client, engine.scope, cp)
    ids = torch.cat([first, prompt(21, 5)])
    ref = reference(ids)
    ok = engine.prefill(ids, src)
    assert ok.source == "objectcache" and ok.cached_tokens == 6 * CT and ok.fallback == ""
    check_same(ok, ref)

    name = f"t1/{SPEC.fingerprint()}/{ok.keys[3]}"
    blob = bytearray(client.objects[name])
    blob[len(blob) // 2] ^= 0x55
    client.objects[name] = bytes(blob)
    bad = engine.prefill(ids, src, save=False)
    assert bad.source == "recompute" and bad.cached_tokens == 0
    assert "ChecksumMismatch" in bad.fallback and ok.keys[3] in bad.fallback
    check_same(bad, ref)

    del client.objects[name]  # lookup says 3 chunks now; a miss after lookup also falls back
    partial = engine.prefill(ids, src, save=False)
    assert partial.cached_tokens == 3 * CT and partial.source == "objectcache"
    check_same(partial, ref)
    src.check_exists = False
    missed = engine.prefill(ids, src, save=False)
    assert missed.source == "recompute" and "ChunkMissing" in missed.fallback
    check_same(missed, ref)


# ---- GPU (device machine) ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layerwise", [True, False])
def test_gpu_bf16_dram_split_equals_recompute(layerwise):
    model = build_model("tiny", seed=11, device="cuda", dtype_override=torch.bfloat16)
    engine, tier, cp = make(model)
    first = prompt(200, 6)
    engine.prefill(first)
    ids = torch.cat([first, prompt(77, 7)])
    result = engine.prefill(ids, DramSource(tier, cp, layerwise=layerwise))
    assert result.cached_tokens == 192
    check_same(result, reference(ids, model), tol=1e-2)


@pytest.mark.gpu
def test_gpu_objectcache_source_and_fallback():
    model = build_model("tiny", seed=11, device="cuda", dtype_override=torch.bfloat16)
    client = MemoryObjectClient()
    writer, _, _ = make(model, client=client)
    first = prompt(160, 8)
    writer.prefill(first)
    writer.saver.flush()
    engine, _, cp = make(model)
    src = ObjectCacheSource(client, engine.scope, cp)
    ids = torch.cat([first, prompt(50, 9)])
    ref = reference(ids, model)
    check_same(engine.prefill(ids, src, save=False), ref, tol=1e-2)
    client.fail_after_layers = 2
    res = engine.prefill(ids, src, save=False)
    assert res.source == "recompute" and res.fallback
    check_same(res, ref, tol=1e-2)


@pytest.mark.gpu
def test_gpu_process_reader_into_registered_shared_memory(real_tier):
    """On CUDA the shared segment is registered as pinned memory and the copies are asynchronous."""
    model = build_model("tiny", seed=11, device="cuda", dtype_override=torch.bfloat16)
    srv, client = real_tier
    writer, _, _ = make(model, client=client)
    first = prompt(160, 8)
    writer.prefill(first)
    writer.saver.flush()
    engine, _, cp = make(model)
    src = ObjectCacheSource(
        client, engine.scope, cp, reader="process", streams=3, check_exists=False, min_stream_bytes=0
    )
    try:
        ids = torch.cat([first, prompt(50, 9)])
        ref = reference(ids, model)
        ok = engine.prefill(ids, src, save=False, max_cached_chunks=10)
        assert ok.source == "objectcache" and ok.cached_tokens == 160 and src.segment.registered
        check_same(ok, ref, tol=1e-2)
        srv.stop()
        down = engine.prefill(ids, src, save=False, max_cached_chunks=10)
        assert down.source == "recompute" and "StorageUnavailable" in down.fallback
        check_same(down, ref, tol=1e-2)
    finally:
        src.close()


def test_ttft_benchmark_end_to_end_with_real_server(tmp_path):
    """The H100 benchmark's own code path on the CPU: our server (paced and unpaced) and client, the object
    source with parallel gather streams, the DRAM sources; every source must use the cache, not fall back,
    and give the recompute's logits; the summary has the headline keys."""
    import json
    import math

    from testbed.validation import ttft

    raw = tmp_path / "raw.json"
    argv = [
        "measure",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--configs",
        "64+16,160+8",
        "--chunk-tokens",
        "16",
    ]
    argv += ["--repeats", "1", "--link-gbps", "2", "--streams", "3", "--raw", str(raw)]
    assert ttft.main(argv) == 0
    data = json.loads(raw.read_text())
    slice_bytes = SPEC.kv_bytes_per_chunk_layer(16)
    for row in data["configs"]:
        assert set(row["sources"]) == set(ttft.SOURCES)
        for name, entry in row["sources"].items():
            assert entry["logits_rel_err"] <= TOL, name
            assert entry["cached_tokens_used"] == (0 if name == "recompute" else row["cached_tokens"])
            if name.startswith("objectcache"):
                assert entry["bytes_loaded"] == row["cached_tokens"] // 16 * SPEC.num_layers * slice_bytes
    out = tmp_path / "summary.json"
    assert ttft.main(["summarize", "--raw", str(raw), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    # Timings on a loaded CPU say nothing about speed: only check the headline keys are real numbers.
    for key in ("ttft_ratio_64k_vs_dram", "ttft_ratio_64k_vs_dram_layerwise"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert math.isfinite(summary["added_ms_4k_vs_dram_layerwise"])
    assert summary["link_Gbps"] == 2 and summary["logits_rel_err"] <= TOL
    heads = summary["headline_sources"]
    assert heads["paced"] in ("objectcache_paced", "objectcache_paced_thread")
    assert heads["paced_reader"] == ("thread" if heads["paced"].endswith("_thread") else "process")
    # A grid's headline configs: summarize one of them; a config the file does not hold is a clear error.
    one = tmp_path / "one.json"
    assert ttft.main(["summarize", "--raw", str(raw), "--configs", "160+8", "--out", str(one)]) == 0
    one_summary = json.loads(one.read_text())
    assert one_summary["headline_4k"] == {"cached_tokens": 160, "new_tokens": 8}
    # The link floor: 160 tokens' KV at 2 Gbps plus one layer of the layerwise DRAM run.
    row = next(r for r in data["configs"] if r["cached_tokens"] == 160)
    floor_ms = 160 // 16 * SPEC.num_layers * slice_bytes / 250e6 * 1e3
    floor_ms += row["sources"]["dram_layerwise"]["ttft_ms"] / SPEC.num_layers
    assert one_summary["link_floor_ms"]["160+8"] == pytest.approx(floor_ms)
    assert one_summary["ttft_ratio_vs_link_floor"]["160+8"] == pytest.approx(
        row["sources"][one_summary["headline_sources"]["paced"]]["ttft_ms"] / floor_ms
    )
    with pytest.raises(ValueError, match="no config 4096\\+128"):
        ttft.main(["summarize", "--raw", str(raw), "--configs", "4096+128", "--out", str(one)])
    for row in data["configs"]:
        assert row["sources"]["objectcache_paced"]["reader"] == "process"
        assert row["sources"]["objectcache_max_thread"]["reader"] == "thread"
        assert row["sources"]["objectcache_paced"]["load_timings_ms"]["first_layer"] > 0


@pytest.fixture
def real_tier(tmp_path):
    """Our object server on loopback and a real client (the process reader builds its own from it)."""
    from testbed.client.core import ObjectCacheClient
    from testbed.objectstore.launch import start_server

    srv = start_server(tmp_path / "store", args=["--no-fsync"])
    try:
        client = ObjectCacheClient(
            srv.url, "kv-test", srv.access_key, srv.secret_key, mode="gather", timeout_s=10
        )
        try:
            client.ensure_bucket()
            yield srv, client
        finally:
            client.close()
    finally:
        srv.stop()


def stored_prefix(client, chunks: int, seed: int, reader: str, streams: int):
    """A prompt whose first ``chunks`` chunks a writer engine saved to the object tier, and a fresh engine
    with an object-tier source reading them (``reader``, ``streams``): ``(prompt, engine, copier, source)``."""
    writer, _, _ = make(client=client)
    first = prompt(chunks * CT, seed)
    writer.prefill(first)
    assert writer.saver.flush() == chunks
    engine, _, cp = make()
    src = ObjectCacheSource(
        client, engine.scope, cp, reader=reader, streams=streams, check_exists=False, min_stream_bytes=0
    )
    return first, engine, cp, src


def test_process_reader_equals_recompute_and_delivers_errors_as_the_same_exceptions(real_tier):
    """The reader-process path on the CPU (the shared segment is plain host memory here): same logits and KV
    as a recompute over several requests and stream counts; a missing chunk and a dead server reach the
    engine as ChunkMissing / StorageUnavailable (the fallback keeps the answer); the source stays usable."""
    srv, client = real_tier
    first, engine, cp, src = stored_prefix(client, 6, 12, "process", 2)
    try:
        ids = torch.cat([first, prompt(19, 13)])
        ref = reference(ids)
        for streams in (2, 3, 1):
            src.streams = streams
            ok = engine.prefill(ids, src, save=False, max_cached_chunks=6)
            assert ok.fallback == "" and ok.source == "objectcache" and ok.cached_tokens == 6 * CT
            check_same(ok, ref)
            assert ok.load.bytes_loaded == 6 * SPEC.num_layers * cp.slice_bytes
            t = ok.load.timings_ms
            assert len(t["first_layer"]) == len(t["response_headers"]) == streams
            assert all(0 < r <= f for r, f in zip(t["response_headers"], t["first_layer"]))
            # The rate the reader achieved feeds the fetch-vs-recompute decision of later requests.
            assert (
                ok.load.achieved_Bps > 0 and src.observed_Bps > 0 and src.expected_Bps() == src.observed_Bps
            )
        reader_pid = src._proc.proc.pid

        client.delete_chunks([f"t1/{SPEC.fingerprint()}/{ok.keys[4]}"])
        missed = engine.prefill(ids, src, save=False, max_cached_chunks=6)
        assert (
            missed.source == "recompute"
            and "ChunkMissing" in missed.fallback
            and ok.keys[4] in missed.fallback
        )
        check_same(missed, ref)
        src.check_exists = True  # lookup now finds 4 chunks: the same reader process serves them
        partial = engine.prefill(ids, src, save=False)
        assert partial.source == "objectcache" and partial.cached_tokens == 4 * CT
        check_same(partial, ref)
        assert src._proc.proc.pid == reader_pid

        src.check_exists = False
        srv.stop()
        down = engine.prefill(ids, src, save=False, max_cached_chunks=6)
        assert down.source == "recompute" and "StorageUnavailable" in down.fallback
        check_same(down, ref)
    finally:
        src.close()
    assert src._proc is None


@pytest.mark.parametrize("reader", ["thread", "process"])
def test_late_missing_chunk_of_an_early_stream_falls_back_to_recompute(real_tier, reader):
    """One gather of 20 chunks: the server checks only the first part (2 keys) before answering, so a chunk
    deleted from a later part is found after the first layer's stream has begun; the error frame reaches
    the engine as ChunkMissing and the recompute gives the right answer."""
    srv, client = real_tier
    first, engine, _, src = stored_prefix(client, 20, 31, reader, 1)
    try:
        ids = torch.cat([first, prompt(7, 32)])
        ref = reference(ids)
        ok = engine.prefill(ids, src, save=False, max_cached_chunks=20)
        assert ok.source == "objectcache" and ok.cached_tokens == 20 * CT
        check_same(ok, ref)
        client.delete_chunks([f"t1/{SPEC.fingerprint()}/{ok.keys[12]}"])
        missed = engine.prefill(ids, src, save=False, max_cached_chunks=20)
        assert missed.source == "recompute" and "ChunkMissing" in missed.fallback
        assert ok.keys[12] in missed.fallback
        check_same(missed, ref)
    finally:
        src.close()
