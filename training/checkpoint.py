"""The checkpoint a training run leaves, and the one way to load it back (used by export).

A run folder holds::

    best.pt         {"model": state_dict} of the best validation epoch (torch.save)
    metadata.json   what export needs to rebuild and publish the model (see CheckpointMetadata)
    tokenizer.json  text models: the tokenizer the model was trained with

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.backbones import create_model

FORMAT = "fineserve-checkpoint/1"
BEST = "best.pt"
METADATA = "metadata.json"
TOKENIZER = "tokenizer.json"


class CheckpointError(ValueError):
    """A run folder that is missing, incomplete or of another format."""


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


def save_checkpoint(run_dir: Path, model: nn.Module, metadata: CheckpointMetadata) -> Path:
    """Writes ``best.pt`` and ``metadata.json`` into ``run_dir`` (created if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    torch.save({"model": state}, run_dir / BEST)
    write_metadata(run_dir, metadata)
    return run_dir / BEST


def write_metadata(run_dir: Path, metadata: CheckpointMetadata) -> None:
    (run_dir / METADATA).write_text(json.dumps(asdict(metadata), indent=2) + "\n")


def read_metadata(run_dir: Path) -> CheckpointMetadata:
    path = run_dir / METADATA
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {METADATA}; is this a training run folder?")
    try:
        data = json.loads(path.read_text())
        meta = CheckpointMetadata(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path}: not a fineserve checkpoint metadata file ({err})") from None
    if meta.format != FORMAT:
        raise CheckpointError(f"{path}: format {meta.format!r} is not {FORMAT!r}")
    return meta


def load_checkpoint(run_dir: Path) -> tuple[nn.Module, CheckpointMetadata]:
    """Rebuilds the trained model from a run folder, in eval mode, on the CPU.

    Raises:
        CheckpointError: the folder, ``best.pt`` or ``metadata.json`` is missing or malformed.
    """
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {run_dir} does not exist")
    meta = read_metadata(run_dir)
    weights = run_dir / BEST
    if not weights.is_file():
        raise CheckpointError(f"{run_dir}: no {BEST}")
    model = create_model(meta.backbone, len(meta.labels), pretrained=False, **meta.model_args)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{weights}: expected a dict with a 'model' state_dict")
    model.load_state_dict(state["model"])
    return model.eval(), meta


def checkpoint_sha256(run_dir: Path) -> str:
    """The hash of ``best.pt``: recorded in the published model's ``source``."""
    digest = hashlib.sha256()
    with (run_dir / BEST).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and torch.compile wrap the module; save the inner one.
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model
