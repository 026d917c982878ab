"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits so that
``softmax(logits / T)`` are calibrated probabilities; the argmax (accuracy) does not change."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.nn import functional


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    return float(functional.cross_entropy(logits.double() / temperature, labels))


def expected_calibration_error(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, bins: int = 15
) -> float:
    """Confidence-binned |accuracy - confidence|, weighted by the share of examples per bin."""
    probs = torch.softmax(logits.double() / temperature, dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the NLL of ``labels`` (optimised as log T, so T stays positive)."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    # Guard against a degenerate fit (e.g. a perfectly separated validation set).
    return temperature if 0.05 <= temperature <= 20 else min(max(temperature, 0.05), 20.0)


def calibration_report(
    val_logits: Tensor, val_labels: Tensor, test_logits: Tensor, test_labels: Tensor
) -> dict:
    """Fits T on validation; reports NLL and ECE before/after on validation and test."""
    t = fit_temperature(val_logits, val_labels)
    report: dict[str, float | str] = {"temperature": t, "fitted_on": "val", "bins": 15}
    for split, lg, lb in (("val", val_logits, val_labels), ("test", test_logits, test_labels)):
        report[f"{split}_nll_before"] = nll(lg, lb)
        report[f"{split}_nll_after"] = nll(lg, lb, t)
        report[f"{split}_ece_before"] = expected_calibration_error(lg, lb)
        report[f"{split}_ece_after"] = expected_calibration_error(lg, lb, t)
    return report
