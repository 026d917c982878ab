"""Bring your own model: foreign ONNX classifiers become checked repository entries."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from fineserve.export.contract import (
    ImagePreprocessing,
    ModelSpecError,
    TextPreprocessing,
    list_versions,
    read_model_spec,
)
from fineserve.export.examples import UNLABELLED, Examples, text_examples
from fineserve.export.pipeline import ExportSettings
from fineserve.export.validate import DynamicAxesError, ValueMismatchError, open_session
from fineserve.export.wrap import WrapError, wrap_onnx
from tests.export.graphs import foreign_image_graph, tiny_image_reference
from tests.fixtures import (
    TINY_IMAGE_SIZE,
    tiny_image_graph,
    tiny_text_graph,
    tiny_vocab,
    write_tiny_tokenizer,
)

PREP = ImagePreprocessing(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _examples(n: int = 10) -> tuple[Examples, np.ndarray]:
    pixels = np.random.default_rng(2).normal(size=(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype(np.float32)
    examples = Examples({"pixel_values": pixels}, np.full(n, UNLABELLED), "noise")
    return examples, tiny_image_reference(examples)


def test_foreign_image_classifier_is_renamed_checked_and_published(tmp_path: Path) -> None:
    onnx.save(foreign_image_graph(), tmp_path / "foreign.onnx")
    examples, reference = _examples()
    published = wrap_onnx(
        tmp_path / "foreign.onnx",
        tmp_path / "models",
        "byom",
        task="image-classification",
        labels=("a", "b", "c"),
        image=PREP,
        examples=examples,
        reference=reference,
        settings=ExportSettings(variants=("fp32", "fp16"), max_batch_size=4),
        temperature=2.0,
    )
    spec = read_model_spec(published.version_dir)
    assert spec.temperature == 2.0  # a given temperature reaches model.json
    assert [t.name for t in spec.inputs] == ["pixel_values"] and [t.name for t in spec.outputs] == ["logits"]
    assert spec.source["original_names"] == {"float_input": "pixel_values", "scores_out": "logits"}
    assert spec.variants["fp32"].checks["max_abs_diff"] <= 1e-4 and "fp16" in spec.variants
    session = open_session(published.version_dir / "model.onnx")
    assert [o.name for o in session.get_outputs()] == ["logits"]  # the label output was dropped


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperature": float("inf")}, r"temperature: must be finite, got inf"),
        ({"temperature": 1e-310}, r"temperature: must be a finite number in \[0\.01, 100\.0\]"),
        (
            {"image": dataclasses.replace(PREP, mean=(0.5, float("nan"), 0.5))},
            r"image\.mean\[1\]: must be finite",
        ),
        (
            {"image": dataclasses.replace(PREP, crop_fraction=0.001)},
            r"image\.crop_fraction: must be a finite",
        ),
        ({"labels": ("a", "b\x00", "c")}, r"labels\[1\]: 'b\\x00' holds '\\x00'"),
    ],
)
def test_out_of_contract_values_are_refused_before_any_work(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    """An infinite temperature used to be published (and serve one score for every class)."""
    onnx.save(foreign_image_graph(), tmp_path / "foreign.onnx")
    arguments: dict[str, Any] = {"task": "image-classification", "labels": ("a", "b", "c"), "image": PREP}
    with pytest.raises(ModelSpecError, match=message):
        wrap_onnx(tmp_path / "foreign.onnx", tmp_path / "models", "byom", **(arguments | change))
    assert not (tmp_path / "models").exists()


def test_damaged_foreign_graph_fails_against_its_reference_and_publishes_nothing(tmp_path: Path) -> None:
    onnx.save(foreign_image_graph(scale=1.01), tmp_path / "damaged.onnx")
    examples, reference = _examples()
    with pytest.raises(ValueMismatchError):
        wrap_onnx(
            tmp_path / "damaged.onnx",
            tmp_path / "models",
            "byom",
            task="image-classification",
            labels=("a", "b", "c"),
            image=PREP,
            examples=examples,
            reference=reference,
        )
    assert list_versions(tmp_path / "models" / "byom") == []
    assert list((tmp_path / "models" / "byom").iterdir()) == []


def test_foreign_text_classifier_with_tokenizer(tmp_path: Path) -> None:
    onnx.save(tiny_text_graph(len(tiny_vocab())), tmp_path / "text.onnx")
    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer.json")
    prep = TextPreprocessing(max_length=16)
    texts = ["a great movie", "awful boring plot", "i love the plot", "bad", "fine", "the movie"]
    examples = text_examples(texts, [1, 0, 1, 0, 1, UNLABELLED], tokenizer, prep, "snippets")
    published = wrap_onnx(
        tmp_path / "text.onnx",
        tmp_path / "models",
        "tiny-sentiment",
        task="text-classification",
        labels=("negative", "positive"),
        text=prep,
        tokenizer_path=tokenizer,
        examples=examples,
        settings=ExportSettings(variants=("fp32", "int8"), max_batch_size=4),
    )
    spec = read_model_spec(published.version_dir)
    assert spec.variants["fp32"].checks["reference_accuracy"] == 1.0  # the tiny graph is right on all 5
    assert spec.source["reference"].startswith("none")
    assert spec.temperature == 1.0  # none given: the graph's scores as they are
    assert (published.version_dir / "tokenizer.json").is_file()


def test_wrap_refuses_graphs_that_do_not_fit(tmp_path: Path) -> None:
    onnx.save(foreign_image_graph(), tmp_path / "foreign.onnx")
    common = {"labels": ("a", "b", "c"), "image": PREP}
    with pytest.raises(WrapError, match="4 labels"):
        wrap_onnx(
            tmp_path / "foreign.onnx",
            tmp_path / "m",
            "x",
            task="image-classification",
            **{**common, "labels": ("a", "b", "c", "d")},
        )
    with pytest.raises(WrapError, match="integer input_ids"):
        wrap_onnx(
            tmp_path / "foreign.onnx",
            tmp_path / "m",
            "x",
            task="text-classification",
            labels=("a", "b", "c"),
            tokenizer_path=tmp_path / "t.json",
        )
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(WrapError, match="not a valid ONNX model"):
        wrap_onnx(tmp_path / "junk.onnx", tmp_path / "m", "x", task="image-classification", **common)
    fixed = foreign_image_graph()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(fixed, tmp_path / "fixed.onnx")
    with pytest.raises(DynamicAxesError):
        wrap_onnx(tmp_path / "fixed.onnx", tmp_path / "m", "x", task="image-classification", **common)
    assert list_versions(tmp_path / "m" / "x") == []


def test_channels_last_graph_gets_nhwc_layout_and_transposed_examples(tmp_path: Path) -> None:
    """A Keras-style [N,H,W,3] graph (tf2onnx keeps channels last): layout is detected."""
    inner = tiny_image_graph()
    transpose = onnx.helper.make_node("Transpose", ["images"], ["pixel_values"], perm=[0, 3, 1, 2])
    graph = onnx.helper.make_graph(
        [transpose, *inner.graph.node],
        "nhwc",
        [
            onnx.helper.make_tensor_value_info(
                "images", onnx.TensorProto.FLOAT, ["n", TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3]
            )
        ],
        list(inner.graph.output),
        initializer=list(inner.graph.initializer),
    )
    model = onnx.helper.make_model(graph, opset_imports=list(inner.opset_import))
    model.ir_version = inner.ir_version
    onnx.save(model, tmp_path / "nhwc.onnx")
    examples, reference = _examples()  # NCHW, as read_examples builds them by default
    published = wrap_onnx(
        tmp_path / "nhwc.onnx",
        tmp_path / "models",
        "keras",
        task="image-classification",
        labels=("a", "b", "c"),
        image=PREP,
        examples=examples,
        reference=reference,
    )
    spec = read_model_spec(published.version_dir)
    assert spec.image is not None and spec.image.layout == "NHWC"
    assert spec.inputs[0].shape == (-1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert spec.variants["fp32"].checks["max_abs_diff"] <= 1e-5


def test_text_wrap_refuses_a_tokenizer_the_server_cannot_load(tmp_path: Path) -> None:
    from fineserve.export.examples import TokenizerError

    onnx.save(tiny_text_graph(len(tiny_vocab())), tmp_path / "text.onnx")

    def wrap_text(max_length: int) -> None:
        wrap_onnx(
            tmp_path / "text.onnx",
            tmp_path / "models",
            "s",
            task="text-classification",
            labels=("negative", "positive"),
            text=TextPreprocessing(max_length=max_length),
            tokenizer_path=tmp_path / "tokenizer.json",
        )

    (tmp_path / "tokenizer.json").write_text("")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is empty"):
        wrap_text(16)
    assert list_versions(tmp_path / "models" / "s") == []
    write_tiny_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(WrapError, match=r"max_length in 2\.\.8192"):
        wrap_text(0)
