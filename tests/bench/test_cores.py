"""``fineserve bench cores`` end to end on the near-free model: a real server per worker count,
real load, and the CPU each answered request cost the server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fineserve.bench.__main__ import main as bench_main
from fineserve.bench.nearfree import near_free_graph, publish_near_free_model
from fineserve.export.contract import read_model_spec


def test_the_near_free_model_is_a_published_classifier(tmp_path: Path) -> None:
    version = publish_near_free_model(tmp_path / "models")
    spec = read_model_spec(version)
    assert (spec.name, spec.version, spec.labels) == ("nearfree", 1, ("a", "b", "c", "d"))
    session = ort.InferenceSession(near_free_graph().SerializeToString())
    pixels = np.ones((2, 3, 8, 8), np.float32)
    # The mean of each channel (1.0) times the weights' rows summed: 0+4+8, 1+5+9, ...
    np.testing.assert_allclose(session.run(None, {"pixel_values": pixels})[0], [[12, 15, 18, 21]] * 2)


def test_cores_sweeps_workers_and_concurrency(tmp_path: Path) -> None:
    out = tmp_path / "cores.json"
    args = ["cores", "--workers", "1,2", "--concurrency", "1,4", "--seconds", "0.5", "--warmup", "0.1"]
    assert bench_main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workers"], r["concurrency"]) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for row in rows:
        assert set(row["codes"]) == {"OK"} and row["requests_ok"] > 0, row
        assert row["server_cpu_us_per_request"] > 0
        assert row["server_cores"] == sorted(os.sched_getaffinity(0))


def test_cores_sends_encoded_images_with_kind_bytes(tmp_path: Path) -> None:
    out = tmp_path / "jpegs.json"
    args = ["cores", "--kind", "bytes", "--workers", "1", "--concurrency", "2", "--seconds", "0.5"]
    assert bench_main([*args, "--warmup", "0.1", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["kind"] == "bytes" and set(row["codes"]) == {"OK"} and row["requests_ok"] > 0


def test_cores_pinned_puts_the_server_and_the_load_on_their_own_cores(tmp_path: Path) -> None:
    out = tmp_path / "pinned.json"
    before = os.sched_getaffinity(0)
    args = ["cores", "--pinned", "--concurrency", "2", "--seconds", "0.5", "--warmup", "0.1"]
    assert bench_main([*args, "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["pinned"] and row["requests_per_s_per_server_core"] == row["items_per_s"] > 0
    assert row["server_cores"] == [max(before)]  # the server ran on the last core only
    # The load ran on one core; this process has all of its cores back, on every thread.
    for task in Path("/proc/self/task").iterdir():
        assert os.sched_getaffinity(int(task.name)) == before
