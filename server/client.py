"""A small typed Python client for the fineserve.v1 API, async and sync.

    from server.client import FineserveClient

    async with FineserveClient("localhost:8001") as client:
        labels = await client.classify("fashion", [jpeg_bytes], top_k=3)
        sentiments = await client.analyze_sentiment("sentiment", ["a fine film"])

``SyncFineserveClient`` has the same methods without ``await``. Failures raise ``grpc.RpcError``
whose ``code()`` is the documented status (docs/serving.md) and ``details()`` the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import grpc
import numpy as np

from server.pb.fineserve.v1 import fineserve_pb2 as pb
from server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 30.0
Image = bytes | np.ndarray


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float
    index: int


@dataclass(frozen=True)
class Sentiment:
    label: str
    score: float
    scores: tuple[LabelScore, ...]


@dataclass(frozen=True)
class ModelVersion:
    version: int
    state: str
    execution_provider: str
    variant: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    labels: tuple[str, ...]
    versions: tuple[ModelVersion, ...]
    max_batch_size: int
    metadata_json: str


# --- requests and replies: shared by both clients -----------------------------------------------


def classify_request(
    model: str, images: Sequence[Image], top_k: int, version: int | None
) -> pb.ClassifyRequest:
    """Encoded images as bytes, or ready float32 tensors (one image each, no batch axis)."""
    inputs = []
    for image in images:
        if isinstance(image, bytes):
            inputs.append(pb.ImageInput(encoded=image))
        else:
            array = np.ascontiguousarray(image, dtype="<f4")
            inputs.append(pb.ImageInput(tensor=pb.Tensor(shape=list(array.shape), fp32_data=array.tobytes())))
    return pb.ClassifyRequest(model=model, version=version or 0, images=inputs, top_k=top_k)


def _labels(message: Sequence[pb.LabelScore]) -> tuple[LabelScore, ...]:
    return tuple(LabelScore(s.label, s.score, s.index) for s in message)


def classifications(reply: pb.ClassifyResponse) -> list[tuple[LabelScore, ...]]:
    return [_labels(result.labels) for result in reply.results]


def sentiments(reply: pb.AnalyzeSentimentResponse) -> list[Sentiment]:
    return [Sentiment(r.label, r.score, _labels(r.scores)) for r in reply.results]


def model_infos(reply: pb.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name,
            task=m.task,
            labels=tuple(m.labels),
            versions=tuple(
                ModelVersion(v.version, v.state, v.execution_provider, v.variant) for v in m.versions
            ),
            max_batch_size=m.max_batch_size,
            metadata_json=m.metadata_json,
        )
        for m in reply.models
    ]


class FineserveClient:
    """Async client (grpc.aio). Use as ``async with``, or call ``close()``."""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.FineserveStub(self._channel)
        self.timeout = timeout

    async def classify(
        self, model: str, images: Sequence[Image], *, top_k: int = 5, version: int | None = None
    ) -> list[tuple[LabelScore, ...]]:
        """The top-k labels of each image, best first, in request order."""
        request = classify_request(model, images, top_k, version)
        return classifications(await self._stub.Classify(request, timeout=self.timeout))

    async def analyze_sentiment(
        self, model: str, texts: Sequence[str], *, version: int | None = None
    ) -> list[Sentiment]:
        request = pb.AnalyzeSentimentRequest(model=model, version=version or 0, texts=list(texts))
        return sentiments(await self._stub.AnalyzeSentiment(request, timeout=self.timeout))

    async def list_models(self) -> list[ModelInfo]:
        return model_infos(await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class SyncFineserveClient:
    """Blocking client. Use as ``with``, or call ``close()``."""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.FineserveStub(self._channel)
        self.timeout = timeout

    def classify(
        self, model: str, images: Sequence[Image], *, top_k: int = 5, version: int | None = None
    ) -> list[tuple[LabelScore, ...]]:
        request = classify_request(model, images, top_k, version)
        return classifications(self._stub.Classify(request, timeout=self.timeout))

    def analyze_sentiment(
        self, model: str, texts: Sequence[str], *, version: int | None = None
    ) -> list[Sentiment]:
        request = pb.AnalyzeSentimentRequest(model=model, version=version or 0, texts=list(texts))
        return sentiments(self._stub.AnalyzeSentiment(request, timeout=self.timeout))

    def list_models(self) -> list[ModelInfo]:
        return model_infos(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
