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
from fineserve.server.supervisor import cpu_slices
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

        def ready_everywhere() -> set[bool]:
            answers = set()
            for _ in range(12):
                with fresh_stub(server.target) as stub:
                    answers.add(stub.ModelReady(ks.ModelReadyRequest(name=MODEL), timeout=10).ready)
            return answers

        with fresh_stub(server.target) as stub:
            stub.RepositoryModelUnload(ks.RepositoryModelUnloadRequest(model_name=MODEL), timeout=30)
        assert ready_everywhere() == {False}
        with fresh_stub(server.target) as stub:
            stub.RepositoryModelLoad(ks.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
        assert ready_everywhere() == {True}
        samples = metrics(server)
        assert total(samples, "fineserve_worker_requests_total", worker="0") == 0  # no inference


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
