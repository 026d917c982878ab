"""An interrupted run resumed from last.pt ends in exactly the state of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fineserve.training.checkpoint import UnfinishedRunError, load_checkpoint, read_metadata
from fineserve.training.config import ConfigError
from fineserve.training.run import RunResult, train
from tests.training.conftest import tiny_image_config


@pytest.mark.parametrize(
    ("changes", "validated"),
    [
        ({}, [1, 2]),
        # the stop falls in epoch 2, which does not validate: the loss of epoch 1's batches, from
        # before the stop, must still count in the mean that epoch 2's line records
        ({"epochs": 3, "eval_every_epochs": 2}, [2, 3]),
    ],
)
def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path: Path, changes: dict, validated: list) -> None:
    # 64 examples / batch 32 = 2 steps per epoch; stop after the first step of epoch 2.
    common = {"strategy": "partial", "trainable_blocks": 3, "crop_padding": 2, "hflip": True, **changes}
    train(tiny_image_config(tmp_path, **common), tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    stopped = train(tiny_image_config(tmp_path, stop_after_steps=3, **common), interrupted)
    assert stopped == RunResult(stopped="stop_after_steps=3 reached")
    saved = torch.load(interrupted / "last.pt", weights_only=True)
    assert (
        saved["progress"]["step"] == 3 and saved["progress"]["epoch"] == 1 and saved["progress"]["batch"] == 1
    )
    train(tiny_image_config(tmp_path, **common), interrupted)

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(interrupted / "last.pt", weights_only=True)
    assert a["progress"]["step"] == b["progress"]["step"] == 2 * changes.get("epochs", 2)
    for key in ("epoch", "step", "train_loss", "val_loss", "val_accuracy"):
        assert [h[key] for h in a["progress"]["history"]] == [h[key] for h in b["progress"]["history"]], key
    assert [h["epoch"] for h in b["progress"]["history"]] == validated
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    exp_avg_a = [s["exp_avg"] for s in a["optimizer"]["state"].values()]
    exp_avg_b = [s["exp_avg"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(exp_avg_a, exp_avg_b, strict=True))
    # metrics.jsonl has one line per validation, no duplicates from the interrupted attempt
    assert len((interrupted / "metrics.jsonl").read_text().splitlines()) == len(validated)


def test_resume_refuses_a_changed_recipe(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_image_config(tmp_path, strategy="partial", stop_after_steps=1), run).stopped
    args_before = (run / "args.yaml").read_text()
    with pytest.raises(ConfigError, match="different 'lr'"):
        train(tiny_image_config(tmp_path, strategy="partial", lr=1e-4), run)
    # args.yaml still describes last.pt, not the refused recipe
    assert (run / "args.yaml").read_text() == args_before
    assert yaml.safe_load(args_before)["lr"] == 2e-3


def test_interrupted_run_is_unfinished_until_it_completes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # 2 steps per epoch: epoch 1 improves (best.pt + metadata.json written), then the stop.
    assert train(tiny_image_config(tmp_path, strategy="partial", stop_after_steps=3), run).stopped
    assert (run / "best.pt").is_file() and read_metadata(run).finished is False
    with pytest.raises(UnfinishedRunError, match="did not finish"):
        load_checkpoint(run)

    train(tiny_image_config(tmp_path, strategy="partial"), run)  # the resume completes it
    meta = read_metadata(run)
    assert meta.finished is True and "test_accuracy" in meta.metrics
    load_checkpoint(run)

    # Training the finished run for more epochs makes it unfinished again until that completes.
    assert train(tiny_image_config(tmp_path, strategy="partial", epochs=3, stop_after_steps=5), run).stopped
    assert read_metadata(run).finished is False
