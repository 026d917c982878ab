"""Overload at four times capacity, and what expired or cancelled requests cost.

A real server process serves ``slow-image`` one request at a time (max_batch_size 1) with a queue
of 4; each request carries work for a few tens of milliseconds, so capacity is measured, not
assumed. Open-loop load at 4x that capacity for a few seconds, then silence: load is shed at
once with RESOURCE_EXHAUSTED, accepted requests keep a p99 bounded by the queue, memory stays
flat, and afterwards the server answers as fast as before.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from fineserve.bench.server_process import ServerProcess, rss_bytes, wait_serving
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as fs
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as fs_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from tests.reliability.graphs import publish_slow_image_model, work
from tests.server.kserve_harness import running_server

QUEUE = 4
TARGET_S = 0.04  # the work per request the test aims for
LOAD_S = 3.0


@dataclass
class Slow:
    server: ServerProcess
    channel: grpc.Channel
    stub: fs_grpc.FineserveStub
    kserve: ks_grpc.GRPCInferenceServiceStub
    iterations: int = 0  # loop iterations that take about TARGET_S
    service_s: float = 0.0  # measured latency of one such request on an idle server

    def request(self, iterations: int | None = None) -> fs.ClassifyRequest:
        pixels = work(self.iterations if iterations is None else iterations)[0]
        image = fs.ImageInput(tensor=fs.Tensor(shape=list(pixels.shape), fp32_data=pixels.tobytes()))
        return fs.ClassifyRequest(model="slow-image", images=[image])

    def timed(self, iterations: int | None = None) -> float:
        started = time.perf_counter()
        self.stub.Classify(self.request(iterations), timeout=30)
        return time.perf_counter() - started

    def executions(self) -> int:
        stats = self.kserve.ModelStatistics(ks.ModelStatisticsRequest(name="slow-image"), timeout=10)
        return int(stats.model_stats[0].execution_count)


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slow]:
    repository: Path = tmp_path_factory.mktemp("overload") / "models"
    publish_slow_image_model(repository)
    batching = {"slow-image": {"max_batch_size": 1, "max_queue_size": QUEUE, "max_queue_delay_ms": 0}}
    env = {"FINESERVE_BATCHING": json.dumps(batching)}
    # One instance: while the long request runs, everything else waits in the queue.
    flags = ("--instances=1", "--intra-op-threads=1", "--shutdown-grace-s=2")
    with running_server(repository, *flags, env=env) as server, grpc.insecure_channel(server.url) as channel:
        wait_serving(channel)
        slow = Slow(
            server, channel, fs_grpc.FineserveStub(channel), ks_grpc.GRPCInferenceServiceStub(channel)
        )
        # Calibrate: iterations per second of this machine, now, through the whole server.
        slow.timed(0)
        probe = 20_000
        per_iteration = (
            max(statistics.median(slow.timed(probe) for _ in range(3)) - slow.timed(0), 1e-3) / probe
        )
        slow.iterations = max(1000, int(TARGET_S / per_iteration))
        # Once more, through the server: scale to the target by what one request really took.
        slow.iterations = max(
            1000, int(slow.iterations * TARGET_S / statistics.median(slow.timed() for _ in range(3)))
        )
        slow.service_s = statistics.median(slow.timed() for _ in range(5))
        yield slow


@dataclass
class Outcomes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    results: list[tuple[grpc.StatusCode, float, str]] = field(default_factory=list)

    def add(self, code: grpc.StatusCode, seconds: float, message: str) -> None:
        with self.lock:
            self.results.append((code, seconds, message))

    def latencies(self, code: grpc.StatusCode) -> list[float]:
        return sorted(s for c, s, _ in self.results if c == code)


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def offer_load(slow: Slow, rate: float, seconds: float) -> tuple[Outcomes, list[int], float]:
    """Open loop: a request every 1/rate seconds whatever the answers; RSS sampled meanwhile."""
    outcomes = Outcomes()
    futures = []
    rss = []
    request = slow.request()
    started = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) - started < seconds:
        if now - started >= sent / rate:
            sent_at = time.perf_counter()
            future = slow.stub.Classify.future(request, timeout=10)

            def done(f: grpc.Future, sent_at: float = sent_at) -> None:
                code = f.code()
                outcomes.add(code, time.perf_counter() - sent_at, f.details() or "")

            future.add_done_callback(done)
            futures.append(future)
            sent += 1
            if sent % 20 == 0:
                rss.append(rss_bytes(slow.server.process.pid))
        else:
            time.sleep(min(0.002, sent / rate - (now - started)))
    achieved = sent / (time.perf_counter() - started)
    for future in futures:
        with contextlib.suppress(grpc.RpcError):
            future.result(timeout=30)
    deadline = time.monotonic() + 10
    while len(outcomes.results) < len(futures) and time.monotonic() < deadline:
        time.sleep(0.01)
    return outcomes, rss, achieved


def test_four_times_capacity_is_shed_fast_and_the_server_recovers(slow: Slow) -> None:
    baseline_rss = rss_bytes(slow.server.process.pid)
    capacity = 1 / slow.service_s
    outcomes, rss, offered = offer_load(slow, 4 * capacity, LOAD_S)
    ok = outcomes.latencies(grpc.StatusCode.OK)
    shed = outcomes.latencies(grpc.StatusCode.RESOURCE_EXHAUSTED)
    others = {c for c, _, _ in outcomes.results} - {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    summary = (
        f"service {slow.service_s * 1000:.0f} ms, offered {offered:.0f}/s for {LOAD_S} s: "
        f"{len(ok)} ok (p99 {p99(ok) * 1000:.0f} ms), {len(shed)} shed (p99 {p99(shed) * 1000:.0f} ms)"
    )
    print(summary)
    assert not others, summary
    assert offered > 3.5 * capacity, summary  # the client really did overload the server
    # Roughly three of every four requests cannot be served; at least a third must be shed.
    assert len(shed) >= len(outcomes.results) / 3, summary
    assert len(ok) >= LOAD_S * capacity / 4, summary
    assert all("queue full" in message for code, _, message in outcomes.results if code != grpc.StatusCode.OK)
    # Shed at once: faster than serving one request, whatever the backlog would have been.
    assert statistics.median(shed) < slow.service_s, summary
    assert p99(shed) < 0.5, summary
    # Accepted requests wait for at most a full queue ahead of them (with room for a busy machine),
    # not for the seconds of backlog an unbounded queue would build.
    bound = (QUEUE + 2) * slow.service_s * 2 + 0.3
    assert p99(ok) < bound, f"{summary}; bound {bound * 1000:.0f} ms"
    assert max(rss) < baseline_rss * 1.10, (
        f"RSS {max(rss) / 2**20:.0f} MiB vs {baseline_rss / 2**20:.0f} before"
    )
    # Load gone: every request is served, about as fast as on an idle server.
    after = [slow.timed() for _ in range(5)]
    assert statistics.median(after) < slow.service_s * 2 + 0.05, (after, summary)


def outcome(future: grpc.Future) -> grpc.StatusCode:
    try:
        future.result()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def refill_while_busy(slow: Slow, long_run: grpc.Future) -> None:
    """With the long request still running, a full queue's worth of new requests is accepted: the
    slots of the requests that left are free at once, not when the batcher reaches them."""
    refill = [slow.stub.Classify.future(slow.request(), timeout=30) for _ in range(QUEUE)]
    time.sleep(0.1)
    assert not long_run.done(), "the long request ended too soon for this test to mean anything"
    long_run.result()
    assert [outcome(f) for f in refill] == [grpc.StatusCode.OK] * QUEUE


def test_expired_requests_are_not_run_and_free_their_queue_slots_at_once(slow: Slow) -> None:
    before = slow.executions()
    long_run = slow.stub.Classify.future(slow.request(slow.iterations * 40), timeout=60)
    time.sleep(slow.service_s)  # it is running now
    expiring = [slow.stub.Classify.future(slow.request(), timeout=0.1) for _ in range(QUEUE)]
    assert [outcome(f) for f in expiring] == [grpc.StatusCode.DEADLINE_EXCEEDED] * QUEUE
    time.sleep(0.05)  # the server has seen the deadlines pass
    refill_while_busy(slow, long_run)
    # The expired requests never ran: the long one and the refill only.
    assert slow.executions() - before == 1 + QUEUE


def test_cancelled_requests_are_not_run_and_free_their_queue_slots_at_once(slow: Slow) -> None:
    before = slow.executions()
    long_run = slow.stub.Classify.future(slow.request(slow.iterations * 40), timeout=60)
    time.sleep(slow.service_s)
    queued = [slow.stub.Classify.future(slow.request(), timeout=30) for _ in range(QUEUE)]
    time.sleep(0.1)  # they reached the server's queue
    overflow = slow.stub.Classify.future(slow.request(), timeout=30)
    assert outcome(overflow) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for future in queued:
        assert future.cancel()
    time.sleep(0.05)  # the server has seen the cancellations
    refill_while_busy(slow, long_run)
    assert slow.executions() - before == 1 + QUEUE
