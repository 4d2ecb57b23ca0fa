"""KV sources and the save path of the layerwise prefill engine (shaped like vLLM's KV connector).

A *KV source* fills the cached-prefix rows of the engine's per-layer KV tensors; the load protocol
(``lookup``, ``start_load``, ``wait_for_layer``, ``finish_load``; ``KVLoadError`` -> recompute) is described in
``testbed.kvload``.

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
