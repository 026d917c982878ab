"""The real server as a subprocess on loopback: the one way benchmarks and tests start it.

``python -m fineserve.server`` runs exactly as a user would run it, so benchmark figures include
everything the server really does (gRPC, health, metrics, the repository poll) and tests see the
real process (signals, exit codes, its log). It also watches the process's memory and CPU, and
those of its worker processes when it runs with ``--workers N``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fineserve.server.threads import ROLES, RoleCpu

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")
# The server's INFO lines that name the ports it bound when asked for port 0.
_GRPC_PORT_LINE = re.compile(r"gRPC listening on port (\d+)")
_METRICS_PORT_LINE = re.compile(r"metrics on http://\S+:(\d+)/metrics")


def rss_bytes(pid: int) -> int:
    """Resident memory of a live process now, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * _PAGE


def children(pid: int) -> list[int]:
    """A live process's child processes, from /proc (Linux)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far, all its threads (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _alive_or_zero(read: Callable[[int], float], pid: int) -> float:
    try:
        return read(pid)
    except OSError:  # exited between listing and reading
        return 0


# gRPC backs off between attempts to reach a server that is not listening yet, up to 120 s by
# default: a wait for SERVING through such a channel could see it up to two minutes late (the
# newcomer benchmark before these options: 967 s measured, about 853 s by the server's own log).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def wait_serving(
    channel: grpc.Channel, timeout_s: float = 60, *, alive: Callable[[], None] | None = None
) -> None:
    """Waits until the standard health service on ``channel`` says SERVING; ``alive``, called
    between tries, raises when the process that should answer is gone. Give the channel
    ``FAST_RECONNECT`` when the server may not be listening yet.

    Raises:
        TimeoutError: not SERVING within ``timeout_s``.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if alive is not None:
            alive()
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.02)
    raise TimeoutError(f"server not SERVING after {timeout_s:.0f} s")


def free_port() -> int:
    """A port free now; for servers whose log level hides the line naming the port they bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m fineserve.server --model-repository REPO [flags]`` on loopback; a context manager.

    With ``grpc_port=0`` (the default) the server binds a port of its own choosing and reports it
    in its log, which needs INFO logging; a server run at WARNING is given ports (``free_port()``).
    Every line the process writes is kept in ``log`` (and written to ``log_path`` when given).
    ``start`` returns once the server is listening, or once health says SERVING.
    """

    def __init__(
        self,
        repository: Path,
        flags: Sequence[str] = (),
        log_path: Path | None = None,
        *,
        grpc_port: int = 0,
        metrics_port: int = 0,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        # ``wrapper``: a command that execs the server, as ``taskset -c 1`` does (same pid).
        self.command = [
            *wrapper, sys.executable, "-m", "fineserve.server", "--model-repository", str(repository),
            "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
            *flags,
        ]  # fmt: skip
        self.port = grpc_port
        self.metrics_port = metrics_port
        self.log_path = log_path
        self.log: list[str] = []
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.seconds_to_serving = float("nan")
        self._log_file: IO[str] | None = None
        self._reader: threading.Thread | None = None
        self._role_cpu: dict[int, RoleCpu] = {}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    url = target

    def start(self, timeout: float = 600.0, *, until: str = "serving") -> float:
        """Starts the process; waits until it listens (``until="listening"``) or until health says
        SERVING (``"serving"``), and returns the seconds that took.

        Raises:
            RuntimeError: the process exited first, or did not get there within ``timeout``
                (the log's last lines are in the message).
        """
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("w")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        self._reader = threading.Thread(target=self._read_log, name="server-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        if self.port == 0:
            self.port = int(self.wait_for(_GRPC_PORT_LINE.pattern, deadline - time.monotonic()).group(1))
        if until == "listening":
            return time.perf_counter() - started
        try:
            with grpc.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
                wait_serving(channel, deadline - time.monotonic(), alive=self._check_alive)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"server not SERVING after {timeout:.0f} s:\n{self.log_tail()}") from None
        self.seconds_to_serving = time.perf_counter() - started
        return self.seconds_to_serving

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line.rstrip("\n"))
            if self._log_file is not None:
                self._log_file.write(line)
            if self.metrics_port == 0 and (found := _METRICS_PORT_LINE.search(line)):
                self.metrics_port = int(found.group(1))

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            if self._reader is not None:
                self._reader.join(2)  # its last lines
            raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first log line matching ``pattern``, waiting for it to be written.

        Raises:
            RuntimeError: not written within ``timeout``, or the process exited without it.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.log):
                if found := re.search(pattern, line):
                    return found
            assert self.process is not None
            exited = self.process.poll() is not None
            if exited and self._reader is not None:
                self._reader.join(2)  # the last lines may still be on their way
                if found := next((m for line in self.log if (m := re.search(pattern, line))), None):
                    return found
            if exited or time.monotonic() > deadline:
                why = f"exited with {self.process.returncode}" if exited else f"not within {timeout:.0f} s"
                raise RuntimeError(f"no {pattern!r} in the server log ({why}):\n{self.log_tail(200)}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log[-lines:])

    def pids(self) -> list[int]:
        """The server process and its children (the workers of ``--workers N``) now."""
        assert self.process is not None
        return [self.process.pid, *children(self.process.pid)]

    def rss_bytes(self) -> int:
        """Resident memory of the server process (and its workers) now."""
        return int(sum(_alive_or_zero(rss_bytes, pid) for pid in self.pids()))

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the server's threads so far, by role (server/threads.py), its workers'
        included; each event loop runs on its process's main thread. A worker that exited takes
        its seconds with it."""
        totals = dict.fromkeys(ROLES, 0.0)
        for pid in self.pids():
            if pid not in self._role_cpu:
                self._role_cpu[pid] = RoleCpu(pid)
                self._role_cpu[pid].loop_tid = pid
            try:
                for role, seconds in self._role_cpu[pid].read().items():
                    totals[role] += seconds
            except OSError:
                continue  # exited meanwhile
        return totals

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process (and its workers) used so far (all threads)."""
        return sum(_alive_or_zero(process_cpu_seconds, pid) for pid in self.pids())

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

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
