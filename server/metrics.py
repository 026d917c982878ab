"""Prometheus metrics: requests, stage latencies, batches, queues, model loads, provider, process, GPU.

Each server owns its registry (not the process-wide default), so two servers in one process,
as in tests, do not collide. Label values stay bounded: a model label is a name the repository
knows (clients cannot invent one; anything else is ``UNKNOWN``), a version label is a version that
was resolved to a loaded one, and a code label is a gRPC status code name. Every metric is listed,
with its type, labels and meaning, in ``docs/observability.md``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from fineserve.server.metrics_http import serve_metrics
from fineserve.server.threads import RoleCpu

log = logging.getLogger(__name__)

# No ``_created`` series beside every counter and histogram: Prometheus would store each as a gauge.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The label value for a model the server does not know, or a version that never resolved:
# model names cannot start with "_" (export.contract.MODEL_NAME), so it never collides.
UNKNOWN = "_unknown"

# Serving latencies are milliseconds; the tail reaches seconds under overload.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

_VERSION = ["model", "version"]
_OUTCOME = ["model", "version", "outcome", "code"]


@dataclass(frozen=True)
class WatchedVersion:
    """Values read at scrape time from a loaded version (no bookkeeping on the request path)."""

    queue_depth: Callable[[], int]
    queue_capacity: int
    in_flight: Callable[[], int]


class Metrics:
    """The server's metrics; the core records into it, ``serve`` exposes it over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The default process, platform and GC collectors, bound to our registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        # --- requests (one per inference request, whatever its outcome) ---
        self.requests = Counter(
            "fineserve_requests",
            "Inference requests by model, version, outcome (ok/error) and gRPC status code.",
            _OUTCOME,
            registry=r,
        )
        self.items = Counter(
            "fineserve_request_items",
            "Items (images, texts or tensor rows) in inference requests, by outcome and status code.",
            _OUTCOME,
            registry=r,
        )
        self.request_duration = Histogram(
            "fineserve_request_duration_seconds",
            "End-to-end time of an inference request inside the server: from the transport "
            "receiving it to its reply being built (preprocessing, queue, inference, outputs).",
            ["model", "version", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "fineserve_request_queue_duration_seconds",
            "Time a successful request waited in its model version's batching queue.",
            _VERSION,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "fineserve_request_preprocess_duration_seconds",
            "Time spent preparing a successful request's tensors (decode, resize, tokenize, checks).",
            _VERSION,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # --- batches (one per batch onnxruntime ran) ---
        self.inference_duration = Histogram(
            "fineserve_batch_inference_duration_seconds",
            "Time onnxruntime took to run one batch.",
            _VERSION,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fineserve_batch_size",
            "Rows (items) per batch run by onnxruntime, before any padding.",
            _VERSION,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.padding_rows = Counter(
            "fineserve_batch_padding_rows",
            "Zero rows added to batches to reach a warmed batch size (pad_batches).",
            _VERSION,
            registry=r,
        )
        self.padding_tokens = Counter(
            "fineserve_batch_padding_tokens",
            "Sequence positions added to the texts of batches to reach a warmed length "
            "(pad_batches, sequence_buckets).",
            _VERSION,
            registry=r,
        )
        # --- models ---
        self.model_ready = Gauge(
            "fineserve_model_ready", "1 while a model version is loaded and ready.", _VERSION, registry=r
        )
        # --- calls refused before any handler ran (never counted in fineserve_requests) ---
        self.refused_calls = Counter(
            "fineserve_refused_calls",
            "Calls refused before their handler ran, by method (registered methods only) and status "
            "code: UNAUTHENTICATED (missing or wrong bearer token), UNAVAILABLE (shutting down), "
            "INVALID_ARGUMENT (not a message of the method's type).",
            ["method", "code"],
            registry=r,
        )
        self.model_load_duration = Gauge(
            "fineserve_model_load_duration_seconds",
            "How long the last successful load of a model version took (session, warmup).",
            _VERSION,
            registry=r,
        )
        self.model_load_failures = Counter(
            "fineserve_model_load_failures",
            "Failed attempts to load a version of a model.",
            ["model"],
            registry=r,
        )
        self.model_execution = Gauge(
            "fineserve_model_execution_info",
            "1 per loaded model version, labelled with its execution provider and graph variant.",
            ["model", "version", "provider", "variant"],
            registry=r,
        )
        self.provider = Info(
            "fineserve_execution",
            "The onnxruntime execution provider the server chose, and the device setting.",
            registry=r,
        )
        self.device_fallback = Gauge(
            "fineserve_device_fallback",
            "1 when device=auto serves on CPU because CUDA, though offered, failed its startup probe "
            "(the log says why); 0 otherwise.",
            registry=r,
        )
        self._known_models: set[str] = set()
        self._watched: dict[tuple[str, str], WatchedVersion] = {}
        self._execution_labels: dict[tuple[str, str], tuple[str, str]] = {}
        self._lock = threading.Lock()  # the scrape thread reads what the event loop writes
        self.registry.register(_ModelCollector(self))
        # CPU time by thread role (event loop, inference, ...); the server sets the loop's thread.
        self.thread_cpu = RoleCpu()
        self.registry.register(_ThreadCollector(self.thread_cpu))
        self.gpu_enabled = False

    def watch_certificate(self, not_after: float) -> None:
        """Exports the seconds until the TLS certificate expires (``not_after``, epoch seconds),
        read at scrape time so that an alert fires before the handshakes start failing."""
        expiry = Gauge(
            "fineserve_tls_certificate_expiry_seconds",
            "Seconds until the gRPC port's TLS certificate (tls_cert_file) expires; negative once it has.",
            registry=self.registry,
        )
        expiry.set_function(lambda: not_after - time.time())

    def enable_gpu(self) -> bool:
        """Adds the NVML GPU metrics if NVML is there (serving on CUDA); False when it is not."""
        if not self.gpu_enabled:
            collector = GpuCollector.create()
            if collector is not None:
                self.registry.register(collector)
                self.gpu_enabled = True
        return self.gpu_enabled

    # --- bounded labels -------------------------------------------------------------------------

    def model_seen(self, name: str) -> None:
        """The repository found ``name`` on disk: from now on it may be a label value."""
        with self._lock:
            self._known_models.add(name)

    def model_label(self, name: str) -> str:
        return name if name in self._known_models else UNKNOWN

    def known_models(self) -> list[str]:
        with self._lock:
            return sorted(self._known_models)

    # --- model lifecycle ------------------------------------------------------------------------

    def version_loaded(
        self,
        name: str,
        version: int,
        *,
        seconds: float,
        provider: str,
        variant: str,
        watched: WatchedVersion,
    ) -> None:
        labels = (name, str(version))
        self.model_seen(name)
        self.model_ready.labels(*labels).set(1)
        self.model_load_duration.labels(*labels).set(seconds)
        self.model_execution.labels(*labels, provider, variant).set(1)
        with self._lock:
            self._watched[labels] = watched
            self._execution_labels[labels] = (provider, variant)

    def version_failed(self, name: str) -> None:
        self.model_seen(name)
        self.model_load_failures.labels(name).inc()

    def version_retired(self, name: str, version: int) -> None:
        """Drops the retired version's gauges; its counters and histograms stay (Prometheus needs
        their last values for rates)."""
        labels = (name, str(version))
        with self._lock:
            self._watched.pop(labels, None)
            execution = self._execution_labels.pop(labels, None)
        for gauge in (self.model_ready, self.model_load_duration):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        if execution is not None:
            with contextlib.suppress(KeyError):
                self.model_execution.remove(*labels, *execution)

    def watched(self) -> list[tuple[tuple[str, str], WatchedVersion]]:
        with self._lock:
            return list(self._watched.items())

    # --- batches --------------------------------------------------------------------------------

    def call_refused(self, method: str, code: str) -> None:
        self.refused_calls.labels(method=method, code=code).inc()

    def batch_recorder(self, name: str, version: int) -> Callable[[int, int], None]:
        """A callback for each batch run: (rows, inference nanoseconds). Children are bound once."""
        size = self.batch_size.labels(name, str(version))
        duration = self.inference_duration.labels(name, str(version))

        def record(rows: int, infer_ns: int) -> None:
            size.observe(rows)
            duration.observe(infer_ns / 1e9)

        return record

    def watch_shared_memory(self, counts: Callable[[], Mapping[str, int]], capacity: int) -> None:
        """Shared memory regions registered, by kind (read at scrape time), and how many may be."""
        self.registry.register(_SharedMemoryCollector(counts, capacity))

    def padding_recorder(self, name: str, version: int) -> Callable[[int, int], None]:
        """A callback for each padded batch: (rows added, sequence positions added); called on
        batching threads (counters are thread-safe)."""
        rows = self.padding_rows.labels(name, str(version))
        tokens = self.padding_tokens.labels(name, str(version))

        def record(rows_added: int, positions_added: int) -> None:
            rows.inc(rows_added)
            tokens.inc(positions_added)

        return record

    def serve(
        self, host: str, port: int, *, max_connections: int = 32, timeout_s: float = 10.0
    ) -> tuple[Any, int]:
        """Starts the /metrics HTTP server in a thread; returns (server, bound port)."""
        return serve_metrics(self.registry, host, port, max_connections=max_connections, timeout_s=timeout_s)


class _ModelCollector(Collector):
    """Per loaded version, read at scrape time: queue depth and capacity, in-flight requests; per
    known model: how many versions are loaded (0 for a model on disk that failed or is unloaded)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "fineserve_queue_depth",
            "Requests waiting in a model version's batching queue (queued or in the batch being formed).",
            labels=_VERSION,
        )
        capacity = GaugeMetricFamily(
            "fineserve_queue_capacity",
            "Requests a model version's queue holds before rejecting with RESOURCE_EXHAUSTED.",
            labels=_VERSION,
        )
        in_flight = GaugeMetricFamily(
            "fineserve_inflight_requests",
            "Requests that resolved a model version and have not finished (queued, running or replying).",
            labels=_VERSION,
        )
        loaded = GaugeMetricFamily(
            "fineserve_model_loaded_versions",
            "Versions of a model that are loaded and ready (0: the model is not being served).",
            labels=["model"],
        )
        counts: dict[str, int] = dict.fromkeys(self._metrics.known_models(), 0)
        for (model, version), watched in self._metrics.watched():
            depth.add_metric([model, version], watched.queue_depth())
            capacity.add_metric([model, version], watched.queue_capacity)
            in_flight.add_metric([model, version], watched.in_flight())
            counts[model] = counts.get(model, 0) + 1
        for model, count in sorted(counts.items()):
            loaded.add_metric([model], count)
        yield from (depth, capacity, in_flight, loaded)


class _SharedMemoryCollector(Collector):
    """Registered shared memory regions by kind, against the cap the open-files limit set. Each
    system region holds a descriptor: next to ``process_open_fds`` and ``process_max_fds``."""

    def __init__(self, counts: Callable[[], Mapping[str, int]], capacity: int) -> None:
        self._counts = counts
        self._capacity = capacity

    def collect(self) -> Iterator[Metric]:
        regions = GaugeMetricFamily(
            "fineserve_shared_memory_regions",
            "Shared memory regions registered, by kind (system: each holds an open descriptor; cuda).",
            labels=["kind"],
        )
        for kind, count in sorted(self._counts().items()):
            regions.add_metric([kind], count)
        yield regions
        yield GaugeMetricFamily(
            "fineserve_shared_memory_regions_limit",
            "Regions (of both kinds together) that may be registered: what the open-files limit "
            "leaves after a reserve for connections and files; one more is RESOURCE_EXHAUSTED.",
            value=self._capacity,
        )


class _ThreadCollector(Collector):
    """CPU time of the server's threads by role, read from /proc at scrape time (Linux; elsewhere
    the series stay at 0). The event loop's rate near 1 (a whole core) means the loop, not the
    model, limits throughput."""

    def __init__(self, role_cpu: RoleCpu) -> None:
        self._role_cpu = role_cpu

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "fineserve_thread_cpu_seconds",
            "CPU time of the server's threads by role: event_loop (gRPC calls, request decoding and "
            "answers), inference (batching threads and onnxruntime's workers), preprocessing (image "
            "decoding, tokenising, model loading), grpc (gRPC's core threads), other.",
            labels=["role"],
        )
        for role, seconds in self._role_cpu.read().items():
            family.add_metric([role], seconds)
        yield family


class GpuCollector(Collector):
    """GPU memory and utilisation per device from NVML (``nvidia-ml-py``, in the ``gpu`` extra).

    Imported lazily: without the package or without a driver, ``create`` returns None and the
    server simply has no GPU metrics.
    """

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def create(cls) -> GpuCollector | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as err:  # ImportError, or NVMLError without a driver: no GPU metrics
            log.info("no GPU metrics (NVML unavailable: %s)", err)
            return None
        return cls(pynvml, handles)

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily("fineserve_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("fineserve_gpu_memory_total_bytes", "GPU memory in total.", labels=["gpu"])
        busy = GaugeMetricFamily(
            "fineserve_gpu_utilization_ratio",
            "Fraction of the last sample period in which the GPU ran a kernel (0-1).",
            labels=["gpu"],
        )
        for index, handle in enumerate(self._handles):
            try:
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception:  # a device gone bad must not break the whole scrape
                log.debug("NVML read of GPU %d failed", index, exc_info=True)
                continue
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
            busy.add_metric([str(index)], rates.gpu / 100.0)
        yield from (used, total, busy)
