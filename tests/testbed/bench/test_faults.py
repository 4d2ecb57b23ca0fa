"""Faults in the object tier: servers killed mid-gather and mid-PUT, damaged objects, a full disk, a network
link taken down.  Every loop is bounded; every fault must surface as a clear ``ObjectCacheError`` within a
bounded time, the engine must recompute to the same logits, and the store must stay consistent.

Helpers live in ``testbed.bench.faults`` (forking servers for cheap kill -9 trials, object damage, tmpfs, veth
namespaces).  Counts and times are printed (``pytest -s``) and quoted in docs/reliability.md.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from scheduler.geometry import ModelSpec
from scheduler.keys import KeyScope, chunk_keys, object_key
from testbed.bench import faults
from testbed.client.core import ObjectCacheClient
from testbed.engine.dram import DramTier
from testbed.engine.kvload import LayerCopier
from testbed.engine.model import build_model
from testbed.engine.objectsource import ObjectCacheSource
from testbed.engine.prefill import PrefillEngine, rel_err
from testbed.engine.save import KVSaver
from testbed.wire import kvformat
from testbed.wire.errors import ObjectCacheError
from tests.fixtures.servers import TEST_CREDENTIALS

CT = 16
MODEL = build_model("tiny", seed=5)
SPEC = MODEL.spec
# A wider geometry for the client-level tests: 64 KiB layer slices, 8 layers (576 KiB chunks).
WIDE = ModelSpec("wide-test", 8, 8, 128, 2, 1024, 8, 2048, 1000)
MiB = 1 << 20


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def client_for(srv, bucket: str, **kw) -> ObjectCacheClient:
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("mode", "gather")
    return ObjectCacheClient(srv.url, bucket, srv.access_key, srv.secret_key, **kw)


def wide_chunks(n: int, seed: int, namespace: str = "faults") -> list[tuple[str, bytes]]:
    """``n`` random chunk objects of the WIDE geometry (names under ``namespace``)."""
    rng = random.Random(seed)
    scope = KeyScope(WIDE.fingerprint(), namespace)
    keys = chunk_keys([rng.randrange(1000) for _ in range(n * CT)], scope, CT)
    sb = WIDE.kv_bytes_per_chunk_layer(CT)
    return [
        (
            object_key(scope, k),
            kvformat.encode_chunk(WIDE, [rng.randbytes(sb) for _ in range(WIDE.num_layers)], CT),
        )
        for k in keys
    ]


def engine_with_saver(client, namespace: str):
    engine = PrefillEngine(MODEL, chunk_tokens=CT, namespace=namespace)
    tier = DramTier(SPEC, 64, chunk_tokens=CT)
    engine.saver = KVSaver(tier, object_client=client, scope=engine.scope)
    copier = LayerCopier(SPEC, CT, MODEL.device, 8, MODEL.lm_head.weight.dtype)
    return engine, copier


def seed_prefix(client, namespace: str, ids: torch.Tensor) -> list[str]:
    """Prefill ``ids`` once on a 'writer node' and upload its full chunks; returns their object names."""
    writer, _ = engine_with_saver(client, namespace)
    res = writer.prefill(ids)
    writer.saver.flush(timeout_s=30)
    writer.saver.close()
    return [object_key(writer.scope, k) for k in res.keys]


REFERENCE: dict[int, torch.Tensor] = {}


def prefill_recomputes(client, namespace: str, ids: torch.Tensor) -> float:
    """Prefill ``ids`` over the object tier behind ``client`` (which is failing): the engine must fall back to
    recompute with the reference logits.  Returns the prefill's wall time (s)."""
    t0 = time.monotonic()
    engine, copier = engine_with_saver(None, namespace)
    engine.saver = None
    res = engine.prefill(ids, ObjectCacheSource(client, engine.scope, copier), save=False)
    engine_s = time.monotonic() - t0
    assert res.source == "recompute" and res.cached_tokens == 0
    assert rel_err(res.logits, reference_logits(ids)) <= 1e-5
    return engine_s


def reference_logits(ids: torch.Tensor) -> torch.Tensor:
    key = hash(tuple(ids.tolist()))
    if key not in REFERENCE:
        REFERENCE[key] = PrefillEngine(MODEL, chunk_tokens=CT).prefill(ids).logits
    return REFERENCE[key]


# --- server killed mid-gather ---------------------------------------------------------------------------


def test_server_killed_mid_gather_client_fails_fast(start_objectcache_server):
    # Paced to 40 Mbit/s so the 4.5 MiB stream is still in flight (~1 s) when the server dies.
    srv = start_objectcache_server(["--egress-gbps", "0.04", "--piece-kib", "64"])
    items = wide_chunks(8, seed=1)
    with client_for(srv, "killed") as client:
        client.ensure_bucket()
        assert client.put_chunks(items) == 8
        names = [n for n, _ in items]
        stream = client.load_layers(names)
        layer, view = next(stream)
        assert layer == 0 and bytes(view[: 64 * 1024]) == items[0][1][4096 : 4096 + 64 * 1024]
        faults.kill_hard(srv)
        t0 = time.monotonic()
        with pytest.raises(ObjectCacheError) as err:
            for _ in stream:
                pass
        elapsed_s = time.monotonic() - t0
    print(
        f"\n[faults] gather after kill -9: {type(err.value).__name__} after {elapsed_s * 1e3:.1f} ms: {err.value}"
    )
    assert elapsed_s < 2.0
    assert "gather" in str(err.value) or "stream" in str(err.value)


class KillAfterFirstLayer:
    """An object-tier client whose server is killed (SIGKILL) right after the first layer arrives."""

    def __init__(self, client: ObjectCacheClient, srv) -> None:
        self.client, self.srv = client, srv
        self.killed_s: float | None = None
        self.error_s: float | None = None

    def exists(self, names):
        return self.client.exists(names)

    def load_layers(self, names, **kwargs):
        try:
            for i, item in enumerate(self.client.load_layers(names, **kwargs)):
                yield item
                if i == 0:
                    faults.kill_hard(self.srv)
                    self.killed_s = time.monotonic()
        except ObjectCacheError:
            self.error_s = time.monotonic()
            raise


def test_server_killed_mid_gather_engine_recomputes_same_logits(start_objectcache_server):
    srv = start_objectcache_server(["--egress-gbps", "0.001", "--piece-kib", "4"])  # ~0.2 s per layer
    ids = torch.cat([prompt(6 * CT, 21), prompt(9, 22)])
    with client_for(srv, "engine-kill") as client:
        client.ensure_bucket()
        names = seed_prefix(client, "tenant-k", ids[: 6 * CT])
        assert client.exists(names) == [True] * 6
        engine, copier = engine_with_saver(None, "tenant-k")
        engine.saver = None
        killer = KillAfterFirstLayer(client, srv)
        res = engine.prefill(ids, ObjectCacheSource(killer, engine.scope, copier), save=False)
    assert killer.killed_s is not None and killer.error_s is not None
    print(
        f"\n[faults] engine: error {1e3 * (killer.error_s - killer.killed_s):.1f} ms after kill; {res.fallback}"
    )
    assert killer.error_s - killer.killed_s < 2.0
    assert res.source == "recompute" and res.cached_tokens == 0 and res.fallback
    assert rel_err(res.logits, reference_logits(ids)) <= 1e-5


# --- damaged objects --------------------------------------------------------------------------------------


def _damage(kind: str, path):
    size = faults.object_size(path)
    if kind == "bitflip":
        faults.flip_bits(path, n=1, seed=3)
    elif kind == "truncate_committed":
        faults.truncate_object(path, size - 1000, keep_trailer=True)
    elif kind == "truncate_file":
        faults.truncate_object(path, size // 2, keep_trailer=False)
    elif kind == "clobber_header":
        faults.clobber_header(path)
    elif kind == "stale_slice_checksum":
        faults.corrupt_slice_checksum(path, layer=2)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["bitflip", "truncate_committed", "truncate_file", "clobber_header", "stale_slice_checksum"]
)
def test_damaged_object_is_detected_quarantined_and_recomputed(kind, objectcache_server, objectcache_bucket):
    srv, bucket = objectcache_server, objectcache_bucket
    ns = f"dmg-{kind.replace('_', '-')}"
    ids = torch.cat([prompt(5 * CT, 31), prompt(7, 32)])
    ref = reference_logits(ids)
    with client_for(srv, bucket) as client:
        names = seed_prefix(client, ns, ids[: 5 * CT])
        _damage(kind, faults.object_path(srv.data_dir, bucket, names[2]))
        engine, copier = engine_with_saver(None, ns)
        engine.saver = None
        source = ObjectCacheSource(client, engine.scope, copier)
        first = engine.prefill(ids, source, save=False)
        # The damaged chunk is never used.  A broken store file (trailer gone) already fails the existence
        # check, so the lookup stops before it; damage found while loading makes the engine recompute
        # everything, and the fallback reason names the chunk.
        if kind == "truncate_file":
            assert first.source == "objectcache" and first.cached_tokens == 2 * CT and not first.fallback
        else:
            assert first.source == "recompute" and first.cached_tokens == 0, first.fallback
            assert names[2].rsplit("/", 1)[1] in first.fallback, first.fallback
        assert rel_err(first.logits, ref) <= 1e-5
        # Quarantined: later lookups miss from the damaged chunk on; the prefix before it still serves.
        assert client.exists(names) == [True, True, False, True, True]
        qdir = faults.quarantine_dir(srv.data_dir, bucket)
        assert any(p.name.endswith(".reason") for p in qdir.iterdir())
        second = engine.prefill(ids, source, save=False)
        assert second.source == "objectcache" and second.cached_tokens == 2 * CT and not second.fallback
        assert rel_err(second.logits, ref) <= 1e-5
    print(f"\n[faults] {kind}: {first.fallback[:160]}")


def test_false_corruption_report_keeps_a_good_object(objectcache_server, objectcache_bucket):
    """A flip in flight (or a wrong report) must not take a good object away: the server re-verifies."""
    srv, bucket = objectcache_server, objectcache_bucket
    (name, blob), *_ = wide_chunks(1, seed=9, namespace="report")
    with client_for(srv, bucket) as client:
        assert client.put_chunk(name, blob)
        assert client.report_corrupt(name) is False
        assert client.exists([name]) == [True]
        faults.flip_bits(faults.object_path(srv.data_dir, bucket, name), n=1, seed=1)
        assert client.report_corrupt(name) is True
        assert client.exists([name]) == [False]


# --- crash during PUT -------------------------------------------------------------------------------------


def test_kill9_during_put_never_leaves_torn_objects(tmp_path):
    """50 trials: a chunk PUT trickles in while the server is SIGKILLed at a random moment; after each
    restart on the same directory every visible object is complete and checksum-valid, every
    acknowledged write is there, and no temporary files remain."""
    trials, rng = 50, random.Random(7)
    data_dir = tmp_path / "crash"
    items = wide_chunks(trials, seed=2, namespace="crash")
    expected = dict(items)
    acked: set[str] = set()
    outcomes = {"acked": 0, "cut": 0}
    t_start = time.monotonic()
    with faults.ServerZygote() as zygote:
        srv = zygote.start(data_dir, credentials=TEST_CREDENTIALS)
        srv.boto3_client().create_bucket(Bucket="crash")
        for trial, (name, blob) in enumerate(items):
            status: list[int | None] = []
            t = threading.Thread(
                target=lambda srv=srv, n=name, b=blob, out=status: out.append(
                    faults.slow_put(srv, f"/crash/{n}", b, piece_bytes=32 * 1024, pause_s=0.002)
                )
            )
            t.start()
            time.sleep(rng.uniform(0.0, 0.08))
            faults.kill_hard(srv)
            t.join(10)
            assert not t.is_alive()
            if status and status[0] == 200:
                acked.add(name)
                outcomes["acked"] += 1
            else:
                outcomes["cut"] += 1
            srv = zygote.start(data_dir, credentials=TEST_CREDENTIALS)
            assert faults.store_leftovers(data_dir, "crash") == [], f"trial {trial}: temp files survived"
            s3 = srv.boto3_client()
            listed = {o["Key"] for o in s3.list_objects_v2(Bucket="crash").get("Contents", [])}
            assert acked <= listed, f"trial {trial}: acknowledged writes lost: {acked - listed}"
            if name in listed:  # the new object, if visible, is whole and intact
                body = s3.get_object(Bucket="crash", Key=name)["Body"].read()
                assert body == expected[name]
                kvformat.decode_chunk(body, key=name)
        s3 = srv.boto3_client()
        for key in {o["Key"] for o in s3.list_objects_v2(Bucket="crash").get("Contents", [])}:
            assert s3.get_object(Bucket="crash", Key=key)["Body"].read() == expected[key]
        srv.stop()
    print(f"\n[faults] kill -9 during PUT: {trials} trials, {outcomes}, {time.monotonic() - t_start:.1f} s")
    assert outcomes["cut"] > 0  # the kills really landed mid-upload


# --- disk full --------------------------------------------------------------------------------------------


def test_disk_full_clear_error_no_partial_objects_reads_continue(tmp_path):
    try:
        ctx = faults.tmpfs(8 * MiB)
        mnt = ctx.__enter__()
    except faults.FaultUnavailable as e:
        pytest.skip(str(e))
    try:
        with faults.ServerZygote() as zygote:
            # The log lives off the full disk: the server must say what happened, and be able to.
            log_path = tmp_path / "server.log"
            srv = zygote.start(
                mnt / "data", credentials=TEST_CREDENTIALS, args=["--no-fsync"], log_path=log_path
            )
            try:
                items = wide_chunks(16, seed=4, namespace="full")  # 16 x 576 KiB > 8 MiB
                with client_for(srv, "full") as client:
                    client.ensure_bucket()
                    written, error = [], None
                    for name, blob in items:
                        try:
                            assert client.put_chunk(name, blob)
                            written.append(name)
                        except ObjectCacheError as e:
                            error = e
                            break
                    assert error is not None and written, "the tmpfs never filled up"
                    print(f"\n[faults] disk full after {len(written)} objects: {error}")
                    assert "InsufficientStorage" in str(error) and "no space" in str(error)
                    assert faults.store_leftovers(srv.data_dir, "full") == []
                    assert client.exists([n for n, _ in items]) == [n in written for n, _ in items]
                    # Reads keep working: whole objects and gather.
                    got = b"".join(bytes(v) for _, v in client.load_layers(written))
                    assert len(got) == len(written) * WIDE.num_layers * WIDE.kv_bytes_per_chunk_layer(CT)
                    s3 = srv.boto3_client()
                    assert (
                        s3.get_object(Bucket="full", Key=written[0])["Body"].read() == dict(items)[written[0]]
                    )
                    # Space freed: writes work again.
                    client.delete_chunks(written[:4])
                    assert client.put_chunk(*items[len(written)])
                    assert "Traceback" not in srv.log_tail(100000)
            finally:
                srv.stop()
    finally:
        ctx.__exit__(None, None, None)


# --- network link down ------------------------------------------------------------------------------------


@pytest.mark.netns
def test_link_down_in_namespace_errors_are_bounded_and_engine_recomputes(tmp_path):
    try:
        topo = faults.VethNamespace()
    except faults.FaultUnavailable as e:
        pytest.skip(str(e))
    with topo:
        srv = topo.start_server(
            tmp_path / "ns-data",
            credentials=TEST_CREDENTIALS,
            args=["--egress-gbps", "0.001", "--piece-kib", "4"],
        )
        try:
            ids = torch.cat([prompt(4 * CT, 41), prompt(5, 42)])
            with client_for(srv, "netns", timeout_s=1.0, retries=0) as client:
                client.ensure_bucket()
                names = seed_prefix(client, "tenant-n", ids[: 4 * CT])
                stream = client.load_layers(names)
                next(stream)
                topo.link_down()
                t0 = time.monotonic()
                with pytest.raises(ObjectCacheError):
                    for _ in stream:
                        pass
                stream_s = time.monotonic() - t0
                engine_s = prefill_recomputes(client, "tenant-n", ids)
                topo.link_up()
                assert client.exists(names) == [True] * len(names)  # and it recovers
            print(
                f"\n[faults] link down: stream error after {stream_s:.2f} s, engine recompute in {engine_s:.2f} s"
            )
            assert stream_s < 3.0 and engine_s < 5.0
        finally:
            srv.proc.kill()
            srv.stop()


# --- backing S3 service stopped (proxy mode) --------------------------------------------------------------


@pytest.mark.rgw
def test_rgw_stopped_mid_run_in_proxy_mode_errors_are_bounded(tmp_path, start_objectcache_server):
    """The server in front of its own Ceph RGW (not the shared session one: this test kills it).  RGW's
    gateway is SIGKILLed between and during gathers: every request fails within a bounded time with an
    ``ObjectCacheError``, the engine recomputes, the server stays up and answers its health check."""
    import os
    import signal
    import urllib.request

    from testbed.harness.rgw import RGWUnavailable, start_rgw

    if os.environ.get("OBJECTCACHE_NO_RGW") == "1":
        pytest.skip("Ceph RGW disabled by OBJECTCACHE_NO_RGW=1")
    try:
        rgw = start_rgw(tmp_path / "rgw", store_bytes=1 << 30, timeout_s=90)
    except RGWUnavailable as e:
        pytest.skip(f"Ceph RGW cannot start: {e}")
    try:
        srv = start_objectcache_server(
            [
                "--store", "s3proxy",
                "--store-option", f"endpoint_url={rgw.endpoint_url}",
                "--store-option", f"access_key={rgw.access_key}",
                "--store-option", f"secret_key={rgw.secret_key}",
                "--store-option", "timeout_s=2",
                "--egress-gbps", "0.02",
                "--piece-kib", "16",
            ]
        )  # fmt: skip
        ids = torch.cat([prompt(4 * CT, 51), prompt(5, 52)])
        items = wide_chunks(6, seed=53, namespace="proxy")
        names = [n for n, _ in items]
        with client_for(srv, "proxied", timeout_s=5.0, retries=1) as client:
            client.ensure_bucket()
            assert client.put_chunks(items) == 6
            prefix = seed_prefix(client, "tenant-p", ids[: 4 * CT])
            stream = client.load_layers(names)
            layer, view = next(stream)
            assert layer == 0 and bytes(view[:16]) == items[0][1][4096 : 4096 + 16]
            os.kill(rgw.pids()["client.rgw.a"], signal.SIGKILL)  # the gateway dies mid-gather
            t0 = time.monotonic()
            try:
                n_more = sum(1 for _ in stream)  # prefetched layers may still arrive; no hang either way
                mid_outcome = f"completed ({n_more} more layers were already prefetched)"
            except ObjectCacheError as e:
                mid_outcome = f"{type(e).__name__}: {str(e)[:120]}"
            mid_s = time.monotonic() - t0
            t0 = time.monotonic()
            with pytest.raises(ObjectCacheError) as err:
                list(client.load_layers(names))
            next_s = time.monotonic() - t0
            engine_s = prefill_recomputes(client, "tenant-p", ids)
        with urllib.request.urlopen(f"{srv.url}/_objectcache/health", timeout=5) as r:
            assert r.status == 200
        print(
            f"\n[faults] RGW killed: in-flight gather {mid_outcome} in {mid_s:.2f} s; next gather "
            f"{type(err.value).__name__} in {next_s:.2f} s; engine recompute in {engine_s:.2f} s; {len(prefix)} chunks"
        )
        assert mid_s < 15.0 and next_s < 15.0 and engine_s < 30.0
    finally:
        rgw.stop(wipe=True)
