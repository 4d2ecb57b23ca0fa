"""Tier manager: eviction order (LRU, S3-FIFO), pinning, TTLs, write-back, prefix lookups, counters."""

from __future__ import annotations

import pytest

from scheduler.geometry import get_model
from scheduler.keys import KeyScope, chunk_keys
from scheduler.tiers import TIERS, TierCache, TierManager

CHUNK = 100  # bytes per chunk in these tests


def keys(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_lru_evicts_the_least_recently_used():
    t = TierCache("dram", 3 * CHUNK, "lru")
    for k in keys(3):
        t.put(k, CHUNK, "ns", 0.0)
    assert t.get("k0", 1.0)  # k0 becomes the most recent
    assert t.put("k3", CHUNK, "ns", 2.0) == ["k1"]
    assert t.put("k4", CHUNK, "ns", 3.0) == ["k2"]
    assert set(t.entries) == {"k0", "k3", "k4"}
    assert (t.counters.hits, t.counters.evictions, t.counters.insertions) == (1, 2, 5)
    assert t.used_bytes == 3 * CHUNK


def _hot_hits_during_scan(policy: str) -> int:
    """A hot set re-read between runs of one-time scan keys: how many of its re-reads hit."""
    t = TierCache("dram", 20 * CHUNK, policy)
    hot = keys(8, "hot")
    for k in hot:
        t.put(k, CHUNK, "ns", 0.0)
    now, hits = 1.0, 0
    for k in hot:  # the hot set is re-used once before the scan
        assert t.get(k, now)
    for i, k in enumerate(keys(150, "scan")):  # one-hit wonders, 15 between re-reads of the hot set
        now += 1.0
        t.put(k, CHUNK, "ns", now)
        if i % 15 == 14:
            for h in hot:
                if t.get(h, now):
                    hits += 1
                else:
                    t.put(h, CHUNK, "ns", now)
    return hits


def test_s3fifo_keeps_the_hot_set_through_a_scan_better_than_lru():
    s3 = _hot_hits_during_scan("s3fifo")
    lru = _hot_hits_during_scan("lru")
    assert s3 == 8 * 10  # every re-read hits
    assert lru < s3 / 2


def test_s3fifo_drops_one_hit_wonders_first_and_remembers_them():
    t = TierCache("dram", 10 * CHUNK, "s3fifo")
    for k in keys(10):
        t.put(k, CHUNK, "ns", 0.0)
    t.get("k0", 1.0)  # k0 was re-used on probation
    evicted = t.put("new", CHUNK, "ns", 2.0)
    assert evicted == ["k1"]  # the oldest never-reused key, not k0
    assert t.peek("k0", 2.0)
    # A key re-inserted while the ghost remembers it goes straight to the main queue.
    t.put("k1", CHUNK, "ns", 3.0)
    assert "k1" in t.queue._main


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_pinned_chunks_are_never_evicted(policy):
    t = TierCache("hbm", 2 * CHUNK, policy)
    t.put("a", CHUNK, "ns", 0.0)
    t.put("b", CHUNK, "ns", 0.0)
    t.pin("a")
    assert t.put("c", CHUNK, "ns", 1.0) == ["b"]
    t.pin("c")
    with pytest.raises(MemoryError):
        t.put("d", CHUNK, "ns", 2.0)
    assert t.counters.rejections == 1
    t.unpin("a")
    assert t.put("d", CHUNK, "ns", 3.0) == ["a"]
    with pytest.raises(ValueError):
        t.unpin("d")


def test_ttl_per_namespace_expires_entries():
    m = TierManager(hbm_bytes=0, dram_bytes=10 * CHUNK, ttl_s={"short": 5.0}, default_ttl_s=100.0)
    m.put("dram", "s", CHUNK, "short", now_s=0.0)
    m.put("dram", "l", CHUNK, "long", now_s=0.0)
    assert m.tier_of("s", 4.9) == "dram"
    assert m.tier_of("s", 5.0) is None  # expired at insertion + TTL
    assert m.tier_of("l", 99.0) == "dram"
    dram = m.tiers["dram"]
    assert not dram.get("s", 6.0)
    assert dram.counters.expirations == 1 and dram.counters.misses == 1
    assert m.expire(200.0)["dram"] == ["l"]
    assert len(dram) == 0


def test_write_back_goes_to_dram_now_and_object_once():
    m = TierManager(hbm_bytes=0, dram_bytes=10 * CHUNK)
    assert m.write_back(["a", "b"], CHUNK, "ns", 0.0) == ["a", "b"]
    assert m.tier_of("a", 0.0) == "dram"
    assert m.tiers["object"].peek("a", 0.0) is False
    # Already queued: not written again.
    assert m.write_back(["a", "c"], CHUNK, "ns", 1.0) == ["c"]
    assert m.complete_writes(2.0, max_count=2) == ["a", "b"]
    assert m.tiers["object"].peek("a", 2.0)
    # Already in the object tier: not written again.
    assert m.write_back(["a"], CHUNK, "ns", 3.0) == []
    assert m.writes_skipped == 2
    assert m.complete_writes(4.0) == ["c"]
    assert m.writes_completed == 3


def test_hbm_victims_are_demoted_to_dram():
    m = TierManager(hbm_bytes=2 * CHUNK, dram_bytes=10 * CHUNK)
    for k in keys(3):
        m.put("hbm", k, CHUNK, "ns", 0.0)
    assert m.tier_of("k0", 0.0) == "dram"
    assert m.tiers["dram"].entries["k0"].size_bytes == CHUNK


def test_longest_prefix_per_tier_with_real_chunk_keys():
    model = get_model("llama-3.1-8b")
    size = model.kv_bytes_per_chunk()
    ks = chunk_keys(list(range(256 * 6)), KeyScope(model.fingerprint(), "tenant-a"))
    m = TierManager(hbm_bytes=10 * size, dram_bytes=10 * size)
    m.put("hbm", ks[0], size, "tenant-a", 0.0)
    for k in ks[1:3]:
        m.put("dram", k, size, "tenant-a", 0.0)
    for k in ks[:5]:
        m.put("object", k, size, "tenant-a", 0.0)
    m.put("object", ks[5], size, "tenant-a", 0.0)
    m.tiers["object"].remove(ks[4])  # a hole: chunk 5 is useless without chunk 4
    assert m.longest_prefix(ks, 1.0) == {"hbm": 1, "dram": 3, "object": 4}
    got = m.lookup_prefix(ks, 1.0)
    assert got == {"hbm": 1, "dram": 3, "object": 4}
    c = m.counters()
    assert (c["hbm"].hits, c["dram"].hits, c["object"].hits) == (1, 2, 1)
    # Each key looked up in faster tiers first: misses there, and the fifth key misses everywhere.
    assert (c["hbm"].misses, c["dram"].misses, c["object"].misses) == (4, 2, 1)
    assert list(got) == list(TIERS)


def test_uploads_to_an_absent_object_tier_are_counted_as_failed():
    m = TierManager(hbm_bytes=0, dram_bytes=10 * CHUNK, object_bytes=0)
    m.write_back(["a"], CHUNK, "ns", 0.0)
    assert m.complete_writes(1.0) == []
    assert (m.writes_completed, m.writes_failed) == (0, 1)
    assert m.tier_of("a", 1.0) == "dram"


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_make_room_evicts_the_victims_put_would_and_stops_at_pinned_keys(policy):
    """``make_room`` is ``put``'s eviction on its own, for a store that keeps the bytes elsewhere."""
    a, b = TierCache("dram", 300, policy), TierCache("dram", 300, policy)
    for t in (a, b):
        for k in "xyz":
            t.put(k, 100, "ns", 0.0)
        t.get("x", 0.0)
    assert [e.key for e in a.make_room(200)] == b.put("w", 200, "ns", 0.0)[:2]
    assert a.used_bytes == 100 and a.make_room(200) == []
    (last,) = a.entries
    a.pin(last)
    with pytest.raises(MemoryError):
        a.make_room(201)
    assert last in a.entries and a.counters.rejections == 1
