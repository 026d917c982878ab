"""Our fineserve.v1 gRPC service. Each method: convert the request, call the core, convert the reply.

The converters below are the only code that touches fineserve.v1 messages; errors become
statuses in ``grpc_status``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc
import numpy as np
from typing_extensions import override

from fineserve.export.contract import ModelSpec
from fineserve.server.classification import ClassScore, top_classes
from fineserve.server.dataplane import DataPlane, ModelHandle, ModelIndexEntry
from fineserve.server.errors import InvalidInput
from fineserve.server.grpc_status import cancelled_of, deadline_of, grpc_errors, headers_of
from fineserve.server.message_limits import check_message_size
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
DEFAULT_TOP_K = 5


class FineserveServicer(pb_grpc.FineserveServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    @override
    @grpc_errors
    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        with self._dataplane.observe(request.model, items=len(request.images), headers=headers_of(context)):
            check_message_size(self._dataplane.settings, request.model, request)
            handle = self._dataplane.resolve(request.model, request.version or None)
            _expect_task(handle.spec, "image-classification", "Classify")
            top_k = _top_k(request.top_k, len(handle.spec.labels))
            encoded, tensors = images_from_request(request.images, handle.spec)
            deadline, is_cancelled = deadline_of(context), cancelled_of(context)
            if encoded is not None:
                result = await self._dataplane.infer_encoded(
                    handle.name, handle.version, encoded, deadline=deadline, is_cancelled=is_cancelled
                )
            else:
                result = await self._dataplane.infer(
                    handle.name, handle.version, tensors, deadline=deadline, is_cancelled=is_cancelled
                )
            return classify_response(result.handle, result.probabilities(), top_k)

    @override
    @grpc_errors
    async def AnalyzeSentiment(
        self, request: pb.AnalyzeSentimentRequest, context: Context
    ) -> pb.AnalyzeSentimentResponse:
        with self._dataplane.observe(request.model, items=len(request.texts), headers=headers_of(context)):
            check_message_size(self._dataplane.settings, request.model, request)
            handle = self._dataplane.resolve(request.model, request.version or None)
            _expect_task(handle.spec, "text-classification", "AnalyzeSentiment")
            items = [text.encode("utf-8") for text in request.texts]
            result = await self._dataplane.infer_encoded(
                handle.name,
                handle.version,
                items,
                deadline=deadline_of(context),
                is_cancelled=cancelled_of(context),
            )
            return sentiment_response(result.handle, result.probabilities())

    @override
    @grpc_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return list_models_response(self._dataplane.index())


# --- converters ---------------------------------------------------------------------------------


def _expect_task(spec: ModelSpec, task: str, rpc: str) -> None:
    if spec.task != task:
        raise InvalidInput(f"model {spec.name!r} is a {spec.task} model; {rpc} needs a {task} model")


def _top_k(requested: int, labels: int) -> int:
    if requested < 0:
        raise InvalidInput(f"top_k must be >= 0, got {requested}")
    return min(requested or DEFAULT_TOP_K, labels)


def images_from_request(
    images: Sequence[pb.ImageInput], spec: ModelSpec
) -> tuple[list[bytes] | None, dict[str, np.ndarray]]:
    """Either the encoded images, or the ready tensors stacked into the model's input batch."""
    if not images:
        raise InvalidInput("the request has no images")
    kinds = {image.WhichOneof("source") for image in images}
    if None in kinds:
        raise InvalidInput("every image needs either encoded bytes or a tensor")
    if len(kinds) > 1:
        raise InvalidInput("send images either all encoded or all as tensors, not mixed")
    if kinds == {"encoded"}:
        return [image.encoded for image in images], {}
    arrays = [tensor_from_message(i, image.tensor) for i, image in enumerate(images)]
    if len({a.shape for a in arrays}) > 1:
        raise InvalidInput(f"image tensors differ in shape: {sorted({a.shape for a in arrays})}")
    batch = arrays[0][np.newaxis] if len(arrays) == 1 else np.stack(arrays)
    return None, {spec.inputs[0].name: batch}


def tensor_from_message(index: int, tensor: pb.Tensor) -> np.ndarray:
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or any(d < 1 for d in shape):
        raise InvalidInput(f"image {index}: tensor shape {list(shape)} must be non-empty with positive sizes")
    data = tensor.fp32_data  # each access copies the bytes out of the message: read it once
    expected = math.prod(shape) * 4
    if len(data) != expected:
        raise InvalidInput(
            f"image {index}: shape {list(shape)} needs {expected} bytes of float32, got {len(data)}"
        )
    return np.frombuffer(data, dtype="<f4").reshape(shape)


def _label_score(found: ClassScore) -> pb.LabelScore:
    return pb.LabelScore(label=found.label, score=found.score, index=found.index)


def classify_response(handle: ModelHandle, probabilities: np.ndarray, top_k: int) -> pb.ClassifyResponse:
    results = [
        pb.Classification(labels=[_label_score(found) for found in row])
        for row in top_classes(probabilities, top_k, handle.spec.labels)
    ]
    return pb.ClassifyResponse(model=handle.name, version=handle.version, results=results)


def sentiment_response(handle: ModelHandle, probabilities: np.ndarray) -> pb.AnalyzeSentimentResponse:
    labels = handle.spec.labels
    results = []
    for row, [best] in zip(probabilities, top_classes(probabilities, 1, labels), strict=True):
        scores = [
            pb.LabelScore(label=label, score=float(p), index=i)
            for i, (label, p) in enumerate(zip(labels, row, strict=True))
        ]
        results.append(pb.Sentiment(label=best.label, score=best.score, scores=scores))
    return pb.AnalyzeSentimentResponse(model=handle.name, version=handle.version, results=results)


def list_models_response(entries: Sequence[ModelIndexEntry]) -> pb.ListModelsResponse:
    by_model: dict[str, list[ModelIndexEntry]] = {}
    for entry in entries:
        by_model.setdefault(entry.name, []).append(entry)
    models = []
    for name, versions in by_model.items():
        ready = [e for e in versions if e.spec is not None]
        info = pb.ModelInfo(
            name=name,
            versions=[
                pb.ModelVersion(
                    version=e.version, state=e.state, execution_provider=e.provider, variant=e.variant
                )
                for e in versions
            ],
        )
        if ready:
            spec = ready[-1].spec
            assert spec is not None
            info.task = spec.task
            info.labels.extend(spec.labels)
            info.inputs.extend(_tensor_specs(spec.inputs))
            info.outputs.extend(_tensor_specs(spec.outputs))
            info.max_batch_size = spec.max_batch_size
            info.metadata_json = spec.to_json()
        models.append(info)
    return pb.ListModelsResponse(models=models)


def _tensor_specs(tensors: Sequence[Any]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in tensors]
