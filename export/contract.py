"""The model repository contract: what export writes and the server reads.

Layout::

    <repository>/<model>/<version>/model.json       # this module's ModelSpec, as JSON
    <repository>/<model>/<version>/<variant files>  # e.g. model.onnx, model.fp16.onnx
    <repository>/<model>/<version>/tokenizer.json   # text models only

Model names match ``[a-z0-9][a-z0-9_-]*``; versions are positive integers (int64) written as plain
decimal folder names. A version folder is complete once it exists under its final name:
publishers write elsewhere and rename (see ``export.publish``), so a reader never sees half a
model. Folders whose names are not integers (e.g. ``.tmp-...``) are ignored by readers.

Standard library only: the server imports this module without torch or onnx.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
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
# Every number of the contract has a range: a value outside it is a broken or hostile entry, which
# fails its own version at load instead of every reply that echoes it (a max_batch_size of 2**31
# does not fit the replies' int32) or every answer it would compute (a temperature of Infinity
# makes all scores equal, 1e-310 makes them NaN).
INT64_MAX = 2**63 - 1
VERSION_RANGE = (1, INT64_MAX)
# Rows per batch: far above any batch the server runs (its own max_batch_size caps it), far below
# the int32 that KServe's and fineserve.v1's replies carry it in.
MAX_BATCH_SIZE_RANGE = (1, 65536)
# Softmax temperature: training clamps its fitted value to 0.05..20 (training/calibration.py).
TEMPERATURE_RANGE = (0.01, 100.0)
# Per-channel mean and std of [0, 1] pixels: a mean outside [0, 1] is the mean of no image; a std
# of 1/255 (a model that takes 0..255 pixels) is in range, a std of 0 or 1e-300 is not.
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (0.001, 10.0)
# Below 0.25 the resize before the centre crop grows every image 4x past the model's input size.
CROP_FRACTION_RANGE = (0.25, 1.0)
IMAGE_SIZE_RANGE = (1, 4096)
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256
# Labels reach clients' screens and logs: no character that is invisible or reorders the text
# around it (bidirectional overrides, embeddings, isolates and marks).
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


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


def read_model_spec(version_dir: Path, shown_as: str | None = None) -> ModelSpec:
    """Reads and validates ``<version_dir>/model.json``; checks the files it names exist.

    ``shown_as`` names the version folder in error messages (the server passes ``<model>/<version>``,
    which clients may read; export leaves it out and shows the full path).

    Raises:
        ModelSpecError: missing or malformed ``model.json`` (NaN and Infinity included), a field
            out of contract, a name or version that does not match the folder, or a named file
            that is missing.
    """
    folder = str(version_dir) if shown_as is None else shown_as
    path = version_dir / MODEL_JSON
    where = f"{folder}/{MODEL_JSON}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelSpecError(f"{where}: missing") from None
    except OSError as err:  # its text would name the absolute path
        raise ModelSpecError(f"{where}: not readable ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ModelSpecError(f"{where}: not UTF-8 text") from None
    spec = _parse_spec(_loads(text, where), where)
    if version_dir.name != str(spec.version):
        raise ModelSpecError(f"{where}: version {spec.version} does not match folder {version_dir.name!r}")
    if version_dir.parent.name != spec.name:
        raise ModelSpecError(f"{where}: name {spec.name!r} does not match folder {version_dir.parent.name!r}")
    needed = [v.file for v in spec.variants.values()]
    if spec.text is not None:
        needed.append(spec.text.tokenizer_file)
    for name in needed:
        if not (version_dir / name).is_file():
            raise ModelSpecError(f"{where}: names {name!r}, which is not in {folder}")
    return spec


def write_model_spec(version_dir: Path, spec: ModelSpec) -> Path:
    """Writes ``model.json`` after checking the spec against the contract (round trip), so export
    never publishes what the server would refuse."""
    where = f"{version_dir / MODEL_JSON} (before writing)"
    _parse_spec(_loads(spec.to_json(), where), where)
    path = version_dir / MODEL_JSON
    path.write_text(spec.to_json(), encoding="utf-8")
    return path


def list_versions(model_dir: Path) -> list[int]:
    """The published versions of a model, ascending; ignores folders whose names are not versions
    (``version_of``) and a model folder that cannot be listed (one bad entry fails only itself)."""
    try:
        children = [child for child in model_dir.iterdir() if child.is_dir()]
    except OSError:  # not a folder, gone, or not readable
        return []
    return sorted(v for v in map(version_of, (child.name for child in children)) if v is not None)


def version_of(folder_name: str) -> int | None:
    """The version a folder name stands for: plain decimal digits, no leading zero, in 1..2**63-1
    (what the replies' int64 can carry); otherwise None."""
    if not (
        folder_name.isascii()  # str.isdigit() also takes "²", which int() refuses
        and folder_name.isdigit()
        and len(folder_name) <= len(str(INT64_MAX))  # before int(): no 5000-digit conversions
        and not folder_name.startswith("0")
    ):
        return None
    version = int(folder_name)
    return version if VERSION_RANGE[0] <= version <= VERSION_RANGE[1] else None


def list_models(repository: Path) -> list[str]:
    """Model folder names in a repository that hold at least one version, sorted."""
    if not repository.is_dir():
        return []
    return sorted(
        child.name
        for child in repository.iterdir()
        if child.is_dir() and MODEL_NAME.match(child.name) and list_versions(child)
    )


def check_labels(labels: Any, where: str) -> tuple[str, ...]:
    """The labels as the contract takes them: 2..MAX_LABELS distinct strings, each 1..MAX_LABEL_CHARS
    characters without control characters (NUL, C0/C1, ESC, line separators) or bidirectional
    controls. Errors name ``where`` and the label's index.

    Raises:
        ModelSpecError: the first label (or count) out of contract.
    """
    items = _list(labels, where)
    if len(items) < 2:
        raise ModelSpecError(f"{where}: needs at least 2 entries, got {len(items)}")
    if len(items) > MAX_LABELS:
        raise ModelSpecError(f"{where}: {len(items)} entries, more than {MAX_LABELS}")
    checked = tuple(_label(item, f"{where}[{i}]") for i, item in enumerate(items))
    if len(set(checked)) != len(checked):
        raise ModelSpecError(f"{where}: has duplicates")
    return checked


def finite_in(value: Any, where: str, low: float, high: float) -> float:
    """``value`` as a float, if it is a finite number in ``[low, high]``.

    Raises:
        ModelSpecError: not a number, NaN, infinite or out of range; the message names ``where``.
    """
    number = _float(value, where)
    if not low <= number <= high:  # NaN fails every comparison
        raise ModelSpecError(f"{where}: must be a finite number in [{low}, {high}], got {number!r}")
    return number


def check_image_preprocessing(image: ImagePreprocessing, where: str) -> ImagePreprocessing:
    """Checks an ``ImagePreprocessing`` built in code against the contract, as model.json's would be."""
    return _image(json.loads(json.dumps(asdict(image))), where)


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
    version = _int_in(d.get("version"), f"{where}: version", *VERSION_RANGE)
    task = _str(d.get("task"), f"{where}: task")
    if task not in TASKS:
        raise ModelSpecError(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
    labels = check_labels(d.get("labels"), f"{where}: labels")
    inputs = _tensors(d.get("inputs"), f"{where}: inputs")
    outputs = _tensors(d.get("outputs"), f"{where}: outputs")
    max_batch_size = _int_in(d.get("max_batch_size", 64), f"{where}: max_batch_size", *MAX_BATCH_SIZE_RANGE)
    temperature = finite_in(d.get("temperature", 1.0), f"{where}: temperature", *TEMPERATURE_RANGE)
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
        if not shape or any(x == 0 or x < -1 or x > INT64_MAX for x in shape):
            raise ModelSpecError(
                f"{where}[{i}].shape {list(shape)} must be non-empty, each -1 or in 1..{INT64_MAX}"
            )
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
        size_bytes=_int_in(d.get("size_bytes", 0), f"{where}.size_bytes", 0, INT64_MAX),
        checks=_obj(d.get("checks", {}), f"{where}.checks"),
        cpu_latency_ms=None if latency is None else finite_in(latency, f"{where}.cpu_latency_ms", 0, 1e9),
    )


def _image(value: Any, where: str) -> ImagePreprocessing:
    d = _obj(value, where)
    height = _int_in(d.get("height"), f"{where}.height", *IMAGE_SIZE_RANGE)
    width = _int_in(d.get("width"), f"{where}.width", *IMAGE_SIZE_RANGE)
    mean = _triple(d.get("mean"), f"{where}.mean", MEAN_RANGE)
    std = _triple(d.get("std"), f"{where}.std", STD_RANGE)
    crop = finite_in(d.get("crop_fraction", 1.0), f"{where}.crop_fraction", *CROP_FRACTION_RANGE)
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
    max_length = _int_in(d.get("max_length", 128), f"{where}.max_length", *MAX_LENGTH_RANGE)
    return TextPreprocessing(tokenizer_file, max_length)


def _triple(value: Any, where: str, bounds: tuple[float, float]) -> tuple[float, float, float]:
    items = _list(value, where)
    if len(items) != 3:
        raise ModelSpecError(f"{where}: needs 3 values, got {len(items)}")
    a, b, c = (finite_in(x, f"{where}[{i}]", *bounds) for i, x in enumerate(items))
    return (a, b, c)


# Control characters (C0, DEL, C1: NUL, ESC, newline, ...) and the line and paragraph separators.
_FORGING = ("Cc", "Zl", "Zp")


def _label(value: Any, where: str) -> str:
    label = _str(value, where)
    if len(label) > MAX_LABEL_CHARS:
        raise ModelSpecError(f"{where}: {len(label)} characters, more than {MAX_LABEL_CHARS}")
    bad = next((c for c in label if c in BIDI_CONTROLS or unicodedata.category(c) in _FORGING), None)
    if bad is not None:
        raise ModelSpecError(
            f"{where}: {label!r} holds {bad!a} (control and bidirectional characters are not allowed)"
        )
    return label


def _loads(text: str, where: str) -> Any:
    """JSON as the contract takes it: Python's json reads NaN, Infinity and -Infinity, which JSON
    does not have and no number of the contract may be."""

    def refuse(constant: str) -> Any:
        raise ModelSpecError(f"{where}: {constant} is not a JSON number (every number must be finite)")

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as err:
        raise ModelSpecError(f"{where}: not readable JSON ({err})") from None


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


def _int_in(value: Any, where: str, low: int, high: int) -> int:
    number = _int(value, where)
    if not low <= number <= high:
        raise ModelSpecError(f"{where}: must be an integer in {low}..{high}, got {number}")
    return number


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelSpecError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range
        raise ModelSpecError(f"{where}: {value} is out of range") from None
    if not math.isfinite(number):
        raise ModelSpecError(f"{where}: must be finite, got {number!r}")
    return number
