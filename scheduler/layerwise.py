"""The layerwise GPU recurrence: when each layer of a prefill computes, given when its KV arrives.

A layerwise prefill computes layer ``l`` for the new tokens once two things hold: the cached prefix's KV of
layer ``l`` has arrived, and the GPU has finished layer ``l-1``.  So with arrivals ``a_l`` (seconds), a GPU
free from ``g`` and ``c`` seconds of compute per layer::

    start_l = max(a_l, end_{l-1}),   end_{-1} = g,   end_l = start_l + c

Every user of that schedule calls ``layer_times``: the fluid model (simulated arrivals), the server's pacer
(estimating the client's GPU from when it sent each layer), the emulated-compute worker (real arrivals,
sleeping to each end) and the simulator's storage paths.  Stall is ``start_l - end_{l-1}`` for ``l >= 1``;
the wait before layer 0 is the first-layer wait, not stall.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator


def layer_times(
    arrivals_s: Iterable[float], compute_per_layer_s: float, gpu_free_s: float, until_s: float = math.inf
) -> Iterator[tuple[float, float]]:
    """``(start_s, end_s)`` of each layer in order, for the layers whose compute starts by ``until_s``.

    ``arrivals_s`` is read lazily, one layer ahead of nothing: a caller may pass a generator that blocks until
    the next layer has really arrived.  Layers after the first one that starts later than ``until_s`` are not
    yielded (their start depends on it).
    """
    end_s = gpu_free_s
    for arrival_s in arrivals_s:
        start_s = max(arrival_s, end_s)
        if start_s > until_s:
            return
        end_s = start_s + compute_per_layer_s
        yield start_s, end_s
