"""Prometheus metrics: requests, latency, batch sizes, queue depth and the provider in use.

Each server owns its registry (not the process-wide default), so two servers in one process,
as in tests, do not collide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics; the core records into it, ``serve`` exposes it over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fineserve_requests",
            "Inference requests by model, version, outcome (ok/error) and status code.",
            ["model", "version", "outcome", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fineserve_request_latency_seconds",
            "End-to-end inference latency inside the server (preprocessing, queue, run).",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_latency = Histogram(
            "fineserve_queue_latency_seconds",
            "Time requests waited in the batching queue.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fineserve_batch_size",
            "Rows per batch run by onnxruntime.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "fineserve_model_ready",
            "1 while a model version is ready.",
            ["model", "version"],
            registry=self.registry,
        )
        self.provider = Info(
            "fineserve_execution", "The onnxruntime execution provider in use.", registry=self.registry
        )
        self._queue_depths: dict[tuple[str, str], Callable[[], int]] = {}
        self.registry.register(_QueueDepthCollector(self._queue_depths))

    def watch_queue(self, model: str, version: int, depth: Callable[[], int]) -> None:
        self._queue_depths[(model, str(version))] = depth

    def unwatch_queue(self, model: str, version: int) -> None:
        self._queue_depths.pop((model, str(version)), None)
        with contextlib.suppress(KeyError):
            self.model_ready.remove(model, str(version))

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Starts the /metrics HTTP server in a thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)


class _QueueDepthCollector(Collector):
    """Reads each batcher's queue depth at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, depths: dict[tuple[str, str], Callable[[], int]]) -> None:
        self._depths = depths

    def collect(self) -> Any:
        family = GaugeMetricFamily(
            "fineserve_queue_depth",
            "Requests waiting in a model version's batching queue.",
            labels=["model", "version"],
        )
        for (model, version), depth in list(self._depths.items()):
            family.add_metric([model, version], depth())
        yield family
