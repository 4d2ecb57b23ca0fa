"""Tier placement and eviction: which chunk's KV lives in HBM, in DRAM and in the object tier.

Three tiers, fastest first: ``hbm`` (GPU memory), ``dram`` (host memory), ``object`` (S3-compatible object
storage, cluster-wide).  Each tier is a byte-capacity cache of chunk keys (``scheduler.keys``) with its own
eviction policy:

* ``lru``: least recently used.
* ``s3fifo``: S3-FIFO (Yang et al., SOSP'23).  A small FIFO (10 % of the bytes) takes new keys; a key
  evicted from it that was never hit again is dropped and remembered in a ghost FIFO, one that was hit moves
  to the main FIFO; a key re-inserted while remembered by the ghost goes straight to main; main re-queues a
  key with hits left (decrementing its counter, capped at 3) instead of evicting it.  One-hit wonders (a
  prompt nobody repeats) leave quickly without flushing the hot shared prefixes, which LRU does under scans.

Pinned keys (chunks an in-flight request is reading) are never evicted; a put that cannot make room without
evicting a pinned key is rejected.  Entries expire after a per-namespace TTL (``ttl_s[namespace]``); time is
always passed in (``now_s``), never read.  Expired entries count as misses and are dropped lazily on lookup
or eagerly by ``expire``.

Write-back (``write_back``): the new full chunks of a finished prefill go to DRAM at once and are queued for
the object tier; ``complete_writes`` moves queued chunks into the object tier when the upload finishes.  The
object tier is content-addressed and immutable, so a key that is already there (or already queued) is not
written again.

Lookups: ``tier_of`` (fastest tier holding a key), ``longest_prefix`` (per tier, how many leading chunk
keys are reachable from that tier or a faster one -- what the fetch-vs-recompute planner needs) and
``lookup_prefix`` (the same, counting hits and misses and refreshing recency).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TIERS: tuple[str, ...] = ("hbm", "dram", "object")


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    insertions: int = 0
    evictions: int = 0
    expirations: int = 0
    rejections: int = 0


@dataclass
class Entry:
    key: str
    size_bytes: int
    namespace: str
    expires_s: float
    freq: int = 0
    pins: int = 0


class LRUQueue:
    """Least recently used order: ``victims`` yields the least recent keys first."""

    name = "lru"

    def __init__(self, capacity_bytes: float) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def inserted(self, e: Entry) -> None:
        self._order[e.key] = None

    def accessed(self, e: Entry) -> None:
        self._order.move_to_end(e.key)

    def removed(self, key: str) -> None:
        self._order.pop(key, None)

    def pick_victim(self, entries: Mapping[str, Entry]) -> str | None:
        for key in self._order:
            if entries[key].pins == 0:
                return key
        return None


class S3FIFOQueue:
    """S3-FIFO over bytes: small FIFO (10 %), main FIFO, ghost FIFO of recently dropped keys."""

    name = "s3fifo"
    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self, capacity_bytes: float) -> None:
        self.capacity_bytes = capacity_bytes
        self._small: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._main: OrderedDict[str, int] = OrderedDict()
        self._ghost: OrderedDict[str, None] = OrderedDict()
        self._small_bytes = 0
        self._main_bytes = 0

    def inserted(self, e: Entry) -> None:
        if e.key in self._ghost:
            del self._ghost[e.key]
            self._main[e.key] = e.size_bytes
            self._main_bytes += e.size_bytes
        else:
            self._small[e.key] = e.size_bytes
            self._small_bytes += e.size_bytes

    def accessed(self, e: Entry) -> None:
        e.freq = min(self.MAX_FREQ, e.freq + 1)

    def removed(self, key: str) -> None:
        if key in self._small:
            self._small_bytes -= self._small.pop(key)
        elif key in self._main:
            self._main_bytes -= self._main.pop(key)

    def _remember(self, key: str) -> None:
        self._ghost[key] = None
        # The ghost remembers about as many keys as the cache holds.
        limit = max(16, len(self._main) + len(self._small))
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)

    def pick_victim(self, entries: Mapping[str, Entry]) -> str | None:
        # Bounded: an unpinned key is promoted at most once and re-queued at most MAX_FREQ times before it
        # is chosen, so after this many steps only pinned keys are left.
        budget = (self.MAX_FREQ + 2) * (len(self._small) + len(self._main)) + 2
        for _ in range(budget):
            small_turn = self._small and (
                self._small_bytes >= self.SMALL_FRACTION * self.capacity_bytes or not self._main
            )
            if small_turn:
                key, size = next(iter(self._small.items()))
                e = entries[key]
                if e.freq > 0 or e.pins:
                    # Re-used while on probation (or in use): promote to main.
                    del self._small[key]
                    self._small_bytes -= size
                    self._main[key] = size
                    self._main_bytes += size
                    e.freq = 0
                    continue
                self._remember(key)
                return key
            if not self._main:
                return None
            key, _ = next(iter(self._main.items()))
            e = entries[key]
            if e.freq > 0 or e.pins:
                e.freq = max(0, e.freq - 1)
                self._main.move_to_end(key)
                continue
            return key
        return None


_POLICIES = {"lru": LRUQueue, "s3fifo": S3FIFOQueue}


class TierCache:
    """One tier: a byte-capacity set of chunk keys with an eviction policy, pins and TTLs."""

    def __init__(self, name: str, capacity_bytes: float, policy: str = "lru") -> None:
        if capacity_bytes < 0:
            raise ValueError(f"tier {name}: negative capacity")
        try:
            self.queue = _POLICIES[policy](capacity_bytes)
        except KeyError:
            raise KeyError(f"unknown eviction policy {policy!r}; known: {sorted(_POLICIES)}") from None
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.entries: dict[str, Entry] = {}
        self.counters = Counters()

    def __len__(self) -> int:
        return len(self.entries)

    def peek(self, key: str, now_s: float) -> bool:
        """Whether ``key`` is present and unexpired; changes nothing."""
        e = self.entries.get(key)
        return e is not None and e.expires_s > now_s

    def get(self, key: str, now_s: float) -> bool:
        """Look ``key`` up: counts a hit or a miss, refreshes recency, drops it if expired."""
        e = self.entries.get(key)
        if e is not None and e.expires_s <= now_s:
            if e.pins == 0:  # a pinned chunk is being read: it goes when unpinned and expired
                self._drop(key)
                self.counters.expirations += 1
            e = None
        if e is None:
            self.counters.misses += 1
            return False
        self.counters.hits += 1
        self.queue.accessed(e)
        return True

    def put(
        self, key: str, size_bytes: int, namespace: str, now_s: float, ttl_s: float = math.inf
    ) -> list[str]:
        """Insert (or refresh) ``key``; returns the evicted keys.  Raises ``MemoryError`` if no room."""
        return [e.key for e in self.put_entry(key, size_bytes, namespace, now_s, ttl_s)]

    def put_entry(
        self, key: str, size_bytes: int, namespace: str, now_s: float, ttl_s: float = math.inf
    ) -> list[Entry]:
        """``put`` returning the evicted entries (with their sizes and namespaces)."""
        old = self.entries.get(key)
        if old is not None:
            old.expires_s = max(old.expires_s, now_s + ttl_s)
            self.queue.accessed(old)
            return []
        if size_bytes > self.capacity_bytes:
            self.counters.rejections += 1
            raise MemoryError(f"tier {self.name}: chunk of {size_bytes} bytes exceeds capacity")
        evicted = self.make_room(size_bytes) if self.used_bytes + size_bytes > self.capacity_bytes else []
        e = Entry(key, size_bytes, namespace, now_s + ttl_s)
        self.entries[key] = e
        self.used_bytes += size_bytes
        self.queue.inserted(e)
        self.counters.insertions += 1
        return evicted

    def make_room(self, size_bytes: int) -> list[Entry]:
        """Evict by the policy until ``size_bytes`` more fit; returns the evicted entries.  Raises
        ``MemoryError`` (counted as a rejection) when only pinned keys are left to evict; the keys evicted
        before that stay evicted.  ``put`` calls it; a store whose entries live elsewhere (the testbed's
        DRAM tier keeps the bytes in host buffers) calls it to free space before it writes."""
        evicted: list[Entry] = []
        entries, queue, counters = self.entries, self.queue, self.counters
        while self.used_bytes + size_bytes > self.capacity_bytes:
            victim = queue.pick_victim(entries)
            if victim is None:
                counters.rejections += 1
                raise MemoryError(f"tier {self.name}: full of pinned chunks")
            e = entries.pop(victim)  # _drop, inlined: evictions are most of a write-back's work
            self.used_bytes -= e.size_bytes
            queue.removed(victim)
            evicted.append(e)
            counters.evictions += 1
        return evicted

    def remove(self, key: str) -> bool:
        if key in self.entries:
            self._drop(key)
            return True
        return False

    def pin(self, key: str) -> None:
        self.entries[key].pins += 1

    def unpin(self, key: str) -> None:
        e = self.entries[key]
        if e.pins <= 0:
            raise ValueError(f"tier {self.name}: {key} is not pinned")
        e.pins -= 1

    def expire(self, now_s: float) -> list[str]:
        gone = [k for k, e in self.entries.items() if e.expires_s <= now_s and e.pins == 0]
        for k in gone:
            self._drop(k)
        self.counters.expirations += len(gone)
        return gone

    def _drop(self, key: str) -> None:
        e = self.entries.pop(key)
        self.used_bytes -= e.size_bytes
        self.queue.removed(key)


@dataclass
class WriteBack:
    key: str
    size_bytes: int
    namespace: str
    queued_s: float


@dataclass
class TierManager:
    """HBM, DRAM and object tiers with write-back, pinning, TTLs and per-tier counters.

    ``capacities_bytes``: per tier (``object`` defaults to unbounded).  ``policy``: eviction policy of the
    HBM and DRAM tiers (``lru`` or ``s3fifo``; the object tier uses ``object_policy``).  ``ttl_s``: TTL per
    namespace (``default_ttl_s`` for others).  ``demote``: chunks evicted from HBM are kept in DRAM.
    """

    hbm_bytes: float
    dram_bytes: float
    object_bytes: float = math.inf
    policy: str = "lru"
    object_policy: str = "lru"
    ttl_s: Mapping[str, float] = field(default_factory=dict)
    default_ttl_s: float = math.inf
    demote: bool = True

    def __post_init__(self) -> None:
        self.tiers: dict[str, TierCache] = {
            "hbm": TierCache("hbm", self.hbm_bytes, self.policy),
            "dram": TierCache("dram", self.dram_bytes, self.policy),
            "object": TierCache("object", self.object_bytes, self.object_policy),
        }
        self.write_queue: OrderedDict[str, WriteBack] = OrderedDict()
        self.writes_skipped = 0
        self.writes_completed = 0
        self.writes_failed = 0

    # -- placement -----------------------------------------------------------------------------------------
    def ttl_for(self, namespace: str) -> float:
        return self.ttl_s.get(namespace, self.default_ttl_s)

    def put(self, tier: str, key: str, size_bytes: int, namespace: str, now_s: float) -> list[str]:
        """Place ``key`` in ``tier``; returns keys evicted from it (HBM victims are demoted to DRAM)."""
        cache = self.tiers[tier]
        evicted = cache.put_entry(key, size_bytes, namespace, now_s, self.ttl_for(namespace))
        if evicted and tier == "hbm" and self.demote:
            self._demote(evicted, now_s)
        return [e.key for e in evicted]

    def _demote(self, evicted: Sequence[Entry], now_s: float) -> None:
        """HBM victims stay in DRAM (a victim DRAM cannot take is dropped)."""
        dram = self.tiers["dram"]
        for victim in evicted:
            if not dram.peek(victim.key, now_s):
                self._place(
                    dram,
                    victim.key,
                    victim.size_bytes,
                    victim.namespace,
                    now_s,
                    self.ttl_for(victim.namespace),
                )

    def _place(
        self, cache: TierCache, key: str, size_bytes: int, namespace: str, now_s: float, ttl_s: float
    ) -> bool:
        """``_try_put`` on a tier object with the namespace's TTL: one call per chunk instead of four
        (write-backs place millions of chunks in a trace replay); the same steps as ``put``."""
        try:
            evicted = cache.put_entry(key, size_bytes, namespace, now_s, ttl_s)
        except MemoryError:
            return False
        if evicted and cache is self.tiers["hbm"] and self.demote:
            self._demote(evicted, now_s)
        return True

    def write_back(
        self, keys: Sequence[str], size_bytes: int, namespace: str, now_s: float, to_hbm: bool = False
    ) -> list[str]:
        """New full chunks after a prefill: into DRAM (and HBM if ``to_hbm``) now, queued for the object
        tier unless already there or queued.  Returns the keys queued for upload."""
        queued = []
        hbm, dram, obj = self.tiers["hbm"], self.tiers["dram"], self.tiers["object"]
        write_queue = self.write_queue
        place = self._place
        ttl_s = self.ttl_for(namespace)
        for key in keys:
            if to_hbm:
                place(hbm, key, size_bytes, namespace, now_s, ttl_s)
            place(dram, key, size_bytes, namespace, now_s, ttl_s)
            if obj.peek(key, now_s) or key in write_queue:
                self.writes_skipped += 1
                continue
            write_queue[key] = WriteBack(key, size_bytes, namespace, now_s)
            queued.append(key)
        return queued

    def complete_writes(self, now_s: float, max_count: int | None = None) -> list[str]:
        """Uploads finished: move queued chunks (oldest first) into the object tier; returns those placed."""
        done = []
        obj = self.tiers["object"]
        while self.write_queue and (max_count is None or len(done) < max_count):
            _, wb = self.write_queue.popitem(last=False)
            if self._place(obj, wb.key, wb.size_bytes, wb.namespace, now_s, self.ttl_for(wb.namespace)):
                self.writes_completed += 1
                done.append(wb.key)
            else:  # no room (capacity 0, or full of pinned chunks): the upload is dropped
                self.writes_failed += 1
        return done

    def promote(self, key: str, to_tier: str, size_bytes: int, namespace: str, now_s: float) -> bool:
        """After a fetch: keep the chunk in a faster tier too.  False if it could not be placed."""
        return self._try_put(to_tier, key, size_bytes, namespace, now_s)

    def _try_put(self, tier: str, key: str, size_bytes: int, namespace: str, now_s: float) -> bool:
        try:
            self.put(tier, key, size_bytes, namespace, now_s)
            return True
        except MemoryError:
            return False

    # -- pinning and expiry ------------------------------------------------------------------------------
    def pin(self, keys: Sequence[str]) -> None:
        for key in keys:
            for t in self.tiers.values():
                if key in t.entries:
                    t.pin(key)

    def unpin(self, keys: Sequence[str]) -> None:
        for key in keys:
            for t in self.tiers.values():
                if key in t.entries and t.entries[key].pins > 0:
                    t.unpin(key)

    def expire(self, now_s: float) -> dict[str, list[str]]:
        return {name: t.expire(now_s) for name, t in self.tiers.items()}

    # -- lookups -------------------------------------------------------------------------------------------
    def tier_of(self, key: str, now_s: float) -> str | None:
        """Fastest tier holding ``key`` (no counters touched)."""
        for name in TIERS:
            if self.tiers[name].peek(key, now_s):
                return name
        return None

    def longest_prefix(self, keys: Sequence[str], now_s: float) -> dict[str, int]:
        """Per tier, the number of leading ``keys`` each held by that tier or a faster one.

        Non-decreasing in tier order (``hbm <= dram <= object``); a key past a hole is useless (its KV
        depends on the missing chunk), so counting stops at the first miss.
        """
        # One pass: a leading key counts for every tier at least as slow as the slowest of the fastest
        # tiers holding it and every key before it (``worst``); the first key no tier holds ends all runs.
        entries = [self.tiers[name].entries for name in TIERS]
        runs = [0] * len(TIERS)
        worst = 0
        for key in keys:
            best = len(TIERS)
            for depth, held in enumerate(entries):
                e = held.get(key)
                if e is not None and e.expires_s > now_s:  # TierCache.peek
                    best = depth
                    break
            if best > worst:
                worst = best
                if worst == len(TIERS):
                    break
            runs[worst] += 1
        out, n = {}, 0
        for name, run in zip(TIERS, runs):
            n += run
            out[name] = n
        return out

    def lookup_prefix(self, keys: Sequence[str], now_s: float) -> dict[str, int]:
        """``longest_prefix`` for a real request: counts a hit in the fastest tier holding each leading key
        (and a miss in each faster tier), refreshes recency, and counts the first absent key as a miss."""
        for key in keys:
            found = False
            for name in TIERS:
                if self.tiers[name].get(key, now_s):
                    found = True
                    break
            if not found:
                break
        return self.longest_prefix(keys, now_s)

    def counters(self) -> dict[str, Counters]:
        return {name: t.counters for name, t in self.tiers.items()}
