"""Prometheus metrics, one registry per server (so tests and Ray replicas never share counters).

Queue depth, active rows and engine steps are read from the engine when scraped, not pushed by it,
so the engine's hot loop carries no monitoring code beyond two integer additions.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OUTCOMES = ("ok", "bad_request", "not_found", "rejected", "timeout", "disconnected", "error")


class EngineCollector:
    """Reads the engine's live numbers at scrape time."""

    def __init__(self, service: Any):
        self.service = service

    def collect(self):
        service = self.service
        engine = service.engine
        yield GaugeMetricFamily(
            "vedrt_queue_depth",
            "requests admitted and waiting for decoder rows",
            value=service.queue_depth,
        )
        yield GaugeMetricFamily(
            "vedrt_active_rows", "decoder rows in the running batch", value=engine.active_rows
        )
        yield GaugeMetricFamily(
            "vedrt_requests_in_flight",
            "requests admitted and not yet answered",
            value=service.in_flight,
        )
        stats = getattr(engine, "stats", {}) or {}
        yield CounterMetricFamily(
            "vedrt_engine_steps", "engine steps run", value=stats.get("steps", 0)
        )
        yield CounterMetricFamily(
            "vedrt_engine_row_steps",
            "decoder rows advanced, summed over steps (row_steps / steps = rows per step)",
            value=stats.get("row_steps", 0),
        )


class Metrics:
    """The counters and histograms a service updates as requests come and go."""

    def __init__(self, service: Any):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vedrt_requests",
            "requests answered, by endpoint and outcome",
            ("endpoint", "outcome"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "vedrt_request_latency_seconds",
            "arrival to answer, for answered requests",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "vedrt_queue_time_seconds",
            "arrival to the engine admitting the request into its batch",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "vedrt_tokens_generated",
            "tokens generated (end token included)",
            registry=self.registry,
        )
        self.images = Counter(
            "vedrt_images", "images submitted to the engine", registry=self.registry
        )
        self.texts = Counter(
            "vedrt_texts", "texts submitted to the engine (text models)", registry=self.registry
        )
        self.registry.register(EngineCollector(service))

    def observe(
        self, endpoint: str, status: int, seconds: float, outcome: str | None = None
    ) -> None:
        self.requests.labels(endpoint, outcome or outcome_of(status)).inc()
        if status == 200:
            self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def outcome_of(status: int) -> str:
    return {200: "ok", 400: "bad_request", 404: "not_found", 503: "rejected", 504: "timeout"}.get(
        status, "error"
    )
