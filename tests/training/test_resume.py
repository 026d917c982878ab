"""An interrupted run resumed from last.pt ends in exactly the state of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_image_config
from training.config import ConfigError
from training.run import train


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path: Path) -> None:
    # 64 examples / batch 32 = 2 steps per epoch; stop after the first step of epoch 2.
    common = {"strategy": "partial", "trainable_blocks": 3, "crop_padding": 2, "hflip": True}
    train(tiny_image_config(tmp_path, **common), tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_image_config(tmp_path, stop_after_steps=3, **common), interrupted)
    saved = torch.load(interrupted / "last.pt", weights_only=True)
    assert (
        saved["progress"]["step"] == 3 and saved["progress"]["epoch"] == 1 and saved["progress"]["batch"] == 1
    )
    train(tiny_image_config(tmp_path, **common), interrupted)

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(interrupted / "last.pt", weights_only=True)
    assert a["progress"]["step"] == b["progress"]["step"] == 4
    assert a["progress"]["history"][-1]["val_loss"] == b["progress"]["history"][-1]["val_loss"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    exp_avg_a = [s["exp_avg"] for s in a["optimizer"]["state"].values()]
    exp_avg_b = [s["exp_avg"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(exp_avg_a, exp_avg_b, strict=True))
    # metrics.jsonl has one line per epoch, no duplicates from the interrupted attempt
    assert len((interrupted / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_refuses_a_changed_recipe(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_image_config(tmp_path, strategy="partial", stop_after_steps=1), run)
    with pytest.raises(ConfigError, match="different 'lr'"):
        train(tiny_image_config(tmp_path, strategy="partial", lr=1e-4), run)
