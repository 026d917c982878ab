"""A calibrated temperature other than 1 reaches the scores of both APIs: softmax(logits / T)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as kpb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_image_model
from tests.server.running import RunningServer

TEMPERATURE = 2.0


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def test_both_apis_score_with_the_models_temperature(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    version_dir = publish_tiny_image_model(repository)
    meta = json.loads((version_dir / "model.json").read_text())
    meta["temperature"] = TEMPERATURE
    (version_dir / "model.json").write_text(json.dumps(meta))
    # Inputs far enough from zero that T = 2 and T = 1 give clearly different probabilities.
    image = np.random.default_rng(3).normal(size=(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype(np.float32)
    image += np.array([1.0, -1.0, 0.5], np.float32)[None, :, None, None]
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"pixel_values": image})[0].astype(np.float64)
    expected = softmax(logits / TEMPERATURE)[0]
    assert np.abs(expected - softmax(logits)[0]).max() > 0.05  # the test can tell T = 2 from T = 1

    with RunningServer(repository) as server, grpc.insecure_channel(server.target) as channel:
        tensor = pb.Tensor(shape=list(image.shape[1:]), fp32_data=image[0].astype("<f4").tobytes())
        request = pb.ClassifyRequest(model="tiny-image", images=[pb.ImageInput(tensor=tensor)], top_k=3)
        labels = pb_grpc.FineserveStub(channel).Classify(request, timeout=10).results[0].labels
        np.testing.assert_allclose(
            sorted((s.index, s.score) for s in labels), list(enumerate(expected)), atol=1e-5
        )

        infer = kpb.ModelInferRequest(model_name="tiny-image")
        infer.inputs.add(name="pixel_values", datatype="FP32", shape=list(image.shape))
        infer.raw_input_contents.append(image.astype("<f4").tobytes())
        infer.outputs.add(name="probabilities")
        reply = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer, timeout=10)
        [output] = reply.outputs
        assert output.name == "probabilities"
        probabilities = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(output.shape))
        np.testing.assert_allclose(probabilities[0], expected, atol=1e-5)
