"""Classification post-processing, shared by both transports: calibrated probabilities from a
model's logits, and each row's best classes (the fineserve.v1 answers, KServe's classification
extension).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassScore:
    """One class of one row: its column, its label ("" when the model has no label for it), its score."""

    index: int
    label: str
    score: float


def probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities: softmax of ``logits / temperature`` over the last axis, as FP32."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    calibrated: np.ndarray = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return calibrated


def top_classes(scores: np.ndarray, k: int, labels: Sequence[str]) -> list[list[ClassScore]]:
    """Per row (the first axis), the ``k`` best classes (at most all of them), best first; equal
    scores keep the lower class index first."""
    rows = np.asarray(scores).reshape(len(scores), -1)
    # Stable sort on the negated scores: ties keep the lower class index first.
    order = np.argsort(-rows, axis=1, kind="stable")[:, : min(k, rows.shape[1])]
    return [
        [
            ClassScore(index, labels[index] if index < len(labels) else "", float(rows[r, index]))
            for index in indices.tolist()
        ]
        for r, indices in enumerate(order)
    ]
