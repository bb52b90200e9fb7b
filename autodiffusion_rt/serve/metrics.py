"""Prometheus metrics of one service instance, in its own registry (several apps may share a process, as in tests)."""

from __future__ import annotations

import threading
import time
from collections import deque

__all__ = ["ROUTES", "ServeMetrics"]

# The service's routes and their methods: each gets its own label value, anything else is counted as "other"
# (bounded label cardinality), and a 404/405 names them.
ROUTES = {"/v1/samples": "POST", "/healthz": "GET", "/readyz": "GET", "/metrics": "GET"}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServeMetrics:
    """Requests by route and status, latency, batch sizes, queue depth, dropped work, images per second."""

    def __init__(self, rate_window_s: float = 10.0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total and memory of the serving process (a replica's own, under Ray Serve):
        # where the CPU goes, beside what the engines do
        ProcessCollector(registry=r)
        self.requests = Counter("adrt_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        # by status too: 429s answered in microseconds and 200s after a batch are different distributions
        self.latency = Histogram(
            "adrt_request_seconds",
            "HTTP request latency (s) in the server, by route and status",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "adrt_batch_images", "images per engine batch, by plan", ["plan"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "adrt_batch_requests",
            "requests merged into one engine batch, by plan",
            ["plan"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_images = Gauge(
            "adrt_queue_images", "images waiting for an engine batch, by plan", ["plan"], registry=r
        )
        self.running_images = Gauge(
            "adrt_running_images", "images of the batch on the engines now, by plan", ["plan"], registry=r
        )
        self.images = Counter("adrt_images", "images generated, by plan", ["plan"], registry=r)
        self.dropped = Counter(
            "adrt_dropped_requests",
            "requests dropped before their batch ran, by plan and reason",
            ["plan", "reason"],
            registry=r,
        )
        self.images_per_second = Gauge(
            "adrt_images_per_second", f"images generated per second over the last {rate_window_s:g} s", registry=r
        )
        self._window = rate_window_s
        self._done: deque = deque()  # (monotonic time, images)
        self._lock = threading.Lock()
        self.images_per_second.set_function(self._rate)

    def record_batch(self, plan: str, images: int, requests: int) -> None:
        self.batch_images.labels(plan).observe(images)
        self.batch_requests.labels(plan).observe(requests)
        self.images.labels(plan).inc(images)
        with self._lock:
            self._done.append((time.monotonic(), images))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - self._window:
                self._done.popleft()
            return sum(n for _, n in self._done) / self._window

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
