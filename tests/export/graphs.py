"""The tiny image graph of ``tests/fixtures.py`` with damaged weights or renamed as another tool
would write it, and what the intact graph computes, in numpy (a reference made independently)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from fineserve.export.examples import Examples
from tests.fixtures import tiny_image_graph


def scaled_image_graph(scale: float) -> onnx.ModelProto:
    """The tiny image graph with its weight matrix times ``scale`` (1.01: a damaged graph)."""
    graph = tiny_image_graph()
    for i, init in enumerate(graph.graph.initializer):
        if init.name == "weight":
            graph.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init) * scale, "weight")
            )
    return graph


def foreign_image_graph(scale: float = 1.0) -> onnx.ModelProto:
    """The tiny image graph as another tool would name it, with an extra label output."""
    graph = scaled_image_graph(scale)
    renames = {"pixel_values": "float_input", "logits": "scores_out"}
    for node in graph.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    graph.graph.input[0].name = "float_input"
    graph.graph.output[0].name = "scores_out"
    graph.graph.node.append(onnx.helper.make_node("ArgMax", ["scores_out"], ["label"], axis=1, keepdims=0))
    graph.graph.output.append(onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["batch"]))
    onnx.checker.check_model(graph)
    return graph


def tiny_image_reference(examples: Examples) -> np.ndarray:
    """What the intact tiny graph computes for ``examples``: channel means -> linear."""
    weights = {i.name: numpy_helper.to_array(i) for i in tiny_image_graph().graph.initializer}
    return examples.features["pixel_values"].mean(axis=(2, 3)) @ weights["weight"] + weights["bias"]
