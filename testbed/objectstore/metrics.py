"""Server metrics through ``prometheus_client`` (``GET /_objectcache/metrics``, Prometheus text format).

Each server has a registry of its own (``ServerMetrics.registry``), so several servers in one process (tests)
never share counts.  Counters: bytes served / received per operation, requests per operation and HTTP status,
errors per S3 code, gather layers sent and gather streams started.  Gauge: active gather streams.  Histogram:
request latency to the last byte per operation.  The pacer's state is read when scraped (``PacerCollector``):
its policy, how often its settings changed, the egress capacity, and each active stream's rate and bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from testbed.objectstore.pacer import Pacer

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class PacerCollector(Collector):
    """The pacer's settings and per-stream state, read at scrape time (``Pacer.snapshot``)."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer

    def collect(self) -> Iterator[Metric]:
        pacer = self.pacer
        policy = GaugeMetricFamily(
            "objectcache_pacer_policy",
            "The pacer's current bandwidth policy (1 for the active one).",
            labels=["policy"],
        )
        policy.add_metric([pacer.policy_name], 1)
        yield policy
        yield CounterMetricFamily(
            "objectcache_pacer_changes_total",
            "Pacer settings changed through the admin operation.",
            value=pacer.changes,
        )
        yield GaugeMetricFamily(
            "objectcache_egress_capacity_bytes_per_second",
            "Configured egress capacity (+Inf: unpaced).",
            value=pacer.egress_Bps if pacer.egress_Bps else math.inf,
        )
        rate = GaugeMetricFamily(
            "objectcache_stream_rate_bytes_per_second",
            "Rate the pacer's policy gives each active flow: a gather stream, or a pace group of streams.",
            labels=["stream", "policy"],
        )
        delivered = GaugeMetricFamily(
            "objectcache_stream_delivered_bytes",
            "Payload bytes sent so far by each active flow (a pace group: its open streams together).",
            labels=["stream"],
        )
        for s in pacer.snapshot():
            rate.add_metric([s["stream_id"], pacer.policy_name], s["rate_Bps"])
            delivered.add_metric([s["stream_id"]], s["delivered_bytes"])
        yield rate
        yield delivered


class ServerMetrics:
    """The server's metrics in a registry of its own; ``render`` is the endpoint's body."""

    def __init__(self, pacer: Pacer | None = None) -> None:
        self.registry = reg = CollectorRegistry()
        self.bytes_served = Counter(
            "objectcache_bytes_served_total", "Response body bytes sent, by operation.", ["op"], registry=reg
        )
        self.bytes_received = Counter(
            "objectcache_bytes_received_total",
            "Request body bytes stored, by operation.",
            ["op"],
            registry=reg,
        )
        self.requests = Counter(
            "objectcache_requests_total",
            "Requests by operation and HTTP status.",
            ["op", "status"],
            registry=reg,
        )
        self.errors = Counter(
            "objectcache_errors_total",
            "Error responses and aborted streams, by S3 error code.",
            ["code"],
            registry=reg,
        )
        self.gather_layers = Counter("objectcache_gather_layers_total", "Layer frames sent.", registry=reg)
        self.gather_streams = Counter(
            "objectcache_gather_streams_total", "Gather streams started.", registry=reg
        )
        self.active_streams = Gauge("objectcache_active_streams", "Gather streams in flight.", registry=reg)
        self.request_duration = Histogram(
            "objectcache_request_duration_seconds",
            "Request latency to the last byte, by operation.",
            ["op"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        if pacer is not None:
            reg.register(PacerCollector(pacer))

    def observe(self, op: str, status: int, latency_s: float) -> None:
        """Book one finished request (``latency_s``: handling start to the last byte)."""
        self.requests.labels(op=op, status=str(status)).inc()
        self.request_duration.labels(op=op).observe(latency_s)

    def count_error(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    def add_bytes_served(self, op: str, n_bytes: int) -> None:
        self.bytes_served.labels(op=op).inc(n_bytes)

    def add_bytes_received(self, op: str, n_bytes: int) -> None:
        self.bytes_received.labels(op=op).inc(n_bytes)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
