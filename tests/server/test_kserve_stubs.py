"""The KServe v2 service through our own generated stubs (``server.pb.inference``), on the wire.

tritonclient covers the client's view (``test_kserve_server.py``); this covers what a client built
from our protos sees, and the corners tritonclient never reaches: undeclared RPCs, a version
without a model name, the stream's ``error_message`` with its ``id``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from server import kserve_codec as codec
from server.pb.inference import grpc_service_pb2 as pb
from server.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures import publish_tiny_image_model, publish_tiny_text_model
from tests.server.kserve_harness import running_server

SERVICE = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    repository: Path = tmp_path_factory.mktemp("stubs") / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    with running_server(repository) as server, grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        for _ in range(300):
            if stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("server not ready:\n" + server.log_tail())
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def text_request(text: bytes, request_id: str = "", model: str = "tiny-text") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="texts", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(codec.encode_bytes_elements([text]))
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
    for rpc in ("SystemSharedMemoryStatus", "CudaSharedMemoryRegister", "TraceSetting", "LogSettings"):
        call = channel.unary_unary(SERVICE + rpc, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, rpc


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
