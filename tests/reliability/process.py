"""Measuring a server process from the outside: resident memory, waiting for readiness."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def wait_serving(channel: grpc.Channel, timeout_s: float = 60) -> None:
    """Waits until the standard health service says SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not SERVING after {timeout_s} s")
