"""Optional OpenTelemetry tracing: one span per inference request, with queue, preprocessing and
inference as child spans.

Off by default, and then free: this module is imported only when ``tracing`` is not ``off``, so
OpenTelemetry is never loaded. The spans are written once the request has finished, from the
timings the server measures anyway (no span objects live on the request path); child spans are
laid out in the order the stages ran. A parent context sent by the client (W3C ``traceparent``
gRPC metadata) is honoured. The tracer provider is the server's own, not the global one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Status, StatusCode

if TYPE_CHECKING:
    from fineserve.server.observe import Outcome, RequestObservation

SERVICE_NAME = "fineserve"


def _resource() -> Resource:
    """The standard resource (OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply), named
    ``fineserve`` only when neither names the service: attributes given to ``Resource.create``
    would override the environment's."""
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    return resource


class RequestTracer:
    """Turns finished requests into spans and hands them to an exporter."""

    def __init__(self, exporter: SpanExporter, *, batch: bool = True) -> None:
        self._provider = TracerProvider(resource=_resource())
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("fineserve.server")

    @classmethod
    def from_setting(cls, tracing: str) -> RequestTracer:
        """``console`` or ``otlp`` (settings have already checked that the package is installed)."""
        exporter: SpanExporter
        if tracing == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        return cls(exporter)

    def record(self, observation: RequestObservation, outcome: Outcome) -> None:
        start = observation.started_unix_ns
        end = start + outcome.duration_ns
        parent = propagate.extract(dict(observation.headers)) if observation.headers else None
        attributes: dict[str, Any] = {
            "fineserve.model": observation.model[:80],
            "fineserve.request_id": observation.request_id,
            "fineserve.items": observation.items,
            "rpc.grpc.status_code_name": outcome.code,
        }
        if observation.version:
            attributes["fineserve.version"] = observation.version
        root = self._tracer.start_span(
            "fineserve.infer",
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=start,
            attributes=attributes,
        )
        if not outcome.ok:
            root.set_status(Status(StatusCode.ERROR, outcome.code))
        inside = trace.set_span_in_context(root)
        cursor = start
        for name, ns in (
            ("preprocess", observation.preprocess_ns),
            ("queue", observation.queue_ns),
            ("inference", observation.inference_ns),
        ):
            if ns:
                stage_end = min(cursor + ns, end)
                self._tracer.start_span(name, context=inside, start_time=cursor).end(end_time=stage_end)
                cursor = stage_end
        root.end(end_time=end)

    def shutdown(self) -> None:
        """Flushes what is buffered and stops the exporter."""
        self._provider.shutdown()
