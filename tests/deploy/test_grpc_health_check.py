"""The container's HEALTHCHECK script against a real server: 0 when SERVING, 1 otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2

from fineserve.bench.server_process import free_port
from tests.server.running import RunningServer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker" / "grpc_health_check.py"


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs the script as Docker does: a fresh process, the address from the environment."""
    return subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serving_server_is_healthy_and_not_serving_is_not(tiny_repository: Path) -> None:
    with RunningServer(tiny_repository, grpc_host="127.0.0.1") as running:
        port = str(running.server.grpc_port)
        healthy = _check({"FINESERVE_GRPC_PORT": port})
        assert healthy.returncode == 0, healthy.stderr
        # What the server reports while models load or on shutdown.
        running.call(running.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
        draining = _check({"FINESERVE_GRPC_PORT": port})
        assert draining.returncode == 1
        assert "NOT_SERVING" in draining.stderr


def test_nothing_listening_is_unhealthy_without_hanging() -> None:
    done = _check({"FINESERVE_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr
