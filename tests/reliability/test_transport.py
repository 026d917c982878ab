"""The gRPC port against a hostile client: refusals that read no request bytes (docs/reliability.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fineserve.bench.server_process import PeakMemory, wait_serving
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from tests.fixtures import publish_tiny_models
from tests.server.kserve_harness import running_server
from tests.server.running import RunningServer

TOKEN = "inference-s3cret-0123456789"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MiB = 1 << 20


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_models(tmp_path_factory.mktemp("transport") / "models")


def code_of(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


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
