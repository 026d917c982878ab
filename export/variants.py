"""Graph variants of a validated fp32 graph, and the size and CPU latency of each.

- fp16: for the CUDA execution provider. Inputs and outputs stay fp32 so clients and the server
  do not change; numerically fragile ops (normalisations, softmax, reductions) stay fp32. The gate
  can check it on onnxruntime's CPU provider, where it is not faster.
- int8 for CPU: dynamic quantisation for text (activation ranges are computed per batch, fine
  for matmul-heavy BERT; weights per output channel), static QDQ with calibration data for
  images (convolutions need fixed activation scales to run in int8).
- BERT graphs first get onnxruntime's transformer fusions (Attention, SkipLayerNormalization,
  EmbedLayerNormalization, BiasGelu).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fineserve.export.validate import open_session

# Kept in fp32 in the fp16 graph: onnxconverter-common's defaults plus the ops whose fp16
# accumulation loses accuracy (variance, exp-sums, large reductions).
FP16_KEEP_FP32_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "SimplifiedLayerNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceL2",
    "Pow",
    "Sqrt",
    "Erf",
)


def optimize_bert(src: Path, dst: Path, *, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime's BERT fusions; returns the count of each fused op."""
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size
    )
    model.save_model_to_file(str(dst))
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}


# Weight layers at the start of an image graph kept out of fp16/int8: a fine-tuned EfficientNet can
# fold very large BatchNorm scales into them (docs/export.md has the measurements behind 3).
LEADING_FP32_LAYERS = 3
_WEIGHT_LAYERS = ("Conv", "Gemm", "MatMul")


def leading_layers(model: onnx.ModelProto, count: int = LEADING_FP32_LAYERS) -> list[str]:
    """Names of the first ``count`` weight layers of an image graph (float input); [] for text."""
    float_input = any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    if not float_input:
        return []
    return [n.name for n in model.graph.node if n.op_type in _WEIGHT_LAYERS][:count]


def make_fp16(src: Path, dst: Path) -> list[str]:
    """fp32 graph -> fp16 weights and compute, fp32 inputs/outputs, fragile ops kept fp32.

    Image graphs also keep their first ``LEADING_FP32_LAYERS`` weight layers in fp32: the large
    BatchNorm scales a fine-tuned EfficientNet can fold into them flip top-1 answers in fp16.

    Standard-domain graphs go through onnxconverter-common. Graphs with onnxruntime's fused ops
    (com.microsoft Attention, SkipLayerNormalization, ...) go through onnxruntime's fork of the
    same converter, which knows those ops' type constraints: onnxconverter-common leaves
    Attention with fp16 weights but an fp32 mask, which onnxruntime refuses to load.

    Returns the names of the nodes kept in fp32 besides the op types of ``FP16_KEEP_FP32_OPS``.
    """
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    block = list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32_OPS]))
    for index, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"  # the block list matches names
    stem = leading_layers(model)
    if any(node.domain == "com.microsoft" for node in model.graph.node):
        from onnxruntime.transformers.onnx_model import OnnxModel

        fused = OnnxModel(model)
        fused.convert_float_to_float16(keep_io_types=True, op_block_list=block, node_block_list=stem)
        fused.save_model_to_file(str(dst))
        return stem
    with warnings.catch_warnings():
        # One warning per tiny weight flushed to fp16's smallest normal; the gate judges the result.
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=block, node_block_list=stem
        )
    _retarget_float_casts(converted)
    onnx.save(converted, str(dst))
    return stem


def _retarget_float_casts(model: onnx.ModelProto) -> None:
    """Makes the graph's own ``Cast(to=float)`` nodes cast to float16 where the converter typed
    their outputs float16.

    onnxconverter-common 1.15 retypes such an output (an attention mask cast to float, say) but
    leaves the node's ``to`` attribute at float, and onnxruntime refuses the graph ("Type
    (tensor(float16)) of output arg ... does not match expected type (tensor(float))";
    microsoft/onnxconverter-common#320). 1.14 changed the attribute; this does what it did.
    """
    float16_values = {
        v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    }
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in float16_values:
            continue
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                attribute.i = onnx.TensorProto.FLOAT16


def make_int8_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused ops (Attention, ...) are outside the default domain, where shape inference gives up:
    # tell the quantiser their tensors are float.
    # Per channel: one scale per weight column. With one scale per tensor, the quick sentiment
    # model of 2026-12-05 lost 1.3 points of test accuracy in int8 (83.5% -> 82.2%, over the
    # gate); per channel it lost 0.4 (83.1%).
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an iterable of input dicts."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def make_int8_static(src: Path, dst: Path, calibration: Iterable[dict[str, np.ndarray]]) -> list[str]:
    """Static QDQ quantisation, per-channel weights, activation ranges from ``calibration``;
    the leading layers stay fp32 (see ``LEADING_FP32_LAYERS``). Returns their names."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Batches, CalibrationDataReader):
        pass

    prepared = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(prepared))
        keep = leading_layers(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(dst),
            Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return keep


def measure_cpu_latency(path: Path, feed: dict[str, np.ndarray], runs: int = 30, warmup: int = 5) -> float:
    """Median wall time of one ``run`` at the given batch, in ms, on onnxruntime's CPU provider."""
    session = open_session(path)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 3)


def describe(path: Path) -> dict[str, Any]:
    return {"file": path.name, "size_bytes": path.stat().st_size}
