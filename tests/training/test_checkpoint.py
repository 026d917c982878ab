"""The run folder's checkpoint files: written atomically, read back with one-line errors, and
only a finished run loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fineserve.training import checkpoint
from fineserve.training.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    read_metadata,
    run_finished,
    save_checkpoint,
)


def _meta(**changes: object) -> CheckpointMetadata:
    fields: dict[str, object] = {
        "backbone": "efficientnet-lite0",
        "task": "image-classification",
        "labels": ["a", "b"],
        "preprocessing": {},
        **changes,
    }
    return CheckpointMetadata(**fields)  # type: ignore[arg-type]


def test_best_pt_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, nn.Linear(2, 2), _meta())
    before = (tmp_path / "best.pt").read_bytes()

    def save_half_then_die(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C in the middle of torch.save

    monkeypatch.setattr(checkpoint.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, nn.Linear(2, 2), _meta())
    assert (tmp_path / "best.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "metadata.json"]  # no temp left
    assert torch.load(tmp_path / "best.pt", weights_only=True)["model"]["weight"].shape == (2, 2)


@pytest.mark.parametrize(
    ("meta", "finished"),
    [
        (_meta(finished=True), True),
        (_meta(finished=False, metrics={"test_accuracy": 0.9}), False),
        (_meta(metrics={"test_accuracy": 0.9}), True),  # older runs: test metrics come last
        (_meta(), False),  # older runs: an improved epoch's metadata, never completed
    ],
)
def test_what_counts_as_finished(meta: CheckpointMetadata, finished: bool) -> None:
    assert run_finished(meta) is finished


def test_metadata_with_a_field_of_the_wrong_type_is_a_checkpoint_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, nn.Linear(2, 2), _meta())
    data = json.loads((tmp_path / "metadata.json").read_text())
    for field, value, message in [
        ("labels", "a,b", "labels must be"),
        ("model_args", {"image_size": 64.5}, "model_args.image_size must be an integer"),
        ("model_args", {"depth": 3}, "unknown key 'depth'"),
        ("temperature", -1, "temperature must be a finite number > 0"),
        ("finished", "yes", "finished must be"),
    ]:
        (tmp_path / "metadata.json").write_text(json.dumps({**data, field: value}))
        with pytest.raises(CheckpointError, match=message):
            read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_metadata(tmp_path)
