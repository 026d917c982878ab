"""OpenTelemetry tracing: off by default and then not even imported; on, a request becomes a
server span with preprocess, queue and inference children, under the caller's trace."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from server.config import SettingsError, load_settings
from server.pb.fineserve.v1 import fineserve_pb2 as pb
from server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.observability.conftest import ROOT, tensor_request
from tests.server.running import RunningServer


def test_tracing_off_imports_no_opentelemetry(tiny_repository: Path) -> None:
    # A whole server, started and sent a request, in a fresh interpreter.
    script = f"""
import sys, grpc
from tests.server.running import RunningServer
from tests.observability.conftest import tensor_request
from server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
with RunningServer({str(tiny_repository)!r}) as server, grpc.insecure_channel(server.target) as ch:
    pb_grpc.FineserveStub(ch).Classify(tensor_request("tiny-image", 1))
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_tracing_without_its_package_is_a_clear_startup_error() -> None:
    # The OTLP exporter is not installed here (only the SDK is).
    with pytest.raises(SettingsError, match=r"tracing 'otlp' needs the opentelemetry-exporter-otlp package"):
        load_settings(tracing="otlp")
    result = subprocess.run(
        [sys.executable, "-m", "server", "--tracing", "otlp", "--model-repository", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "fineserve-serve: error: " in result.stderr and "pip install" in result.stderr


def test_a_request_is_traced_through_preprocess_queue_and_inference(tiny_repository: Path) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra (opentelemetry-sdk) is not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from server.tracing import RequestTracer

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
