"""Smoke tests of the benchmark code on the tiny models: it runs, and writes what it says.

Benchmarks are not tests: nothing here asserts a speed, only that every figure is produced.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fineserve.bench import loadgen, raw_ort, suite
from fineserve.bench.__main__ import main as bench_main
from fineserve.bench.server_process import free_port


def test_suite_writes_every_figure_tables_and_plots(tiny_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["--model-repository", str(tiny_repository), "--models", "tiny-image,tiny-text"]
    args += ["--seconds", "0.1", "--warmup", "0", "--concurrency", "1,4", "--batch-sizes", "1,2"]
    assert suite.main([*args, "--rounds", "2", "--out", str(out)]) == 0

    results = json.loads((out / "suite.json").read_text())
    assert results["server"]["seconds_to_serving"] > 0
    assert results["server"]["idle_rss_mb"] > 0
    assert results["server"]["peak_rss_under_load_mb"] > 0
    for name in ("tiny-image", "tiny-text"):
        model = results["models"][name]
        assert [r["batch"] for r in model["raw"]] == [1, 2]
        # Instances as the server measured them at load; raw runs as many side by side.
        instances = model["threads"]["instances"]
        assert instances in (1, 2)
        assert [r["callers"] for r in model["raw"]] == [instances, instances]
        assert [r["items_per_request"] for r in model["items_per_request"]] == [1, 2]
        assert {r["concurrency"] for r in model["items_per_request"]} == {2 * instances}
        for kind in ("tensor", "bytes"):
            rows = model["concurrency"][kind]
            assert [r["concurrency"] for r in rows] == [1, 4]
            assert all(r["codes"].get("OK", 0) > 0 for r in rows), rows
            assert set(model["batching"][kind]) == {"on", "off"}
        assert model["saturation"]["ratio"] > 0
        assert model["preprocessing"]["items_per_s"] > 0
        assert len(model["latency_c1"]["rounds"]) == 2
        assert model["latency_c1"]["empty_rpc_p50_ms"] > 0
        assert model["latency_c1"]["server_stages"]["compute_infer_ms"] > 0
        assert len(model["saturation"]["rounds"]) == 2
        # Where one request's CPU went at that point, by server thread role, and the client's.
        budget = model["saturation"]["cpu_ms_per_request"]
        assert set(budget) == {"event_loop", "inference", "preprocessing", "grpc", "other"}
        assert all(ms >= 0 for ms in budget.values())
        assert model["saturation"]["client_cpu_ms_per_request"] >= 0
        # The same point with the inputs in shared memory: served, every request answered.
        in_shm = model["saturation_shared_memory"]
        assert in_shm["served_at"] == model["saturation"]["served_at"]
        assert len(in_shm["rounds"]) == 2 and all(r["served_items_per_s"] > 0 for r in in_shm["rounds"])
        assert len(model["batching"]["tensor"]["on"]["rounds"]) == 2
        for plot in ("concurrency", "batch"):
            assert (out / f"suite-{name}-{plot}.png").read_bytes().startswith(b"\x89PNG")
    tables = (out / "suite.md").read_text()
    assert "process start to health SERVING" in tables
    assert "as the server measured them at load" in tables
    assert tables.count("| served at saturation >=") == 2
    assert tables.count("inputs in system shared memory") == 2
    assert tables.count("of the CPU spent") == 6  # three saturation points per model
    assert "fineserve bench suite --model-repository" in tables  # the command that made them


def test_load_and_raw_commands_run_on_a_tiny_model(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = tiny_repository / "tiny-text" / "1"
    raw_json = tmp_path / "raw.json"
    assert (
        raw_ort.main(
            ["--model-dir", str(version), "--batch-sizes", "1,3", "--seconds", "0.1", "--json", str(raw_json)]
        )
        == 0
    )
    assert [r["batch"] for r in json.loads(raw_json.read_text())["rows"]] == [1, 3]
    gaps = ["--model-dir", str(version), "--batch-sizes", "1", "--seconds", "0.1", "--gap-ms", "1"]
    assert raw_ort.main([*gaps, "--no-spinning", "--json", str(raw_json)]) == 0
    [row] = json.loads(raw_json.read_text())["rows"]
    assert row["cpu_ms_per_run"] > 0
    # Idle gaps slow the loop down: far fewer than 0.1 s / 1 ms runs fit.
    assert row["runs"] < 100
    # No server there: the first call fails fast with a one-line error, not a traceback.
    port = free_port()
    code = loadgen.main(
        [
            "--target",
            f"127.0.0.1:{port}",
            "--model-dir",
            str(version),
            "--seconds",
            "0.1",
            "--warmup",
            "0",
            "--timeout",
            "1",
        ]
    )
    assert code == 1
    assert "error: 127.0.0.1" in capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(tiny_repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        loadgen.main(["--target", "10.0.0.1:8001", "--model-dir", str(tiny_repository / "tiny-text" / "1")])
    assert exited.value.code == 2
    assert "loopback" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main(["--model-repository", str(tiny_repository), "--models", "nope"])
    assert "not in" in capsys.readouterr().err
    assert bench_main(["nope"]) == 2


def test_startup_reports_seconds_to_serving(tiny_repository: Path, tmp_path: Path) -> None:
    from fineserve.bench import startup

    out = tmp_path / "startup.json"
    assert startup.main(["--model-repository", str(tiny_repository), "--runs", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["models"] == ["tiny-image", "tiny-text"]
    assert result["seconds_to_serving"] > 0 and result["idle_rss_mb"] > 0


def test_stream_compares_unary_calls_with_an_open_stream(tiny_repository: Path, tmp_path: Path) -> None:
    from fineserve.bench import stream_compare

    out = tmp_path / "stream.json"
    args = ["--model-repository", str(tiny_repository), "--model", "tiny-image", "--concurrency", "1,4"]
    assert stream_compare.main([*args, "--rounds", "1", "--seconds", "0.2", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"kserve c=1", "kserve-stream c=1", "kserve c=4", "kserve-stream c=4"}
    assert all(figures["items_per_s"] > 0 for figures in summary.values())


def test_suite_with_instances_runs_raw_side_by_side_the_same(tiny_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["--model-repository", str(tiny_repository), "--models", "tiny-image", "--skip-bytes"]
    args += ["--seconds", "0.1", "--warmup", "0", "--concurrency", "1", "--batch-sizes", "1,2"]
    assert suite.main([*args, "--rounds", "1", "--instances", "2", "--threads", "1", "--out", str(out)]) == 0

    results = json.loads((out / "suite.json").read_text())
    assert results["threads"]["instances"] == 2
    assert {"--instances=2", "--intra-op-threads=1"} <= set(results["server"]["flags"])
    model = results["models"]["tiny-image"]
    assert [r["callers"] for r in model["raw"]] == [2, 2]
    # One request at a time is compared with one raw run at a time.
    assert model["latency_c1"]["rounds"][0]["raw_p50_ms"] > 0
    assert [r["callers"] for r in model["raw_one_run_all_cores"]] == [1, 1]
    assert "2 instance(s) = raw runs side by side" in (out / "suite.md").read_text()


def test_suite_runs_against_a_server_with_worker_processes(tiny_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["--model-repository", str(tiny_repository), "--models", "tiny-image", "--skip-bytes"]
    args += ["--seconds", "0.1", "--warmup", "0", "--concurrency", "1,4", "--batch-sizes", "1"]
    assert suite.main([*args, "--rounds", "1", "--workers", "2", "--out", str(out)]) == 0

    results = json.loads((out / "suite.json").read_text())
    assert results["workers"] == "2" and "--workers=2" in results["server"]["flags"]
    model = results["models"]["tiny-image"]
    assert all(set(r["codes"]) == {"OK"} for r in model["concurrency"]["tensor"]), model["concurrency"]
    # Spread over connections (so over both workers): as many as requests in flight, up to 8.
    assert [r["connections"] for r in model["concurrency"]["tensor"]] == [1, 4]
    # The server's CPU is its workers' (the supervisor only watches): the event loops did the work.
    assert model["saturation"]["cpu_ms_per_request"]["event_loop"] > 0


def test_raw_runs_side_by_side_count_every_run(tiny_repository: Path) -> None:
    from fineserve.bench.inputs import tensor_batch
    from fineserve.export.contract import read_model_spec

    version = tiny_repository / "tiny-image" / "1"
    spec = read_model_spec(version)
    session = raw_ort.make_session(version / "model.onnx", "cpu", 1, 1)
    row = raw_ort.measure(session, tensor_batch(spec, 2, version_dir=version), 0.2, callers=3)
    assert row["callers"] == 3
    assert row["runs"] > 3
    assert row["items_per_s"] > 0
    with pytest.raises(ValueError, match="one caller"):
        raw_ort.measure(session, tensor_batch(spec, 2, version_dir=version), 0.1, gap_s=0.001, callers=2)


def test_load_with_inputs_in_shared_memory(tiny_repository: Path, tmp_path: Path) -> None:
    from fineserve.bench.server_process import ServerProcess

    version = tiny_repository / "tiny-text" / "1"  # two inputs: two places in one region
    out = tmp_path / "load.json"
    args = ["--model-dir", str(version), "--seconds", "0.3", "--warmup", "0", "--concurrency", "2"]
    args += ["--items", "3", "--shared-memory", "--json", str(out)]
    before = set(Path("/dev/shm").iterdir())
    flags = ["--system-shared-memory", "--log-level=WARNING"]
    with ServerProcess(tiny_repository, flags, tmp_path / "server.log", grpc_port=free_port()) as server:
        server.start()
        assert loadgen.main(["--target", server.target, *args]) == 0
    result = json.loads(out.read_text())
    assert result["shared_memory"] is True
    assert result["requests_ok"] > 0 and set(result["codes"]) == {"OK"}
    # A server without shared memory refuses the region: a one-line error, nothing left behind.
    quiet = ["--log-level=WARNING"]
    with ServerProcess(tiny_repository, quiet, tmp_path / "plain.log", grpc_port=free_port()) as plain:
        plain.start()
        assert loadgen.main(["--target", plain.target, *args]) == 1
    assert set(Path("/dev/shm").iterdir()) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["raw", "--batch-sizes", "a,b"], "expected comma-separated integers, got 'a,b'"),
        (["raw", "--batch-sizes", "0"], "expected positive integers, got '0'"),
        (["raw", "--seconds", "0"], r"expected seconds in \(0, 3600\], got '0'"),
        (["raw", "--intra-threads", "-2"], "--intra-threads and --inter-threads must be >= 0"),
        (["suite", "--concurrency", "1,-4"], "expected positive integers, got '1,-4'"),
        (["suite", "--workers", "0"], "--workers must be a positive number or auto, not '0'"),
        (["startup", "--runs", "0"], "--runs must be >= 1"),
        (["newcomer", "--repo", "/nonexistent"], "--repo /nonexistent: not a git checkout"),
        (
            ["newcomer", "--json", "/nonexistent/n.json"],
            "--json /nonexistent/n.json: folder /nonexistent does not",
        ),
    ],
)
def test_bad_arguments_are_one_error_line_and_exit_2(
    tiny_repository: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    if args[0] == "raw":
        args = [*args, "--model-dir", str(tiny_repository / "tiny-image" / "1")]
    with pytest.raises(SystemExit) as exited:
        bench_main(args)
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), errors


def test_a_graph_onnxruntime_cannot_load_is_one_error_line(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = tmp_path / "tiny-image" / "1"
    shutil.copytree(tiny_repository / "tiny-image" / "1", version)
    (version / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(SystemExit) as exited:
        bench_main(["raw", "--model-dir", str(version), "--batch-sizes", "1", "--seconds", "0.1"])
    assert exited.value.code == 2
    assert "model.onnx: onnxruntime cannot load it (InvalidProtobuf)" in capsys.readouterr().err


def test_the_measured_window_opens_after_the_warmup(tiny_repository: Path, tmp_path: Path) -> None:
    """CPU counters are read when the window opens, so the warmup's work is not charged to it."""
    import asyncio
    import time

    from fineserve.bench.server_process import ServerProcess
    from fineserve.export.contract import read_model_spec

    version = tiny_repository / "tiny-image" / "1"
    load = loadgen.Load(items=1, concurrency=2, seconds=0.2, warmup_s=0.4, version_dir=version)
    opened: list[float] = []
    quiet = ["--log-level=WARNING"]
    with ServerProcess(tiny_repository, quiet, tmp_path / "server.log", grpc_port=free_port()) as server:
        server.start()
        started = time.perf_counter()
        result = asyncio.run(
            loadgen.run_load(
                server.target,
                read_model_spec(version),
                load,
                on_window=lambda: opened.append(time.perf_counter()),
            )
        )
    assert len(opened) == 1 and opened[0] - started >= 0.4
    assert result["requests_ok"] > 0


def test_newcomer_reports_what_export_published_for_each_model(tiny_repository: Path) -> None:
    from fineserve.bench.newcomer import published_models
    from tests.fixtures import publish_tiny_image_model

    publish_tiny_image_model(tiny_repository, version=2)
    models = published_models(tiny_repository)
    assert set(models) == {"tiny-image", "tiny-text"}
    assert models["tiny-image"]["version"] == 2  # the newest version
    fp32 = models["tiny-image"]["variants"]["fp32"]
    assert fp32["size_bytes"] == (tiny_repository / "tiny-image" / "2" / "model.onnx").stat().st_size
