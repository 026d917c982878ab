"""The gate refuses damaged graphs, each failure with its own error type, and publishes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fineserve.export import validate
from fineserve.export.contract import ImagePreprocessing, TensorSpec, list_versions
from fineserve.export.examples import UNLABELLED, Examples
from fineserve.export.pipeline import ExportSettings, ModelToExport, export_and_publish
from tests.export.graphs import scaled_image_graph, tiny_image_reference
from tests.fixtures import TINY_IMAGE_SIZE, tiny_image_graph

INPUTS = (TensorSpec("pixel_values", "FP32", (-1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)),)
OUTPUTS = (TensorSpec("logits", "FP32", (-1, 3)),)


def _save(model: onnx.ModelProto, path: Path) -> validate.ort.InferenceSession:
    onnx.save(model, path)
    return validate.open_session(path)


def _examples(n: int = 11, labels: np.ndarray | None = None) -> Examples:
    pixels = np.random.default_rng(1).normal(size=(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype(np.float32)
    return Examples(
        {"pixel_values": pixels}, labels if labels is not None else np.full(n, UNLABELLED), "noise"
    )


def test_intact_graph_passes_fp32_at_every_batch_size(tmp_path: Path) -> None:
    session = _save(tiny_image_graph(), tmp_path / "m.onnx")
    examples = _examples()
    validate.check_interface(session, INPUTS, OUTPUTS)
    figures = validate.check_fp32(session, tiny_image_reference(examples), examples, max_batch_size=8)
    assert (
        figures["batch_sizes"] == [1, 7, 8] and figures["max_abs_diff"] <= 1e-4 and figures["top1_identical"]
    )


def test_damaged_weights_fail_the_value_check(tmp_path: Path) -> None:
    session = _save(scaled_image_graph(1.01), tmp_path / "m.onnx")
    examples = _examples()
    validate.check_interface(session, INPUTS, OUTPUTS)  # names and shapes are fine...
    with pytest.raises(validate.ValueMismatchError, match="batch 1"):  # ...the values are not
        validate.check_fp32(session, tiny_image_reference(examples), examples, max_batch_size=8)


def test_renamed_output_fails_the_names_check_first(tmp_path: Path) -> None:
    graph = tiny_image_graph()
    graph.graph.node[-1].output[0] = "probabilities"
    graph.graph.output[0].name = "probabilities"
    with pytest.raises(validate.OutputNamesError, match="probabilities"):
        validate.check_interface(_save(graph, tmp_path / "m.onnx"), INPUTS, OUTPUTS)


def test_fixed_batch_axis_fails_the_dynamic_axes_check(tmp_path: Path) -> None:
    graph = tiny_image_graph()
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(validate.DynamicAxesError, match="axis 0"):
        validate.check_interface(_save(graph, tmp_path / "m.onnx"), INPUTS, OUTPUTS)


def test_wrong_image_size_and_class_count_fail_the_shape_checks(tmp_path: Path) -> None:
    small = _save(tiny_image_graph(size=4), tmp_path / "small.onnx")
    with pytest.raises(validate.ShapeError, match="axis 2"):
        validate.check_interface(small, INPUTS, OUTPUTS)
    four = tiny_image_graph(num_classes=4)
    four.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"  # only visible at run time
    session = _save(four, tmp_path / "four.onnx")
    with pytest.raises(validate.ShapeError, match=r"returned \[1, 4\]"):
        validate.run_batched(session, _examples(), 1, num_labels=3)


def test_fp16_and_int8_thresholds(tmp_path: Path) -> None:
    examples = _examples(40)
    reference = tiny_image_reference(examples)
    other = _save(tiny_image_graph(seed=7), tmp_path / "other.onnx")  # a different model altogether
    with pytest.raises(validate.Fp16AgreementError, match="agreement"):
        validate.check_fp16(other, reference, examples, max_batch_size=8)
    with pytest.raises(validate.Int8AccuracyError, match="drop"):
        validate.check_int8(other, reference, examples, max_batch_size=8)
    # Labelled examples: the drop is measured against the true labels, not the reference top-1.
    same = _save(tiny_image_graph(), tmp_path / "same.onnx")
    truth = reference.argmax(axis=1)
    truth[:4] = (truth[:4] + 1) % 3  # the reference gets 4 of 40 wrong
    labelled = Examples(examples.features, truth, "noise")
    figures = validate.check_int8(same, reference, labelled, max_batch_size=8)
    assert figures["label_source"] == "held-out labels"
    assert figures["reference_accuracy"] == pytest.approx(0.9) and figures["accuracy_drop_points"] <= 1e-9


class BatchDependentClassifier(nn.Module):
    """Branches on the batch size in Python: the tracer bakes in the branch of its example batch
    (2), so the ONNX graph differs from PyTorch at every other batch size. A real exporter trap."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.mean(dim=(2, 3)))
        return logits * 3 if x.shape[0] == 2 else logits


def test_a_graph_that_differs_from_pytorch_publishes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    item = ModelToExport(
        model=BatchDependentClassifier(),
        task="image-classification",
        labels=("a", "b", "c"),
        image=ImagePreprocessing(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    )
    repository = tmp_path / "models"
    with pytest.raises(validate.ValueMismatchError):
        export_and_publish(item, _examples(), repository, "broken", settings=ExportSettings(max_batch_size=4))
    assert list_versions(repository / "broken") == []
    assert list((repository / "broken").iterdir()) == []  # no temporary folder left behind


def test_a_graph_onnxruntime_cannot_load_is_a_failed_check(tmp_path: Path) -> None:
    # e.g. an fp16 conversion that leaves a float16 tensor where float is declared
    (tmp_path / "model.fp16.onnx").write_bytes(b"not a graph at all")
    with pytest.raises(validate.GraphLoadError, match=r"onnxruntime cannot load model\.fp16\.onnx"):
        validate.open_session(tmp_path / "model.fp16.onnx")
