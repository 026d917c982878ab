"""``fineserve bench floor`` end to end: the two bare gRPC servers and the real server answer the
same load, and every row carries the server's measured CPU per request."""

from __future__ import annotations

import json
from pathlib import Path

from fineserve.bench.__main__ import main as bench_main
from tests.fixtures import publish_tiny_image_model


def test_floor_measures_bare_grpc_and_the_server(tmp_path: Path) -> None:
    publish_tiny_image_model(tmp_path / "models")
    out = tmp_path / "floor.json"
    args = ["floor", "--model-dir", str(tmp_path / "models" / "tiny-image" / "1")]
    args += ["--concurrency", "2", "--seconds", "0.5", "--warmup", "0.1", "--json", str(out)]

    assert bench_main(args) == 0

    rows = json.loads(out.read_text())["rows"]
    assert [row["server"] for row in rows] == ["grpc.aio", "grpc-sync", "fineserve"]
    for row in rows:
        assert set(row["codes"]) == {"OK"}, row
        assert row["requests_ok"] > 0
        # Measured from /proc: a server that answered requests used some CPU to do it.
        assert row["server_cpu_us_per_request"] > 0


def test_floor_refuses_a_missing_model_dir() -> None:
    assert bench_main(["floor", "--model-dir", "/nonexistent/1", "--seconds", "1"]) == 2
