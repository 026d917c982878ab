"""Helpers for the observability tests: a real Prometheus on loopback, scraping a real fineserve."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fineserve.bench.server_process import free_port
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from tests.fixtures import TINY_IMAGE_SIZE
from tests.tools import binary

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/fineserve.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERTS_TEST = ROOT / "deploy/prometheus/alerts_test.yml"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text: str = page.read().decode()
    return text


def sample_names(exposition: str) -> set[str]:
    """Every series name a /metrics page declares (``x``, ``x_total``, ``x_bucket``, ...), including
    those of labelled families that have no samples yet (e.g. a counter of load failures)."""
    suffixes = {"counter": ("_total",), "info": ("_info",), "histogram": ("_bucket", "_count", "_sum")}
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the Grafana dashboard: panel targets and variable queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names an expression uses (ours, and the process and Python collectors')."""
    return set(re.findall(r"\b((?:fineserve|process|python)_[a-z0-9_]+)\b", expr))


def tensor_request(model: str, images: int, seed: int = 0) -> pb.ClassifyRequest:
    rng = np.random.default_rng(seed)
    pictures = rng.normal(size=(images, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype("<f4")
    return pb.ClassifyRequest(
        model=model,
        images=[
            pb.ImageInput(tensor=pb.Tensor(shape=list(p.shape), fp32_data=p.tobytes())) for p in pictures
        ],
    )


class Prometheus:
    """A real Prometheus process on loopback scraping ``targets`` every second."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "fineserve", "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (workdir / "prometheus.log").open("w")
        self._process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(workdir)

    def _wait_ready(self, workdir: Path) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready in 30 s")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Runs an instant query; returns its vector (raises on a PromQL error)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None when it returns nothing."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, ok: Callable[[float | None], bool], timeout: float = 20) -> float | None:
        deadline = time.monotonic() + timeout
        while True:
            value = self.value(expr)
            if ok(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.25)

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def prometheus_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        started.append(Prometheus(tmp_path_factory.mktemp("prometheus"), targets))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()
