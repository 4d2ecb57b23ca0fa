"""GPU compute model interface: how long one layer of a prefill takes.

``layer_time_s(cached_tokens, new_tokens)`` is the time of one decoder layer when ``new_tokens`` tokens are
prefilled on top of ``cached_tokens`` tokens of cached prefix.  Implementations (measured profile tables with
interpolation, an analytic roofline fallback) live in this module; the simulator, the planner and the
testbed's emulated compute mode all use them.
"""

from __future__ import annotations

from typing import Protocol


class ComputeModel(Protocol):
    num_layers: int

    def layer_time_s(self, cached_tokens: int, new_tokens: int) -> float: ...

    def prefill_time_s(self, cached_tokens: int, new_tokens: int) -> float: ...
