"""Seeded random draws the simulator's experiments and the testbed share (no SimPy).

``sub_seed`` gives every sweep point its own deterministic seed; ``draw_mixed`` draws the shared-bandwidth
experiment's concurrent requests (arrival in seconds, cached and new tokens).  The testbed harness draws its
requests with the same functions and seeds, so both sides run the same load.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


def sub_seed(seed: int, *parts) -> int:
    """Deterministic per-point seed (crc32 of the parts; Python's ``hash`` is salted per process)."""
    return (seed * 1_000_003 + zlib.crc32(repr(parts).encode())) % (2**32)


@dataclass(frozen=True)
class MixedDraw:
    """One drawn request of the shared-bandwidth experiment."""

    arrival_s: float
    cached_tokens: int
    new_tokens: int


def draw_mixed(rng: np.random.Generator, n: int, p: dict) -> list[MixedDraw]:
    """``n`` requests arriving uniformly within ``p["arrival_window_s"]`` (sorted; all at 0 for a zero
    window), cached and new tokens drawn from ``p["prefix_choices"]`` and ``p["new_choices"]``."""
    arrivals = (
        np.sort(rng.uniform(0.0, float(p["arrival_window_s"]), size=n))
        if p["arrival_window_s"] > 0
        else [0.0] * n
    )
    cached = rng.choice(np.asarray(p["prefix_choices"], dtype=int), size=n)
    new = rng.choice(np.asarray(p["new_choices"], dtype=int), size=n)
    return [MixedDraw(float(a), int(c), int(w)) for a, c, w in zip(arrivals, cached, new)]
