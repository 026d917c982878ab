"""From a PyTorch classifier to a published, validated repository version.

Order: export fp32 -> (BERT fusions) -> gate -> each variant -> its gate -> latencies ->
``model.json`` -> atomic rename. Everything is built in a temporary folder; the first failed
check raises and the folder disappears, so nothing half-checked is ever published.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from fineserve.export import validate, variants
from fineserve.export.contract import (
    ImagePreprocessing,
    ModelSpec,
    TensorSpec,
    TextPreprocessing,
    Variant,
    image_preprocessing_from_dict,
    read_model_spec,
    text_preprocessing_from_dict,
)
from fineserve.export.errors import UnsupportedModelError, ValidationError
from fineserve.export.examples import Examples, load_tokenizer
from fineserve.export.onnx import (
    IMAGE_INPUT,
    OPSET,
    OUTPUT,
    TEXT_INPUTS,
    export_onnx,
    prepare_for_export,
)
from fineserve.export.publish import publish, staging_folder

FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
DEFAULT_VARIANTS: tuple[str, ...] = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class ExportSettings:
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    exporter: str = "torchscript"
    opset: int = OPSET
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    latency_runs: int = 30
    fp32_tolerance: float = validate.FP32_TOLERANCE
    fp16_min_agreement: float = validate.FP16_MIN_AGREEMENT
    int8_max_drop_points: float = validate.INT8_MAX_DROP_POINTS
    # Variants left out (and recorded in source.rejected_variants) when their check fails,
    # instead of failing the whole export; fp32 is never optional.
    optional_variants: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelToExport:
    """A classifier in PyTorch and everything the repository entry records about it."""

    model: nn.Module
    task: str
    labels: tuple[str, ...]
    image: ImagePreprocessing | None = None
    text: TextPreprocessing | None = None
    tokenizer_path: Path | None = None
    temperature: float = 1.0
    source: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Published:
    version_dir: Path
    spec: ModelSpec
    seconds: float


def io_specs(
    task: str, num_labels: int, image: ImagePreprocessing | None
) -> tuple[tuple[TensorSpec, ...], ...]:
    if task == "image-classification":
        assert image is not None
        inputs: tuple[TensorSpec, ...] = (
            TensorSpec(IMAGE_INPUT, "FP32", (-1, 3, image.height, image.width)),
        )
    else:
        inputs = tuple(TensorSpec(name, "INT64", (-1, -1)) for name in TEXT_INPUTS)
    return inputs, (TensorSpec(OUTPUT, "FP32", (-1, num_labels)),)


def torch_logits(
    wrapped: nn.Module, examples: Examples, batch_size: int = 64, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """The PyTorch reference: logits of every example (text in per-batch padding)."""
    wrapped.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            feed = examples.take(slice(start, start + batch_size))
            tensors = [torch.from_numpy(v) for v in feed.values()]
            tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
            out.append(wrapped(*tensors).double().numpy())
    logits = np.concatenate(out)
    return logits.astype(np.float32) if dtype == torch.float32 else logits


def reference_error(wrapped: nn.Module, examples: Examples, reference: np.ndarray) -> float:
    """How far PyTorch's own fp32 logits are from the exact (float64) ones: the larger error of
    the reference (batch 64) and of PyTorch one example at a time.

    PyTorch's fp32 error changes with the batch size (other kernels, other summation orders), and
    the graph is checked at batch 1 too: measured at batch 64 alone, it understated the error the
    gate must allow (docs/export.md, "fp32 tolerance").
    """
    exact = torch_logits(copy.deepcopy(wrapped).double(), examples, dtype=torch.float64)
    one_by_one = torch_logits(wrapped, examples, batch_size=1).astype(np.float64)
    return max(
        float(np.abs(reference.astype(np.float64) - exact).max()), float(np.abs(one_by_one - exact).max())
    )


def export_and_publish(
    item: ModelToExport,
    examples: Examples,
    repository: Path,
    name: str,
    *,
    settings: ExportSettings = ExportSettings(),
    calibration: Examples | None = None,
    log: Any = print,
) -> Published:
    """Exports, checks and publishes ``item`` as the next version of ``name``.

    Raises:
        ValidationError (a subclass per check), OnnxExportError, UnsupportedModelError,
        PublishError (all ``export.errors``).
    """
    started = time.perf_counter()
    wrapped = prepare_for_export(item.model, item.task)
    inputs, outputs = io_specs(item.task, len(item.labels), item.image)
    size = (item.image.height, item.image.width) if item.image else (224, 224)
    with staging_folder(repository, name) as tmp:
        raw = tmp / "export.raw.onnx"
        exported = export_onnx(
            wrapped, item.task, raw, image_size=size, exporter=settings.exporter, opset=settings.opset
        )
        log(f"{name}: exported with {exported.exporter} (opset {exported.opset})")
        reference = torch_logits(wrapped, examples)
        error = reference_error(wrapped, examples, reference)
        fp32 = tmp / FILES["fp32"]
        fusions = _optimize(wrapped, item.task, raw, fp32)
        gate = gate_variants(
            fp32,
            reference,
            examples,
            inputs,
            outputs,
            settings=settings,
            calibration=calibration,
            task=item.task,
            reference_fp32_error=error,
            log=log,
        )
        raw.unlink()
        if item.tokenizer_path is not None:
            shutil.copyfile(item.tokenizer_path, tmp / "tokenizer.json")
        spec = build_spec(
            name,
            task=item.task,
            labels=item.labels,
            inputs=inputs,
            outputs=outputs,
            gate=gate,
            settings=settings,
            temperature=item.temperature,
            image=item.image,
            text=item.text,
            source={
                **item.source,
                "exporter": exported.exporter,
                "opset": exported.opset,
                "graph_optimization": fusions,
                "rejected_variants": gate.rejected,
                "reference": "PyTorch eval-mode logits",
                "examples": examples.source,
                "latency": _latency_conditions(settings.latency_runs),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
            },
        )
        version_dir = publish(tmp, spec)
    seconds = time.perf_counter() - started
    published = read_model_spec(version_dir)  # what the server will read, checked once more
    log(f"{name}: published version {published.version} at {version_dir} in {seconds:.1f} s")
    return Published(version_dir, published, seconds)


@dataclass(frozen=True)
class GateResult:
    variants: dict[str, Variant]
    # Optional variants whose check failed: precision -> {"check": error type, "message": ...}
    rejected: dict[str, dict[str, str]]


def build_spec(
    name: str,
    *,
    task: str,
    labels: tuple[str, ...],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    gate: GateResult,
    settings: ExportSettings,
    image: ImagePreprocessing | None,
    text: TextPreprocessing | None,
    source: dict[str, Any],
    temperature: float = 1.0,
) -> ModelSpec:
    """The ``model.json`` of a checked entry: our own exports and wrapped graphs alike.

    Its version is a placeholder (1) that ``publish`` replaces with the version it takes.
    """
    return ModelSpec(
        name=name,
        version=1,
        task=task,
        labels=labels,
        inputs=inputs,
        outputs=outputs,
        variants=gate.variants,
        max_batch_size=settings.max_batch_size,
        temperature=temperature,
        image=image,
        text=text,
        source=source,
    )


def gate_variants(
    fp32: Path,
    reference: np.ndarray,
    examples: Examples,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    settings: ExportSettings,
    calibration: Examples | None,
    task: str,
    reference_fp32_error: float | None = None,
    log: Any = print,
) -> GateResult:
    """Checks the fp32 graph against ``reference``, then builds and checks each other variant.

    Used for our own exports and for wrapped ONNX models alike.

    Raises:
        ValidationError: the first failed check of a variant that is not optional.
    """
    latency_feed = examples.take(np.array([0]))
    made: dict[str, Variant] = {}
    rejected: dict[str, dict[str, str]] = {}
    for precision in ("fp32", "fp16", "int8"):
        if precision not in settings.variants:
            continue
        path = fp32.with_name(FILES[precision])
        try:
            figures = _build_and_check(
                precision,
                fp32,
                path,
                reference,
                examples,
                inputs,
                outputs,
                settings,
                calibration,
                task,
                reference_fp32_error,
            )
        except ValidationError as err:
            if precision == "fp32" or precision not in settings.optional_variants:
                raise
            path.unlink(missing_ok=True)
            rejected[precision] = {"check": type(err).__name__, "message": str(err)}
            log(f"  {precision}: REJECTED, left out ({type(err).__name__}: {err})")
            continue
        latency = variants.measure_cpu_latency(path, latency_feed, runs=settings.latency_runs)
        made[precision] = Variant(path.name, precision, path.stat().st_size, figures, latency)
        megabytes = path.stat().st_size / 1e6
        log(f"  {precision}: passed {_summary(figures)}; {megabytes:.1f} MB, {latency:.2f} ms at batch 1")
    return GateResult(made, rejected)


def _build_and_check(  # noqa: PLR0917 - one private step with the loop's state
    precision: str,
    fp32: Path,
    path: Path,
    reference: np.ndarray,
    examples: Examples,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    settings: ExportSettings,
    calibration: Examples | None,
    task: str,
    reference_fp32_error: float | None,
) -> dict[str, Any]:
    kept_fp32: list[str] = []
    if precision == "fp16":
        kept_fp32 = variants.make_fp16(fp32, path)
    elif precision == "int8" and task == "text-classification":
        variants.make_int8_dynamic(fp32, path)
    elif precision == "int8":
        calib = calibration if calibration is not None else examples
        batches = [calib.take(slice(i, i + 8)) for i in range(0, len(calib), 8)]
        kept_fp32 = variants.make_int8_static(fp32, path, batches)
    session = validate.open_session(path)
    validate.check_interface(session, inputs, outputs)
    size = settings.max_batch_size
    if precision == "fp32":
        return validate.check_fp32(
            session, reference, examples, size, settings.fp32_tolerance, reference_error=reference_fp32_error
        )
    if precision == "fp16":
        figures = validate.check_fp16(session, reference, examples, size, settings.fp16_min_agreement)
        return {**figures, "kept_fp32_nodes": kept_fp32, "checked_on": "onnxruntime CPUExecutionProvider"}
    figures = validate.check_int8(session, reference, examples, size, settings.int8_max_drop_points)
    if task == "image-classification":
        figures["calibration"] = (calibration or examples).source
        figures["method"] = "static QDQ, per-channel int8 weights, uint8 activations, MinMax calibration"
        figures["kept_fp32_nodes"] = kept_fp32
    else:
        figures["method"] = "dynamic, per-channel int8 weights"
    return figures


def _optimize(wrapped: nn.Module, task: str, raw: Path, dst: Path) -> dict[str, int]:
    config = getattr(getattr(wrapped, "model", None), "config", None)
    if task == "text-classification" and getattr(config, "model_type", None) == "bert":
        return variants.optimize_bert(
            raw, dst, num_heads=int(config.num_attention_heads), hidden_size=int(config.hidden_size)
        )
    shutil.copyfile(raw, dst)
    return {}


def _latency_conditions(runs: int) -> dict[str, Any]:
    return {
        "batch_size": 1,
        "provider": "CPUExecutionProvider",
        "statistic": f"median of {runs} runs after 5 warm-up runs",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
    }


def _summary(figures: dict[str, Any]) -> str:
    keys = ("max_abs_diff", "top1_agreement", "accuracy_drop_points", "reference_accuracy")
    return ", ".join(f"{k}={figures[k]:.3g}" for k in keys if isinstance(figures.get(k), int | float))


def model_from_checkpoint(run_dir: Path) -> ModelToExport:
    """Loads a finished training run folder (``training.checkpoint``) as something to export.

    Raises:
        training.errors.CheckpointError: missing, unfinished or malformed run folder
            (``UnfinishedRunError`` for a run that was interrupted or failed).
        UnsupportedModelError: a task this exporter does not handle.
        contract.ModelSpecError: recorded preprocessing out of contract.
        TokenizerError: a text run whose tokenizer.json cannot be loaded.
    """
    from fineserve.training.checkpoint import METADATA, checkpoint_sha256, load_checkpoint

    model, meta = load_checkpoint(run_dir)
    if meta.task not in ("image-classification", "text-classification"):
        raise UnsupportedModelError(f"{run_dir}: unsupported task {meta.task!r}")
    where = f"{run_dir / METADATA}: preprocessing"
    image = text = None
    tokenizer = None
    if meta.task == "image-classification":
        image = image_preprocessing_from_dict(meta.preprocessing.get("image"), f"{where}.image")
    else:
        recorded = text_preprocessing_from_dict(meta.preprocessing.get("text", {}), f"{where}.text")
        text = TextPreprocessing(max_length=recorded.max_length)
        tokenizer = run_dir / recorded.tokenizer_file
        if not tokenizer.is_file():
            raise UnsupportedModelError(f"{run_dir}: text checkpoint without its {tokenizer.name}")
        load_tokenizer(tokenizer)
    return ModelToExport(
        model=model,
        task=meta.task,
        labels=tuple(meta.labels),
        image=image,
        text=text,
        tokenizer_path=tokenizer,
        temperature=float(meta.temperature),
        source={
            "checkpoint": str(run_dir),
            "checkpoint_sha256": checkpoint_sha256(run_dir),
            "backbone": meta.backbone,
            "model_args": meta.model_args,
            "metrics": meta.metrics,
            "calibration": meta.calibration,
            "split": meta.split,
            "seed": meta.seed,
            "git_commit": meta.git_commit,
        },
    )
