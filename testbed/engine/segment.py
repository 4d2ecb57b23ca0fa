"""The engine side of the reader process's receive buffers: one shared memory segment holding every layer.

``LayerSegment`` owns a ``testbed.engine.reader.SharedSegment`` of ``num_layers * layer_stride_bytes``
(layer ``l``'s gather payload at ``[l * layer_stride_bytes, ...)``), its torch view and, on CUDA, its
registration as pinned memory (``cudaHostRegister``: the host-to-device copies from it are then asynchronous
DMA).  Allocating and registering is slow (4.8 s for the 7.5 GiB of a 60K-token Llama-3.1-8B prefix), so it
happens once, at ``reserve``, and the segment is reused by every request that fits; a larger request
replaces it with a new *generation*, which tells the reader process to map the new one.
"""

from __future__ import annotations

import torch

from testbed.engine.reader import SharedSegment


class LayerSegment:
    """Per-layer receive buffers shared with the reader process (see the module docstring).

    ``cuda``: register the segment as pinned memory (``registered`` says it is).  ``generation`` counts the
    segments allocated (0: none yet); ``layer_stride_bytes``: bytes reserved per layer.
    """

    def __init__(self, num_layers: int, *, cuda: bool) -> None:
        self.num_layers, self.cuda = num_layers, cuda
        self.generation = 0
        self.layer_stride_bytes = 0
        self.shared: SharedSegment | None = None
        self._tensor: torch.Tensor | None = None
        self.registered = False

    def reserve(self, layer_bytes: int) -> None:
        """Make room for ``layer_bytes`` per layer (a new, larger segment when the current one is smaller)."""
        if self.shared is not None and self.layer_stride_bytes >= layer_bytes:
            return
        self.close()
        self.shared = SharedSegment(max(1, self.num_layers * layer_bytes))
        self.generation += 1
        self.layer_stride_bytes = layer_bytes
        self._tensor = torch.frombuffer(self.shared.mm, dtype=torch.uint8)
        if self.cuda:
            rc = torch.cuda.cudart().cudaHostRegister(self._tensor.data_ptr(), self.shared.size_bytes, 0)
            if int(rc) != 0:
                raise RuntimeError(f"cudaHostRegister of {self.shared.size_bytes} B failed: {rc}")
            self.registered = True

    def layer(self, layer: int, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of ``layer``'s region (uint8 host tensor)."""
        lo = layer * self.layer_stride_bytes
        return self._tensor[lo : lo + nbytes]

    def close(self) -> None:
        """Unregister and free the segment (a later ``reserve`` allocates a new one)."""
        if self.shared is None:
            return
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self._tensor.data_ptr())
            self.registered = False
        self._tensor = None
        self.shared.close()
        self.shared = None
