"""One ``/metrics`` for ``--workers N``: the workers' own expositions, fetched and merged at scrape time.

Each worker serves its usual metrics on a loopback port (``pool.py`` names it); the supervisor's
``/metrics`` reads them all when scraped and adds them up. Why a merge and not prometheus_client's
multiprocess mode: every collector keeps working as it is (the scrape-time queue depths,
in-flight counts and thread CPU, the process and GPU collectors, the execution ``Info``, none of
which multiprocess mode carries), and a retired version's series disappear (multiprocess files
cannot remove a gauge's series). The cost: a worker that dies takes with it what it counted since
the last scrape; what it had counted by then is carried on (``departed``), so counters never go
backwards.

How each kind combines (docs/observability.md lists every metric's):

- counters, histograms (bucket by bucket, ``_sum``, ``_count``) and summaries: summed;
- gauges: summed, except those in ``MAX_GAUGES`` (a value every worker sees the same, or a
  "latest"/"any" flag) and ``MIN_GAUGES`` (true of the whole server only when true of every
  worker; a worker without the series counts as 0).
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from fineserve.server.pool import PoolDir

log = logging.getLogger(__name__)

MAX_GAUGES = frozenset(
    {
        "fineserve_model_load_duration_seconds",  # the slowest worker's last load
        "fineserve_model_execution_info",
        "fineserve_execution_info",
        "fineserve_device_fallback",
        "fineserve_shared_memory_regions_limit",  # a cap each worker has for itself
        "fineserve_gpu_memory_used_bytes",  # one device, seen alike by every worker
        "fineserve_gpu_memory_total_bytes",
        "fineserve_gpu_utilization_ratio",
        "process_max_fds",
        "python_info",
    }
)
MIN_GAUGES = frozenset(
    {
        "fineserve_model_ready",  # 1: the version is ready in every worker
        "fineserve_model_loaded_versions",  # versions every worker serves
        "process_start_time_seconds",  # the oldest worker's start
    }
)
_SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
_REQUESTS = "fineserve_requests_total"
SCRAPE_TIMEOUT_S = 2.0

_Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class _Family:
    name: str
    documentation: str
    type: str
    unit: str
    # (sample name, labels) -> value per worker that has it
    values: dict[_Key, list[float]] = field(default_factory=dict)


class WorkerMetrics(Collector):
    """The merged metrics of the pool's workers, plus the supervisor's own (restarts, workers)."""

    def __init__(self, pool: PoolDir) -> None:
        self._pool = pool
        self._last: dict[int, str] = {}  # worker index -> its last exposition
        self._departed: list[str] = []  # last expositions of workers that died
        # departed() runs on the supervisor's thread, collect() on the HTTP server's: a worker
        # that dies during a scrape must be counted once, live or departed, never both.
        self._lock = threading.Lock()
        self.restarts = 0

    def departed(self, index: int) -> None:
        """Worker ``index`` exited: its counts so far stay in the sums; its port is forgotten."""
        with self._lock:
            self._pool.forget_metrics_port(index)
            last = self._last.pop(index, None)
            if last is not None:
                self._departed.append(_counts_only(last))

    def collect(self) -> Iterator[Metric]:
        expositions, departed = self._scrape()
        families: dict[str, _Family] = {}
        for text in [*expositions.values(), *departed]:
            _add(families, text)
        live = len(expositions)
        for family in families.values():
            yield _combined(family, live)
        per_worker = Metric(
            "fineserve_worker_requests",
            "Inference requests answered by each worker process (as fineserve_requests_total; starts "
            "again from 0 when the worker is restarted).",
            "counter",
        )
        for index, text in sorted(expositions.items()):
            per_worker.add_sample("fineserve_worker_requests_total", {"worker": str(index)}, _requests(text))
        yield per_worker
        restarts = Metric(
            "fineserve_worker_restarts",
            "Worker processes the supervisor restarted after they exited unasked.",
            "counter",
        )
        restarts.add_sample("fineserve_worker_restarts_total", {}, float(self.restarts))
        yield restarts
        workers = Metric("fineserve_workers", "Worker processes the server runs (--workers).", "gauge")
        workers.add_sample("fineserve_workers", {}, float(self._pool.workers))
        yield workers
        ready = Metric("fineserve_workers_ready", "Worker processes whose models are ready.", "gauge")
        ready.add_sample("fineserve_workers_ready", {}, float(self._pool.ready_count()))
        yield ready

    def _scrape(self) -> tuple[dict[int, str], list[str]]:
        """The live workers' expositions by index, and the departed ones' counts, as of one moment.

        The fetches run outside the lock (a slow worker must not hold up the supervisor's
        restarts); a worker whose port changed meanwhile departed, and its fetch is dropped."""
        with self._lock:
            ports = {index: self._pool.metrics_port(index) for index in range(self._pool.workers)}
        fetched = {index: _fetch(index, port) for index, port in ports.items() if port is not None}
        found = {}
        with self._lock:
            for index, fresh in fetched.items():
                if self._pool.metrics_port(index) != ports[index]:
                    continue  # departed meanwhile: what it counted is in _departed now
                # Unreadable (exiting): its last scrape is carried on until it is gone.
                text = fresh if fresh is not None else self._last.get(index)
                if text is not None:
                    found[index] = self._last[index] = text
            return found, list(self._departed)


def _fetch(index: int, port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
            text: str = reply.read().decode()
            return text
    except OSError as err:
        log.debug("worker %d metrics unreadable: %s", index, err)
        return None


def _add(families: dict[str, _Family], text: str) -> None:
    for parsed in text_string_to_metric_families(text):
        family = families.get(parsed.name)
        if family is None:
            family = families[parsed.name] = _Family(
                parsed.name, parsed.documentation, parsed.type, parsed.unit
            )
        for sample in parsed.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            family.values.setdefault(key, []).append(sample.value)


def _combined(family: _Family, live: int) -> Metric:
    metric = Metric(family.name, family.documentation, family.type, family.unit)
    for (name, labels), values in family.values.items():
        if family.type in _SUMMED_TYPES or family.name not in MAX_GAUGES | MIN_GAUGES:
            value = sum(values)
        elif family.name in MAX_GAUGES:
            value = max(values)
        else:
            value = min(values) if len(values) >= live else min(0.0, *values)
        metric.add_sample(name, dict(labels), value)
    return metric


def _counts_only(text: str) -> str:
    """An exposition's counters, histograms and summaries (what a departed worker leaves behind)."""
    lines = []
    for parsed in text_string_to_metric_families(text):
        if parsed.type not in _SUMMED_TYPES:
            continue
        # The text format names a counter's family with its _total (the parser strips it).
        exposed = f"{parsed.name}_total" if parsed.type == "counter" else parsed.name
        lines.append(f"# TYPE {exposed} {parsed.type}")
        for sample in parsed.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
            lines.append(f"{sample.name}{{{labels}}} {sample.value!r}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _requests(text: str) -> float:
    return sum(
        sample.value
        for parsed in text_string_to_metric_families(text)
        for sample in parsed.samples
        if sample.name == _REQUESTS
    )
