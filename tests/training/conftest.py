"""Tiny, fast training setups: sklearn digits at 32 px, a separable JSONL text set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fineserve.training.config import TrainConfig, build_config

TINY_IMAGE: dict[str, Any] = {
    "backbone": "efficientnet-lite0",
    "dataset": "digits",
    "image_size": 32,
    "train_samples": 64,
    "val_samples": 32,
    "test_samples": 32,
    "batch_size": 32,
    "eval_batch_size": 64,
    "epochs": 2,
    "lr": 2e-3,
    "warmup_fraction": 0.0,
    "schedule": "constant",
    "progress": False,
    "log_every": 0,
    "threads": 1,
    "plots": False,
}

POSITIVE = ["good", "great", "lovely", "wonderful", "superb", "fine", "brilliant", "fun"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "poor", "weak", "ugly"]


def tiny_image_config(tmp_path: Path, **changes: Any) -> TrainConfig:
    return build_config({**TINY_IMAGE, "data_cache": str(tmp_path / "cache"), **changes})


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 short reviews whose label follows from one obvious word."""
    path = tmp_path_factory.mktemp("text") / "reviews.jsonl"
    rows = []
    for i in range(96):
        words = POSITIVE if i % 2 else NEGATIVE
        rows.append(
            {
                "text": f"the film was {words[i % 8]} and {words[(i // 2) % 8]}",
                "label": "pos" if i % 2 else "neg",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_text_config(tmp_path: Path, text_file: Path, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "backbone": "minilm-l6",
        "dataset": "text-file",
        "data_path": str(text_file),
        "max_length": 16,
        "num_layers": 2,
        "batch_size": 16,
        "eval_batch_size": 64,
        "epochs": 3,
        "lr": 1e-4,
        "head_lr": 1e-3,
        "warmup_fraction": 0.0,
        "schedule": "constant",
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "progress": False,
        "log_every": 0,
        "threads": 1,
        "plots": False,
        "data_cache": str(tmp_path / "cache"),
    }
    return build_config({**values, **changes})


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def partial_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One finished partial fine-tune on the whole digits test split (shared: a teacher, a checkpoint)."""
    from fineserve.training.run import train

    tmp = tmp_path_factory.mktemp("partial")
    run = tmp / "run"
    metrics = train(tiny_image_config(tmp, strategy="partial", epochs=1, test_samples=None), run).metrics
    return run, metrics
