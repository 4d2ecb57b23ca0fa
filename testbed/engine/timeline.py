"""A per-phase timeline of one prefill request: what the object tier delivered when, against the compute.

``PrefillEngine.timeline`` (None: off) is filled by the engine and its KV source during ``prefill``; every
time is in ms from the request's start (``time.monotonic()``, a clock shared by the reader process):

* ``load_start``: the source was asked to load; per gather stream (``groups``): ``request_sent``,
  ``response_headers`` (status and headers in: the control round trip and the server's open of the objects
  it checks first), ``first_byte`` (the first layer frame's head in: its payload follows), ``first_layer``
  (layer 0 received and verified);
* per layer: ``arrived`` (every stream has delivered it into the pinned host buffer), ``wait`` (the host
  blocked in ``wait_for_layer`` from .. to), ``compute`` (the layer's kernels ran from .. to: CUDA events
  on the compute stream, placed on the host clock by an event recorded at the request's start, when the
  stream is idle; on the CPU the host times around the synchronous forward);
* ``ttft``: the last token's logits are on the host; ``fallback``: why the load was abandoned, if it was.

``to_dict()`` resolves the CUDA events (after the request: it synchronises).  ``testbed.validation.timeline``
measures and draws it.
"""

from __future__ import annotations

import time

import torch


class Timeline:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.t0: float | None = None
        self.marks: dict[str, float] = {}
        self.groups: dict[str, list] = {}
        self.arrived: dict[int, float] = {}
        self.wait: dict[int, tuple[float, float]] = {}
        self._compute: dict[int, list] = {}
        self._base = None
        self.fallback = ""

    def start(self, t0: float | None = None) -> None:
        """A new request starts now (``time.monotonic()``): forget the previous one."""
        self.t0 = time.monotonic() if t0 is None else t0
        self.marks, self.groups, self.arrived, self.wait, self._compute = {}, {}, {}, {}, {}
        self.fallback = ""
        if self.cuda:
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()

    def ms(self, t_mono: float) -> float:
        return (t_mono - self.t0) * 1e3

    def mark(self, name: str, t_mono: float | None = None) -> None:
        self.marks[name] = self.ms(time.monotonic() if t_mono is None else t_mono)

    def layer_arrived(self, layer: int, t_mono: float | None = None) -> None:
        self.arrived[layer] = self.ms(time.monotonic() if t_mono is None else t_mono)

    def layer_wait(self, layer: int, start_mono: float, end_mono: float) -> None:
        self.wait[layer] = (self.ms(start_mono), self.ms(end_mono))

    def compute_begin(self, layer: int) -> None:
        self._compute[layer] = [self._stamp(), None]

    def compute_end(self, layer: int) -> None:
        self._compute[layer][1] = self._stamp()

    def _stamp(self):
        if not self.cuda:
            return self.ms(time.monotonic())
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def load_timings(self, timings_ms: dict) -> None:
        """The source's ``LoadStats.timings_ms`` (ms from ``load_start``; per-stream lists) on this clock."""
        base = self.marks.get("load_start", 0.0)
        for key in ("request_sent", "response_headers", "first_byte", "first_layer"):
            vals = timings_ms.get(key)
            if isinstance(vals, list):
                self.groups[key] = [None if v is None else base + v for v in vals]

    def to_dict(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()

        def at(x) -> float:
            return x if isinstance(x, float) else self._base.elapsed_time(x)

        layers = sorted(set(self.arrived) | set(self.wait) | set(self._compute))
        return {
            "marks_ms": dict(self.marks),
            "groups_ms": dict(self.groups),
            "fallback": self.fallback,
            "layers": [
                {
                    "layer": i,
                    "arrived_ms": self.arrived.get(i),
                    "wait_ms": list(self.wait[i]) if i in self.wait else None,
                    "compute_ms": [at(x) for x in self._compute[i]] if i in self._compute else None,
                }
                for i in layers
            ],
            "compute_clock": "cuda events" if self.cuda else "host",
        }
