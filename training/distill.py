"""Knowledge distillation: a fine-tuned teacher's temperature-softened outputs guide a student.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones as T
changes (Hinton et al., 2015).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional

from fineserve.training import layers
from fineserve.training.checkpoint import CheckpointMetadata, load_checkpoint
from fineserve.training.errors import DatasetError


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    t = temperature
    soft = functional.kl_div(
        functional.log_softmax(student_logits / t, dim=1),
        functional.log_softmax(teacher_logits.detach() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = functional.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * t * t * soft + (1 - alpha) * hard


@dataclass(frozen=True)
class DistillationLoss:
    """The training loss against the labels blended with the teacher's softened logits."""

    teacher: nn.Module
    temperature: float
    alpha: float
    label_smoothing: float

    def __call__(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        teacher_batch = dict(batch, pixels=batch["teacher_pixels"]) if "teacher_pixels" in batch else batch
        with torch.no_grad():
            teacher_logits = layers.logits(self.teacher, teacher_batch).float()
        return distillation_loss(
            logits,
            teacher_logits,
            batch["labels"],
            temperature=self.temperature,
            alpha=self.alpha,
            label_smoothing=self.label_smoothing,
        )


def load_teacher(run_dir: Path, labels: list[str]) -> tuple[nn.Module, CheckpointMetadata]:
    """The teacher in eval mode with frozen weights; its labels must be the run's labels."""
    teacher, meta = load_checkpoint(run_dir)
    if meta.labels != labels:
        raise DatasetError(
            f"label mismatch: teacher {run_dir} has labels {meta.labels}, the data has {labels}"
        )
    teacher.requires_grad_(False)
    return teacher, meta


def default_student_layers(teacher_layers: int) -> list[int]:
    """Every second teacher layer, top layer included: 6 -> [1, 3, 5]."""
    return list(range(teacher_layers - 1, -1, -2))[::-1]


def init_text_student(student: nn.Module, teacher: nn.Module, layers: list[int]) -> None:
    """Copies embeddings, the chosen encoder layers (in order), pooler and head from the teacher."""
    s_bert, t_bert = student.bert, teacher.bert
    if len(s_bert.encoder.layer) != len(layers):
        raise ValueError(f"student has {len(s_bert.encoder.layer)} layers, got {len(layers)} to copy")
    s_bert.embeddings.load_state_dict(t_bert.embeddings.state_dict())
    for target, source in zip(s_bert.encoder.layer, layers, strict=True):
        target.load_state_dict(t_bert.encoder.layer[source].state_dict())
    if s_bert.pooler is not None and t_bert.pooler is not None:
        s_bert.pooler.load_state_dict(t_bert.pooler.state_dict())
    student.classifier.load_state_dict(teacher.classifier.state_dict())
