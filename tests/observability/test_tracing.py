"""OpenTelemetry tracing: off by default and then not even imported; on, a request becomes a
server span with preprocess, queue and inference children, under the caller's trace."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from fineserve.server.config import SettingsError, load_settings
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.observability.conftest import ROOT, tensor_request
from tests.server.running import RunningServer


def test_tracing_off_imports_no_opentelemetry(tiny_repository: Path) -> None:
    # A whole server, started and sent a request, in a fresh interpreter.
    script = f"""
import sys, grpc
from tests.server.running import RunningServer
from tests.observability.conftest import tensor_request
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
with RunningServer({str(tiny_repository)!r}) as server, grpc.insecure_channel(server.target) as ch:
    pb_grpc.FineserveStub(ch).Classify(tensor_request("tiny-image", 1))
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_tracing_without_its_package_is_a_clear_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a machine without the otel extra: the exporter's package cannot be found.
    missing = {"opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc"}
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name in missing else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(
        SettingsError, match=r"tracing 'otlp' needs the opentelemetry-exporter-otlp-proto-grpc"
    ):
        load_settings(tracing="otlp")
    with pytest.raises(SettingsError, match=r"tracing 'console' needs the opentelemetry-sdk package"):
        load_settings(tracing="console")
    # The CLI turns it into one line and exit code 2.
    script = (
        "import importlib.util, sys; importlib.util.find_spec = lambda name, package=None: None; "
        "from fineserve.server.__main__ import main; "
        "sys.exit(main(['--tracing', 'otlp', '--model-repository', '.']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fineserve serve: error: ")
    assert "pip install 'fineserve[otel]'" in result.stderr


def test_a_request_is_traced_through_preprocess_queue_and_inference(tiny_repository: Path) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra (opentelemetry-sdk) is not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from fineserve.server.tracing import RequestTracer

    exporter = InMemorySpanExporter()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with RunningServer(tiny_repository) as server, grpc.insecure_channel(server.target) as channel:
        server.server.dataplane.telemetry.tracer = RequestTracer(exporter, batch=False)
        stub = pb_grpc.FineserveStub(channel)
        stub.Classify(
            tensor_request("tiny-image", 2),
            metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01"), ("x-request-id", "trace-me")],
        )
        with pytest.raises(grpc.RpcError):
            stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-image", texts=["x"]))
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "fineserve.infer"]
    assert len(roots) == 2
    ok, failed = roots
    assert ok.kind == SpanKind.SERVER
    assert f"{ok.context.trace_id:032x}" == trace_id and f"{ok.parent.span_id:016x}" == parent_id
    assert dict(ok.attributes) == {
        "fineserve.model": "tiny-image",
        "fineserve.version": 1,
        "fineserve.request_id": "trace-me",
        "fineserve.items": 2,
        "rpc.grpc.status_code_name": "OK",
    }
    children = [s for s in spans if s.parent is not None and s.parent.span_id == ok.context.span_id]
    assert [s.name for s in children] == ["preprocess", "queue", "inference"]
    assert ok.start_time <= children[0].start_time
    for before, after in itertools.pairwise(children):
        assert before.end_time <= after.start_time
    assert children[-1].end_time <= ok.end_time
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["rpc.grpc.status_code_name"] == "INVALID_ARGUMENT"
    assert failed.parent is None  # no traceparent sent: a new trace


class _TraceReceiver:
    """A minimal OTLP/gRPC trace receiver: what a collector would get, kept in memory."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.requests: list[Any] = []
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the proto's name)
                receiver.requests.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def spans(self) -> list[Any]:
        return [
            span
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


def test_spans_reach_an_otlp_receiver_over_grpc(tiny_repository: Path) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc", reason="the otel extra is not installed")
    from tests.server.kserve_harness import running_server

    receiver = _TraceReceiver()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export soon after the request
        "OTEL_SERVICE_NAME": "fineserve-under-test",
    }
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    try:
        with running_server(tiny_repository, "--tracing", "otlp", env=env) as server:
            server.wait_for("server ready")
            with grpc.insecure_channel(server.url) as channel:
                pb_grpc.FineserveStub(channel).Classify(
                    tensor_request("tiny-image", 1),
                    metadata=[("traceparent", f"00-{trace_id}-b7ad6b7169203331-01")],
                    timeout=10,
                )
            deadline = time.monotonic() + 20
            while len(receiver.spans()) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        receiver.server.stop(None)
    spans = receiver.spans()
    assert sorted(s.name for s in spans) == ["fineserve.infer", "inference", "preprocess", "queue"]
    assert {s.trace_id.hex() for s in spans} == {trace_id}
    [root] = [s for s in spans if s.name == "fineserve.infer"]
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["fineserve.model"].string_value == "tiny-image"
    assert attributes["rpc.grpc.status_code_name"].string_value == "OK"
    resource = {
        a.key: a.value.string_value for a in receiver.requests[0].resource_spans[0].resource.attributes
    }
    assert resource["service.name"] == "fineserve-under-test"


def test_the_service_is_named_fineserve_unless_the_environment_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra (opentelemetry-sdk) is not installed")
    from fineserve.server.tracing import _resource

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert _resource().attributes["service.name"] == "fineserve"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,deployment.environment=prod")
    assert _resource().attributes["service.name"] == "from-attributes"
    assert _resource().attributes["deployment.environment"] == "prod"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-service-name")
    assert _resource().attributes["service.name"] == "from-service-name"
