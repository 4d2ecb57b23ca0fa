"""Server metrics in the Prometheus text exposition format (``GET /_objectcache/metrics``).

Counters: bytes served / received per operation, requests per operation and status, errors per S3 code,
gather layers sent, pacer settings changes.  Gauges: active gather streams, the pacer's policy and
capacity, per-stream rates from the pacer.  A fixed-bucket histogram of request latencies per operation
(time to the last byte).
"""

from __future__ import annotations

import math
from collections import defaultdict

from testbed.objectstore.pacer import Pacer

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(**kv: str) -> str:
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in kv.items()
    )
    return "{" + inner + "}" if inner else ""


class Metrics:
    def __init__(self) -> None:
        self.bytes_served: dict[str, int] = defaultdict(int)
        self.bytes_received: dict[str, int] = defaultdict(int)
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.gather_layers = 0
        self.gather_streams_total = 0
        self.active_streams = 0
        self._lat_counts: dict[str, list[int]] = {}
        self._lat_sum: dict[str, float] = defaultdict(float)

    def observe(self, op: str, status: int, latency_s: float) -> None:
        self.requests[(op, status)] += 1
        counts = self._lat_counts.setdefault(op, [0] * (len(LATENCY_BUCKETS_S) + 1))
        for i, le in enumerate(LATENCY_BUCKETS_S):
            if latency_s <= le:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self._lat_sum[op] += latency_s

    def render(self, pacer: Pacer | None = None) -> str:
        out: list[str] = []

        def block(name: str, kind: str, help_text: str, rows: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                out.append(f"{name}{labels} {_fmt(value)}")

        block(
            "objectcache_bytes_served_total",
            "counter",
            "Response body bytes sent, by operation.",
            [(_labels(op=op), v) for op, v in sorted(self.bytes_served.items())],
        )
        block(
            "objectcache_bytes_received_total",
            "counter",
            "Request body bytes stored, by operation.",
            [(_labels(op=op), v) for op, v in sorted(self.bytes_received.items())],
        )
        block(
            "objectcache_requests_total",
            "counter",
            "Requests by operation and HTTP status.",
            [(_labels(op=op, status=str(st)), v) for (op, st), v in sorted(self.requests.items())],
        )
        block(
            "objectcache_errors_total",
            "counter",
            "Error responses and aborted streams, by S3 error code.",
            [(_labels(code=c), v) for c, v in sorted(self.errors.items())],
        )
        block("objectcache_gather_layers_total", "counter", "Layer frames sent.", [("", self.gather_layers)])
        block(
            "objectcache_gather_streams_total",
            "counter",
            "Gather streams started.",
            [("", self.gather_streams_total)],
        )
        block("objectcache_active_streams", "gauge", "Gather streams in flight.", [("", self.active_streams)])
        if pacer is not None:
            block(
                "objectcache_pacer_policy",
                "gauge",
                "The pacer's current bandwidth policy (1 for the active one).",
                [(_labels(policy=pacer.policy_name), 1)],
            )
            block(
                "objectcache_pacer_changes_total",
                "counter",
                "Pacer settings changed through the admin operation.",
                [("", pacer.changes)],
            )
            block(
                "objectcache_egress_capacity_bytes_per_second",
                "gauge",
                "Configured egress capacity (+Inf: unpaced).",
                [("", pacer.egress_Bps if pacer.egress_Bps else math.inf)],
            )
            snap = pacer.snapshot()
            block(
                "objectcache_stream_rate_bytes_per_second",
                "gauge",
                "Rate the pacer's policy gives each active gather stream.",
                [(_labels(stream=s["stream_id"], policy=pacer.policy_name), s["rate_Bps"]) for s in snap],
            )
            block(
                "objectcache_stream_delivered_bytes",
                "gauge",
                "Payload bytes sent so far by each active gather stream.",
                [(_labels(stream=s["stream_id"]), s["delivered_bytes"]) for s in snap],
            )
        name = "objectcache_request_duration_seconds"
        out.append(f"# HELP {name} Request latency to the last byte, by operation.")
        out.append(f"# TYPE {name} histogram")
        for op, counts in sorted(self._lat_counts.items()):
            cum = 0
            for le, c in zip(LATENCY_BUCKETS_S, counts):
                cum += c
                out.append(f"{name}_bucket{_labels(op=op, le=str(le))} {cum}")
            cum += counts[-1]
            out.append(f"{name}_bucket{_labels(op=op, le='+Inf')} {cum}")
            out.append(f"{name}_sum{_labels(op=op)} {_fmt(self._lat_sum[op])}")
            out.append(f"{name}_count{_labels(op=op)} {cum}")
        return "\n".join(out) + "\n"


def _fmt(v: float) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)
