"""The real server as a subprocess on loopback: start it, time it to SERVING, watch its memory and CPU.

The benchmarks drive ``python -m fineserve.server`` exactly as a user would run it, so the figures include
everything the server really does (gRPC, health, metrics, the repository poll).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fineserve.server.threads import RoleCpu

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of a live process now, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * _PAGE


def wait_serving(channel: grpc.Channel, timeout_s: float = 60) -> None:
    """Waits until the standard health service on ``channel`` says SERVING.

    Raises:
        TimeoutError: not SERVING within ``timeout_s``.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.05)
    raise TimeoutError(f"server not SERVING after {timeout_s} s")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m fineserve.server`` with the given flags, on free loopback ports; a context manager."""

    def __init__(self, repository: Path, flags: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.command = [
            sys.executable,
            "-m",
            "fineserve.server",
            "--model-repository",
            str(repository),
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(self.port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(free_port()),
            *flags,
        ]
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.seconds_to_serving = float("nan")
        self._role_cpu: RoleCpu | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> float:
        """Starts the process and waits for health SERVING; returns the seconds that took.

        Raises:
            RuntimeError: the process exited or did not serve within ``timeout`` (log path named).
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - started < timeout:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        self.seconds_to_serving = time.perf_counter() - started
                        return self.seconds_to_serving
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"server not SERVING after {timeout:.0f} s; see {self.log_path}")

    def rss_bytes(self) -> int:
        """Resident memory of the server process now."""
        assert self.process is not None
        return rss_bytes(self.process.pid)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the server's threads so far, by role (server/threads.py); its event loop
        runs on the process's main thread."""
        assert self.process is not None
        if self._role_cpu is None or self._role_cpu.pid != self.process.pid:
            self._role_cpu = RoleCpu(self.process.pid)
            self._role_cpu.loop_tid = self.process.pid
        return self._role_cpu.read()

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (all its threads)."""
        assert self.process is not None
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PeakMemory:
    """Samples a server's resident memory every ``interval`` seconds while in a ``with`` block."""

    def __init__(self, server: ServerProcess, interval: float = 0.05) -> None:
        self._server = server
        self._interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._server.rss_bytes())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
