"""The repository reader rejects a malformed model.json with a message that names the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fineserve.export.contract import ModelSpecError, list_models, list_versions, read_model_spec
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
    ("zero axis", _set(["inputs", 0, "shape"], [-1, 3, 0, 8]), "each > 0 or -1"),
    ("no outputs", _set(["outputs"], []), "outputs: needs at least one tensor"),
    ("no variants", _set(["variants"], {}), "variants is empty"),
    ("unknown precision", _set(["variants", "bf16"], {"file": "model.onnx"}), "variant 'bf16'"),
    ("file outside folder", _set(["variants", "fp32", "file"], "../x.onnx"), "plain file name"),
    ("missing graph file", _set(["variants", "fp32", "file"], "gone.onnx"), "names 'gone.onnx'"),
    ("zero std", _set(["image", "std"], [0.5, 0, 0.5]), "std must be > 0"),
    ("two means", _set(["image", "mean"], [0.5, 0.5]), "needs 3 values"),
    ("crop fraction", _set(["image", "crop_fraction"], 1.5), "crop_fraction must be in (0, 1]"),
    ("no image block", _drop("image"), "image: expected an object"),
    ("temperature", _set(["temperature"], 0), "temperature must be > 0"),
    ("max batch", _set(["max_batch_size"], 0), "max_batch_size must be >= 1"),
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
