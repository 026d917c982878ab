"""Our fineserve.v1 API, health and reflection against a real server on a free port."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_models
from tests.server.running import RunningServer


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_models(tmp_path_factory.mktemp("api") / "models")


@pytest.fixture(scope="module")
def running(repository: Path) -> Iterator[RunningServer]:
    with RunningServer(
        repository, max_image_pixels=10_000, max_items_per_request=16, max_text_chars=200
    ) as server:
        yield server


@pytest.fixture(scope="module")
def channel(running: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(running.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.FineserveStub:
    return pb_grpc.FineserveStub(channel)


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code(), caught.value.details()


def assert_still_serving(stub: pb_grpc.FineserveStub) -> None:
    reply = stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=["good"]))
    assert reply.results[0].label == "positive"


# --- every RPC --------------------------------------------------------------------------------------


def test_classify_encoded_images_returns_top_k_per_image(stub: pb_grpc.FineserveStub) -> None:
    images = [pb.ImageInput(encoded=png(20, 12, seed)) for seed in range(3)]
    reply = stub.Classify(pb.ClassifyRequest(model="tiny-image", images=images, top_k=2))
    assert (reply.model, reply.version, len(reply.results)) == ("tiny-image", 1, 3)
    for result in reply.results:
        scores = [s.score for s in result.labels]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert all(s.label == f"class_{s.index}" for s in result.labels)


def test_classify_tensors_matches_encoded_after_same_preprocessing(stub: pb_grpc.FineserveStub) -> None:
    # An 8x8 PNG is already the model's size: its tensor is (pixels/255 - 0.5) / 0.5, CHW.
    pixels = np.random.default_rng(7).integers(0, 256, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    tensor = ((pixels.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    by_tensor = stub.Classify(
        pb.ClassifyRequest(
            model="tiny-image",
            images=[pb.ImageInput(tensor=pb.Tensor(shape=list(tensor.shape), fp32_data=tensor.tobytes()))],
            top_k=3,
        )
    )
    by_bytes = stub.Classify(
        pb.ClassifyRequest(model="tiny-image", images=[pb.ImageInput(encoded=buffer.getvalue())], top_k=3)
    )
    got = [(s.index, s.score) for s in by_tensor.results[0].labels]
    want = [(s.index, s.score) for s in by_bytes.results[0].labels]
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)


def test_analyze_sentiment_labels_each_text(stub: pb_grpc.FineserveStub) -> None:
    texts = ["a good great movie", "an awful boring plot", "love it", "I hate the plot"]
    reply = stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=texts))
    assert [r.label for r in reply.results] == ["positive", "negative", "positive", "negative"]
    for r in reply.results:
        assert [s.label for s in r.scores] == ["negative", "positive"]
        assert sum(s.score for s in r.scores) == pytest.approx(1.0, abs=1e-5)


def test_list_models_reports_versions_provider_and_metadata(stub: pb_grpc.FineserveStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"tiny-image", "tiny-text"}
    image = models["tiny-image"]
    assert image.task == "image-classification"
    assert list(image.labels) == ["class_0", "class_1", "class_2"]
    assert [(v.version, v.state, v.execution_provider, v.variant) for v in image.versions] == [
        (1, "READY", "CPUExecutionProvider", "fp32")
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in image.inputs] == [
        ("pixel_values", "FP32", [-1, 3, 8, 8])
    ]
    assert '"name": "tiny-image"' in image.metadata_json


def test_health_is_serving_for_the_server_and_each_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "fineserve.v1.Fineserve", "inference.GRPCInferenceService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_both_services(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = list(
        reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"fineserve.v1.Fineserve", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


# --- errors: the documented status, and the server keeps serving --------------------------------------


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (
            pb.ClassifyRequest(model="nope", images=[pb.ImageInput(encoded=b"x")]),
            "NOT_FOUND",
            "not in the repository",
        ),
        (
            pb.ClassifyRequest(model="tiny-image", version=7, images=[pb.ImageInput(encoded=b"x")]),
            "NOT_FOUND",
            "no version 7",
        ),
        (
            pb.ClassifyRequest(model="tiny-image", images=[pb.ImageInput(encoded=b"not an image")]),
            "INVALID_ARGUMENT",
            "item 0: not a decodable",
        ),
        (
            pb.ClassifyRequest(model="tiny-image", images=[pb.ImageInput(encoded=png(200, 200))]),
            "INVALID_ARGUMENT",
            "max_image_pixels",
        ),
        (
            pb.ClassifyRequest(model="tiny-image", images=[pb.ImageInput(encoded=png(4, 4))] * 17),
            "INVALID_ARGUMENT",
            "max_items_per_request",
        ),
        (pb.ClassifyRequest(model="tiny-image", images=[]), "INVALID_ARGUMENT", "no images"),
        (
            pb.ClassifyRequest(model="tiny-text", images=[pb.ImageInput(encoded=b"x")]),
            "INVALID_ARGUMENT",
            "text-classification model",
        ),
        (
            pb.ClassifyRequest(
                model="tiny-image",
                images=[pb.ImageInput(tensor=pb.Tensor(shape=[3, 4, 4], fp32_data=bytes(192)))],
            ),
            "INVALID_ARGUMENT",
            "shape [1, 3, 4, 4] does not match [-1, 3, 8, 8] (dimension 2 must be 8)",
        ),
        (
            pb.ClassifyRequest(
                model="tiny-image",
                images=[pb.ImageInput(tensor=pb.Tensor(shape=[3, 8, 8], fp32_data=bytes(10)))],
            ),
            "INVALID_ARGUMENT",
            "needs 768 bytes of float32",
        ),
        (
            pb.ClassifyRequest(model="tiny-image", top_k=-1, images=[pb.ImageInput(encoded=b"x")]),
            "INVALID_ARGUMENT",
            "top_k",
        ),
    ],
)
def test_classify_errors(
    stub: pb_grpc.FineserveStub, request_: pb.ClassifyRequest, code: str, words: str
) -> None:
    got, details = status_of(lambda: stub.Classify(request_))
    assert got == grpc.StatusCode[code]
    assert words in details
    assert_still_serving(stub)


def test_sentiment_limits_name_the_limit(stub: pb_grpc.FineserveStub) -> None:
    code, details = status_of(
        lambda: stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=["good " * 100]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_text_chars (200)" in details
    code, details = status_of(lambda: stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no items" in details
    assert_still_serving(stub)


def test_request_bytes_limits(repository: Path) -> None:
    settings = {"max_receive_message_bytes": 4096, "max_request_bytes": 2000}
    with RunningServer(repository, **settings) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FineserveStub(channel)
        over_limit = pb.ClassifyRequest(model="tiny-image", images=[pb.ImageInput(encoded=bytes(3000))])
        code, details = status_of(lambda: stub.Classify(over_limit))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_request_bytes (2000)" in details
        # Over the gRPC message size: refused by gRPC itself before it reaches us.
        too_big = pb.ClassifyRequest(model="tiny-image", images=[pb.ImageInput(encoded=bytes(8000))])
        code, _ = status_of(lambda: stub.Classify(too_big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_still_serving(stub)
