"""A model whose run time the request chooses, for overload, deadline and shutdown tests.

``slow-image`` has the tiny image model's interface (``pixel_values`` [N,3,8,8] -> ``logits``) and
runs a Loop of small matrix products as many times as the largest pixel value says, so a test
sends exactly the amount of work it wants; the loop adds zero to the logits, which stay the tiny
model's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fineserve.export.contract import Variant, read_model_spec, write_model_spec
from tests.fixtures import OPSET, publish_tiny_image_model

STATE = 32


def slow_image_graph(base: onnx.ModelProto) -> onnx.ModelProto:
    """``base`` (the tiny image graph) plus a Loop that runs max(pixel_values) times."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "mix"], ["mixed"]),
            helper.make_node("Tanh", ["mixed"], ["state_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [STATE, STATE]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [STATE, STATE]),
        ],
        initializer=[numpy_helper.from_array(np.full((STATE, STATE), 0.03, np.float32), "mix")],
    )
    graph = base.graph
    graph.node[-1].output[0] = "base_logits"
    graph.node.extend(
        [
            helper.make_node("ReduceMax", ["pixel_values"], ["largest"], keepdims=0),
            helper.make_node("Cast", ["largest"], ["trips_signed"], to=TensorProto.INT64),
            helper.make_node("Max", ["trips_signed", "zero_i"], ["trips"]),
            helper.make_node("Loop", ["trips", "true", "state0"], ["state"], body=body),
            helper.make_node("ReduceSum", ["state"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero_f"], ["nothing"]),
            helper.make_node("Add", ["base_logits", "nothing"], ["logits"]),
        ]
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
            numpy_helper.from_array(np.array(True), "true"),
            numpy_helper.from_array(np.full((STATE, STATE), 0.5, np.float32), "state0"),
        ]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def publish_slow_image_model(repository: Path, name: str = "slow-image", version: int = 1) -> Path:
    folder = publish_tiny_image_model(repository, name=name, version=version)
    graph_file = folder / "model.onnx"
    onnx.save(slow_image_graph(onnx.load(graph_file)), graph_file)
    spec = read_model_spec(folder)
    variants = {"fp32": Variant("model.onnx", "fp32", graph_file.stat().st_size)}
    write_model_spec(folder, dataclasses.replace(spec, variants=variants))
    return folder


def work(iterations: int, rows: int = 1) -> np.ndarray:
    """A pixel_values batch that makes slow-image loop ``iterations`` times."""
    batch = np.zeros((rows, 3, 8, 8), np.float32)
    batch[:, 0, 0, 0] = iterations
    return batch


def odd_batch_failing_graph(base: onnx.ModelProto) -> onnx.ModelProto:
    """``base`` (the tiny image graph) with its pooled features reshaped to pairs of rows and back:
    the same logits for an even batch size, a run-time Reshape error for an odd one."""
    graph = base.graph
    matmul = next(node for node in graph.node if node.op_type == "MatMul")
    matmul.input[0] = "pooled_again"
    first_after_pool = list(graph.node).index(matmul)
    reshapes = [
        helper.make_node("Reshape", ["pooled", "pairs_shape"], ["pairs"]),
        helper.make_node("Reshape", ["pairs", "rows_shape"], ["pooled_again"]),
    ]
    for offset, node in enumerate(reshapes):
        graph.node.insert(first_after_pool + offset, node)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1, 6], np.int64), "pairs_shape"),
            numpy_helper.from_array(np.array([-1, 3], np.int64), "rows_shape"),
        ]
    )
    onnx.checker.check_model(base)
    return base


def publish_odd_batch_failing_model(repository: Path, name: str = "even-only") -> Path:
    folder = publish_tiny_image_model(repository, name=name)
    onnx.save(odd_batch_failing_graph(onnx.load(folder / "model.onnx")), folder / "model.onnx")
    spec = read_model_spec(folder)
    variants = {"fp32": Variant("model.onnx", "fp32", (folder / "model.onnx").stat().st_size)}
    write_model_spec(folder, dataclasses.replace(spec, variants=variants))
    return folder
