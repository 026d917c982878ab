"""The exporter choice is explicit and both work; the traps around export stay closed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fineserve.export.examples import Examples
from fineserve.export.onnx import UnsupportedModelError, export_onnx, prepare_for_export
from fineserve.export.pipeline import torch_logits
from fineserve.export.validate import check_fp32, open_session
from fineserve.training.checkpoint import load_checkpoint


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_both_exporters_give_dynamic_batch_graphs_equal_to_pytorch(exporter: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    wrapped = prepare_for_export(TinyConvNet(), "image-classification")
    graph = export_onnx(
        wrapped, "image-classification", tmp_path / "m.onnx", image_size=(8, 8), exporter=exporter
    )
    assert graph.exporter == exporter and onnx.load(str(graph.path)).opset_import[0].version == 18
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no external .data file
    pixels = np.random.default_rng(0).normal(size=(9, 3, 8, 8)).astype(np.float32)
    examples = Examples({"pixel_values": pixels}, np.full(9, -1), "noise")
    session = open_session(graph.path)
    assert isinstance(session.get_inputs()[0].shape[0], str)
    figures = check_fp32(session, torch_logits(wrapped, examples), examples, max_batch_size=9)
    assert figures["max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_dynamo_exporter_gives_one_self_contained_graph_that_passes_the_gate(
    image_run: Path, image_examples_: Examples, tmp_path: Path
) -> None:
    model, _ = load_checkpoint(image_run)
    wrapped = prepare_for_export(model, "image-classification")
    graph = export_onnx(
        wrapped, "image-classification", tmp_path / "m.onnx", image_size=(64, 64), exporter="dynamo"
    )
    assert graph.exporter == "dynamo" and graph.opset == 18
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no external .data file
    assert onnx.load(str(graph.path)).opset_import[0].version == 18
    session = open_session(graph.path)
    dims = session.get_inputs()[0].shape
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 64]  # dynamic batch
    figures = check_fp32(session, torch_logits(wrapped, image_examples_), image_examples_, max_batch_size=5)
    assert figures["max_abs_diff"] <= 1e-4


def test_text_graph_has_dynamic_batch_and_sequence_axes(
    text_run: Path, text_examples_: Examples, tmp_path: Path
) -> None:
    model, _ = load_checkpoint(text_run)
    wrapped = prepare_for_export(model, "text-classification")
    graph = export_onnx(wrapped, "text-classification", tmp_path / "t.onnx")
    session = open_session(graph.path)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert all(i.shape == ["batch", "sequence"] for i in session.get_inputs())
    # Padded batches, batch 1 unpadded, and the maximum: all within 1e-4 of PyTorch.
    figures = check_fp32(session, torch_logits(wrapped, text_examples_), text_examples_, max_batch_size=12)
    assert figures["max_abs_diff"] <= 1e-4


def test_export_leaves_the_reference_in_eval_mode(tmp_path: Path) -> None:
    class Dropper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.mean(dim=(2, 3)))

    wrapped = prepare_for_export(Dropper().train(), "image-classification")
    wrapped.train()  # as a caller might leave it; the exporter restores this mode after exporting
    export_onnx(wrapped, "image-classification", tmp_path / "d.onnx", image_size=(8, 8))
    assert not wrapped.training and not any(m.training for m in wrapped.modules())


def test_preparing_efficientnet_lite_keeps_its_relu6(image_run: Path, image_examples_: Examples) -> None:
    """``set_swish(memory_efficient=False)`` would swap Lite's ReLU6 for swish: a different model."""
    model, _ = load_checkpoint(image_run)
    pixels = torch.from_numpy(image_examples_.features["pixel_values"][:4])
    with torch.inference_mode():
        before = model(pixels).numpy()
        after = prepare_for_export(model, "image-classification")(pixels).numpy()
    np.testing.assert_array_equal(before, after)
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_unknown_task_and_exporter_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="unsupported task"):
        prepare_for_export(nn.Linear(2, 2), "object-detection")
    with pytest.raises(UnsupportedModelError, match="unknown exporter"):
        export_onnx(nn.Linear(2, 2), "image-classification", tmp_path / "x.onnx", exporter="tf2onnx")
