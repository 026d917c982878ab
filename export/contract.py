"""The model repository contract: what export writes and the server reads.

Layout::

    <repository>/<model>/<version>/model.json       # this module's ModelSpec, as JSON
    <repository>/<model>/<version>/<variant files>  # e.g. model.onnx, model.fp16.onnx
    <repository>/<model>/<version>/tokenizer.json   # text models only

Model names match ``[a-z0-9][a-z0-9_-]*``; versions are positive integers written as plain
decimal folder names. A version folder is complete once it exists under its final name:
publishers write elsewhere and rename (see ``export.publish``), so a reader never sees half a
model. Folders whose names are not integers (e.g. ``.tmp-...``) are ignored by readers.

Standard library only: the server imports this module without torch or onnx.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fineserve.export.errors import ExportError

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
TOKENIZER_JSON = "tokenizer.json"

Task = Literal["image-classification", "text-classification"]
Precision = Literal["fp32", "fp16", "int8"]
TASKS: tuple[str, ...] = ("image-classification", "text-classification")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
# KServe v2 datatype names: the server and clients speak these.
DATATYPES: tuple[str, ...] = ("FP32", "FP16", "INT64", "INT32", "BOOL", "UINT8", "BYTES")
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")  # \Z: "$" would let "name\n" pass
# Tokens per text the server truncates to: at least a [CLS] and a [SEP].
MAX_LENGTH_RANGE = (2, 8192)


class ModelSpecError(ExportError, ValueError):
    """A model.json (or a version folder) that breaks the contract; the message names the field."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` includes the batch axis; -1 marks a dynamic axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ImagePreprocessing:
    """How the server turns an encoded image into the model's input tensor.

    Decode -> convert to ``channel_order`` -> resize the shorter side to
    ``round(max(height, width) / crop_fraction)`` with ``interpolation`` -> center-crop to
    ``height`` x ``width`` -> scale to [0, 1] -> ``(x - mean) / std`` per channel -> ``layout``.
    With ``crop_fraction == 1`` a square image is resized straight to the target size.
    """

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    layout: str = "NCHW"


@dataclass(frozen=True)
class TextPreprocessing:
    """How the server tokenizes a text: ``tokenizer_file`` (a ``tokenizers`` JSON in the version
    folder), truncated to ``max_length`` tokens, padded per batch to its longest member."""

    tokenizer_file: str = TOKENIZER_JSON
    max_length: int = 128


@dataclass(frozen=True)
class Variant:
    """One graph file of the version and the figures of the checks it passed.

    ``checks`` holds the validation gate's figures (e.g. ``max_abs_diff``, ``top1_agreement``,
    ``accuracy_drop_points``); ``cpu_latency_ms`` the measured latency at batch 1.
    """

    file: str
    precision: str
    size_bytes: int = 0
    checks: dict[str, Any] = field(default_factory=dict)
    cpu_latency_ms: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    """The content of ``model.json``: everything the server needs, so it never guesses."""

    name: str
    version: int
    task: str
    labels: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: dict[str, Variant]
    max_batch_size: int = 64
    # Divide logits by this before the softmax: fitted on the validation split so scores are
    # calibrated probabilities (1.0 = uncalibrated).
    temperature: float = 1.0
    image: ImagePreprocessing | None = None
    text: TextPreprocessing | None = None
    # Where it came from: checkpoint hash, backbone, training metrics, opset, exporter, ...
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def variant(self, precision: str) -> Variant:
        try:
            return self.variants[precision]
        except KeyError:
            have = ", ".join(sorted(self.variants))
            raise ModelSpecError(
                f"model {self.name!r} version {self.version} has no {precision!r} variant (has: {have})"
            ) from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = MODEL_JSON) -> ModelSpec:
        return _parse_spec(data, where)


def read_model_spec(version_dir: Path) -> ModelSpec:
    """Reads and validates ``<version_dir>/model.json``; checks the files it names exist.

    Raises:
        ModelSpecError: missing or malformed ``model.json``, a field out of contract, a name or
            version that does not match the folder, or a named file that is missing.
    """
    path = version_dir / MODEL_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelSpecError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSpecError(f"{path}: not readable JSON ({err})") from None
    spec = _parse_spec(data, str(path))
    if version_dir.name != str(spec.version):
        raise ModelSpecError(f"{path}: version {spec.version} does not match folder {version_dir.name!r}")
    if version_dir.parent.name != spec.name:
        raise ModelSpecError(f"{path}: name {spec.name!r} does not match folder {version_dir.parent.name!r}")
    needed = [v.file for v in spec.variants.values()]
    if spec.text is not None:
        needed.append(spec.text.tokenizer_file)
    for name in needed:
        if not (version_dir / name).is_file():
            raise ModelSpecError(f"{path}: names {name!r}, which is not in {version_dir}")
    return spec


def write_model_spec(version_dir: Path, spec: ModelSpec) -> Path:
    """Writes ``model.json`` after checking the spec against the contract (round trip)."""
    _parse_spec(json.loads(spec.to_json()), f"{version_dir / MODEL_JSON} (before writing)")
    path = version_dir / MODEL_JSON
    path.write_text(spec.to_json(), encoding="utf-8")
    return path


def list_versions(model_dir: Path) -> list[int]:
    """The published versions of a model, ascending; ignores non-integer folder names."""
    if not model_dir.is_dir():
        return []
    versions = []
    for child in model_dir.iterdir():
        if (
            child.is_dir()
            and child.name.isascii()  # str.isdigit() also takes "²", which int() refuses
            and child.name.isdigit()
            and int(child.name) > 0
            and str(int(child.name)) == child.name
        ):
            versions.append(int(child.name))
    return sorted(versions)


def list_models(repository: Path) -> list[str]:
    """Model folder names in a repository that hold at least one version, sorted."""
    if not repository.is_dir():
        return []
    return sorted(
        child.name
        for child in repository.iterdir()
        if child.is_dir() and MODEL_NAME.match(child.name) and list_versions(child)
    )


def image_preprocessing_from_dict(value: Any, where: str) -> ImagePreprocessing:
    """Parses and checks an ``image`` object (as in model.json); errors name ``where``."""
    return _image(value, where)


def text_preprocessing_from_dict(value: Any, where: str) -> TextPreprocessing:
    """Parses and checks a ``text`` object (as in model.json); errors name ``where``."""
    return _text(value, where)


# --- parsing: every failure names the field -----------------------------------------------------


def _parse_spec(data: Any, where: str) -> ModelSpec:
    d = _obj(data, where)
    fmt = _int(d.get("format_version", FORMAT_VERSION), f"{where}: format_version")
    if fmt != FORMAT_VERSION:
        raise ModelSpecError(f"{where}: format_version {fmt} is not supported (expected {FORMAT_VERSION})")
    name = _str(d.get("name"), f"{where}: name")
    if not MODEL_NAME.match(name):
        raise ModelSpecError(f"{where}: name {name!r} must match {MODEL_NAME.pattern}")
    version = _int(d.get("version"), f"{where}: version")
    if version < 1:
        raise ModelSpecError(f"{where}: version must be a positive integer, got {version}")
    task = _str(d.get("task"), f"{where}: task")
    if task not in TASKS:
        raise ModelSpecError(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
    labels = tuple(
        _str(x, f"{where}: labels[{i}]") for i, x in enumerate(_list(d.get("labels"), f"{where}: labels"))
    )
    if len(labels) < 2:
        raise ModelSpecError(f"{where}: labels needs at least 2 entries, got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise ModelSpecError(f"{where}: labels has duplicates")
    inputs = _tensors(d.get("inputs"), f"{where}: inputs")
    outputs = _tensors(d.get("outputs"), f"{where}: outputs")
    max_batch_size = _int(d.get("max_batch_size", 64), f"{where}: max_batch_size")
    if max_batch_size < 1:
        raise ModelSpecError(f"{where}: max_batch_size must be >= 1, got {max_batch_size}")
    temperature = _float(d.get("temperature", 1.0), f"{where}: temperature")
    if not temperature > 0:
        raise ModelSpecError(f"{where}: temperature must be > 0, got {temperature}")
    raw_variants = _obj(d.get("variants"), f"{where}: variants")
    if not raw_variants:
        raise ModelSpecError(f"{where}: variants is empty")
    variants = {k: _variant(k, v, f"{where}: variants.{k}") for k, v in raw_variants.items()}
    image = text = None
    if task == "image-classification":
        image = _image(d.get("image"), f"{where}: image")
    else:
        text = _text(d.get("text"), f"{where}: text")
    last = outputs[0].shape[-1] if outputs[0].shape else None
    if last not in (-1, len(labels)):
        raise ModelSpecError(f"{where}: outputs[0] has {last} classes but labels has {len(labels)}")
    source = _obj(d.get("source", {}), f"{where}: source")
    return ModelSpec(
        name=name,
        version=version,
        task=task,
        labels=labels,
        inputs=inputs,
        outputs=outputs,
        variants=variants,
        max_batch_size=max_batch_size,
        temperature=temperature,
        image=image,
        text=text,
        source=source,
        format_version=fmt,
    )


def _tensors(value: Any, where: str) -> tuple[TensorSpec, ...]:
    items = _list(value, where)
    if not items:
        raise ModelSpecError(f"{where}: needs at least one tensor")
    out = []
    for i, item in enumerate(items):
        d = _obj(item, f"{where}[{i}]")
        datatype = _str(d.get("datatype"), f"{where}[{i}].datatype")
        if datatype not in DATATYPES:
            raise ModelSpecError(f"{where}[{i}].datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        shape = tuple(_int(x, f"{where}[{i}].shape") for x in _list(d.get("shape"), f"{where}[{i}].shape"))
        if not shape or any(x == 0 or x < -1 for x in shape):
            raise ModelSpecError(f"{where}[{i}].shape {list(shape)} must be non-empty, each > 0 or -1")
        out.append(TensorSpec(name=_str(d.get("name"), f"{where}[{i}].name"), datatype=datatype, shape=shape))
    if len({t.name for t in out}) != len(out):
        raise ModelSpecError(f"{where}: duplicate tensor names")
    return tuple(out)


def _variant(key: str, value: Any, where: str) -> Variant:
    if key not in PRECISIONS:
        raise ModelSpecError(f"{where}: variant {key!r} is not one of {', '.join(PRECISIONS)}")
    d = _obj(value, where)
    file = _str(d.get("file"), f"{where}.file")
    if "/" in file or "\\" in file or file.startswith("."):
        raise ModelSpecError(f"{where}.file {file!r} must be a plain file name inside the version folder")
    precision = _str(d.get("precision", key), f"{where}.precision")
    if precision != key:
        raise ModelSpecError(f"{where}.precision {precision!r} does not match its key {key!r}")
    latency = d.get("cpu_latency_ms")
    return Variant(
        file=file,
        precision=precision,
        size_bytes=_int(d.get("size_bytes", 0), f"{where}.size_bytes"),
        checks=_obj(d.get("checks", {}), f"{where}.checks"),
        cpu_latency_ms=None if latency is None else _float(latency, f"{where}.cpu_latency_ms"),
    )


def _image(value: Any, where: str) -> ImagePreprocessing:
    d = _obj(value, where)
    height = _int(d.get("height"), f"{where}.height")
    width = _int(d.get("width"), f"{where}.width")
    if not (1 <= height <= 4096 and 1 <= width <= 4096):
        raise ModelSpecError(f"{where}: height and width must be in 1..4096, got {height}x{width}")
    mean = _triple(d.get("mean"), f"{where}.mean")
    std = _triple(d.get("std"), f"{where}.std")
    if any(s <= 0 for s in std):
        raise ModelSpecError(f"{where}.std must be > 0, got {list(std)}")
    crop = _float(d.get("crop_fraction", 1.0), f"{where}.crop_fraction")
    if not 0 < crop <= 1:
        raise ModelSpecError(f"{where}.crop_fraction must be in (0, 1], got {crop}")
    interpolation = _str(d.get("interpolation", "bilinear"), f"{where}.interpolation")
    if interpolation not in INTERPOLATIONS:
        raise ModelSpecError(
            f"{where}.interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
        )
    channel_order = _str(d.get("channel_order", "RGB"), f"{where}.channel_order")
    if channel_order not in ("RGB", "BGR"):
        raise ModelSpecError(f"{where}.channel_order {channel_order!r} must be RGB or BGR")
    layout = _str(d.get("layout", "NCHW"), f"{where}.layout")
    if layout not in ("NCHW", "NHWC"):
        raise ModelSpecError(f"{where}.layout {layout!r} must be NCHW or NHWC")
    return ImagePreprocessing(height, width, mean, std, crop, interpolation, channel_order, layout)


def _text(value: Any, where: str) -> TextPreprocessing:
    d = _obj(value, where)
    tokenizer_file = _str(d.get("tokenizer_file", TOKENIZER_JSON), f"{where}.tokenizer_file")
    if "/" in tokenizer_file or tokenizer_file.startswith("."):
        raise ModelSpecError(f"{where}.tokenizer_file {tokenizer_file!r} must be a plain file name")
    max_length = _int(d.get("max_length", 128), f"{where}.max_length")
    low, high = MAX_LENGTH_RANGE
    if not low <= max_length <= high:
        raise ModelSpecError(f"{where}.max_length must be in {low}..{high}, got {max_length}")
    return TextPreprocessing(tokenizer_file, max_length)


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    items = _list(value, where)
    if len(items) != 3:
        raise ModelSpecError(f"{where}: needs 3 values, got {len(items)}")
    a, b, c = (_float(x, where) for x in items)
    return (a, b, c)


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ModelSpecError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ModelSpecError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ModelSpecError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelSpecError(f"{where}: expected an integer, got {value!r}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelSpecError(f"{where}: expected a number, got {value!r}")
    return float(value)
