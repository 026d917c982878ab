"""``python -m fineserve.server`` as a process: startup, metrics over HTTP, graceful SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.fixtures import TINY_IMAGE_SIZE
from tests.reliability.certs import make_pki
from tests.server.kserve_harness import running_server

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_turns_health_not_serving_and_lets_in_flight_requests_finish(tiny_repository: Path) -> None:
    # The open Watch stream is itself an in-flight call: it holds shutdown for the whole grace.
    flags = ("--grpc-host", "localhost", "--max-queue-delay-ms", "1500", "--shutdown-grace-s", "2")
    with running_server(tiny_repository, *flags) as server:
        server.wait_for("server ready: SERVING")
        with grpc.insecure_channel(server.url) as channel:
            statuses: list[int] = []
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            watcher = threading.Thread(target=_collect, args=(watch, statuses), daemon=True)
            watcher.start()
            stub = pb_grpc.FineserveStub(channel)
            image = np.zeros((3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), "<f4")
            request = pb.ClassifyRequest(
                model="tiny-image",
                images=[pb.ImageInput(tensor=pb.Tensor(shape=[3, 8, 8], fp32_data=image.tobytes()))],
            )
            in_flight = stub.Classify.future(request, timeout=20)  # waits 1.5 s for company
            time.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            reply = in_flight.result(timeout=20)
            assert len(reply.results) == 1
            assert server.process.wait(timeout=20) == 0
            watcher.join(5)
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        server.wait_for("server stopped")
        log = "\n".join(server.log)
        assert "shutting down: health NOT_SERVING" in log
        assert "Traceback" not in log


def _collect(watch: Iterator[health_pb2.HealthCheckResponse], statuses: list[int]) -> None:
    # The server cancels the stream when the grace period ends.
    with contextlib.suppress(grpc.RpcError):
        statuses.extend(reply.status for reply in watch)


def test_metrics_are_served_over_http(tiny_repository: Path) -> None:
    with running_server(tiny_repository, "--grpc-host", "localhost", "--metrics-port", "0") as server:
        metrics_port = int(server.wait_for(r"metrics on http://[^:]+:(\d+)/")[1])
        server.wait_for("server ready")
        with grpc.insecure_channel(server.url) as channel:
            stub = pb_grpc.FineserveStub(channel)
            stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=["good", "bad"]))
        with urllib.request.urlopen(f"http://localhost:{metrics_port}/metrics", timeout=5) as page:
            text = page.read().decode()
        assert 'fineserve_requests_total{code="OK",model="tiny-text",outcome="ok",version="1"} 1.0' in text
        assert 'fineserve_execution_info{device="auto",provider="CPUExecutionProvider"} 1.0' in text
        assert 'fineserve_queue_depth{model="tiny-image",version="1"} 0.0' in text
        assert "fineserve_batch_size_bucket" in text
        # device=auto without CUDA: said in the log, not silent.
        assert "CUDA execution provider not available" in "\n".join(server.log)


def test_a_bad_flag_exits_2_with_a_one_line_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fineserve.server", "--max-batch-size", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fineserve serve: error: max_batch_size: Input should be greater than or equal to 1"
    ]


def test_a_missing_repository_exits_1_with_a_one_line_message(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "fineserve.server",
        "--model-repository",
        str(tmp_path / "nope"),
        "--grpc-port",
        "0",
    ]
    result = subprocess.run([*command, "--metrics-port", "-1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"fineserve serve: error: model repository {tmp_path / 'nope'} is not a folder"
    )


def test_cuda_asked_for_but_unavailable_is_an_error_never_a_silent_fallback(tiny_repository: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    command = [
        sys.executable,
        "-m",
        "fineserve.server",
        "--model-repository",
        str(tiny_repository),
        "--device",
        "cuda",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("fineserve serve: error: device=cuda but onnxruntime")
    )


def serve_and_fail(tiny_repository: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fineserve.server", "--model-repository", str(tiny_repository), *flags]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_a_port_in_use_is_one_line_naming_the_settings(tiny_repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_busy = serve_and_fail(tiny_repository, "--grpc-host", "127.0.0.1", "--grpc-port", str(port))
        metrics_busy = serve_and_fail(
            tiny_repository, "--grpc-port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", str(port)
        )
    assert grpc_busy.returncode == 1
    assert grpc_busy.stderr.strip().splitlines()[-1] == (
        f"fineserve serve: error: cannot bind gRPC to 127.0.0.1:{port} (grpc_host, grpc_port): the port is "
        "in use, or the address is not one of this host's"
    )
    assert "Traceback" not in grpc_busy.stderr
    assert metrics_busy.returncode == 1 and "Traceback" not in metrics_busy.stderr
    assert (
        metrics_busy.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"fineserve serve: error: cannot serve metrics on 127.0.0.1:{port} (metrics_host, metrics_port):"
        )
    )


def test_unusable_tls_files_are_one_line_before_anything_binds(tiny_repository: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = {
        "are not a PEM certificate and its unencrypted private key": [
            "--tls-cert-file", str(junk), "--tls-key-file", str(pki.server_key),
        ],
        "KEY_VALUES_MISMATCH": [
            "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.client_key),
        ],
        "is not PEM CA certificates": [
            "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
            "--tls-client-ca-file", str(junk),
        ],
    }  # fmt: skip
    for words, flags in cases.items():
        result = serve_and_fail(tiny_repository, "--grpc-port", "0", "--metrics-port", "-1", *flags)
        assert result.returncode == 2, result.stderr
        [line] = [x for x in result.stderr.strip().splitlines() if "error" in x]
        assert line.startswith("fineserve serve: error: tls_") and words in line, line
        assert "Traceback" not in result.stderr
