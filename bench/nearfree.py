"""The near-free model: an 8x8 image classifier whose graph costs microseconds, published the way
users bring their own graphs (``fineserve export wrap``), so that serving figures measured on it
are the serving path's own cost (gRPC, checks, batching, metrics, replies), not the model's."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from fineserve.export.contract import ImagePreprocessing
from fineserve.export.pipeline import ExportSettings
from fineserve.export.wrap import wrap_onnx

NAME = "nearfree"
SIDE = 8
LABELS = ("a", "b", "c", "d")


def near_free_graph() -> onnx.ModelProto:
    """[N, 3, 8, 8] -> mean over the pixels -> [N, 3] @ [3, 4] -> logits [N, 4]."""
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [3, 4], np.arange(12, dtype=np.float32))
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixel_values", "axes"], ["channels"], keepdims=0),
            helper.make_node("MatMul", ["channels", "weight"], ["logits"]),
        ],
        NAME,
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
        initializer=[weight, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def publish_near_free_model(repository: Path, max_batch_size: int = 64) -> Path:
    """Publishes the next version of ``nearfree`` in ``repository``; returns its folder."""
    image = ImagePreprocessing(height=SIDE, width=SIDE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "nearfree.onnx"
        onnx.save(near_free_graph(), path)
        published = wrap_onnx(
            path,
            repository,
            NAME,
            task="image-classification",
            labels=LABELS,
            image=image,
            settings=ExportSettings(variants=("fp32",), max_batch_size=max_batch_size),
            log=lambda *_: None,
        )
    return published.version_dir
