"""The egress pacer: policy plumbing, token bucket, GPU estimate, and pacing of real gather streams."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.layerwise import layer_times
from scheduler.policies import get_policy, register_policy
from testbed.objectstore.paced_stream import EGRESS, PacedStream
from testbed.objectstore.pacer import Pacer
from testbed.wire.frames import LAYER_MAGIC, iter_frames
from tests.fixtures.servers import signed_request, wait_for_metrics
from tests.testbed.objectstore.test_gather import TINY, make_chunks, put_all, server_with_chunks


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_unlimited_egress_never_waits():
    p = Pacer("equal", None, clock=FakeClock())
    s = p.open_stream(1000, 4)
    assert not p.limited and math.isinf(s.rate_Bps)
    assert p.delay_for(s, 10**9) == 0.0


def test_equal_shares_follow_streams_coming_and_going():
    clock = FakeClock()
    p = Pacer("equal", 1e6, clock=clock)
    a = p.open_stream(1000, 4, stream_id="a")
    assert a.rate_Bps == pytest.approx(1e6)
    b = p.open_stream(1000, 4, stream_id="a")  # duplicate client ids stay distinct
    assert a.stream_id != b.stream_id
    assert (a.rate_Bps, b.rate_Bps) == (pytest.approx(5e5), pytest.approx(5e5))
    p.close_stream(a)
    assert b.rate_Bps == pytest.approx(1e6) and list(p.streams) == [b.stream_id]


def test_token_bucket_delays_match_the_rate():
    clock = FakeClock()
    p = Pacer("equal", 1e6, clock=clock, burst_s=0.0)
    s = p.open_stream(10**6, 4)
    # All asked at the same instant: a piece leaves once the link would have carried it (deadline based).
    delays = [p.delay_for(s, 100_000) for _ in range(5)]
    assert delays == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    clock.t += 10.0  # idle time does not bank unlimited credit
    assert p.delay_for(s, 100_000) == pytest.approx(0.1)
    assert p.delay_for(s, 100_000) == pytest.approx(0.2)
    assert s.delivered_bytes == 700_000


def test_late_sender_gets_bounded_credit_and_pieces_scale_with_rate():
    clock = FakeClock()
    p = Pacer("equal", 1e6, clock=clock, burst_s=0.005, quantum_s=0.0015)
    s = p.open_stream(10**6, 4)
    assert p.delay_for(s, 10_000) == pytest.approx(0.01)
    clock.t += 0.013  # woke 3 ms late: the next deadline counts from the missed one, not from now
    assert p.delay_for(s, 10_000) == pytest.approx(0.007)
    clock.t += 1.0  # very late: at most burst_s of credit
    assert p.delay_for(s, 10_000) == pytest.approx(0.005)
    assert p.piece_bytes(s, 4096) == 4096  # 1.5 ms at 1 MB/s is below the floor
    p.egress_Bps = 2e9
    p.reallocate()
    assert p.piece_bytes(s, 4096) == 3_000_000  # 1.5 ms at 2 GB/s


def test_gpu_estimate_and_flow_views():
    clock = FakeClock()
    p = Pacer("equal", 1e6, clock=clock)
    s = p.open_stream(1000, 4, compute_per_layer_s=1.0)
    clock.t += 0.1
    p.layer_sent(s)
    clock.t += 0.1
    p.layer_sent(s)
    assert s.gpu_state(0.5) == (1, pytest.approx(1.1))  # layer 1 waits for layer 0's compute
    assert s.gpu_state(1.5) == (2, pytest.approx(2.1))
    v = s.view(0.5)
    assert v.layers_computed == 1 and v.gpu_busy_until_s == pytest.approx(1.1)
    assert v.first_layer_s == pytest.approx(0.1) and v.compute_per_layer_s == 1.0 and v.path == (EGRESS,)


@given(
    steps=st.lists(st.tuples(st.booleans(), st.floats(-0.01, 0.05), st.floats(0.0, 0.01)), max_size=60),
    compute_per_layer_s=st.sampled_from([0.0, 0.001, 0.004, 0.02]),
)
def test_gpu_state_resumed_equals_a_full_replay(steps, compute_per_layer_s):
    """The pacer's resumable GPU estimate answers exactly what replaying the recurrence from the start does,
    for any interleaving of sends and questions (also about earlier times)."""
    s = PacedStream("s", 1, 64, compute_per_layer_s, arrival_s=0.0)
    now_s = 0.0
    for send, dt_s, send_delay_s in steps:
        if send and s.layers_sent < s.layers_total:
            s.layer_sent_s.append(max(s.layer_sent_s[-1] if s.layer_sent_s else 0.0, now_s) + send_delay_s)
        now_s = max(0.0, now_s + dt_s)
        started, busy_s = 0, s.arrival_s
        for _, end_s in layer_times(s.layer_sent_s, compute_per_layer_s, s.arrival_s, now_s):
            started, busy_s = started + 1, end_s
        assert s.gpu_state(now_s) == (started, busy_s)


@pytest.mark.parametrize("policy", ["equal", "bandwidth_aware", "srtf"])
def test_rates_are_the_policy_decision(policy):
    clock = FakeClock()
    p = Pacer(policy, 1e7, clock=clock)
    fast = p.open_stream(10**6, 8, compute_per_layer_s=0.001, stream_id="fast")
    slow = p.open_stream(2 * 10**6, 8, compute_per_layer_s=1.0, stream_id="slow")
    clock.t += 0.05
    p.layer_sent(slow)
    now = p.now_s()
    views = [s.view(now) for s in sorted(p.streams.values(), key=lambda s: s.stream_id)]
    from scheduler.flows import Link

    expected = get_policy(policy).allocate(now, views, {EGRESS: Link(EGRESS, 1e7)})
    assert {fast.stream_id: fast.rate_Bps, slow.stream_id: slow.rate_Bps} == pytest.approx(expected)
    assert fast.rate_Bps + slow.rate_Bps <= 1e7 * (1 + 1e-9)


@register_policy
class _FirstTakesAll:
    """Test policy: the first stream (by id) gets the whole link, the others nothing."""

    name = "test-first-takes-all"

    def allocate(self, now_s, flows, links):
        cap = links[EGRESS].capacity_Bps
        return {
            f.flow_id: (cap if i == 0 else 0.0) for i, f in enumerate(sorted(flows, key=lambda f: f.flow_id))
        }


def test_starved_stream_waits_for_reallocation():
    async def run():
        p = Pacer("test-first-takes-all", 1e9, starve_poll_s=5.0)
        a = p.open_stream(1000, 1, stream_id="a")
        b = p.open_stream(1000, 1, stream_id="b")
        assert b.rate_Bps == 0.0
        waiter = asyncio.create_task(p.pace(b, 1000))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        p.close_stream(a)
        await asyncio.wait_for(waiter, 1.0)
        assert b.rate_Bps == 1e9 and b.delivered_bytes == 1000

    asyncio.run(run())


def _gather(server, bucket, keys, out, i):
    body = json.dumps(
        {"version": 1, "keys": keys, "compute_per_layer_s": 0.01, "stream_id": f"t{i}"}
    ).encode()
    t0 = time.monotonic()
    resp = signed_request(server, "POST", f"/{bucket}?gather", body=body)
    frames = list(iter_frames(resp.read))
    out[i] = (resp.status, len(frames), time.monotonic() - t0)


def test_server_paces_concurrent_streams(start_objectcache_server):
    egress_Bps = 4e6
    srv = start_objectcache_server(["--egress-gbps", str(egress_Bps * 8 / 1e9), "--piece-kib", "64"])
    s3 = srv.boto3_client()
    s3.create_bucket(Bucket="paced")
    chunks = make_chunks(2, seed=11)
    put_all(s3, "paced", chunks)
    keys = [c[0] for c in chunks]
    stream_bytes = 2 * TINY.kv_bytes_per_chunk_layer() * TINY.num_layers  # 512 KiB

    out: dict[int, tuple] = {}
    _gather(srv, "paced", keys, out, 0)
    status, layers, alone_s = out[0]
    assert (status, layers) == (200, 4)
    assert alone_s >= 0.8 * stream_bytes / egress_Bps  # ~0.13 s at 4 MB/s; unpaced it takes ~1 ms

    threads = [threading.Thread(target=_gather, args=(srv, "paced", keys, out, i)) for i in (1, 2)]
    snapshots = []  # the rates of the streams active at one moment
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        text = srv.metrics_text()
        rates = re.findall(r"objectcache_stream_rate_bytes_per_second\{[^}]*\} (\S+)", text)
        snapshots.append([float(v) for v in rates])
        time.sleep(0.02)
    for t in threads:
        t.join()
    both_done_s = time.monotonic() - t0
    assert all(out[i][:2] == (200, 4) for i in (1, 2))
    # Two streams through one paced link take at least twice as long as one, overlapping or not.
    assert both_done_s >= 0.8 * 2 * stream_bytes / egress_Bps
    assert any(snapshots)
    for rates in filter(None, snapshots):
        assert sum(rates) <= egress_Bps * (1 + 1e-9)
        if all(rates):  # streams with bytes left share the egress equally (a finished one gets 0)
            assert rates == pytest.approx([egress_Bps / len(rates)] * len(rates))
    needles = ["objectcache_gather_layers_total 12", "objectcache_active_streams 0"]
    text = wait_for_metrics(srv, needles)
    assert all(n in text for n in needles)


def test_client_disconnect_mid_stream_is_cleaned_up(start_objectcache_server):
    # 2 MB/s: a stream takes ~0.25 s.
    srv = start_objectcache_server(["--egress-gbps", "0.016", "--piece-kib", "32"])
    s3 = srv.boto3_client()
    s3.create_bucket(Bucket="drop")
    chunks = make_chunks(2, seed=12)
    put_all(s3, "drop", chunks)
    body = json.dumps({"version": 1, "keys": [c[0] for c in chunks]}).encode()
    resp = signed_request(srv, "POST", "/drop?gather", body=body)
    assert resp.status == 200 and resp.read(1000)[:4] == LAYER_MAGIC
    resp.close()  # the client goes away mid-stream
    text = wait_for_metrics(srv, ["objectcache_active_streams 0", 'code="ClientDisconnected"'])
    assert (
        "objectcache_active_streams 0" in text
        and 'objectcache_errors_total{code="ClientDisconnected"} 1' in text
    )
    resp = signed_request(srv, "POST", "/drop?gather", body=body)  # the server carries on
    assert resp.status == 200 and len(list(iter_frames(resp.read))) == 4
    assert "Traceback" not in srv.log_tail(100000)


@pytest.mark.parametrize("policy", ["bandwidth_aware", "srtf"])
def test_server_with_scheduler_policies(start_objectcache_server, policy):
    egress_Bps = 8e6
    srv = start_objectcache_server(["--egress-gbps", str(egress_Bps * 8 / 1e9), "--policy", policy])
    s3 = srv.boto3_client()
    s3.create_bucket(Bucket="pol")
    chunks = make_chunks(3, seed=13)
    put_all(s3, "pol", chunks)
    out: dict[int, tuple] = {}
    threads = [
        threading.Thread(target=_gather, args=(srv, "pol", [c[0] for c in chunks[:n]], out, n))
        for n in (1, 3)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out[1][:2] == (200, 4) and out[3][:2] == (200, 4)
    total_bytes = 4 * TINY.kv_bytes_per_chunk_layer() * TINY.num_layers
    assert time.monotonic() - t0 >= 0.8 * total_bytes / egress_Bps
    with urllib.request.urlopen(f"{srv.url}/_objectcache/health", timeout=5) as r:
        assert json.loads(r.read())["policy"] == policy


def _paced_load(srv, bucket, names, out, i, pace_group=None):
    from testbed.client.core import ObjectCacheClient

    with ObjectCacheClient(srv.url, bucket, srv.access_key, srv.secret_key, mode="gather") as c:
        t0 = time.monotonic()
        arrivals = [(time.monotonic(), len(v)) for _, v in c.load_layers(names, pace_group=pace_group)]
        out[i] = (sum(n for _, n in arrivals), arrivals[-1][0] - t0, arrivals)


def stored_copies(srv, bucket: str, names: list[str], n: int) -> list[str]:
    """``n`` distinct object names holding copies of the objects ``names`` (in turn): a long gather without
    repeating a key (the server refuses a gather that names a key twice)."""
    from concurrent.futures import ThreadPoolExecutor

    s3 = srv.boto3_client()
    blobs = [s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in names]
    copies = [f"{names[i % len(names)]}-copy{i}" for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: s3.put_object(Bucket=bucket, Key=copies[i], Body=blobs[i % len(blobs)]), range(n)
            )
        )
    return copies


@pytest.fixture(scope="module")
def paced_200MBps(tmp_path_factory):
    """A server paced to 200 MB/s (well below what loopback does here) holding 192 tiny chunks (8 distinct
    ones and copies of them)."""
    with server_with_chunks(tmp_path_factory.mktemp("paced"), ["--egress-gbps", "1.6"], "rate", 8, 21) as sc:
        srv, keys = sc
        yield srv, stored_copies(srv, "rate", keys, 192)


def test_paced_stream_delivers_its_configured_rate(paced_200MBps):
    srv, keys = paced_200MBps
    names = keys  # 192 slices of 64 KiB a layer: 48 MiB, ~0.25 s at 200 MB/s
    out: dict[int, tuple] = {}
    _paced_load(srv, "rate", names[:8], out, 0)  # warm-up: connection, page cache
    _paced_load(srv, "rate", names, out, 0)
    nbytes, _, arrivals = out[0]
    assert nbytes == len(names) * TINY.kv_bytes_per_chunk_layer() * TINY.num_layers
    # The paced rate from the first layer's arrival to the last (the request's setup, opening 192 objects,
    # is not pacing) is within 10% of the configured one: not faster (the pacer holds), not much slower.
    paced_bytes = sum(n for _, n in arrivals[1:])
    rate_Bps = paced_bytes / (arrivals[-1][0] - arrivals[0][0])
    assert 0.90 <= rate_Bps / 200e6 <= 1.05


def test_two_paced_streams_split_the_link_equally(paced_200MBps):
    srv, keys = paced_200MBps
    names = keys[:96]  # 24 MiB each; together ~0.25 s at 200 MB/s
    out: dict[int, tuple] = {}
    threads = [threading.Thread(target=_paced_load, args=(srv, "rate", names, out, i)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Equal shares: while both send, each gets 100 MB/s (first layer's arrival to the last, as above).
    for i in (0, 1):
        arrivals = out[i][2]
        rate_Bps = sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0])
        assert rate_Bps == pytest.approx(100e6, rel=0.10)


def test_a_pace_group_gets_one_requests_share(paced_200MBps):
    """Three streams of one request (one pace group) against one stream of another request: under ``equal``
    the two *requests* split the link (100 MB/s each; per-stream shares would give the group 150 and the
    lone request 50), and the link stays busy."""
    srv, keys = paced_200MBps
    group_names = [keys[0:32], keys[32:64], keys[64:96]]  # 8 MiB each: the group moves 24 MiB
    lone_names = keys[96:192]  # 24 MiB
    out: dict[int, tuple] = {}
    threads = [
        threading.Thread(target=_paced_load, args=(srv, "rate", names, out, i, "request-a"))
        for i, names in enumerate(group_names)
    ]
    threads.append(threading.Thread(target=_paced_load, args=(srv, "rate", lone_names, out, 3)))
    for t in threads:
        t.start()
    rates: dict[str, float] = {}
    deadline = time.monotonic() + 5.0
    while len(rates) < 2 and time.monotonic() < deadline:  # until both requests are on the link
        text = srv.metrics_text()
        rates = {
            m[1]: float(m[2])
            for m in re.finditer(
                r'objectcache_stream_rate_bytes_per_second\{[^}]*stream="([^"]+)"[^}]*\} (\S+)', text
            )
        }
        rates = {sid: r for sid, r in rates.items() if r > 0}
    for t in threads:
        t.join(30)
    assert len(rates) == 2, rates  # one flow for the group, one for the lone stream
    assert any(sid.startswith("request-a#") for sid in rates)
    assert list(rates.values()) == [pytest.approx(100e6, rel=0.01)] * 2
    link_s = 48 * 2**20 / 200e6  # both requests' bytes at the link rate
    start = min(out[i][2][0][0] for i in range(4))
    assert max(out[i][2][-1][0] for i in range(4)) - start < 1.3 * link_s


def test_pace_group_members_share_one_flow_and_deadline():
    clock = FakeClock()
    p = Pacer("equal", 1e6, clock=clock, burst_s=0.0)
    a = p.open_stream(1000, 4, group="g", tenant="t1")
    b = p.open_stream(3000, 4, group="g", tenant="t1")
    other = p.open_stream(1000, 4, group="g", tenant="t2")  # another tenant's "g" is another flow
    lone = p.open_stream(1000, 4)
    assert a.flow is b.flow is not other.flow
    assert a.stream_id != b.stream_id and len(p.streams) == 3
    assert a.flow.layer_bytes == 4000 and a.flow.rate_Bps == pytest.approx(1e6 / 3)
    assert lone.rate_Bps == pytest.approx(1e6 / 3)
    # Members take slots one after another on the group's deadline: b's piece waits behind a's.
    rate = a.flow.rate_Bps
    assert p.delay_for(a, 10_000) == pytest.approx(10_000 / rate)
    assert p.delay_for(b, 10_000) == pytest.approx(20_000 / rate)
    assert a.flow.slot_end_s(a.slot_end_bytes) < a.flow.slot_end_s(b.slot_end_bytes)
    # A member that sends nothing leaves the whole group rate to the other one.
    for _ in range(3):
        p.delay_for(a, 10_000)
    assert p.delay_for(a, 10_000) == pytest.approx(60_000 / rate)
    assert a.flow.delivered_bytes == 60_000 and a.accounted_bytes == 50_000
    with pytest.raises(ValueError, match="layers"):
        p.open_stream(1000, 8, group="g", tenant="t1")


def test_pace_group_layers_and_leaving_members():
    clock = FakeClock()
    p = Pacer("equal", 1e6, clock=clock, burst_s=0.0)
    a = p.open_stream(1000, 2, compute_per_layer_s=0.01, group="g")
    b = p.open_stream(1000, 2, compute_per_layer_s=0.01, group="g")
    flow = a.flow
    p.layer_sent(a)
    p.layer_sent(a)  # a is done; the group's layer 0 waits for b
    assert flow.layers_sent == 0
    clock.t += 0.5
    p.layer_sent(b)
    assert flow.layer_sent_s == [pytest.approx(0.5)]
    p.delay_for(b, 700)
    p.close_stream(b)  # b leaves early: its bytes are no longer the group's
    assert flow.layer_bytes == 1000 and flow.delivered_bytes == 0
    assert flow.layers_sent == 2  # only a is left, and it has sent both layers
    assert list(p.streams) == [flow.stream_id]
    p.close_stream(a)
    assert not p.streams and not p._groups
    again = p.open_stream(1000, 2, group="g")  # the name is free again: a new flow
    assert again.flow is not flow


def test_pace_group_member_waits_while_ahead_of_the_slowest():
    """A member a layer or more ahead of its group's slowest member waits (the client needs every member's
    layer before it can compute it); the slowest one never does.  Progress is the member's own accounted
    payload bytes, in layers of its size."""
    clock = FakeClock()
    p = Pacer("equal", 1e9, clock=clock)
    fast = p.open_stream(1000, 8, group="g")
    slow = p.open_stream(3000, 8, group="g")
    p.delay_for(fast, 500)
    p.delay_for(slow, 1500)  # both half a layer in: nobody waits
    assert not p._ahead_of_group(fast) and not p._ahead_of_group(slow)
    p.delay_for(fast, 1000)  # fast is 1.5 layers in, slow 0.5
    waits: list[float] = []

    def wait(s: float) -> bool:
        waits.append(s)
        clock.t += s
        if len(waits) == 3:
            p.delay_for(slow, 600)  # slow reaches 0.7 layers: fast (1.5) is less than a layer ahead
        return False

    p.pace_blocking(fast, 100, wait)
    assert len(waits) == 3
    waits.clear()
    p.pace_blocking(slow, 100, wait)
    assert waits == []


def test_paced_buffered_path_delivers_the_bytes_at_its_rate(start_objectcache_server):
    """``--no-sendfile``: layers are read into buffers and the send thread paces them piece by piece."""
    srv = start_objectcache_server(["--no-sendfile", "--egress-gbps", "1.6"])
    s3 = srv.boto3_client()
    s3.create_bucket(Bucket="buffered")
    chunks = make_chunks(4, seed=22)
    put_all(s3, "buffered", chunks)
    names = stored_copies(srv, "buffered", [c[0] for c in chunks], 96)  # 96 slices of 64 KiB a layer: 24 MiB
    # in all, ~0.13 s at 200 MB/s
    out: dict[int, tuple] = {}
    _paced_load(srv, "buffered", names, out, 0)
    nbytes, _, arrivals = out[0]
    assert nbytes == len(names) * TINY.kv_bytes_per_chunk_layer() * TINY.num_layers
    rate_Bps = sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0])
    assert 0.85 <= rate_Bps / 200e6 <= 1.05


def test_rate_change_retimes_a_waiting_piece():
    """A piece waiting for its slot continues at the new rate from the moment rates change (the fluid model's
    piecewise-constant rates), and the policy sees only the bytes whose slot has passed."""
    clock = FakeClock()
    p = Pacer("equal", 1e6, clock=clock, burst_s=0.0)
    a = p.open_stream(10**6, 4, stream_id="a")
    t0 = p.now_s()
    assert p.delay_for(a, 100_000) == pytest.approx(0.1)
    clock.t += 0.05
    assert a.sent_bytes(p.now_s()) == pytest.approx(50_000)  # half the piece's slot has passed
    b = p.open_stream(10**6, 4, stream_id="b")  # a's share halves: the other 50 kB take 0.1 s, not 0.05 s
    assert a.rate_Bps == pytest.approx(5e5)
    assert a.next_send_s == pytest.approx(t0 + 0.15)
    clock.t += 0.02
    p.close_stream(b)  # back to the full link: 40 kB left, 0.04 s
    assert a.next_send_s == pytest.approx(t0 + 0.07 + 0.04)
    assert a.sent_bytes(p.now_s()) == pytest.approx(60_000)


@register_policy
class _OnlyB:
    """Test policy: stream ids containing 'b' get the link while they exist, others share what is left."""

    name = "test-only-b"

    def allocate(self, now_s, flows, links):
        cap = links[EGRESS].capacity_Bps
        bs = [f for f in flows if "b" in str(f.flow_id)]
        return {f.flow_id: (cap / len(bs) if f in bs else 0.0) if bs else cap / len(flows) for f in flows}


def test_stream_cut_to_zero_keeps_what_it_owes_and_resumes():
    clock = FakeClock()
    p = Pacer("test-only-b", 1e6, clock=clock, burst_s=0.0)
    a = p.open_stream(10**6, 4, stream_id="a")
    p.delay_for(a, 100_000)
    clock.t += 0.03
    b = p.open_stream(10**6, 4, stream_id="b")
    assert a.rate_Bps == 0.0 and math.isinf(a.next_send_s) and a.owed_bytes == pytest.approx(70_000)
    assert a.sent_bytes(p.now_s()) == pytest.approx(30_000)  # frozen while it has no rate
    clock.t += 1.0
    p.close_stream(b)
    assert a.rate_Bps == pytest.approx(1e6) and a.next_send_s == pytest.approx(p.now_s() + 0.07)


@register_policy
class _IdleGpuGetsAll:
    """Test policy: streams whose (estimated) GPU waits for data share the link; busy ones get nothing."""

    name = "test-idle-gpu-gets-all"

    def allocate(self, now_s, flows, links):
        cap = links[EGRESS].capacity_Bps
        idle = [f for f in flows if f.gpu_busy_until_s <= now_s]
        return {f.flow_id: (cap / len(idle) if f in idle else 0.0) for f in flows}


def test_gpu_layer_end_is_an_event():
    """The fluid model re-asks the policy when a GPU finishes a layer while layers remain; so does the
    pacer, with a timer on the event loop, without waiting for another stream's event or the starve poll."""
    clock = FakeClock()
    p = Pacer("test-idle-gpu-gets-all", 1e9, clock=clock)
    s = p.open_stream(1000, 4, compute_per_layer_s=0.05)
    p.layer_sent(s)
    assert p.next_gpu_event_s(p.now_s()) == pytest.approx(s.arrival_s + 0.05)
    clock.t += 1.0
    p.reallocate()
    assert p.next_gpu_event_s(p.now_s()) == math.inf  # the GPU waits: no event until data comes

    async def run():
        p = Pacer("test-idle-gpu-gets-all", 1e9, starve_poll_s=30.0)
        s = p.open_stream(1000, 4, compute_per_layer_s=0.05)
        assert s.rate_Bps == 1e9  # nothing to compute yet: the GPU waits for layer 0
        p.layer_sent(s)  # layer 0 sent: the GPU computes it for 50 ms, the policy gives nothing meanwhile
        assert s.rate_Bps == 0.0
        t0 = time.monotonic()
        await asyncio.wait_for(p.pace(s, 1000), 2.0)
        assert time.monotonic() - t0 >= 0.045
        assert p.timer_reallocations >= 1 and s.rate_Bps == 1e9
        p.close_stream(s)

    asyncio.run(run())


def test_last_piece_still_leaves_when_its_stream_gets_no_rate():
    """Once a stream's last piece has had its slot, the policy sees nothing left and gives it 0: the piece
    must still leave (it used to wait for a rate that never came, stalling that request for good)."""
    clock = FakeClock()
    p = Pacer("equal", 1e6, clock=clock, burst_s=0.0, recheck_s=0.01)
    s = p.open_stream(1000, 1)
    waits = []

    def wait(d):  # the sender oversleeps its slot; meanwhile the event loop re-allocates
        waits.append(d)
        assert len(waits) < 50, "the sender never got to send"
        clock.t += d + 0.001
        p.reallocate()
        return False

    p.pace_blocking(s, 1000, wait=wait)  # the whole stream in one piece: its slot is 1 ms
    assert waits == [pytest.approx(0.001)]
    assert s.rate_Bps == 0.0 and s.owed_bytes == 0.0 and s.next_send_s <= p.now_s()
