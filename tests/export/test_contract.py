"""The repository reader rejects a malformed model.json with a message that names the field."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fineserve.export.contract import (
    ModelSpecError,
    list_models,
    list_versions,
    read_model_spec,
    write_model_spec,
)
from tests.fixtures import publish_tiny_image_model, publish_tiny_text_model


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.pop(key)


FINITE = "must be a finite number in"
INT64 = "each -1 or in 1..9223372036854775807"
FORGES = "(control and bidirectional characters are not allowed)"

CASES = [
    ("labels not a list", _set(["labels"], "cat,dog"), "labels: expected a list"),
    ("one label", _set(["labels"], ["cat"]), "at least 2"),
    ("duplicate labels", _set(["labels"], ["a", "a", "b"]), "duplicates"),
    ("labels vs classes", _set(["labels"], ["a", "b"]), "3 classes but labels has 2"),
    ("unknown task", _set(["task"], "object-detection"), "task 'object-detection' is not one of"),
    ("no name", _drop("name"), "name: expected a non-empty string"),
    ("version as text", _set(["version"], "1"), "version: expected an integer"),
    ("bool version", _set(["version"], True), "version: expected an integer"),
    ("wrong folder version", _set(["version"], 2), "does not match folder"),
    ("future format", _set(["format_version"], 99), "format_version 99 is not supported"),
    ("bad datatype", _set(["inputs", 0, "datatype"], "FLOAT"), "inputs[0].datatype 'FLOAT'"),
    ("zero axis", _set(["inputs", 0, "shape"], [-1, 3, 0, 8]), INT64),
    (
        "axis past int64",
        _set(["inputs", 0, "shape"], [-1, 3, 2**63, 8]),
        INT64,
    ),
    ("no outputs", _set(["outputs"], []), "outputs: needs at least one tensor"),
    ("no variants", _set(["variants"], {}), "variants is empty"),
    ("unknown precision", _set(["variants", "bf16"], {"file": "model.onnx"}), "variant 'bf16'"),
    ("file outside folder", _set(["variants", "fp32", "file"], "../x.onnx"), "plain file name"),
    ("missing graph file", _set(["variants", "fp32", "file"], "gone.onnx"), "names 'gone.onnx'"),
    ("zero std", _set(["image", "std"], [0.5, 0, 0.5]), f"std[1]: {FINITE} [0.001, 10.0]"),
    (
        "subnormal std",
        _set(["image", "std"], [1e-300] * 3),
        f"std[0]: {FINITE} [0.001, 10.0]",
    ),
    ("NaN mean", _set(["image", "mean"], [0.5, float("nan"), 0.5]), "NaN is not a JSON number"),
    (
        "mean of no image",
        _set(["image", "mean"], [0.5, 0.5, 5]),
        f"mean[2]: {FINITE} [0.0, 1.0]",
    ),
    ("infinite std", _set(["image", "std"], [float("inf")] * 3), "Infinity is not a JSON number"),
    ("two means", _set(["image", "mean"], [0.5, 0.5]), "needs 3 values"),
    (
        "crop fraction",
        _set(["image", "crop_fraction"], 1.5),
        f"crop_fraction: {FINITE} [0.25, 1.0]",
    ),
    (
        "tiny crop",
        _set(["image", "crop_fraction"], 0.01),
        f"crop_fraction: {FINITE} [0.25, 1.0]",
    ),
    ("huge image", _set(["image", "height"], 5000), "height: must be an integer in 1..4096"),
    ("no image block", _drop("image"), "image: expected an object"),
    ("temperature", _set(["temperature"], 0), f"temperature: {FINITE} [0.01, 100.0]"),
    ("infinite temperature", _set(["temperature"], float("inf")), "Infinity is not a JSON number"),
    (
        "subnormal temperature",
        _set(["temperature"], 1e-310),
        f"temperature: {FINITE} [0.01, 100.0]",
    ),
    ("max batch", _set(["max_batch_size"], 0), "max_batch_size: must be an integer in 1..65536"),
    (
        "max batch past int32",
        _set(["max_batch_size"], 2**31),
        "max_batch_size: must be an integer in 1..65536",
    ),
    ("version past int64", _set(["version"], 2**63), "version: must be an integer in 1..9223372036854775807"),
    ("negative size", _set(["variants", "fp32", "size_bytes"], -1), "size_bytes: must be an integer in 0.."),
    ("NaN latency", _set(["variants", "fp32", "cpu_latency_ms"], float("nan")), "NaN is not a JSON number"),
    ("empty label", _set(["labels"], ["a", "", "c"]), "labels[1]: expected a non-empty string"),
    ("NUL in a label", _set(["labels"], ["a", "b\x00", "c"]), "labels[1]: 'b\\x00' holds '\\x00'"),
    (
        "ANSI escape in a label",
        _set(["labels"], ["a", "b", "\x1b[31mc"]),
        f"labels[2]: '\\x1b[31mc' holds '\\x1b' {FORGES}",
    ),
    ("C1 control in a label", _set(["labels"], ["\x9bx", "b", "c"]), "labels[0]: '\\x9bx' holds '\\x9b'"),
    (
        "right-to-left override",
        _set(["labels"], ["a", "b\u202ec", "d"]),
        f"labels[1]: 'b\\u202ec' holds '\\u202e' {FORGES}",
    ),
    ("bidi isolate", _set(["labels"], ["a", "b", "\u2066c"]), "holds '\\u2066'"),
    ("newline in a label", _set(["labels"], ["a\nb", "b", "c"]), "labels[0]: 'a\\nb' holds '\\n'"),
    ("over-long label", _set(["labels"], ["a", "b", "c" * 257]), "labels[2]: 257 characters, more than 256"),
]


@pytest.mark.parametrize(("case", "edit", "message"), CASES, ids=[c[0] for c in CASES])
def test_malformed_image_model_json(
    tmp_path: Path, case: str, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    version_dir = publish_tiny_image_model(tmp_path / "models")
    data = json.loads((version_dir / "model.json").read_text())
    edit(data)
    (version_dir / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelSpecError) as err:
        read_model_spec(version_dir)
    assert message in str(err.value) and "model.json" in str(err.value)


def test_text_model_without_its_tokenizer_is_rejected(tmp_path: Path) -> None:
    version_dir = publish_tiny_text_model(tmp_path / "models")
    read_model_spec(version_dir)  # intact: fine
    (version_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelSpecError, match=r"names 'tokenizer\.json'"):
        read_model_spec(version_dir)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "missing"), ("{not json", "not readable JSON"), ("[]", "expected an object")],
)
def test_unreadable_model_json(tmp_path: Path, content: str | None, message: str) -> None:
    version_dir = publish_tiny_image_model(tmp_path / "models")
    if content is None:
        (version_dir / "model.json").unlink()
    else:
        (version_dir / "model.json").write_text(content)
    with pytest.raises(ModelSpecError, match=message):
        read_model_spec(version_dir)


def test_only_plain_ascii_numbers_are_versions(tmp_path: Path) -> None:
    model = tmp_path / "models" / "m"
    for name in ("1", "7", "02", "0", "v3", "\u00b2", "\u0663", "\uff14", "12x"):
        (model / name).mkdir(parents=True)
    (model / "9").write_text("a file, not a version folder")
    # "²" passes str.isdigit() and then breaks int(); "٣" and "４" would pass as 3 and 4.
    assert list_versions(model) == [1, 7]
    assert list_models(tmp_path / "models") == ["m"]


def test_versions_are_int64(tmp_path: Path) -> None:
    """A version no reply's int64 can carry is no version: 2**63 used to be listed, and every
    ListModels then failed with INTERNAL."""
    model = tmp_path / "models" / "m"
    for name in ("3", str(2**63 - 1), str(2**63), "9" * 200):
        (model / name).mkdir(parents=True)
    assert list_versions(model) == [3, 2**63 - 1]


def test_numbers_json_cannot_hold_are_refused(tmp_path: Path) -> None:
    """``1e400`` is valid JSON that Python reads as infinity."""
    version_dir = publish_tiny_image_model(tmp_path / "models")
    text = (version_dir / "model.json").read_text()
    (version_dir / "model.json").write_text(text.replace('"temperature": 1.0', '"temperature": 1e400'))
    with pytest.raises(ModelSpecError, match=r"temperature: must be finite, got inf"):
        read_model_spec(version_dir)


def test_labels_are_checked_before_writing(tmp_path: Path) -> None:
    """Export refuses what the server would: write_model_spec checks labels too."""
    version_dir = publish_tiny_image_model(tmp_path / "models")
    spec = read_model_spec(version_dir)
    bad = dataclasses.replace(spec, labels=("a", "b\u202e", "c"))
    with pytest.raises(ModelSpecError, match=r"labels\[1\]: 'b\\u202e' holds '\\u202e'"):
        write_model_spec(tmp_path, bad)
    assert not (tmp_path / "model.json").exists()


def test_server_shown_paths_are_relative(tmp_path: Path) -> None:
    version_dir = publish_tiny_image_model(tmp_path / "models")
    (version_dir / "model.onnx").unlink()
    with pytest.raises(ModelSpecError) as err:
        read_model_spec(version_dir, shown_as="tiny-image/1")
    assert str(err.value) == "tiny-image/1/model.json: names 'model.onnx', which is not in tiny-image/1"
    assert str(tmp_path) not in str(err.value)
