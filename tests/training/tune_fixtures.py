"""A tiny recipe with a `search:` section (sklearn digits at 32 px): a trial trains in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.training.conftest import TINY_IMAGE

SEARCH: dict[str, Any] = {
    "lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
    "trainable_blocks": {"low": 1, "high": 2},
}


def tiny_tune_recipe(folder: Path, **changes: Any) -> Path:
    """Two epochs of a partial fine-tune on 64 digits; ``changes`` replace recipe keys (``search``)."""
    values: dict[str, Any] = {
        **TINY_IMAGE,
        "strategy": "partial",
        "train_samples": 48,
        "data_cache": str(folder / "cache"),
        "search": SEARCH,
        **changes,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in values.items() if v is not None}, sort_keys=False))
    return path
