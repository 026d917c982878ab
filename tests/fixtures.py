"""Toy models for tests: tiny real ONNX graphs and model repository entries built in tmp_path.

The graphs are small but real: onnxruntime runs them, so tests exercise the actual runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fineserve.export import variants as export_variants
from fineserve.export.contract import (
    ImagePreprocessing,
    ModelSpec,
    TensorSpec,
    TextPreprocessing,
    Variant,
    write_model_spec,
)
from fineserve.export.publish import publish, staging_folder

OPSET = 18
TINY_IMAGE_SIZE = 8
TINY_VOCAB = ["good", "great", "fine", "love", "bad", "awful", "boring", "hate", "movie", "the", "a", "plot"]
POSITIVE_WORDS = {"good", "great", "fine", "love"}
NEGATIVE_WORDS = {"bad", "awful", "boring", "hate"}


def tiny_image_graph(num_classes: int = 3, size: int = TINY_IMAGE_SIZE, seed: int = 0) -> onnx.ModelProto:
    """pixel_values [N,3,size,size] -> per-channel mean -> linear -> logits [N,num_classes]."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(3, num_classes)).astype(np.float32) * 4
    bias = rng.normal(size=(num_classes,)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "weight"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_image",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def tiny_text_graph(vocab_size: int, num_classes: int = 2, dim: int = 4) -> onnx.ModelProto:
    """input_ids, attention_mask [N,S] -> embedding -> masked mean -> linear -> logits [N,K].

    The embedding puts positive words on +1 and negative words on -1 in dimension 0, so the
    graph is a real (if tiny) sentiment classifier whose answers tests can predict.
    """
    emb = np.zeros((vocab_size, dim), dtype=np.float32)
    for word_id, word in enumerate(tiny_vocab()):
        if word in POSITIVE_WORDS:
            emb[word_id, 0] = 1.0
        elif word in NEGATIVE_WORDS:
            emb[word_id, 0] = -1.0
    emb[:, 1] = 0.01
    weight = np.zeros((dim, num_classes), dtype=np.float32)
    weight[0] = np.linspace(-3, 3, num_classes)
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["vectors"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask3"]),
        helper.make_node("Mul", ["vectors", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_f", "seq_axis"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["safe_count"]),
        helper.make_node("Div", ["summed", "safe_count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_text",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[
            numpy_helper.from_array(emb, "embedding"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "last_axis"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
            numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def tiny_vocab() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *TINY_VOCAB]


def write_tiny_tokenizer(path: Path) -> Path:
    """A word-level ``tokenizers`` JSON: lowercase, whitespace split, [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {word: i for i, word in enumerate(tiny_vocab())}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.save(str(path))
    return path


# Every precision the export pipeline makes; the tiny models are published with all of them.
ALL_VARIANTS: tuple[str, ...] = ("fp32", "fp16", "int8")
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def _make_variants(
    folder: Path, precisions: Sequence[str], calibration: list[dict[str, np.ndarray]] | None
) -> dict[str, Variant]:
    """The fp16 and int8 graphs of ``folder/model.onnx``, made by the export pipeline's own code
    (``export/variants.py``): int8 static with ``calibration`` (images) or dynamic (text)."""
    fp32 = folder / VARIANT_FILES["fp32"]
    for precision in precisions:
        path = folder / VARIANT_FILES[precision]
        if precision == "fp16":
            export_variants.make_fp16(fp32, path)
        elif precision == "int8" and calibration is not None:
            export_variants.make_int8_static(fp32, path, calibration)
        elif precision == "int8":
            export_variants.make_int8_dynamic(fp32, path)
    return {p: Variant(VARIANT_FILES[p], p, (folder / VARIANT_FILES[p]).stat().st_size) for p in precisions}


def _publish(repository: Path, spec: ModelSpec, build: Callable[[Path], dict[str, Variant]]) -> Path:
    """Builds a version in a staging folder and publishes it as the export pipeline does
    (``export/publish.py``); the next free version must be the one ``spec`` names."""
    with staging_folder(repository, spec.name) as staging:
        made = publish(staging, dataclasses.replace(spec, variants=build(staging)))
    if made.name != str(spec.version):
        raise ValueError(f"{spec.name}: published as version {made.name}, not {spec.version}")
    return made


def publish_tiny_image_model(
    repository: Path,
    name: str = "tiny-image",
    version: int = 1,
    num_classes: int = 3,
    seed: int = 0,
    *,
    variants: Sequence[str] = ALL_VARIANTS,
) -> Path:
    """Publishes ``<repository>/<name>/<version>/``: a tiny image graph, its ``variants`` and model.json.

    Versions are published in order (the next free one must be ``version``).
    """
    rng = np.random.default_rng(seed)
    calibration = [
        {"pixel_values": rng.normal(size=(8, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype(np.float32)}
    ]

    def build(folder: Path) -> dict[str, Variant]:
        onnx.save(tiny_image_graph(num_classes, seed=seed), folder / "model.onnx")
        return _make_variants(folder, variants, calibration)

    spec = ModelSpec(
        name=name,
        version=version,
        task="image-classification",
        labels=tuple(f"class_{i}" for i in range(num_classes)),
        inputs=(TensorSpec("pixel_values", "FP32", (-1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)),),
        outputs=(TensorSpec("logits", "FP32", (-1, num_classes)),),
        variants={},
        max_batch_size=8,
        image=ImagePreprocessing(
            height=TINY_IMAGE_SIZE, width=TINY_IMAGE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        ),
        source={"note": "tiny test graph"},
    )
    return _publish(repository, spec, build)


def publish_tiny_text_model(
    repository: Path, name: str = "tiny-text", version: int = 1, *, variants: Sequence[str] = ALL_VARIANTS
) -> Path:
    """Publishes ``<repository>/<name>/<version>/``: a tiny sentiment graph, its ``variants``,
    tokenizer and model.json."""

    def build(folder: Path) -> dict[str, Variant]:
        write_tiny_tokenizer(folder / "tokenizer.json")
        onnx.save(tiny_text_graph(len(tiny_vocab())), folder / "model.onnx")
        return _make_variants(folder, variants, None)

    spec = ModelSpec(
        name=name,
        version=version,
        task="text-classification",
        labels=("negative", "positive"),
        inputs=(
            TensorSpec("input_ids", "INT64", (-1, -1)),
            TensorSpec("attention_mask", "INT64", (-1, -1)),
        ),
        outputs=(TensorSpec("logits", "FP32", (-1, 2)),),
        variants={},
        max_batch_size=8,
        text=TextPreprocessing(max_length=16),
        source={"note": "tiny test graph"},
    )
    return _publish(repository, spec, build)


def publish_tiny_models(repository: Path) -> Path:
    """``tiny-image`` and ``tiny-text``, version 1 each, with fp32, fp16 and int8 variants, in
    ``repository``; returns it."""
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    return repository


def copy_version(src: Path, dst_version: int) -> Path:
    """Copies a version folder to a new version number (rewriting model.json's version)."""
    import json

    dst = src.parent / str(dst_version)
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    meta["version"] = dst_version
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def publish_graph_that_fails_above_batch_1(repository: Path) -> None:
    """A graph that reshapes to a fixed batch of 1: it loads and warms up, then fails on batch 2."""
    weight = np.ones((192, 3), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["pixel_values", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
        ],
        "fails_above_1",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(np.array([1, 192], np.int64), "shape"),
            numpy_helper.from_array(weight, "weight"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    publish_8x8_image_graph(repository, "brittle", model)


def publish_8x8_image_graph(repository: Path, name: str, model: onnx.ModelProto) -> Path:
    """Publishes ``model`` (pixel_values [batch, 3, 8, 8] -> logits [batch, 3], fp32 only) as
    version 1 of ``name``, with three labels and max batch 8; returns the version folder."""
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    onnx.save(model, version_dir / "model.onnx")
    spec = ModelSpec(
        name=name,
        version=1,
        task="image-classification",
        labels=("a", "b", "c"),
        inputs=(TensorSpec("pixel_values", "FP32", (-1, 3, 8, 8)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 3)),),
        variants={"fp32": Variant("model.onnx", "fp32")},
        max_batch_size=8,
        image=ImagePreprocessing(height=8, width=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    )
    write_model_spec(version_dir, spec)
    return version_dir


# Makes a POSIX shared-memory object of a size: its key ("/name") and its bytes.
MakeObject = Callable[[int], tuple[str, memoryview]]


def unique_name(label: str) -> str:
    """A name no other run (or test) uses: shared memory is one namespace for the whole host."""
    return f"fstest_{os.getpid()}_{label}_{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def shared_memory_objects() -> Iterator[MakeObject]:
    """Makes real POSIX shared-memory objects with unique names; closed and unlinked afterwards."""
    made: list[shared_memory.SharedMemory] = []

    def make(size: int) -> tuple[str, memoryview]:
        obj = shared_memory.SharedMemory(name=unique_name("obj"), create=True, size=size)
        made.append(obj)
        assert obj.buf is not None
        return "/" + obj.name, obj.buf

    try:
        yield make
    finally:
        for obj in made:
            obj.close()
            obj.unlink()
