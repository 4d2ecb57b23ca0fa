"""KV sources and the save path of the layerwise prefill engine (shaped like vLLM's KV connector).

A *KV source* fills the cached-prefix rows of the engine's per-layer KV tensors.  The engine calls

    n = source.lookup(keys)            # how many leading chunks this source holds
    source.start_load(request)         # start moving them (returns at once)
    source.wait_for_layer(l)           # before computing layer l: make the compute stream wait for KV(l)
    source.finish_load()               # after the last layer: statistics, release

and catches ``KVLoadError`` (or any ``ObjectCacheError``) from ``wait_for_layer`` to fall back to recompute.

Sources: ``RecomputeSource`` (holds nothing), ``DramSource`` (pinned host memory, whole or layerwise
host-to-device copies) and ``ObjectCacheSource`` (the object-tier client's layer stream into pinned buffers).
The save path (``KVSaver``) writes new chunks to the DRAM tier and, in the background, to the object tier.

Layout (every name stays importable from here):

* ``testbed.kvload``: the load protocol (``KVSource``/``RecomputeSource``, ``LoadRequest``, ``LoadStats``,
  ``KVLoadError``) and the device data path (``LayerCopier``, ``pinned_empty``).
* ``testbed.dramtier``: the DRAM tier (``DramTier``), its source (``DramSource``) and the save path
  (``KVSaver``).
* ``testbed.objectsource``: the object-tier source (``ObjectCacheSource``, ``READERS``).
"""

from __future__ import annotations

from testbed.dramtier import DramSource, DramTier, KVSaver
from testbed.kvload import (
    KVLoadError,
    KVSource,
    LayerCopier,
    LoadRequest,
    LoadStats,
    RecomputeSource,
    pinned_empty,
)
from testbed.objectsource import READERS, ObjectCacheSource

__all__ = [
    "READERS",
    "DramSource",
    "DramTier",
    "KVLoadError",
    "KVSaver",
    "KVSource",
    "LayerCopier",
    "LoadRequest",
    "LoadStats",
    "ObjectCacheSource",
    "RecomputeSource",
    "pinned_empty",
]
