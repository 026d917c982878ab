"""A real Prometheus scrapes a real fineserve: what it stores must agree with the traffic sent.

Known traffic: 20 two-image Classify requests that each wait out a 50 ms batching delay (so every
server-side latency is over 50 ms and each batch holds exactly 2 rows), 5 successful texts, 4
requests of the wrong task and 3 for a model that does not exist. A version whose graph is
broken fails to load. Then the counts, quantiles and the dashboard's queries are checked through
Prometheus' HTTP query API.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fineserve.server.metrics import LATENCY_BUCKETS
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.fixtures import publish_tiny_image_model, publish_tiny_text_model
from tests.observability.conftest import (
    DASHBOARD,
    Prometheus,
    dashboard_expressions,
    metric_names,
    sample_names,
    scrape,
    tensor_request,
)
from tests.server.running import RunningServer
from tests.tools import binary

QUEUE_DELAY_S = 0.05
SUCCESSES, IMAGES_PER_REQUEST = 20, 2
TEXT_SUCCESSES, WRONG_TASK, UNKNOWN_MODEL = 5, 4, 3
TOTAL = SUCCESSES + TEXT_SUCCESSES + WRONG_TASK + UNKNOWN_MODEL


@dataclass
class Observed:
    server: RunningServer
    prometheus: Prometheus
    client_latencies: list[float]  # seconds, of the 20 image requests


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory, prometheus_factory: Callable[[list[str]], Prometheus]
) -> Iterator[Observed]:
    binary("prometheus")  # skip early, before starting the server, when it is not installed
    repository = tmp_path_factory.mktemp("repo") / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    broken = publish_tiny_image_model(repository, name="broken")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    # Every request sits out the whole delay (not only while others are on their way).
    server = RunningServer(
        repository,
        repository_poll_s=0,
        batching={"tiny-image": {"max_queue_delay_ms": QUEUE_DELAY_S * 1000}},
        batch_wait="fixed",
    )
    try:
        prometheus = prometheus_factory([f"127.0.0.1:{server.server.metrics_port}"])
        latencies = send_known_traffic(server.target)
        # Counters are read raw (they started at 0 with the server): wait for a scrape with all of it.
        seen = prometheus.wait_for('sum(fineserve_requests_total{job="fineserve"})', lambda v: v == TOTAL)
        assert seen == TOTAL
        yield Observed(server, prometheus, latencies)
    finally:
        server.stop()


def send_known_traffic(target: str) -> list[float]:
    latencies = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FineserveStub(channel)
        for i in range(SUCCESSES):
            request = tensor_request("tiny-image", IMAGES_PER_REQUEST, seed=i)
            started = time.perf_counter()
            stub.Classify(request, timeout=10)
            latencies.append(time.perf_counter() - started)
        for _ in range(TEXT_SUCCESSES):
            stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=["a good movie"]))
        for _ in range(WRONG_TASK):
            with pytest.raises(grpc.RpcError) as err:
                stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-image", texts=["x"]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(UNKNOWN_MODEL):
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(tensor_request("no-such-model", 1))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    return latencies


def test_request_and_item_counts_match_the_traffic(observed: Observed) -> None:
    value = observed.prometheus.value
    assert value('up{job="fineserve"}') == 1
    image = 'model="tiny-image",version="1"'
    assert value(f'fineserve_requests_total{{{image},outcome="ok",code="OK"}}') == SUCCESSES
    assert value(f'fineserve_requests_total{{{image},outcome="error",code="INVALID_ARGUMENT"}}') == WRONG_TASK
    assert value('fineserve_requests_total{model="tiny-text",code="OK"}') == TEXT_SUCCESSES
    assert value(f'fineserve_request_items_total{{{image},outcome="ok"}}') == SUCCESSES * IMAGES_PER_REQUEST
    # The unknown name is counted under the placeholder; it never becomes a label value.
    unknown = 'model="_unknown",version="_unknown",outcome="error",code="NOT_FOUND"'
    assert value(f"fineserve_requests_total{{{unknown}}}") == UNKNOWN_MODEL
    assert value(f"fineserve_request_items_total{{{unknown}}}") == UNKNOWN_MODEL
    assert observed.prometheus.query('{model="no-such-model"}') == []
    # One batch of exactly 2 rows per sequential request; every stage observed once per request.
    assert value(f"fineserve_batch_size_count{{{image}}}") == SUCCESSES
    assert value(f"fineserve_batch_size_sum{{{image}}}") == SUCCESSES * IMAGES_PER_REQUEST
    assert value(f"fineserve_batch_inference_duration_seconds_count{{{image}}}") == SUCCESSES
    assert value(f"fineserve_request_preprocess_duration_seconds_count{{{image}}}") == SUCCESSES
    assert value(f'fineserve_request_duration_seconds_count{{{image},outcome="error"}}') == WRONG_TASK


def test_latency_quantiles_agree_with_the_traffic(observed: Observed) -> None:
    client = sorted(observed.client_latencies)
    for q in (0.5, 0.95, 0.99):
        # Every server-side latency is above the batching delay and below its client-side latency,
        # so the q-quantile Prometheus interpolates lies between the delay and the top of the
        # bucket holding the client's q-quantile (same rank rule as histogram_quantile).
        client_q = client[math.ceil(q * len(client)) - 1]
        upper = LATENCY_BUCKETS[bisect.bisect_left(LATENCY_BUCKETS, client_q)]
        for metric in ("fineserve_request_duration_seconds", "fineserve_request_queue_duration_seconds"):
            outcome = ',outcome="ok"' if metric == "fineserve_request_duration_seconds" else ""
            expr = f'histogram_quantile({q}, sum by (le) ({metric}_bucket{{model="tiny-image"{outcome}}}))'
            server_q = observed.prometheus.value(expr)
            assert server_q is not None and QUEUE_DELAY_S <= server_q <= upper, (
                metric,
                q,
                server_q,
                client_q,
            )
    batch_p50 = observed.prometheus.value(
        'histogram_quantile(0.5, sum by (le) (fineserve_batch_size_bucket{model="tiny-image"}))'
    )
    assert batch_p50 is not None and 1 < batch_p50 <= IMAGES_PER_REQUEST


def test_model_gauges_show_loaded_and_failed_models(observed: Observed) -> None:
    value = observed.prometheus.value
    assert value('fineserve_model_loaded_versions{model="tiny-image"}') == 1
    assert value('fineserve_model_loaded_versions{model="broken"}') == 0
    assert value('fineserve_model_load_failures_total{model="broken"}') == 1
    assert value('fineserve_model_ready{model="tiny-text",version="1"}') == 1
    load = value('fineserve_model_load_duration_seconds{model="tiny-image",version="1"}')
    assert load is not None and 0 < load < 30
    info = observed.prometheus.query('fineserve_model_execution_info{model="tiny-image"}')
    assert [(r["metric"]["provider"], r["metric"]["variant"]) for r in info] == [
        ("CPUExecutionProvider", "fp32")
    ]
    assert value('fineserve_execution_info{provider="CPUExecutionProvider"}') == 1
    assert value('fineserve_queue_capacity{model="tiny-image",version="1"}') == 128
    assert value('fineserve_queue_depth{model="tiny-image",version="1"}') == 0
    assert value('fineserve_inflight_requests{model="tiny-image",version="1"}') == 0
    resident = value('process_resident_memory_bytes{job="fineserve"}')
    assert resident is not None and resident > 0


def as_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in as 'All' and a short window."""
    expr = expr.replace("$__rate_interval", "20s").replace("$job", ".*").replace("$model", ".*")
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", expr)
    return f"group by ({match[2]}) ({match[1]})" if match else expr


def test_every_dashboard_query_names_exported_metrics_and_returns_data(observed: Observed) -> None:
    exprs = dashboard_expressions()
    assert len(exprs) >= 15
    exported = sample_names(scrape(observed.server.server.metrics_port))
    # rate() needs two scrapes of a series.
    observed.prometheus.wait_for("sum(rate(fineserve_requests_total[20s]))", lambda v: v is not None)
    for expr in exprs:
        named = metric_names(expr)
        assert named, expr
        assert named <= exported, (expr, named - exported)
        # Prometheus parses it, and over the known traffic it has data to show.
        assert observed.prometheus.query(as_query(expr)), expr


def test_dashboard_file_is_grafana_json() -> None:
    dashboard = json.loads(Path(DASHBOARD).read_text())
    assert dashboard["uid"] == "fineserve"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "queue", "batch size", "errors", "loaded", "provider"):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
