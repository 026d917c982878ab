"""A whole run's options, on the cheap linear-probe path (cached features): gradient
accumulation, early stopping, and a stop mid-epoch that leaves a resumable run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fineserve.training.checkpoint import read_metadata
from fineserve.training.run import RunResult, train
from tests.training.conftest import tiny_image_config


def test_gradient_accumulation_matches_the_larger_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Plain SGD instead of AdamW: Adam's steps barely depend on the gradient's scale, so an
    # accumulation that forgot to average (2x the gradient) would still match under AdamW.
    monkeypatch.setattr(torch.optim, "AdamW", torch.optim.SGD)
    common = {"strategy": "linear-probe", "grad_clip": None, "head_lr": 1e-1, "epochs": 1}
    train(tiny_image_config(tmp_path, batch_size=32, grad_accum=1, **common), tmp_path / "big")
    train(tiny_image_config(tmp_path, batch_size=16, grad_accum=2, **common), tmp_path / "accum")
    big = torch.load(tmp_path / "big" / "last.pt", weights_only=True)
    accum = torch.load(tmp_path / "accum" / "last.pt", weights_only=True)
    assert big["progress"]["step"] == accum["progress"]["step"] == 2
    assert torch.allclose(big["model"]["_fc.weight"], accum["model"]["_fc.weight"], atol=1e-6)


def test_early_stopping_ends_the_run_when_validation_stalls(tmp_path: Path) -> None:
    # An lr this small cannot change the predictions: no epoch after the first is better.
    cfg = tiny_image_config(
        tmp_path, strategy="linear-probe", lr=1e-12, head_lr=1e-12, epochs=6, early_stopping_patience=2
    )
    result = train(cfg, tmp_path / "run")
    metrics = result.metrics
    assert result.stopped is None  # early stopping finishes the run
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1
    assert json.loads(lines[-1])["epoch"] == 3


def test_eval_every_epochs_validates_every_nth_epoch_and_the_last(tmp_path: Path) -> None:
    cfg = tiny_image_config(tmp_path, strategy="linear-probe", epochs=7, eval_every_epochs=3)
    metrics = train(cfg, tmp_path / "run").metrics
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [3, 6, 7]
    assert [r["step"] for r in records] == [6, 12, 14]  # 2 steps per epoch
    assert metrics["epochs_run"] == 7 and metrics["optimizer_steps"] == 14
    assert metrics["best_epoch"] in (3, 6, 7)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["progress"]["epoch"] == 7


def test_early_stopping_counts_validations_not_epochs(tmp_path: Path) -> None:
    cfg = tiny_image_config(
        tmp_path,
        strategy="linear-probe",
        lr=1e-12,
        head_lr=1e-12,
        epochs=9,
        eval_every_epochs=2,
        early_stopping_patience=2,
    )
    metrics = train(cfg, tmp_path / "run").metrics
    # validated after epochs 2 (best), 4 and 6 (no better: patience used up)
    assert metrics["epochs_run"] == 6 and metrics["best_epoch"] == 2


def test_a_stop_mid_epoch_ends_the_run_cleanly_and_the_same_call_resumes_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # 64 examples / batch 32 = 2 steps per epoch: step 3 is the middle of epoch 2.
    result = train(tiny_image_config(tmp_path, strategy="linear-probe", stop_after_steps=3), run)
    assert result == RunResult(metrics={}, stopped="stop_after_steps=3 reached")
    saved = torch.load(run / "last.pt", weights_only=True)
    assert (saved["progress"]["epoch"], saved["progress"]["batch"], saved["progress"]["step"]) == (1, 1, 3)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 only
    assert read_metadata(run).finished is False  # best.pt of epoch 1, not a finished run

    resumed = train(tiny_image_config(tmp_path, strategy="linear-probe"), run)
    assert resumed.stopped is None
    assert resumed.metrics["optimizer_steps"] == 4 and resumed.metrics["epochs_run"] == 2
    assert read_metadata(run).finished is True
