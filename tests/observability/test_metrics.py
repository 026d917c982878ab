"""The /metrics page of a running server: bounded labels, one count per request on every path,
model lifecycle gauges, GPU metrics only with NVML, and every metric documented."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fineserve.server.kserve.tensors import encode_bytes_elements
from fineserve.server.metrics import UNKNOWN, GpuCollector, Metrics
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as kpb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as kpb_grpc
from fineserve.server.threads import thread_cpu
from tests.fixtures import TINY_IMAGE_SIZE
from tests.observability.conftest import (
    ROOT,
    dashboard_expressions,
    metric_names,
    sample_names,
    scrape,
    tensor_request,
)
from tests.server.running import RunningServer

DOCS = ROOT / "docs/observability.md"


@pytest.fixture
def server(tiny_repository: Path) -> Iterator[RunningServer]:
    with RunningServer(tiny_repository, repository_poll_s=0) as running:
        yield running


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, from the server's /metrics page."""
    page = scrape(port)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


def requests_by_labels(port: int) -> dict[tuple[str, str, str], float]:
    """(model, version, code) -> fineserve_requests_total."""
    return {
        (labels["model"], labels["version"], labels["code"]): value
        for (name, frozen), value in samples(port).items()
        if name == "fineserve_requests_total"
        for labels in [dict(frozen)]
    }


def kserve_text(model: str, text: bytes) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model)
    request.inputs.add(name="texts", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_elements([text]))
    return request


def test_client_chosen_names_and_versions_never_become_label_values(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        ours, kserve = pb_grpc.FineserveStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
        for name in ("evil-1", "evil-2", "../etc", "x" * 300):
            with pytest.raises(grpc.RpcError):
                ours.Classify(tensor_request(name, 1))
            with pytest.raises(grpc.RpcError):
                kserve.ModelInfer(kserve_text(name, b"good"))
        with pytest.raises(grpc.RpcError) as err:
            ours.Classify(pb.ClassifyRequest(model="tiny-image", version=987654, images=[]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    counts = requests_by_labels(server.server.metrics_port)
    assert counts == {(UNKNOWN, UNKNOWN, "NOT_FOUND"): 8, ("tiny-image", UNKNOWN, "NOT_FOUND"): 1}
    page = scrape(server.server.metrics_port)
    assert "evil" not in page and "987654" not in page and "etc" not in page


def test_each_request_is_counted_once_on_every_path(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        ours, kserve = pb_grpc.FineserveStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
        ours.Classify(tensor_request("tiny-image", 3))
        ours.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=["good", "bad"]))
        kserve.ModelInfer(kserve_text("tiny-text", b"good"))
        # A stream: one good request and one for a model of the wrong kind of input, both counted.
        answers = list(
            kserve.ModelStreamInfer(
                iter([kserve_text("tiny-text", b"fine"), kserve_text("tiny-image", b"x")])
            )
        )
        assert sorted(bool(a.error_message) for a in answers) == [False, True]
    # The core called directly, without a transport, observes the request itself.
    images = np.zeros((2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.float32)
    server.call(server.server.dataplane.infer("tiny-image", None, {"pixel_values": images}, deadline=None))
    counts = requests_by_labels(server.server.metrics_port)
    assert counts == {
        ("tiny-image", "1", "OK"): 2,
        ("tiny-text", "1", "OK"): 3,
        ("tiny-image", "1", "INVALID_ARGUMENT"): 1,
    }
    values = samples(server.server.metrics_port)

    def value(name: str, **labels: str) -> float:
        return values[(name, frozenset(labels.items()))]

    ok = {"outcome": "ok", "code": "OK"}
    assert value("fineserve_request_items_total", model="tiny-image", version="1", **ok) == 5
    assert value("fineserve_request_items_total", model="tiny-text", version="1", **ok) == 4
    image = {"model": "tiny-image", "version": "1"}
    assert value("fineserve_batch_size_sum", **image) == 5
    assert value("fineserve_request_duration_seconds_count", outcome="ok", **image) == 2
    assert value("fineserve_request_queue_duration_seconds_count", **image) == 2


def test_model_gauges_follow_unload_and_load(server: RunningServer) -> None:
    port = server.server.metrics_port
    before = samples(port)
    text = frozenset({("model", "tiny-text"), ("version", "1")})
    assert before[("fineserve_model_ready", text)] == 1
    assert before[("fineserve_queue_depth", text)] == 0
    assert before[("fineserve_model_load_duration_seconds", text)] > 0
    server.call(server.server.dataplane.unload("tiny-text"))
    after = samples(port)
    assert after[("fineserve_model_loaded_versions", frozenset({("model", "tiny-text")}))] == 0
    assert ("fineserve_model_ready", text) not in after
    assert ("fineserve_queue_depth", text) not in after
    assert not [
        k for k in after if k[0] == "fineserve_model_execution_info" and ("model", "tiny-text") in k[1]
    ]
    server.call(server.server.dataplane.load("tiny-text"))
    assert samples(port)[("fineserve_model_loaded_versions", frozenset({("model", "tiny-text")}))] == 1


def test_cpu_time_is_split_by_thread_role(server: RunningServer) -> None:
    def by_role() -> dict[str, float]:
        return {
            dict(labels)["role"]: value
            for (name, labels), value in samples(server.server.metrics_port).items()
            if name == "fineserve_thread_cpu_seconds_total"
        }

    before = by_role()
    assert set(before) == {"event_loop", "inference", "preprocessing", "grpc", "other"}
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FineserveStub(channel)
        request = tensor_request("tiny-image", 1)
        for _ in range(400):  # /proc counts in clock ticks (10 ms): enough calls to see the loop's
            stub.Classify(request)
    after = by_role()
    assert after["event_loop"] > before["event_loop"]
    assert all(after[role] >= before[role] for role in before)  # a counter
    process = samples(server.server.metrics_port)[("process_cpu_seconds_total", frozenset())]
    assert sum(after.values()) <= process + 0.05
    # The model's batching thread carries its name for the operating system (top -H, py-spy).
    names = {name for name, _ in thread_cpu().values()}
    assert "infer:tiny-imag" in names  # the kernel keeps 15 bytes of a name


def test_process_metrics_are_exported_and_gpu_metrics_only_with_nvml(server: RunningServer) -> None:
    page = scrape(server.server.metrics_port)
    assert "process_resident_memory_bytes" in page and "python_gc_objects_collected_total" in page
    # No NVML here (no nvidia-ml-py, no driver): no GPU metrics, and no error.
    assert "fineserve_gpu" not in page
    assert Metrics().enable_gpu() is False


def test_gpu_collector_reports_each_device_from_nvml() -> None:
    # NVML cannot run here; a stand-in with NVML's call shapes checks the translation to metrics.
    fake: Any = SimpleNamespace(
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=h * 1024, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=h * 10),
    )
    registry = CollectorRegistry()
    registry.register(GpuCollector(fake, [1, 2]))
    page = generate_latest(registry).decode()
    assert 'fineserve_gpu_memory_used_bytes{gpu="1"} 2048.0' in page
    assert 'fineserve_gpu_utilization_ratio{gpu="0"} 0.1' in page
    totals = {
        s.labels["gpu"]: s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == "fineserve_gpu_memory_total_bytes"
    }
    assert totals == {"0": 80 * 2**30, "1": 80 * 2**30}


def documented_metrics() -> set[str]:
    """The metric names in the first column of docs/observability.md's metric tables."""
    return set(re.findall(r"^\| `((?:fineserve|process|python)_[a-z0-9_]+)`", DOCS.read_text(), re.M))


def test_every_exported_metric_is_documented_and_every_documented_one_exported(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.FineserveStub(channel).Classify(tensor_request("tiny-image", 1))
    suffix = {"counter": "_total", "info": "_info"}
    exported = {
        family.name + suffix.get(family.type, "")
        for family in text_string_to_metric_families(scrape(server.server.metrics_port))
        if family.name.startswith("fineserve_")
    }
    documented = {name for name in documented_metrics() if name.startswith("fineserve_")}
    assert exported <= documented, exported - documented
    gpu_only = {
        "fineserve_gpu_memory_used_bytes",
        "fineserve_gpu_memory_total_bytes",
        "fineserve_gpu_utilization_ratio",
    }
    # The supervisor of --workers N exports these (tests/server/test_workers.py).
    supervisor_only = {
        "fineserve_worker_restarts_total",
        "fineserve_workers",
        "fineserve_workers_ready",
        "fineserve_worker_requests_total",
    }
    tls_only = {"fineserve_tls_certificate_expiry_seconds"}  # tests/reliability/test_transport.py
    assert documented - exported == gpu_only | supervisor_only | tls_only


def test_dashboard_parses_and_names_only_metrics_the_server_exports(server: RunningServer) -> None:
    # Without Prometheus too (test_prometheus.py also runs each query through a real one).
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.FineserveStub(channel).Classify(tensor_request("tiny-image", 1))
    exported = sample_names(scrape(server.server.metrics_port))
    exprs = dashboard_expressions()
    assert len(exprs) >= 15
    for expr in exprs:
        assert metric_names(expr), expr
        assert metric_names(expr) <= exported, (expr, metric_names(expr) - exported)
