"""The DRAM tier's eviction is the scheduler core's (``scheduler.tiers``): the same victims as the
simulator's ``TierManager`` under LRU and S3-FIFO, pinned chunks survive, TTLs expire (time from the tier's
clock, passed to the core)."""

from __future__ import annotations

import random

import pytest
import torch

from scheduler.tiers import TierManager
from testbed.engine.dram import DramSource, DramTier
from testbed.engine.kvload import LayerCopier
from testbed.engine.prefill import PrefillEngine
from testbed.engine.save import KVSaver
from tests.testbed.engine.test_kvsource import CT, SPEC, random_slices
from tests.testbed.engine.test_prefill import MODEL, check_same, prompt, reference

KEYS = [f"{i:064x}" for i in range(12)]


class Clock:
    """A hand-driven monotonic clock (seconds)."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def payload(seed: int) -> list[bytes]:
    return [p.numpy().tobytes() for p in random_slices(1, seed)]


def ops(seed: int, n: int = 80) -> list[tuple[str, str]]:
    """A mix of single-chunk saves and lookups over 12 keys, some hot (looked up and saved often)."""
    rng = random.Random(seed)
    hot = KEYS[:3]
    out = []
    for _ in range(n):
        key = rng.choice(hot) if rng.random() < 0.5 else rng.choice(KEYS)
        out.append(("get" if rng.random() < 0.5 else "put", key))
    return out


HAND_BUILT = [("put", KEYS[i]) for i in range(4)] + [
    ("get", KEYS[0]),
    ("get", KEYS[0]),
    ("put", KEYS[4]),
    ("get", KEYS[2]),
    ("put", KEYS[5]),
    ("put", KEYS[6]),
    ("get", KEYS[4]),
    ("put", KEYS[1]),
    ("put", KEYS[7]),
    ("put", KEYS[8]),
    ("get", KEYS[0]),
    ("put", KEYS[9]),
]


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
@pytest.mark.parametrize("sequence", [HAND_BUILT, ops(1), ops(2)], ids=["hand", "mix1", "mix2"])
def test_eviction_order_is_the_simulators(policy, sequence):
    capacity = 4
    tier = DramTier(SPEC, capacity, chunk_tokens=CT, policy=policy, clock=Clock())
    cb = tier.chunk_bytes
    sim = TierManager(hbm_bytes=0, dram_bytes=capacity * cb, object_bytes=0, policy=policy)
    got, want = [], []
    for step, (op, key) in enumerate(sequence):
        if op == "get":
            assert tier.lookup([key]) == int(sim.tiers["dram"].get(key, 0.0)), step
            continue
        before = set(tier.slots)
        if key in tier:
            tier.refresh([key])  # a re-save of a held chunk: a use, nothing to write
        else:
            tier.put([key], payload(step))
        got.append(sorted(before - set(tier.slots)))
        want.append(sorted(sim.put("dram", key, cb, "default", 0.0)))
        assert set(tier.slots) == set(sim.tiers["dram"].entries), step
    assert got == want
    assert sum(map(len, got)) > 0  # the sequence did evict


def test_pinned_chunks_survive_and_a_tier_full_of_them_rejects():
    tier = DramTier(SPEC, 3, chunk_tokens=CT, clock=Clock())
    for i in range(3):
        tier.put([KEYS[i]], payload(i))
    tier.pin([KEYS[0]])  # the least recently used, but being read
    tier.put([KEYS[3]], payload(3))
    assert KEYS[0] in tier and KEYS[1] not in tier
    tier.pin([KEYS[2], KEYS[3]])
    with pytest.raises(MemoryError):
        tier.allocate(1)
    assert len(tier) == 3  # nothing was evicted by the failed allocation
    tier.unpin([KEYS[0]])
    tier.put([KEYS[4]], payload(4))
    assert KEYS[0] not in tier and all(k in tier for k in KEYS[2:5])


def test_ttl_expires_per_namespace_and_frees_the_slots():
    clock = Clock()
    tier = DramTier(SPEC, 4, chunk_tokens=CT, ttl_s={"short": 10.0}, clock=clock)
    tier.put(KEYS[:2], [p.numpy().tobytes() for p in random_slices(2, 1)], namespace="short")
    tier.put(KEYS[2:3], payload(2), namespace="long")
    clock.now_s = 9.0
    assert tier.lookup(KEYS[:2]) == 2
    tier.pin([KEYS[1]])
    clock.now_s = 10.5
    assert tier.lookup(KEYS[:2]) == 0 and KEYS[0] not in tier.slots  # expired: dropped, slot freed
    assert KEYS[1] in tier.slots and KEYS[1] not in tier  # pinned: kept (unusable) until unpinned
    assert tier.lookup(KEYS[2:3]) == 1  # other namespaces keep the default (no expiry)
    tier.unpin([KEYS[1]])
    assert tier.expire() == [KEYS[1]] and len(tier) == 1
    assert len(tier.allocate(3)) == 3  # every freed slot is usable again


def test_engine_saves_with_its_namespace_ttl_and_recomputes_after_expiry():
    clock = Clock()
    tier = DramTier(SPEC, 16, chunk_tokens=CT, ttl_s={"t1": 5.0}, clock=clock)
    engine = PrefillEngine(MODEL, chunk_tokens=CT, namespace="t1")
    engine.saver = KVSaver(tier, scope=engine.scope)
    copier = LayerCopier(SPEC, CT, torch.device("cpu"), 8, torch.float32)
    first = prompt(3 * CT, 9)
    engine.prefill(first)
    ids = torch.cat([first, prompt(5, 10)])
    clock.now_s = 4.0
    hit = engine.prefill(ids, DramSource(tier, copier), save=False)
    assert hit.cached_tokens == 3 * CT
    assert all(e.pins == 0 for e in tier.cache.entries.values())  # the load's pins were released
    clock.now_s = 6.0
    miss = engine.prefill(ids, DramSource(tier, copier), save=False)
    assert miss.cached_tokens == 0 and miss.source == "recompute"
    check_same(hit, reference(ids))
    check_same(miss, reference(ids))


def test_a_save_that_only_pinned_chunks_could_make_room_for_is_skipped():
    """The prefix being loaded is pinned, so the new chunks do not fit: the save is skipped, not the answer."""
    tier = DramTier(SPEC, 4, chunk_tokens=CT, clock=Clock())
    engine = PrefillEngine(MODEL, chunk_tokens=CT, namespace="t1")
    engine.saver = KVSaver(tier, scope=engine.scope)
    copier = LayerCopier(SPEC, CT, torch.device("cpu"), 8, torch.float32)
    first = prompt(3 * CT, 11)
    engine.prefill(first)
    ids = torch.cat([first, prompt(2 * CT + 3, 12)])
    res = engine.prefill(ids, DramSource(tier, copier))
    assert res.cached_tokens == 3 * CT and res.saved_keys == [] and engine.saver.skipped_chunks == 2
    check_same(res, reference(ids))
    assert all(e.pins == 0 for e in tier.cache.entries.values())
    again = engine.prefill(ids)  # no load pins the prefix: room is made
    assert len(again.saved_keys) == 2 and len(tier) == 4 and engine.saver.skipped_chunks == 2


def test_clear_frees_every_unpinned_slot():
    tier = DramTier(SPEC, 4, chunk_tokens=CT, clock=Clock())
    tier.put(KEYS[:4], [p.numpy().tobytes() for p in random_slices(4, 3)])
    tier.pin(KEYS[1:2])
    assert sorted(tier.clear()) == sorted(KEYS[:1] + KEYS[2:4])
    assert list(tier.slots) == [KEYS[1]] and tier.lookup(KEYS[:1]) == 0 and len(tier.allocate(3)) == 3
