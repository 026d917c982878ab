"""PNG plots of a run: learning curves and the test confusion matrix (matplotlib, no display).

matplotlib is imported when a plot is drawn: a bare GPU box without it still trains
(``available()`` tells the run to skip the plots, and says so).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], marker="o", color="tab:green")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Rows: true class; columns: predicted class."""
    k = len(names)
    return torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)


def confusion_plot(matrix: torch.Tensor, names: list[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    k = len(names)
    size = max(4.0, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    high = int(matrix.max()) if matrix.numel() else 0
    for i in range(k):
        for j in range(k):
            value = int(matrix[i, j])
            ax.text(j, i, value, ha="center", va="center", color="white" if value > high / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
