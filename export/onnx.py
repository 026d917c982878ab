"""PyTorch classifier -> ONNX graph with client-facing names and dynamic batch (and sequence) axes.

The exporter is chosen explicitly: torch >= 2.9 defaults to the dynamo exporter, which behaves
differently (it needs ``onnxscript``, writes large weights as external data unless told not to,
and takes ``dynamic_shapes`` instead of ``dynamic_axes``). ``torchscript`` (``dynamo=False``) is
our default because it gives the smaller, fusion-friendly graph onnxruntime's BERT optimiser
recognises; ``dynamo`` is selectable and tested.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fineserve.export.errors import OnnxExportError, UnsupportedModelError

OPSET = 18
Exporter = Literal["torchscript", "dynamo"]
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
# Opsets we export at, per exporter. The floor is ours: fp16 conversion and int8 per-channel QDQ
# quantisation need opset 13 (below it the variants fail to load). The ceilings are torch's: the
# TorchScript exporter implements up to ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET; dynamo translates at
# 18 and converts up to ONNX_MAX_OPSET, below 18 only with a warning.
_TORCH_OPSETS = getattr(torch.onnx, "_constants", None)
OPSET_RANGES: dict[str, tuple[int, int]] = {
    "torchscript": (13, int(getattr(_TORCH_OPSETS, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))),
    "dynamo": (18, int(getattr(_TORCH_OPSETS, "ONNX_MAX_OPSET", 23))),
}
IMAGE_INPUT = "pixel_values"
TEXT_INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"


@dataclass(frozen=True)
class ExportedGraph:
    path: Path
    exporter: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


class ImageClassifierForExport(nn.Module):
    """``pixel_values [N,3,H,W] -> logits [N,K]``: fixes the graph's input name."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


class TextClassifierForExport(nn.Module):
    """``input_ids, attention_mask [N,S] -> logits [N,K]``: unwraps Hugging Face's output object."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out


def prepare_for_export(model: nn.Module, task: str) -> nn.Module:
    """Wraps ``model`` for export and puts it in eval mode; the result is also the PyTorch
    reference the graph is compared against.

    Raises:
        UnsupportedModelError: the task is neither image nor text classification.
    """
    if task == "image-classification":
        _plain_swish(model)
        return ImageClassifierForExport(model).eval()
    if task == "text-classification":
        # Eager attention exports to the MatMul/Softmax pattern onnxruntime fuses into its
        # Attention op; the sdpa path exports a pattern the optimiser leaves unfused.
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        return TextClassifierForExport(model).eval()
    raise UnsupportedModelError(f"unsupported task {task!r}: expected image- or text-classification")


def _plain_swish(model: nn.Module) -> None:
    """Swaps EfficientNet's memory-efficient swish (a custom autograd function the exporter
    cannot trace) for the plain one, module by module.

    Not ``model.set_swish(memory_efficient=False)``: on EfficientNet-*Lite* that call replaces
    the ReLU6 activations with swish, silently turning the network into a different one (the
    ImageNet model then calls the cat photo a "tabby" and int8 agreement collapses).
    """
    for module in model.modules():
        activation = getattr(module, "_swish", None)
        if type(activation).__name__ == "MemoryEfficientSwish":
            from efficientnet_lite_pytorch.utils import Swish

            module._swish = Swish()


def check_exporter(exporter: str, opset: int) -> None:
    """Refuses an exporter or opset ``export_onnx`` cannot use, before any export work (an
    opset the exporter rejects makes it print the whole TorchScript graph first).

    Raises:
        UnsupportedModelError: unknown exporter, or an opset outside ``OPSET_RANGES``.
    """
    if exporter not in EXPORTERS:
        raise UnsupportedModelError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    low, high = OPSET_RANGES[exporter]
    if not low <= opset <= high:
        raise UnsupportedModelError(f"opset {opset}: the {exporter} exporter takes opsets {low} to {high}")


def example_inputs(task: str, image_size: tuple[int, int] = (224, 224)) -> tuple[torch.Tensor, ...]:
    """Tracing inputs. Batch 2 (not 1) so no exporter specialises the batch axis to a constant."""
    if task == "image-classification":
        return (torch.randn(2, 3, *image_size),)
    ids = torch.randint(5, 1000, (2, 8))
    return (ids, torch.ones_like(ids))


def export_onnx(
    wrapped: nn.Module,
    task: str,
    path: Path,
    *,
    image_size: tuple[int, int] = (224, 224),
    exporter: str = "torchscript",
    opset: int = OPSET,
) -> ExportedGraph:
    """Exports a module made by ``prepare_for_export`` to ``path`` (one self-contained file).

    Raises:
        UnsupportedModelError: unknown task or exporter name, or an opset it does not take.
        OnnxExportError: the exporter failed.
    """
    check_exporter(exporter, opset)
    inputs = example_inputs(task, image_size)
    input_names = (IMAGE_INPUT,) if task == "image-classification" else TEXT_INPUTS
    axes: dict[int, str] = (
        {0: BATCH_AXIS} if task == "image-classification" else {0: BATCH_AXIS, 1: SEQUENCE_AXIS}
    )
    kwargs: dict[str, Any]
    if exporter == "dynamo":
        dims = {i: torch.export.Dim(name) for i, name in axes.items()}
        kwargs = {"dynamic_shapes": {name: dims for name in input_names}, "external_data": False}
    else:
        dynamic_axes: dict[str, dict[int, str]] = {name: axes for name in input_names}
        kwargs = {"dynamic_axes": {**dynamic_axes, OUTPUT: {0: BATCH_AXIS}}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped,
                inputs,
                str(path),
                input_names=list(input_names),
                output_names=[OUTPUT],
                opset_version=opset,
                dynamo=exporter == "dynamo",
                **kwargs,
            )
    except Exception as err:  # the exporters raise many unrelated types
        message = f"{exporter} export failed: {type(err).__name__}: {err}".splitlines()[0]
        raise OnnxExportError(message) from err
    finally:
        # The exporter restores the training mode the module had before; a wrapper built
        # without .eval() would then compare with dropout on. Always back to eval.
        wrapped.eval()
    return ExportedGraph(path, exporter, opset, input_names, (OUTPUT,))
