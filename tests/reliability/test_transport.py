"""The gRPC port's limits against a hostile client or a careless operator: refusals that read no
request bytes, per-model message sizes, streams per connection, connection age and keepalive
enforcement, capped health watches, certificate dates, open model control, open streams on
SIGTERM, and the metrics port's timeouts and connection cap (docs/reliability.md)."""

from __future__ import annotations

import logging
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fineserve.bench.server_process import PeakMemory, wait_serving
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from tests.fixtures import publish_tiny_models
from tests.reliability.certs import make_expired_cert, make_pki
from tests.reliability.graphs import publish_slow_image_model, work
from tests.server.kserve_harness import running_server
from tests.server.running import RunningServer, code_of

TOKEN = "inference-s3cret-0123456789"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MiB = 1 << 20


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_models(tmp_path_factory.mktemp("transport") / "models")


def raw_request(model: str, size: int) -> ks.ModelInferRequest:
    """A ModelInferRequest of about ``size`` bytes (one UINT8 tensor)."""
    request = ks.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixel_values", datatype="UINT8", shape=[size])
    request.raw_input_contents.append(bytes(size))
    return request


# --- item 1: refused before a byte of the request is read -------------------------------------------


def test_a_call_without_its_token_is_refused_before_its_request_arrives(repository: Path) -> None:
    """ModelInfer called as a request stream that sends nothing yet: the refusal must not wait for
    the message (a unary handler waits for all of it, however large and slow, holding it)."""
    with (
        RunningServer(repository, inference_token=TOKEN) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        call = channel.stream_unary(MODEL_INFER, request_serializer=bytes, response_deserializer=bytes)
        release = threading.Event()

        def never_sends() -> Iterator[bytes]:
            release.wait(20)
            return
            yield b""

        started = time.monotonic()
        try:
            code = code_of(lambda: call(never_sends(), timeout=10))
        finally:
            release.set()
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - started < 5


def test_unauthenticated_large_requests_do_not_hold_server_memory(repository: Path) -> None:
    """Eight 24 MiB ModelInfer requests without a token at once: refused at once, so the server
    never holds their bytes (it did: it read each whole message before the token check)."""
    requests = 8
    size = 24 * MiB
    message = raw_request("tiny-image", size).SerializeToString()
    with running_server(repository, f"--inference-token={TOKEN}") as server:
        with grpc.insecure_channel(server.target) as channel:
            wait_serving(channel)
            call = channel.unary_unary(MODEL_INFER, request_serializer=bytes, response_deserializer=bytes)
            # Warm the allocator and gRPC up on one refused call of the same size.
            assert code_of(lambda: call(message, timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
            before = server.rss_bytes()
            codes: list[grpc.StatusCode] = []
            with PeakMemory(server, interval=0.01) as peak:
                threads = [
                    threading.Thread(target=lambda: codes.append(code_of(lambda: call(message, timeout=30))))
                    for _ in range(requests)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(60)
        grown = (peak.peak_bytes - before) / MiB
        print(f"RSS before {before / MiB:.0f} MiB, peak +{grown:.0f} MiB over {requests} x {size // MiB} MiB")
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * requests
        assert grown < requests * size / MiB / 4, f"+{grown:.0f} MiB"


# --- item 1: message sizes per model -------------------------------------------------------------


def test_a_model_may_accept_larger_or_smaller_messages_than_the_server_wide_limit(repository: Path) -> None:
    limits = {"tiny-image": 2 * MiB, "tiny-text": 4096}
    with (
        RunningServer(
            repository,
            max_receive_message_bytes=MiB,
            max_request_bytes=MiB,
            max_receive_message_bytes_per_model=limits,
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = ks_grpc.GRPCInferenceServiceStub(channel)

        def refusal(model: str, size: int) -> tuple[grpc.StatusCode, str]:
            try:
                stub.ModelInfer(raw_request(model, size), timeout=10)
            except grpc.RpcError as err:
                return err.code(), err.details() or ""
            return grpc.StatusCode.OK, ""

        # Over the server-wide limit but within tiny-image's own: parsed and checked as usual
        # (a UINT8 tensor is not what the model takes).
        assert refusal("tiny-image", MiB + MiB // 2)[0] == grpc.StatusCode.INVALID_ARGUMENT
        code, message = refusal("tiny-image", 3 * MiB)  # over every limit: gRPC's own refusal
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, message = refusal("tiny-text", MiB + MiB // 2)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_receive_message_bytes_per_model" in message and "'tiny-text'" in message
        assert refusal("tiny-text", 8192)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refusal("tiny-text", 1024)[0] == grpc.StatusCode.INVALID_ARGUMENT


# --- item 1: streams, connection age, keepalive ------------------------------------------------------


def _watch(channel: grpc.Channel) -> Iterator[health_pb2.HealthCheckResponse]:
    watch: Iterator[health_pb2.HealthCheckResponse] = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="liveness"), timeout=30
    )
    return watch


def test_a_connection_may_open_only_so_many_streams_at_once(repository: Path) -> None:
    with RunningServer(repository, grpc_max_concurrent_streams=2) as server:
        # Channels to one target share a connection unless told otherwise.
        own = [("grpc.use_local_subchannel_pool", 1)]
        with (
            grpc.insecure_channel(server.target, options=own) as crowded,
            grpc.insecure_channel(server.target, options=own) as other,
        ):
            check = health_pb2_grpc.HealthStub(crowded).Check
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status
            watches = [_watch(crowded) for _ in range(2)]
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            # A third call on the same connection waits for a free stream.
            assert code_of(lambda: check(health_pb2.HealthCheckRequest(), timeout=1)) == (
                grpc.StatusCode.DEADLINE_EXCEEDED
            )
            assert health_pb2_grpc.HealthStub(other).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            watches[0].cancel()  # type: ignore[attr-defined]
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status
            watches[1].cancel()  # type: ignore[attr-defined]


def _states(channel: grpc.Channel) -> list[grpc.ChannelConnectivity]:
    seen: list[grpc.ChannelConnectivity] = []
    channel.subscribe(seen.append, try_to_connect=False)
    return seen


def test_an_idle_connection_is_closed(repository: Path) -> None:
    ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE
    with (
        RunningServer(repository, grpc_max_connection_idle_s=0.3) as server,
        grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel,
    ):
        seen = _states(channel)
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        end = time.monotonic() + 5
        # The callbacks arrive on gRPC's thread: READY, then IDLE once the server's GOAWAY closes it.
        while not (ready in seen and seen[-1] == idle) and time.monotonic() < end:
            time.sleep(0.05)
        assert ready in seen and seen[-1] == idle, seen


@pytest.mark.parametrize(
    ("allowed_s", "every_ms", "closed"), [(0.1, 200, False), (5, 50, True)], ids=["allowed", "too-often"]
)
def test_keepalive_pings_are_allowed_at_the_interval_and_enforced_beyond(
    repository: Path, allowed_s: float, every_ms: int, closed: bool
) -> None:
    """A client pinging every 200 ms keeps its connection where 0.1 s is allowed (gRPC's own
    default, 5 minutes, would close it); one pinging every 50 ms where 5 s is allowed is closed."""
    pinging = [
        ("grpc.keepalive_time_ms", every_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    settings = {"grpc_min_client_ping_interval_s": allowed_s, "grpc_max_ping_strikes": 2}
    with (
        RunningServer(repository, **settings) as server,
        grpc.insecure_channel(server.target, options=pinging) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=15 if closed else 2
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)
        if closed:
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "too many pings" in (ended.value.details() or "").lower()  # type: ignore[attr-defined]
        else:  # open until its deadline
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


# --- item 7a: health Watch streams -----------------------------------------------------------------


def test_health_watches_are_capped(repository: Path) -> None:
    with (
        RunningServer(repository, inference_token=TOKEN, max_health_watches=3) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        watches = [_watch(channel) for _ in range(3)]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            next(_watch(channel))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "max_health_watches" in (refused.value.details() or "")  # type: ignore[attr-defined]
        # Check is not capped, and a closed watch frees its place.
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        watches[0].cancel()  # type: ignore[attr-defined]
        end = time.monotonic() + 5
        while server.server.health.watching > 2 and time.monotonic() < end:
            time.sleep(0.02)
        assert next(_watch(channel)).status == health_pb2.HealthCheckResponse.SERVING


# --- item 7b: certificate dates ----------------------------------------------------------------------


def test_an_expired_certificate_refuses_to_start(repository: Path, tmp_path: Path) -> None:
    """gRPC itself would start, report SERVING and fail every handshake."""
    cert, key = make_expired_cert(tmp_path / "pki")
    command = [
        sys.executable, "-m", "fineserve.server", "--model-repository", str(repository),
        "--grpc-host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("fineserve serve: error:")]
    assert len(errors) == 1, done.stderr
    assert re.search(r"tls_cert_file \S+ expired on 2020-01-02 00:00:00 UTC: .* renew it", errors[0])
    assert "gRPC listening" not in done.stderr + done.stdout


def test_a_certificate_close_to_expiry_is_warned_about_and_counted_down(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path / "pki")  # valid for 2 days: within the default 14 days' warning
    caplog.set_level(logging.WARNING, "fineserve.server.security")
    with RunningServer(repository, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key) as server:
        left = server.server.metrics.registry.get_sample_value("fineserve_tls_certificate_expiry_seconds")
    assert left is not None and 86400 < left <= 2 * 86400
    assert re.search(r"tls_cert_file \S+ expires on .* in 2\.0 days: renew it", caplog.text), caplog.text


# --- open model control on a reachable address -----------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ({"grpc_host": "0.0.0.0"}, ["load and unload models"]),
        ({"grpc_host": "0.0.0.0", "system_shared_memory": True}, ["load and unload", "shared memory"]),
        ({"grpc_host": "0.0.0.0", "admin_token": TOKEN}, []),
        ({"grpc_host": "0.0.0.0", "allow_model_control": False}, []),
        ({"grpc_host": "127.0.0.1", "system_shared_memory": True}, []),
    ],
    ids=["any-address", "and-shared-memory", "admin-token", "control-off", "loopback"],
)
def test_open_model_control_on_a_reachable_address_is_warned_about(
    repository: Path, caplog: pytest.LogCaptureFixture, settings: dict[str, Any], warned: list[str]
) -> None:
    caplog.set_level(logging.WARNING, "fineserve.server.app")
    with RunningServer(repository, **settings):
        pass
    lines = [
        r.getMessage() for r in caplog.records if "with no token: anyone who reaches it" in r.getMessage()
    ]
    assert len(lines) == len(warned), lines
    for line, what in zip(lines, warned, strict=True):
        assert what in line


# --- item 5: open streams on SIGTERM ------------------------------------------------------------------


def slow_request(request_id: str, iterations: int) -> ks.ModelInferRequest:
    pixels = work(iterations)
    request = ks.ModelInferRequest(model_name="slow-image", id=request_id)
    request.inputs.add(name="pixel_values", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.astype("<f4").tobytes())
    return request


def test_an_open_stream_on_sigterm_answers_what_it_accepted_refuses_the_rest_and_ends(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_slow_image_model(repository)
    outgoing: queue.Queue[ks.ModelInferRequest | None] = queue.Queue()

    def requests() -> Iterator[ks.ModelInferRequest]:
        while (request := outgoing.get()) is not None:
            yield request

    answers: list[tuple[str, str]] = []  # (id, error_message)
    with (
        running_server(repository, "--shutdown-grace-s=20", "--max-batch-size=1") as server,
        grpc.insecure_channel(server.url) as channel,
    ):
        wait_serving(channel)
        stream = ks_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=60)
        outgoing.put(slow_request("warm", 1))
        first = next(stream)
        answers.append((first.infer_response.id, first.error_message))
        for n in range(2):
            outgoing.put(slow_request(f"before-{n}", 200_000))
        time.sleep(0.3)  # read, and the first running
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("shutting down", timeout=10)
        for n in range(2):
            outgoing.put(slow_request(f"after-{n}", 1))
        with pytest.raises(grpc.RpcError) as ended:
            for answer in stream:
                answers.append((answer.infer_response.id, answer.error_message))
        outgoing.put(None)
        exit_code = server.process.wait(timeout=30)
    log = server.log_tail(50)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, log  # type: ignore[attr-defined]
    assert "shutting down" in (ended.value.details() or "")  # type: ignore[attr-defined]
    by_id = dict(answers)
    assert by_id["warm"] == "" and by_id["before-0"] == "" and by_id["before-1"] == "", answers
    assert by_id["after-0"].startswith("the server is shutting down"), answers
    assert by_id["after-1"].startswith("the server is shutting down"), answers
    # The refusals come at once, before the accepted requests are done.
    assert [i for i, _ in answers].index("after-0") < [i for i, _ in answers].index("before-1"), answers
    assert exit_code == 0, log


# --- item 6: the metrics port ----------------------------------------------------------------------


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def scrape(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return int(reply.status)


def test_half_sent_metrics_requests_hold_neither_threads_nor_the_port(repository: Path) -> None:
    """300 connections that send half a request: at most ``metrics_max_connections`` threads for
    them, each closed after ``metrics_timeout_s``; then /metrics answers again."""
    flags = ("--metrics-port=0", "--metrics-max-connections=8", "--metrics-timeout-s=1")
    with running_server(repository, *flags) as server:
        with grpc.insecure_channel(server.url) as channel:
            wait_serving(channel)
        assert server.process is not None
        pid, port = server.process.pid, server.metrics_port
        assert scrape(port) == 200
        before = threads_of(pid)
        sockets = []
        try:
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
                sockets.append(sock)
            time.sleep(0.3)
            held = threads_of(pid) - before
            # Every half-sent connection is closed: at once (busy, 503) or after the timeout.
            closed = 0
            for sock in sockets:
                sock.settimeout(5)
                try:
                    reply = sock.recv(1024)
                except TimeoutError:
                    continue
                closed += reply == b"" or reply.startswith(b"HTTP/1.1 503")
        finally:
            for sock in sockets:
                sock.close()
        print(f"threads: {before} before, +{held} with 300 half-sent requests")
        assert held <= 8, held
        assert closed == len(sockets)
        assert scrape(port) == 200
