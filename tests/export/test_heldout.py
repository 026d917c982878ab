"""Held-out examples rebuilt from a run's recorded split (training.data), digest-checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fineserve.export.examples import ExamplesError
from fineserve.export.heldout import examples_from_run
from fineserve.training.checkpoint import CheckpointMetadata
from fineserve.training.config import build_config
from fineserve.training.data import image_encoder, make_splits
from fineserve.training.datasets import load_dataset

LABELS = [str(i) for i in range(10)]
CONFIG = {"dataset": "digits", "labels": LABELS, "image_size": 32, "test_samples": 30, "seed": 3}


def _meta() -> CheckpointMetadata:
    cfg = build_config(dict(CONFIG))
    raw = load_dataset("digits", data_path=None, cache=Path("."), text_column="text", label_column="label")
    record = make_splits(raw, cfg, image_encoder).record
    image = {"height": 32, "width": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 1.0}
    return CheckpointMetadata(
        backbone="efficientnet-lite0",
        task="image-classification",
        labels=LABELS,
        preprocessing={"image": image},
        config=dict(CONFIG),
        split=record,
    )


def test_rebuilds_the_recorded_test_split(tmp_path: Path) -> None:
    test, calibration = examples_from_run(_meta(), tmp_path, limit=25, calibration_limit=8)
    assert len(test) == 25 and test.features["pixel_values"].shape == (25, 3, 32, 32)
    assert set(test.labels.tolist()) <= set(range(10)) and len(set(test.labels.tolist())) > 3
    assert len(calibration) == 8 and "val split" in calibration.source
    assert np.abs(test.features["pixel_values"]).max() <= 1.0 + 1e-6  # normalised with mean = std = 0.5


def test_a_different_split_is_refused(tmp_path: Path) -> None:
    meta = _meta()
    tampered = dataclasses.replace(meta, split={**meta.split, "indices_sha256": "0" * 16})
    with pytest.raises(ExamplesError, match="differs from the recorded one"):
        examples_from_run(tampered, tmp_path, limit=10)


def test_an_unrebuildable_config_says_pass_examples(tmp_path: Path) -> None:
    meta = dataclasses.replace(
        _meta(), config={"dataset": "imagefolder", "data_path": str(tmp_path / "gone")}
    )
    with pytest.raises(ExamplesError, match="pass --examples"):
        examples_from_run(meta, tmp_path, limit=10)
