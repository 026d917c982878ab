"""Temperature scaling repairs an over-confident classifier and never changes its argmax."""

from __future__ import annotations

import torch

from fineserve.training.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    nll,
)


def test_temperature_scaling_lowers_nll_and_ece_of_overconfident_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    # Calibrated logits by construction: labels are drawn from softmax(logits).
    logits = torch.randn(4000, 5, generator=gen) * 1.5
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
    overconfident = logits * 3.0
    t = fit_temperature(overconfident[:2000], labels[:2000])
    assert 2.5 < t < 3.5
    held_out, held_labels = overconfident[2000:], labels[2000:]
    assert nll(held_out, held_labels, t) < nll(held_out, held_labels)
    assert expected_calibration_error(held_out, held_labels, t) < 0.5 * expected_calibration_error(
        held_out, held_labels
    )
    assert torch.equal((held_out / t).argmax(1), held_out.argmax(1))
    report = calibration_report(overconfident[:2000], labels[:2000], held_out, held_labels)
    assert report["test_ece_after"] < report["test_ece_before"]


def test_ece_is_zero_for_a_perfectly_confident_correct_classifier() -> None:
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    assert expected_calibration_error(logits, torch.tensor([0, 1])) < 1e-9
