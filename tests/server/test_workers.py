"""``--workers N``: real supervisor and worker processes on one port, real clients.

Each new connection lands on one of the workers (the kernel's SO_REUSEPORT choice), so the
clients here open a fresh connection per call (``grpc.use_local_subchannel_pool``: gRPC would
otherwise share one connection between channels to the same address) and spread over the workers.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from fineserve.bench.loadgen import Load, run_load
from fineserve.bench.server_process import ServerProcess, process_cpu_seconds, rss_bytes
from fineserve.export.contract import read_model_spec
from fineserve.server.metrics_merge import WorkerMetrics
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from fineserve.server.pool import PoolDir
from fineserve.server.supervisor import MAX_FAILED_RESTARTS, cpu_slices
from tests.fixtures import TINY_IMAGE_SIZE, copy_version, publish_tiny_image_model

MODEL = "tiny-image"
_PIXELS = np.zeros((1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.float32)
_REQUEST = ks.ModelInferRequest(
    model_name=MODEL,
    inputs=[ks.ModelInferRequest.InferInputTensor(name="pixel_values", datatype="FP32", shape=_PIXELS.shape)],
    raw_input_contents=[_PIXELS.tobytes()],
)


@contextmanager
def fresh_stub(target: str) -> Iterator[ks_grpc.GRPCInferenceServiceStub]:
    """A stub on a connection of its own (a new connection: any worker may get it)."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        yield ks_grpc.GRPCInferenceServiceStub(channel)


def infer(target: str, timeout: float = 10) -> ks.ModelInferResponse:
    with fresh_stub(target) as stub:
        reply: ks.ModelInferResponse = stub.ModelInfer(_REQUEST, timeout=timeout)
        return reply


def metrics(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def wait_until(condition: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the supervisor's log."""
    pids = {}
    for line in list(server.log):
        if found := re.search(r"worker (\d+) started \(pid (\d+)\)", line):
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def joined(server: ServerProcess, index: int) -> int:
    """How many times worker ``index`` joined the port (once per life)."""
    return sum(f"worker {index} (pid" in line and "joined gRPC port" in line for line in list(server.log))


def ready_everywhere(server: ServerProcess) -> set[bool]:
    """The answers of ModelReady over 12 fresh connections (spread over the workers)."""
    answers = set()
    for _ in range(12):
        with fresh_stub(server.target) as stub:
            answers.add(stub.ModelReady(ks.ModelReadyRequest(name=MODEL), timeout=10).ready)
    return answers


def zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    publish_tiny_image_model(tmp_path / "models")
    return tmp_path / "models"


def two_workers(repository: Path, *flags: str) -> ServerProcess:
    return ServerProcess(repository, ["--workers", "2", "--repository-poll-s", "0", *flags])


def test_two_workers_serve_one_port_and_one_metrics_endpoint_sums_them(repository: Path) -> None:
    with two_workers(repository) as server:
        server.start(60)
        assert "workers: 2 (workers setting)" in "\n".join(server.log)
        assert sorted(worker_pids(server)) == [0, 1]
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: infer(server.target), range(40)))
        assert {r.model_version for r in replies} == {"1"}
        samples = metrics(server)
        assert total(samples, "fineserve_requests_total", model=MODEL, outcome="ok") == 40
        per_worker = {w: total(samples, "fineserve_worker_requests_total", worker=w) for w in ("0", "1")}
        assert sum(per_worker.values()) == 40 and min(per_worker.values()) > 0, per_worker
        assert total(samples, "fineserve_request_duration_seconds_count", model=MODEL) == 40
        assert total(samples, "fineserve_model_ready", model=MODEL, version="1") == 1  # min, not sum
        assert total(samples, "fineserve_workers_ready") == total(samples, "fineserve_workers") == 2
        # The bench harness charges the server with its workers' CPU and memory, not the idle parent's.
        assert server.process is not None
        assert sorted(server.pids()[1:]) == sorted(worker_pids(server).values())
        assert server.cpu_seconds() > process_cpu_seconds(server.process.pid)
        assert server.rss_bytes() > rss_bytes(server.process.pid)
        # KServe statistics answer for the whole server, whichever worker is asked.
        time.sleep(0.5)  # each worker writes its statistics within a poll (0.2 s)
        for _ in range(4):
            with fresh_stub(server.target) as stub:
                stats = stub.ModelStatistics(ks.ModelStatisticsRequest(name=MODEL), timeout=10)
            assert stats.model_stats[0].inference_stats.success.count == 40


def test_the_load_generator_spreads_its_connections_over_the_workers(repository: Path) -> None:
    with two_workers(repository) as server:
        server.start(60)
        load = Load(concurrency=8, connections=8, seconds=0.5)
        row = asyncio.run(run_load(server.target, read_model_spec(repository / MODEL / "1"), load))
        assert row["codes"] == {"OK": row["requests_ok"]} and row["connections"] == 8
        samples = metrics(server)
        assert min(total(samples, "fineserve_worker_requests_total", worker=w) for w in ("0", "1")) > 0


def test_a_killed_worker_is_restarted_and_requests_keep_succeeding(repository: Path) -> None:
    with two_workers(repository) as server:
        server.start(60)
        victim = worker_pids(server)[1]
        os.kill(victim, signal.SIGKILL)
        # Once it is gone (connections the kernel queued on its socket in its last moments are
        # reset with it), its siblings answer every new connection while it restarts.
        server.wait_for(f"worker 1 \\(pid {victim}\\) exited with -9; restarting it", 10)
        failures = []
        for _ in range(20):
            try:
                infer(server.target)
            except grpc.RpcError as err:
                failures.append(err.code())
        assert failures == []
        wait_until(lambda: joined(server, 1) == 2, 30, "worker 1 back")
        assert worker_pids(server)[1] != victim
        samples = metrics(server)
        assert total(samples, "fineserve_worker_restarts_total") == 1
        assert total(samples, "fineserve_workers_ready") == 2
        # The restarted worker serves again; the counts of the one killed are kept.
        for _ in range(30):
            infer(server.target)
        samples = metrics(server)
        assert total(samples, "fineserve_worker_requests_total", worker="1") > 0
        assert total(samples, "fineserve_requests_total", model=MODEL, outcome="ok") == 50


def test_sigterm_drains_every_worker(repository: Path) -> None:
    # Each request waits out a fixed 1.5 s batching delay: they are all in flight at the signal.
    with two_workers(repository, "--batch-wait", "fixed", "--max-queue-delay-ms", "1500") as server:
        server.start(60)
        pids = list(worker_pids(server).values())
        with ThreadPoolExecutor(6) as pool:
            calls = [pool.submit(infer, server.target, 20) for _ in range(6)]
            time.sleep(0.5)
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            replies = [call.result() for call in calls]
        assert [r.model_name for r in replies] == [MODEL] * 6
        assert server.process.wait(30) == 0
        server.stop()
        log = "\n".join(server.log)
        assert log.count("server stopped") == 2 and "all workers stopped" in log
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_version_published_under_load_reaches_every_worker_with_no_failed_request(
    repository: Path, tmp_path: Path
) -> None:
    with ServerProcess(repository, ["--workers", "2", "--repository-poll-s", "0.2"]) as server:
        server.start(60)
        outcomes: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    outcomes.append(infer(server.target).model_version)
                except grpc.RpcError as err:
                    outcomes.append(err.code().name)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(outcomes) >= 20, what="traffic")
        # Published as a publisher does: written beside the repository, then renamed in at once.
        staged = copy_version(repository / MODEL / "1", 2)
        shutil.move(staged, tmp_path / "staged")
        (tmp_path / "staged").rename(repository / MODEL / "2")

        def every_worker_has_version_2() -> bool:
            log = list(server.log)
            return all(
                any(f"[worker {i}]" in line and f"model {MODEL} version 2 READY" in line for line in log)
                for i in (0, 1)
            )

        wait_until(every_worker_has_version_2, 30, "version 2 READY in both workers")
        seen = len(outcomes)
        wait_until(lambda: len(outcomes) >= seen + 20, what="traffic after the switch")
        stop.set()
        for thread in threads:
            thread.join(20)
        assert set(outcomes) == {"1", "2"}, sorted(set(outcomes))
        assert outcomes[-10:] == ["2"] * 10
        samples = metrics(server)
        assert total(samples, "fineserve_model_ready", model=MODEL, version="2") == 1


def test_load_and_unload_through_one_worker_reach_every_worker(repository: Path) -> None:
    with two_workers(repository) as server:
        server.start(60)
        with fresh_stub(server.target) as stub:
            stub.RepositoryModelUnload(ks.RepositoryModelUnloadRequest(model_name=MODEL), timeout=30)
        assert ready_everywhere(server) == {False}
        with fresh_stub(server.target) as stub:
            stub.RepositoryModelLoad(ks.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
        assert ready_everywhere(server) == {True}
        samples = metrics(server)
        assert total(samples, "fineserve_worker_requests_total", worker="0") == 0  # no inference


def test_a_load_or_unload_waits_for_no_dead_worker_and_the_restarted_one_replays_it(repository: Path) -> None:
    with two_workers(repository) as server:
        server.start(60)
        assert server.process is not None
        supervisor, victim = server.process.pid, worker_pids(server)[1]
        # Stopped, the supervisor neither reaps nor restarts worker 1: it cannot apply the call.
        os.kill(supervisor, signal.SIGSTOP)
        try:
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: zombie(victim), 10, "worker 1 dead")
            started = time.monotonic()
            with fresh_stub(server.target) as stub:  # only worker 0 listens now
                # A connection the kernel handed worker 1 in its last moments is reset with it
                # (seen once in CI): the call waits for a connection rather than failing on it.
                request = ks.RepositoryModelUnloadRequest(model_name=MODEL)
                stub.RepositoryModelUnload(request, timeout=10, wait_for_ready=True)
            unload_s = time.monotonic() - started
        finally:
            os.kill(supervisor, signal.SIGCONT)
        assert unload_s < 5, unload_s  # before: until worker 1 applied it (120 s at most)
        wait_until(lambda: joined(server, 1) == 2, 60, "worker 1 back")
        assert ready_everywhere(server) == {False}  # the restarted worker replayed the unload


def test_a_worker_whose_supervisor_is_gone_exits_instead_of_serving(repository: Path, tmp_path: Path) -> None:
    # The pool of a supervisor that has exited: the worker's parent is not the pool's supervisor.
    pool = tmp_path / "pool"
    create = "import pathlib, sys; from fineserve.server.pool import PoolDir; "
    create += "PoolDir.create(pathlib.Path(sys.argv[1]), 1, [[]])"
    made = [sys.executable, "-c", create, str(pool)]
    subprocess.run(made, check=True, timeout=60)
    result = subprocess.run(
        [sys.executable, "-m", "fineserve.server", "--model-repository", str(repository),
         "--grpc-host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1",
         "--worker-of", str(pool), "--worker-index", "0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "worker 0: its supervisor is gone" in result.stderr


def test_a_worker_that_keeps_crashing_after_it_was_ready_backs_off_then_stops_the_server(
    repository: Path,
) -> None:
    with two_workers(repository) as server:
        server.start(60)
        assert server.process is not None
        backoffs = []
        for life in range(1, MAX_FAILED_RESTARTS + 1):
            wait_until(lambda life=life: joined(server, 1) == life, 60, f"worker 1 joined {life} times")
            victim = worker_pids(server)[1]
            os.kill(victim, signal.SIGKILL)
            if life < MAX_FAILED_RESTARTS:
                restart = rf"worker 1 \(pid {victim}\) exited with -9; restarting it in ([\d.]+) s"
                backoffs.append(float(server.wait_for(restart, 10).group(1)))
        assert backoffs == [0.5, 1.0, 2.0, 4.0]  # before: 0.5 s every time, for ever
        assert server.process.wait(60) == 1
        assert f"worker 1 (pid {victim}) exited with -9: 5 exits in a row" in "\n".join(server.log)


def test_a_worker_someone_else_stops_during_startup_is_restarted_not_fatal(repository: Path) -> None:
    with two_workers(repository) as server:
        server.start(60, until="listening")
        wait_until(lambda: 1 in worker_pids(server), 10, "worker 1 started")
        loading = worker_pids(server)[1]
        os.kill(loading, signal.SIGSTOP)  # still loading: the server is not ready as a whole yet
        try:
            wait_until(lambda: joined(server, 0) == 1, 60, "worker 0 joined")
            time.sleep(0.5)  # its ready flag raised, and seen by the supervisor (it looks every 0.1 s)
            first = worker_pids(server)[0]
            os.kill(first, signal.SIGTERM)  # it drains and lowers its flag on the way out
            # Before: counted as "exited before it was ready", which stopped the server.
            server.wait_for(rf"worker 0 \(pid {first}\) exited with 0; restarting it", 30)
        finally:
            os.kill(loading, signal.SIGCONT)
        wait_until(lambda: joined(server, 0) == 2 and joined(server, 1) == 1, 60, "both workers up")
        infer(server.target)


def test_a_taken_port_fails_at_once_without_starting_workers(repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fineserve.server", "--model-repository", str(repository),
             "--workers", "2", "--grpc-host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "-1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot bind gRPC to 127.0.0.1:{port}" in result.stderr
    assert "started (pid" not in result.stderr


def test_workers_that_cannot_start_stop_the_server_instead_of_restarting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fineserve.server", "--model-repository", str(tmp_path / "missing"),
         "--workers", "2", "--grpc-host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "before it was ready; stopping" in result.stderr
    assert "restarting it" not in result.stderr


def test_bad_worker_counts_are_refused_with_one_line() -> None:
    for bad in ("0", "-2", "many"):
        result = subprocess.run(
            [sys.executable, "-m", "fineserve.server", "--workers", bad],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("fineserve serve: error: workers"), result.stderr


def test_cores_are_split_between_workers() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    slices = cpu_slices(len(cpus))
    assert sorted(cpu for s in slices for cpu in s) == cpus
    assert cpu_slices(len(cpus) + 1)[-1] == [cpus[0]]  # more workers than CPUs: round robin


def test_merged_gauges_combine_as_documented_and_departed_workers_keep_their_counts(tmp_path: Path) -> None:
    pool = PoolDir.create(tmp_path, 2, [[], []])
    servers = []
    for index, (ready_versions, depth, requests) in enumerate([(("1", "2"), 2, 3), (("1",), 5, 4)]):
        registry = CollectorRegistry()
        ready = Gauge("fineserve_model_ready", "", ["model", "version"], registry=registry)
        for version in ready_versions:
            ready.labels("m", version).set(1)
        Gauge("fineserve_queue_depth", "", registry=registry).set(depth)
        Gauge("fineserve_gpu_memory_total_bytes", "", registry=registry).set(80)
        Gauge("fineserve_shared_memory_regions_limit", "", registry=registry).set(100)
        Counter("fineserve_requests", "", registry=registry).inc(requests)
        server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        pool.write_metrics_port(index, server.server_port)
    merged = WorkerMetrics(pool)

    def collected() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in merged.collect()
            for s in family.samples
        }

    try:
        samples = collected()
        assert samples[("fineserve_requests_total", ())] == 7  # counters: summed
        assert samples[("fineserve_queue_depth", ())] == 7  # gauges: summed by default
        assert samples[("fineserve_gpu_memory_total_bytes", ())] == 80  # one device: max
        assert samples[("fineserve_shared_memory_regions_limit", ())] == 100  # a cap per worker: max
        # Ready in every worker (min), not in one of them.
        assert samples[("fineserve_model_ready", (("model", "m"), ("version", "1")))] == 1
        assert samples[("fineserve_model_ready", (("model", "m"), ("version", "2")))] == 0
        servers[0].shutdown()
        merged.departed(0)
        samples = collected()
        assert samples[("fineserve_requests_total", ())] == 7  # a departed worker's counts carry on
        assert samples[("fineserve_queue_depth", ())] == 5  # its gauges do not
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


class _HeldMetrics(BaseHTTPRequestHandler):
    """A worker's /metrics that answers only once ``release`` is set."""

    reached = threading.Event()
    release = threading.Event()
    body = b"# TYPE fineserve_requests_total counter\nfineserve_requests_total 3.0\n"

    def do_GET(self) -> None:
        type(self).reached.set()
        type(self).release.wait(10)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_worker_that_departs_during_a_scrape_is_counted_once(tmp_path: Path) -> None:
    pool = PoolDir.create(tmp_path, 1, [[]])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HeldMetrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pool.write_metrics_port(0, server.server_port)
    merged = WorkerMetrics(pool)

    def requests() -> float:
        samples = [s for family in merged.collect() for s in family.samples]
        return sum(s.value for s in samples if s.name == "fineserve_requests_total")

    try:
        _HeldMetrics.release.set()
        assert requests() == 3
        _HeldMetrics.release.clear()
        _HeldMetrics.reached.clear()
        with ThreadPoolExecutor(1) as scraper:  # the scrape runs on the HTTP server's thread
            scrape = scraper.submit(requests)
            assert _HeldMetrics.reached.wait(10)
            merged.departed(0)  # meanwhile, on the supervisor's thread, the worker exits
            _HeldMetrics.release.set()
            assert scrape.result(10) == 3  # before: 6, its counts live and departed at once
        assert requests() == 3  # and carried on
    finally:
        _HeldMetrics.release.set()
        server.shutdown()
        server.server_close()
