"""Where the read paths put a layer: the caller's buffers (``out``), or fresh ones made layer by layer.

A layer's buffer holds ``n_chunks * slice_bytes`` bytes, chunk ``i``'s slice at
``[i * slice_bytes, (i + 1) * slice_bytes)``; the read paths read payload bytes straight into it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def as_byte_view(buf) -> memoryview:
    """A flat, writable byte view of a caller's buffer (bytearray, numpy array, pinned memory, ...)."""
    view = memoryview(buf)
    if view.readonly:
        raise ValueError("output buffers must be writable")
    if not view.c_contiguous:
        raise ValueError("output buffers must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class LayerBuffers(Sequence):
    """One fresh buffer of ``layer_bytes`` per layer, allocated when the layer is first asked for and left
    uninitialised (the exact read fills it before it is yielded).  Allocating and zeroing a whole request up
    front (64 MB at a 32K-token prefix of the scaled model, 4 GB at 32K tokens of Llama-3.1-8B) holds the GIL
    for tens of milliseconds and stalls every other request's reader in the process."""

    def __init__(self, n_layers: int, layer_bytes: int) -> None:
        self._n = n_layers
        self._layer_bytes = layer_bytes
        self._views: dict[int, memoryview] = {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        i %= self._n
        v = self._views.get(i)
        if v is None:
            v = self._views[i] = memoryview(np.empty(self._layer_bytes, dtype=np.uint8))
        return v


def layer_views(out: Sequence | None, n_layers: int, layer_bytes: int) -> Sequence[memoryview]:
    """One ``layer_bytes`` view per layer: into the caller's ``out`` (one buffer per layer, at least that
    large, possibly repeated as a ring), or ``LayerBuffers`` when ``out`` is None."""
    if out is None:
        return LayerBuffers(n_layers, layer_bytes)
    if len(out) < n_layers:
        raise ValueError(f"out has {len(out)} buffers, need one per layer ({n_layers})")
    views = [as_byte_view(b) for b in out[:n_layers]]
    for i, v in enumerate(views):
        if len(v) < layer_bytes:
            raise ValueError(f"out[{i}] holds {len(v)} bytes, layer needs {layer_bytes}")
    return [v[:layer_bytes] for v in views]
