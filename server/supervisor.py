"""``--workers N``: a supervisor process and N serving processes on one gRPC port.

The supervisor serves nothing itself. It reserves the gRPC port (a bound, never-listening socket
with SO_REUSEPORT: port 0 becomes a concrete port, and a port another program holds fails here, at
once), then starts each worker as ``python -m fineserve.server`` with the same arguments plus the
port and its place in the pool. Each worker binds the same port with SO_REUSEPORT (gRPC's default
on Linux) once its models are loaded, and the kernel spreads new connections over the workers
that listen. The supervisor serves the one ``/metrics`` (``metrics_merge.py``), restarts a worker
that exits unasked (with backoff, logged, counted in ``fineserve_worker_restarts_total``), and on
SIGTERM passes SIGTERM to every worker and waits for each to drain.

It never spins: a worker that exits before it first became ready stops the whole server (a taken
port, a bad repository or setting fails every worker alike), and so does a worker that exits
``MAX_FAILED_RESTARTS`` times in a row, whether before or after it became ready: only a worker that
stayed up ``STABLE_S`` after it became ready starts the count (and the backoff) again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from fineserve.server.config import Settings
from fineserve.server.metrics_http import serve_metrics
from fineserve.server.metrics_merge import WorkerMetrics
from fineserve.server.pool import PoolDir
from fineserve.server.runtime import cpu_cores

log = logging.getLogger(__name__)

# Restart backoff: the first restart after this, doubling per exit in a row, up to the cap.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
# Exits count "in a row" until a worker stays up this long after it became ready.
STABLE_S = 30.0
# A worker that exits this many times in a row stops the server: a crash loop, not bad luck.
MAX_FAILED_RESTARTS = 5
# On SIGTERM each worker gets shutdown_grace_s plus this to exit before SIGKILL.
EXIT_MARGIN_S = 15.0
_POLL_S = 0.1
# auto on CUDA: front ends feeding one device; more would only queue on it (not measured yet).
CUDA_AUTO_WORKERS = 4


def worker_count(settings: Settings) -> tuple[int, str]:
    """How many workers, and why (``auto`` says what it picked from)."""
    if settings.workers != "auto":
        return settings.workers, "workers setting"
    cores = cpu_cores()
    if settings.device != "cpu" and _cuda_offered():
        count = min(cores, CUDA_AUTO_WORKERS)
        return count, f"auto: CUDA, min({cores} cores, {CUDA_AUTO_WORKERS})"
    per_worker = max(2, settings.intra_op_threads + 1)
    count = max(1, cores // per_worker)
    return count, f"auto: CPU, {cores} cores // {per_worker} cores per worker (its event loop and inference)"


def _cuda_offered() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def cpu_slices(count: int) -> list[list[int]]:
    """Each worker's CPUs: the usable cores split into ``count`` near-equal runs (one CPU each,
    round robin, when there are more workers than CPUs)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return [[] for _ in range(count)]
    cpus = sorted(getaffinity(0))
    if count > len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(count)]
    usable = cpus[: max(count, min(len(cpus), cpu_cores()))]  # a CPU quota counts as fewer cores
    share, extra = divmod(len(usable), count)
    slices, start = [], 0
    for i in range(count):
        size = share + (1 if i < extra else 0)
        slices.append(usable[start : start + size])
        start += size
    return slices


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (never listening) SO_REUSEPORT socket on ``host:port``: holds the port for the workers.

    Raises:
        OSError: the address cannot be bound (taken without SO_REUSEPORT, not this host's).
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family, kind, proto, _, address = socket.getaddrinfo(
        name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as gRPC binds [::]
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Slot:
    """One worker's place in the pool, across its restarts."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    # When the supervisor first saw the current process's ready flag (None: not yet). Kept when
    # the flag goes down: a worker someone else stops lowers it on its way out.
    ready_since: float | None = None
    exits_in_a_row: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Starts, watches, restarts and drains the workers; ``run`` returns the exit code."""

    def __init__(self, settings: Settings, argv: Sequence[str], count: int, port: int, pool: PoolDir) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.port = port
        self.pool = pool
        self.metrics = WorkerMetrics(pool)
        self.slots = [_Slot(i) for i in range(count)]
        self._stop_requested = False
        self._everyone_ready_once = False

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested = True

    def command(self, index: int) -> list[str]:
        metrics = ["--metrics-host", "127.0.0.1", "--metrics-port", "0"]
        if self.settings.metrics_port < 0:
            metrics = ["--metrics-port", "-1"]
        return [
            sys.executable, "-m", "fineserve.server", *self.argv,
            "--workers", "1", "--grpc-port", str(self.port), *metrics,
            "--worker-of", str(self.pool.root), "--worker-index", str(index),
        ]  # fmt: skip

    def _start(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(self.command(slot.index))
        slot.ready_since = None
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def _flag_holds_its_pid(self, slot: _Slot) -> bool:
        """Whether the worker's current process raised its ready flag (and the flag is up)."""
        return slot.process is not None and self.pool.ready_pid(slot.index) == slot.process.pid

    def run(self) -> int:
        for slot in self.slots:
            self._start(slot)
        while not self._stop_requested:
            time.sleep(_POLL_S)
            if not self._everyone_ready_once and all(s.ready_since is not None for s in self.slots):
                self._everyone_ready_once = True
                log.info("all %d workers ready", len(self.slots))
            for slot in self.slots:
                code = self._watch(slot)
                if code is not None:
                    self._drain()
                    return code
        return self._drain()

    def _watch(self, slot: _Slot) -> int | None:
        """Restarts ``slot``'s worker if it exited; an exit code when the server must stop."""
        if slot.process is None:
            if time.monotonic() >= slot.restart_at:
                self._start(slot)
            return None
        code = slot.process.poll()
        now = time.monotonic()
        if code is None:
            if slot.ready_since is None and self._flag_holds_its_pid(slot):
                slot.ready_since = now
                log.info("worker %d (pid %d) ready", slot.index, slot.process.pid)
            return None
        # A killed worker leaves its flag up: it may have become ready since the last look.
        was_ready = slot.ready_since is not None or self._flag_holds_its_pid(slot)
        stayed_up = slot.ready_since is not None and now - slot.ready_since >= STABLE_S
        pid = slot.process.pid
        slot.process = None
        self.metrics.departed(slot.index)
        if not self._everyone_ready_once and not was_ready:
            log.error(
                "worker %d (pid %d) exited with %d before it was ready; stopping", slot.index, pid, code
            )
            return code if code > 0 else 1
        slot.exits_in_a_row = 1 if stayed_up else slot.exits_in_a_row + 1
        if slot.exits_in_a_row >= MAX_FAILED_RESTARTS:
            log.error(
                "worker %d (pid %d) exited with %d: %d exits in a row, none up %.0f s after it was "
                "ready; stopping",
                slot.index, pid, code, slot.exits_in_a_row, STABLE_S,
            )  # fmt: skip
            return 1
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (slot.exits_in_a_row - 1))
        log.error(
            "worker %d (pid %d) exited with %d; restarting it in %.1f s", slot.index, pid, code, backoff
        )
        self.metrics.restarts += 1
        slot.restart_at = now + backoff
        return None

    def _drain(self) -> int:
        """SIGTERM to every worker, then waits for each (SIGKILL past the grace); the exit code."""
        running = [s.process for s in self.slots if s.process is not None and s.process.poll() is None]
        log.info("stopping: SIGTERM to %d workers, each drains its in-flight requests", len(running))
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + EXIT_MARGIN_S
        worst = 0
        for process in running:
            try:
                code = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not drain in time; killing it", process.pid)
                process.kill()
                code = process.wait()
            worst = worst or code
        log.info("all workers stopped")
        return 0 if worst == 0 else 1


def supervise(settings: Settings, argv: Sequence[str], count: int) -> int:
    """Runs ``count`` workers behind the settings' gRPC port until SIGTERM; the exit code."""
    try:
        reserved = reserve_port(settings.grpc_host, settings.grpc_port)
    except OSError as err:
        print(
            f"fineserve serve: error: cannot bind gRPC to {settings.grpc_host}:{settings.grpc_port} "
            f"(grpc_host, grpc_port): {err.strerror or err}",
            file=sys.stderr,
        )
        return 1
    root = Path(tempfile.mkdtemp(prefix="fineserve-workers-"))
    metrics_server: Any = None
    try:
        port = int(reserved.getsockname()[1])
        pool = PoolDir.create(root, count, cpu_slices(count))
        supervisor = Supervisor(settings, argv, count, port, pool)
        if settings.metrics_port >= 0:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(supervisor.metrics)
            try:
                # The same bounded server a single process uses (timeouts, a connection cap).
                metrics_server, _ = serve_metrics(
                    registry,
                    settings.metrics_host,
                    settings.metrics_port,
                    max_connections=settings.metrics_max_connections,
                    timeout_s=settings.metrics_timeout_s,
                )
            except OSError as err:
                print(
                    f"fineserve serve: error: cannot serve metrics on {settings.metrics_host}:"
                    f"{settings.metrics_port} (metrics_host, metrics_port): {err.strerror or err}",
                    file=sys.stderr,
                )
                return 1
            log.info("metrics on http://%s:%d/metrics", settings.metrics_host, metrics_server.server_port)
        log.info("gRPC listening on port %d with %d workers (health SERVING once all are ready)", port, count)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, supervisor.request_stop)
        return supervisor.run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        reserved.close()
        shutil.rmtree(root, ignore_errors=True)
