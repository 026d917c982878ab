"""One inference request, observed: its metrics, its log line (failed or slow) and its trace.

A transport opens ``Telemetry.observe`` around an inference RPC; the core fills in what it learns
(the resolved version, the item count, the stage timings) through ``current_request()``, a
context variable, so no signature between them changes. When the block ends, the outcome and its
gRPC status code are recorded exactly once, whatever raised. Nothing of the payload is kept.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fineserve.server.errors import status_of
from fineserve.server.logs import REQUEST_LOGGER
from fineserve.server.metrics import UNKNOWN, Metrics

if TYPE_CHECKING:
    from fineserve.server.tracing import RequestTracer

log = logging.getLogger(REQUEST_LOGGER)

REQUEST_ID_HEADER = "x-request-id"
# A client's request id is logged only if it looks like an id (no spaces, no control characters).
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,64}$")
# Failures that point at the server (or its capacity) rather than at the request: WARNING.
_SERVER_SIDE = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNKNOWN"})

_current: ContextVar[RequestObservation | None] = ContextVar("fineserve_request", default=None)


def current_request() -> RequestObservation | None:
    """The request being observed in this task, if a transport (or the core) opened one."""
    return _current.get()


@dataclass
class RequestObservation:
    """What is known about one request; nanosecond timings from ``time.perf_counter_ns``."""

    model: str
    items: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    version: int | None = None
    started_ns: int = field(default_factory=time.perf_counter_ns)
    started_unix_ns: int = field(default_factory=time.time_ns)
    preprocess_ns: int = 0
    queue_ns: int = 0
    inference_ns: int = 0
    batch_sizes: tuple[int, ...] = ()
    _request_id: str = ""

    @property
    def request_id(self) -> str:
        """The client's ``x-request-id`` if it sent a sane one, else a fresh id (made on first use)."""
        if not self._request_id:
            given = self.headers.get(REQUEST_ID_HEADER, "")
            self._request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:16]
        return self._request_id

    def completed(self, items: int, preprocess_ns: int, queue_ns: int, inference_ns: int) -> None:
        self.items = items
        self.preprocess_ns = preprocess_ns
        self.queue_ns = queue_ns
        self.inference_ns = inference_ns


@dataclass(frozen=True)
class Outcome:
    code: str  # gRPC status code name
    message: str
    duration_ns: int

    @property
    def ok(self) -> bool:
        return self.code == "OK"


class Telemetry:
    """Records finished requests into the metrics, the request log and (optionally) a tracer."""

    def __init__(self, metrics: Metrics, slow_request_ms: float, tracer: RequestTracer | None = None) -> None:
        self.metrics = metrics
        self.slow_ns = int(slow_request_ms * 1e6)
        self.tracer = tracer

    @contextlib.contextmanager
    def observe(
        self, model: str, *, items: int = 0, headers: Mapping[str, str] | None = None
    ) -> Iterator[RequestObservation]:
        observation = RequestObservation(model, items, headers or {})
        token = _current.set(observation)
        try:
            yield observation
        except BaseException as err:
            self._finish(observation, err)
            raise
        else:
            self._finish(observation, None)
        finally:
            _current.reset(token)

    def _finish(self, observation: RequestObservation, err: BaseException | None) -> None:
        duration_ns = time.perf_counter_ns() - observation.started_ns
        if err is None:
            outcome = Outcome("OK", "", duration_ns)
        elif isinstance(err, Exception):
            outcome = Outcome(*status_of(err), duration_ns)
        else:  # asyncio.CancelledError: the client went away
            outcome = Outcome("CANCELLED", "request cancelled", duration_ns)
        self._record_metrics(observation, outcome)
        self._log(observation, outcome)
        if self.tracer is not None:
            self.tracer.record(observation, outcome)

    def _record_metrics(self, observation: RequestObservation, outcome: Outcome) -> None:
        m = self.metrics
        model = m.model_label(observation.model)
        version = str(observation.version) if model != UNKNOWN and observation.version else UNKNOWN
        result = "ok" if outcome.ok else "error"
        m.requests.labels(model, version, result, outcome.code).inc()
        if observation.items:
            m.items.labels(model, version, result, outcome.code).inc(observation.items)
        m.request_duration.labels(model, version, result).observe(outcome.duration_ns / 1e9)
        if outcome.ok:
            m.queue_duration.labels(model, version).observe(observation.queue_ns / 1e9)
            m.preprocess_duration.labels(model, version).observe(observation.preprocess_ns / 1e9)

    def _log(self, observation: RequestObservation, outcome: Outcome) -> None:
        if outcome.ok and duration_below(outcome.duration_ns, self.slow_ns):
            return
        if not outcome.ok:
            level = logging.WARNING if outcome.code in _SERVER_SIDE else logging.INFO
            message = "request failed"
        elif self.slow_ns:
            level, message = logging.WARNING, "slow request"
        else:
            level, message = logging.INFO, "request"
        if not log.isEnabledFor(level):
            return
        fields: dict[str, object] = {
            "request_id": observation.request_id,
            "model": observation.model[:80],
            "version": observation.version or "",
            "status": outcome.code,
            "items": observation.items,
            "duration_ms": _ms(outcome.duration_ns),
        }
        if outcome.ok:
            fields |= {
                "preprocess_ms": _ms(observation.preprocess_ns),
                "queue_ms": _ms(observation.queue_ns),
                "inference_ms": _ms(observation.inference_ns),
            }
        else:
            fields["error"] = outcome.message
        log.log(level, message, extra={"fields": fields})


def duration_below(duration_ns: int, threshold_ns: int) -> bool:
    return threshold_ns > 0 and duration_ns < threshold_ns


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)
