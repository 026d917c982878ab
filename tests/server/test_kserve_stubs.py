"""The KServe v2 service through our own generated stubs (``server.pb.inference``), on the wire.

tritonclient covers the client's view (``test_kserve_server.py``); this covers what a client built
from our protos sees, and the corners tritonclient never reaches: undeclared RPCs, a version
without a model name, the stream's ``error_message`` with its ``id``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fineserve.bench.server_process import ServerProcess
from fineserve.server.kserve.tensors import encode_bytes_elements
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures import (
    TINY_IMAGE_SIZE,
    publish_tiny_models,
)
from tests.server.kserve_harness import running_server

SERVICE = "/inference.GRPCInferenceService/"


# tiny-image's own batching settings on the second server; tiny-text keeps the server-wide ones.
IMAGE_BATCHING = {
    "max_queue_size": 2,
    "preferred_batch_sizes": [2, 4],
    "max_queue_delay_ms": 7,
    "instances": 3,
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_models(tmp_path_factory.mktemp("stubs") / "models")


def wait_ready(server: ServerProcess, channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    grpc.channel_ready_future(channel).result(timeout=30)
    for _ in range(300):
        if stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
            return
        time.sleep(0.1)
    raise AssertionError("server not ready:\n" + server.log_tail())


@pytest.fixture(scope="module")
def channel(repository: Path) -> Iterator[grpc.Channel]:
    with running_server(repository) as server, grpc.insecure_channel(server.url) as channel:
        wait_ready(server, channel)
        yield channel


@pytest.fixture(scope="module")
def tuned_server(repository: Path) -> Iterator[ServerProcess]:
    """A second server with per-model batching for tiny-image (``FINESERVE_BATCHING``) over
    server-wide values (instances set, not measured: the count is then known)."""
    env = {"FINESERVE_BATCHING": json.dumps({"tiny-image": IMAGE_BATCHING})}
    with running_server(repository, "--instances=1", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def image_request(request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-image", id=request_id)
    shape = [1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]
    request.inputs.add(name="pixel_values", datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.zeros(shape, "<f4").tobytes())
    return request


def text_request(text: bytes, request_id: str = "", model: str = "tiny-text") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="texts", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_elements([text]))
    return request


def test_health_metadata_and_config(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny-image", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny-image", version="2")).ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "fineserve"
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny-text"))
    assert [t.name for t in meta.inputs] == ["input_ids", "attention_mask", "texts"]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="tiny-text", version="1")).config
    assert config.max_batch_size == 8 and config.WhichOneof("scheduling_choice") == "dynamic_batching"


def test_infer_with_typed_and_raw_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    typed = pb.ModelInferRequest(model_name="tiny-text", id="typed")
    for name in ("input_ids", "attention_mask"):
        tensor = typed.inputs.add(name=name, datatype="INT64", shape=[1, 3])
        tensor.contents.int64_contents.extend([2, 4, 3] if name == "input_ids" else [1, 1, 1])
    from_tensors = stub.ModelInfer(typed)
    from_text = stub.ModelInfer(text_request(b"good", "raw"))
    assert (from_tensors.id, from_text.id) == ("typed", "raw")
    assert from_tensors.model_version == "1"
    # "[CLS] good [SEP]" is what the tokenizer makes of "good": both forms give the same logits.
    assert from_tensors.raw_output_contents == from_text.raw_output_contents
    logits = np.frombuffer(from_text.raw_output_contents[0], "<f4").reshape(list(from_text.outputs[0].shape))
    assert logits.shape == (1, 2) and logits[0, 1] > logits[0, 0]


def test_stream_reports_errors_in_band_with_the_request_id(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    requests = [
        text_request(b"good", "a"),
        text_request(b"good", "b", model="nope"),
        text_request(b"bad", "c"),
    ]
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"a", "b", "c"}
    assert "'nope' is not in the repository" in by_id["b"].error_message
    assert not by_id["a"].error_message and len(by_id["c"].infer_response.raw_output_contents) == 2


def test_statistics_and_repository(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    stub.ModelInfer(text_request(b"great"))
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny-text")).model_stats
    assert stats[0].inference_count >= 1 and stats[0].inference_stats.success.count >= 1
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelStatistics(pb.ModelStatisticsRequest(version="1"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert {(m.name, m.state) for m in index} == {("tiny-image", "READY"), ("tiny-text", "READY")}
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny-image"))  # already served: no-op
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny-image")).ready
    with pytest.raises(grpc.RpcError) as other_repository:
        stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="elsewhere"))
    assert other_repository.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_undeclared_rpcs_are_unimplemented(channel: grpc.Channel) -> None:
    for rpc in ("TraceSetting", "LogSettings"):
        call = channel.unary_unary(SERVICE + rpc, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, rpc
    # System shared memory is declared, but off by default: refused, and not among the extensions.
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    refused: dict[str, Callable[[], object]] = {
        "register": lambda: stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=8), timeout=10
        ),
        "status": lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10),
        "unregister": lambda: stub.SystemSharedMemoryUnregister(
            pb.SystemSharedMemoryUnregisterRequest(), timeout=10
        ),
        "CUDA register": lambda: stub.CudaSharedMemoryRegister(
            pb.CudaSharedMemoryRegisterRequest(name="r", raw_handle=bytes(64), byte_size=8), timeout=10
        ),
        "CUDA status": lambda: stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), timeout=10),
        "CUDA unregister": lambda: stub.CudaSharedMemoryUnregister(
            pb.CudaSharedMemoryUnregisterRequest(), timeout=10
        ),
    }
    for what, rpc_call in refused.items():
        with pytest.raises(grpc.RpcError) as denied:
            rpc_call()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
        kind = "CUDA" if what.startswith("CUDA") else "system"
        assert f"{kind} shared memory is disabled" in (denied.value.details() or ""), what
    request = text_request(b"good")
    placed = request.inputs[0]
    placed.parameters["shared_memory_region"].string_param = "r"
    placed.parameters["shared_memory_byte_size"].int64_param = len(request.raw_input_contents[0])
    del request.raw_input_contents[:]
    with pytest.raises(grpc.RpcError) as infer_denied:
        stub.ModelInfer(request, timeout=10)
    assert infer_denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    extensions = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions
    assert "statistics" in extensions and "system_shared_memory" not in extensions
    assert "cuda_shared_memory" not in extensions


def test_an_expired_grpc_deadline_leaves_the_server_serving(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    # gRPC rounds tiny deadlines up and checks them on a coarse timer: a server that answers a lone
    # request at once can beat a 1 us deadline now and then, so some of several calls must expire.
    codes = []
    for _ in range(20):
        try:
            stub.ModelInfer(text_request(b"good"), timeout=1e-6)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    assert stub.ModelInfer(text_request(b"good"), timeout=30).model_name == "tiny-text"


def inference_count(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> int:
    return (
        stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0].inference_count
    )


def test_a_stream_stops_reading_while_its_client_does_not_read(tuned_server: ServerProcess) -> None:
    """A client that sends fast and never reads: the server runs only the requests it may hold
    (tiny-image's max_queue_size of 2, in flight or answered but unsent) plus the answers the
    client's small receive window takes; the rest wait unread until the client reads again."""
    sent = 300
    # A small fixed receive window, so unread answers back up to the server after a few.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    with grpc.insecure_channel(tuned_server.url, options=options) as channel:
        wait_ready(tuned_server, channel)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stream = stub.ModelStreamInfer((image_request(str(i)) for i in range(sent)), timeout=60)
        counts = [inference_count(stub, "tiny-image")]
        while len(counts) < 3 or counts[-1] != counts[-3]:  # settled: no change for 0.5 s
            time.sleep(0.25)
            counts.append(inference_count(stub, "tiny-image"))
            assert counts[-1] < 50, f"the server kept reading an unread stream: {counts}"
        # Reading again lets every request through; per-model limit 2 means none overflows the queue.
        answers = list(stream)
    assert [a.error_message for a in answers] == [""] * sent
    assert sorted(int(a.infer_response.id) for a in answers) == list(range(sent))


def test_model_config_shows_each_models_own_batching(tuned_server: ServerProcess) -> None:
    with grpc.insecure_channel(tuned_server.url) as channel:
        wait_ready(tuned_server, channel)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        image = stub.ModelConfig(pb.ModelConfigRequest(name="tiny-image")).config
        text = stub.ModelConfig(pb.ModelConfigRequest(name="tiny-text")).config
    batching = image.dynamic_batching
    assert (list(batching.preferred_batch_size), batching.max_queue_delay_microseconds) == ([2, 4], 7000)
    batching = text.dynamic_batching
    assert (list(batching.preferred_batch_size), batching.max_queue_delay_microseconds) == ([], 2000)
    # Instances: tiny-image's own, tiny-text the server-wide value.
    assert (image.instance_group[0].count, text.instance_group[0].count) == (3, 1)
