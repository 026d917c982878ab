"""The server on the default model repository (``make models``): every model loads and answers.

Skipped when ``models/`` at the repository root holds no default models yet.
"""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from export.contract import list_models
from server.pb.fineserve.v1 import fineserve_pb2 as pb
from server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.server.running import RunningServer

DEFAULTS = Path(__file__).resolve().parents[2] / "models"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not list_models(DEFAULTS), reason="no default models: run `make models` first"),
]


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_every_default_model_serves() -> None:
    with (
        RunningServer(DEFAULTS, repository_poll_s=0) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.FineserveStub(channel)
        models = stub.ListModels(pb.ListModelsRequest()).models
        assert models and all(m.versions[-1].state == "READY" for m in models), models
        photo = jpeg(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
        for model in models:
            if model.task == "image-classification":
                reply = stub.Classify(
                    pb.ClassifyRequest(model=model.name, images=[pb.ImageInput(encoded=photo)] * 3)
                )
                assert len(reply.results) == 3
                assert reply.results[0].labels[0].label in model.labels
                # The same image three times in one batch: the same answer three times.
                assert len({r.labels[0].index for r in reply.results}) == 1
            else:
                texts = ["a wonderful, moving and beautifully acted film", "a dull, tedious and boring mess"]
                reply = stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model=model.name, texts=texts))
                positive, negative = (r.label for r in reply.results)
                assert positive != negative
