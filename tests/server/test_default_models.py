"""The server on the default model repository (``make models``): every model loads and answers.

With ``models/`` built (``make models``), every default model there is served. On a fresh clone
(CI), where ``models/`` is empty, the ``imagenet`` default model, the one that needs no training,
is built into a temporary repository by the real ``export defaults`` command and served instead.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from fineserve.export.contract import list_models
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.server.running import RunningServer

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = ROOT / "models"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if list_models(DEFAULTS):
        return DEFAULTS
    repository = tmp_path_factory.mktemp("defaults") / "models"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fineserve.export",
            "defaults",
            "--repository",
            str(repository),
            "--only",
            "imagenet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list_models(repository) == ["imagenet"]
    return repository


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_every_default_model_serves(default_repository: Path) -> None:
    with (
        RunningServer(default_repository, repository_poll_s=0) as server,
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


def test_imagenet_default_recognises_the_sample_photos(default_repository: Path) -> None:
    """The pretrained ImageNet model, end to end through the server's own JPEG preprocessing."""
    if "imagenet" not in list_models(default_repository):
        pytest.skip("models/ holds no imagenet model")
    from skimage import data

    with (
        RunningServer(default_repository, repository_poll_s=0) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.FineserveStub(channel)
        photos = [pb.ImageInput(encoded=jpeg(data.chelsea())), pb.ImageInput(encoded=jpeg(data.coffee()))]
        cat, coffee = stub.Classify(pb.ClassifyRequest(model="imagenet", images=photos, top_k=5)).results
        assert "Egyptian cat" in [s.label for s in cat.labels]
        assert coffee.labels[0].label == "espresso"
