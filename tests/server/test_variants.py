"""Every graph variant the export pipeline publishes, served: which one a server picks for its
``--precision`` / ``--prefer-int8-on-cpu`` flags, as its own KServe ModelConfig says, and that
its answers stay close to the fp32 graph's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fineserve.bench.server_process import ServerProcess
from fineserve.export.contract import read_model_spec
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_models

# Largest |logit - fp32 logit| each variant may show on the tiny models, whose logits reach ~2
# (measured: fp16 2.3e-4 on the image model, int8 5.9e-3 on the text model, whose dynamic
# quantisation rounds weights and activations to 256 levels; the image int8 graph keeps its one
# weight layer in fp32, as the pipeline keeps an image graph's first three).
TOLERANCE = {"fp32": 1e-6, "fp16": 2e-3, "int8": 2e-2}
# [CLS] good great [SEP] [PAD] / [CLS] movie the a plot [SEP] / [CLS] bad [SEP] [PAD] [PAD]
TOKEN_IDS = np.array([[2, 4, 5, 3, 0, 0], [2, 12, 13, 14, 15, 3], [2, 8, 3, 0, 0, 0]], np.int64)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_models(tmp_path_factory.mktemp("variants") / "models")


def test_the_tiny_models_are_published_with_every_variant(repository: Path) -> None:
    for model in ("tiny-image", "tiny-text"):
        spec = read_model_spec(repository / model / "1")
        assert sorted(spec.variants) == ["fp16", "fp32", "int8"]
        for variant in spec.variants.values():
            assert (repository / model / "1" / variant.file).stat().st_size == variant.size_bytes
    # Made by the export code, not copies: float16 weights, and the text model's int8 matmul.
    fp16 = onnx.load(repository / "tiny-text" / "1" / "model.fp16.onnx")
    assert {init.data_type for init in fp16.graph.initializer} >= {onnx.TensorProto.FLOAT16}
    int8 = onnx.load(repository / "tiny-text" / "1" / "model.int8.onnx")
    assert "MatMulInteger" in {node.op_type for node in int8.graph.node}


def image_batch() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.normal(size=(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype(np.float32)


def text_batch() -> dict[str, np.ndarray]:
    return {"input_ids": TOKEN_IDS, "attention_mask": (TOKEN_IDS != 0).astype(np.int64)}


def fp32_logits(repository: Path, model: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The fp32 graph's logits, from onnxruntime directly: the reference each variant is held to."""
    session = ort.InferenceSession(
        str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    logits: np.ndarray = session.run(["logits"], feed)[0]
    return logits


def infer_logits(
    stub: pb_grpc.GRPCInferenceServiceStub, model: str, feed: dict[str, np.ndarray]
) -> np.ndarray:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in feed.items():
        datatype = "FP32" if array.dtype == np.float32 else "INT64"
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    request.outputs.add(name="logits")
    reply = stub.ModelInfer(request)
    return np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(reply.outputs[0].shape))


@pytest.fixture
def serve(repository: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts ``python -m fineserve.server`` with the given flags; stopped after the test."""
    started: list[ServerProcess] = []

    def start(*flags: str) -> ServerProcess:
        server = ServerProcess(repository, ["--metrics-port", "-1", "--repository-poll-s", "0", *flags])
        started.append(server)
        server.start(120)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize(
    ("flags", "variant"),
    [
        ((), "fp32"),  # precision auto on CPU: fp32, though fp16 and int8 are there
        (("--prefer-int8-on-cpu",), "int8"),
        (("--precision", "int8"), "int8"),
        (("--device", "cpu", "--precision", "fp16"), "fp16"),
        (("--precision", "fp32", "--prefer-int8-on-cpu"), "fp32"),  # a named precision wins
    ],
)
def test_the_server_serves_the_variant_its_flags_ask_for(
    repository: Path, serve: Callable[..., ServerProcess], flags: tuple[str, ...], variant: str
) -> None:
    server = serve(*flags)
    feeds = {"tiny-image": {"pixel_values": image_batch()}, "tiny-text": text_batch()}
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model, feed in feeds.items():
            config = stub.ModelConfig(pb.ModelConfigRequest(name=model)).config
            assert config.parameters["variant"].string_value == variant
            assert config.parameters["provider"].string_value == "CPUExecutionProvider"
            got = infer_logits(stub, model, feed)
            want = fp32_logits(repository, model, feed)
            np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[variant])
            assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    warned = any("precision=fp16 on CPUExecutionProvider" in line for line in server.log)
    assert warned == (variant == "fp16")
