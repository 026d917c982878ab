"""The checkpoint a training run leaves, and the one way to load it back (used by export).

A run folder holds::

    best.pt         {"model": state_dict} of the best validation epoch (torch.save)
    metadata.json   what export needs to rebuild and publish the model (see CheckpointMetadata)
    tokenizer.json  text models: the tokenizer the model was trained with

``best.pt`` and ``metadata.json`` are rewritten after every improved epoch, so their presence does
not mean the run is done: ``metadata.json`` says ``"finished": true`` only once training, test
evaluation and calibration completed, and ``load_checkpoint`` refuses any other run. Both files
are written to a temporary name and renamed, so a reader never sees half of one.

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fineserve.files import write_atomically
from fineserve.training.backbones import backbone_config, create_model
from fineserve.training.config import TrainConfig
from fineserve.training.errors import CheckpointError, UnfinishedRunError

FORMAT = "fineserve-checkpoint/1"
BEST = "best.pt"
METADATA = "metadata.json"
TOKENIZER = "tokenizer.json"


@dataclass
class CheckpointMetadata:
    """``metadata.json``. ``preprocessing`` uses the field names of ``export.contract``:
    ``{"image": {height, width, mean, std, crop_fraction, interpolation, channel_order, layout}}``
    or ``{"text": {"tokenizer_file": "tokenizer.json", "max_length": N}}``."""

    backbone: str
    task: str
    labels: list[str]
    preprocessing: dict[str, Any]
    # Extra keyword arguments of ``create_model`` (e.g. image_size, num_layers).
    model_args: dict[str, Any] = field(default_factory=dict)
    # Softmax temperature fitted on the validation split, and the calibration figures.
    temperature: float = 1.0
    calibration: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    git_commit: str | None = None
    format: str = FORMAT
    # True only once training, test evaluation and calibration completed; False while the run is
    # in progress (or was interrupted). None: metadata written before this field existed, where
    # the test metrics, recorded only at the very end, tell instead (see ``run_finished``).
    finished: bool | None = None


def run_metadata(
    cfg: TrainConfig,
    labels: list[str],
    split: dict[str, Any],
    *,
    image_size: int,
    max_length: int,
    model_args: dict[str, Any],
) -> CheckpointMetadata:
    """The metadata of a run's model before the run finishes (no test metrics yet)."""
    backbone = backbone_config(cfg.backbone)
    if backbone.kind == "text":
        preprocessing: dict[str, Any] = {"text": {"tokenizer_file": TOKENIZER, "max_length": max_length}}
    else:
        preprocessing = {
            "image": {
                "height": image_size,
                "width": image_size,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
                # Training resizes the whole (square) image: no center crop.
                "crop_fraction": 1.0,
                "interpolation": "bilinear",
                "channel_order": "RGB",
                "layout": "NCHW",
            }
        }
    return CheckpointMetadata(
        backbone=cfg.backbone,
        task="text-classification" if backbone.kind == "text" else "image-classification",
        labels=list(labels),
        preprocessing=preprocessing,
        model_args=dict(model_args),
        config=cfg.to_dict(),
        split=dict(split),
        seed=cfg.seed,
        git_commit=git_commit(),
        finished=False,
    )


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def run_finished(meta: CheckpointMetadata) -> bool:
    """Whether the run that wrote ``meta`` completed."""
    if meta.finished is not None:
        return meta.finished
    return "test_accuracy" in meta.metrics


def require_finished(run_dir: Path, meta: CheckpointMetadata) -> None:
    """Raises ``UnfinishedRunError`` unless the run completed."""
    if not run_finished(meta):
        raise UnfinishedRunError(
            f"{run_dir}: the training run did not finish (interrupted or failed; no test metrics or "
            f"calibration yet); finish it by rerunning its fineserve train command with --output-dir "
            f"{run_dir} (it resumes from last.pt), or train again"
        )


def save_checkpoint(run_dir: Path, model: nn.Module, metadata: CheckpointMetadata) -> Path:
    """Writes ``best.pt`` and ``metadata.json`` into ``run_dir`` (created if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    write_atomically(run_dir / BEST, lambda tmp: torch.save({"model": state}, tmp))
    write_metadata(run_dir, metadata)
    return run_dir / BEST


def write_metadata(run_dir: Path, metadata: CheckpointMetadata) -> None:
    text = json.dumps(asdict(metadata), indent=2) + "\n"
    write_atomically(run_dir / METADATA, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_metadata(run_dir: Path) -> CheckpointMetadata:
    """Reads and type-checks ``metadata.json`` (finished or not).

    Raises:
        CheckpointError: missing, unreadable, not JSON, of another format or with a field of the
            wrong type; the message names the file and the field.
    """
    path = run_dir / METADATA
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {METADATA}; is this a training run folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a fineserve checkpoint metadata file (not a JSON object)")
    try:
        meta = CheckpointMetadata(**data)
    except TypeError as err:
        raise CheckpointError(f"{path}: not a fineserve checkpoint metadata file ({err})") from None
    if meta.format != FORMAT:
        raise CheckpointError(f"{path}: format {meta.format!r} is not {FORMAT!r}")
    _check_fields(meta, path)
    return meta


def mark_unfinished(output_dir: Path) -> None:
    """A run that trains again (resumed for more epochs, or retrained over an old folder) is not
    finished until it completes again, even before its first improved epoch rewrites the files."""
    try:
        meta = read_metadata(output_dir)
    except CheckpointError:  # none yet, or unreadable: export refuses that folder anyway
        return
    if meta.finished is not False:
        meta.finished = False
        write_metadata(output_dir, meta)


def load_checkpoint(run_dir: Path) -> tuple[nn.Module, CheckpointMetadata]:
    """Rebuilds the trained model of a finished run from its folder, in eval mode, on the CPU.

    Raises:
        UnfinishedRunError: the run was interrupted or failed before it finished.
        CheckpointError: the folder, ``best.pt`` or ``metadata.json`` is missing, unreadable or
            malformed, or the weights do not fit the recorded model.
    """
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "does not exist"
        raise CheckpointError(f"checkpoint folder {run_dir} {what}")
    meta = read_metadata(run_dir)
    require_finished(run_dir, meta)
    weights = run_dir / BEST
    if not weights.is_file():
        raise CheckpointError(f"{run_dir}: no {BEST}")
    state = _load_weights(weights)
    model = create_model(meta.backbone, len(meta.labels), pretrained=False, **meta.model_args)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:  # weights of another shape or architecture
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{weights}: does not fit the recorded model ({first})") from None
    return model.eval(), meta


def _load_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``best.pt``."""
    if weights.stat().st_size == 0:
        raise CheckpointError(f"{weights}: is empty (the run was cut off while writing it?); train again")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises EOFError, KeyError, RuntimeError, UnpicklingError, ...
        raise CheckpointError(
            f"{weights}: unreadable, truncated or not a torch checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{weights}: expected a dict with a 'model' state_dict")
    return state["model"]


def checkpoint_sha256(run_dir: Path) -> str:
    """The hash of ``best.pt``: recorded in the published model's ``source``."""
    digest = hashlib.sha256()
    with (run_dir / BEST).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Fields a value of the wrong type would only fail on deep inside export (model building, float()).
_DICT_FIELDS = ("preprocessing", "model_args", "calibration", "metrics", "config", "split")
_MODEL_ARGS = {"image_size": 32, "num_layers": 1}  # create_model's keyword -> its minimum


def _check_fields(meta: CheckpointMetadata, path: Path) -> None:
    def bad(field_name: str, expected: str, value: object) -> CheckpointError:
        return CheckpointError(f"{path}: {field_name} must be {expected}, got {value!r}")

    for name in ("backbone", "task"):
        if not isinstance(getattr(meta, name), str):
            raise bad(name, "a string", getattr(meta, name))
    if not isinstance(meta.labels, list) or len(meta.labels) < 2:
        raise bad("labels", "a list of at least 2 names", meta.labels)
    if not all(isinstance(label, str) and label for label in meta.labels):
        raise bad("labels", "non-empty strings", meta.labels)
    for name in _DICT_FIELDS:
        if not isinstance(getattr(meta, name), dict):
            raise bad(name, "an object", getattr(meta, name))
    for key, value in meta.model_args.items():
        if key not in _MODEL_ARGS:
            known = ", ".join(_MODEL_ARGS)
            raise CheckpointError(f"{path}: model_args has an unknown key {key!r} (known: {known})")
        if not _is_int(value) or value < _MODEL_ARGS[key]:
            raise bad(f"model_args.{key}", f"an integer >= {_MODEL_ARGS[key]}", value)
    temperature = meta.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise bad("temperature", "a number", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise bad("temperature", "a finite number > 0", temperature)
    if meta.seed is not None and not _is_int(meta.seed):
        raise bad("seed", "an integer or null", meta.seed)
    if meta.git_commit is not None and not isinstance(meta.git_commit, str):
        raise bad("git_commit", "a string or null", meta.git_commit)
    if meta.finished is not None and not isinstance(meta.finished, bool):
        raise bad("finished", "true, false or absent", meta.finished)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and torch.compile wrap the module; save the inner one.
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model
