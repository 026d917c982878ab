"""The distillation loss against a hand-computed case, and students built from a teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fineserve.training.backbones import create_model
from fineserve.training.checkpoint import load_checkpoint
from fineserve.training.distill import default_student_layers, distillation_loss, init_text_student
from fineserve.training.run import train
from tests.training.conftest import tiny_image_config


def test_distillation_loss_matches_hand_computed_case() -> None:
    student, teacher, label = [2.0, 0.0], [0.0, 2.0], 0
    t, alpha = 2.0, 0.25

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    p_t = softmax([v / t for v in teacher])  # [1/(1+e), e/(1+e)]
    p_s = softmax([v / t for v in student])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    ce = -math.log(softmax(student)[label])
    expected = alpha * t * t * kl + (1 - alpha) * ce
    got = distillation_loss(
        torch.tensor([student]), torch.tensor([teacher]), torch.tensor([label]), temperature=t, alpha=alpha
    )
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # identical logits: only the hard-label part remains
    same = distillation_loss(
        torch.tensor([student]), torch.tensor([student]), torch.tensor([label]), temperature=t, alpha=alpha
    )
    assert float(same) == pytest.approx((1 - alpha) * ce, rel=1e-6)


def test_text_student_starts_from_the_teachers_layers() -> None:
    teacher = create_model("minilm-l6", 2)
    layers = default_student_layers(6)
    assert layers == [1, 3, 5]
    student = create_model("minilm-l6", 2, pretrained=False, num_layers=3)
    init_text_student(student, teacher, layers)
    for s_layer, t_index in zip(student.bert.encoder.layer, layers, strict=True):
        t_state = teacher.bert.encoder.layer[t_index].state_dict()
        assert all(torch.equal(v, t_state[k]) for k, v in s_layer.state_dict().items())
    ids = torch.tensor([[101, 2023, 2143, 2001, 2307, 102]])
    student.eval(), teacher.eval()
    assert torch.equal(student.bert.embeddings(ids), teacher.bert.embeddings(ids))
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_image_distillation_run_records_teacher_and_labels(
    tmp_path: Path, partial_run: tuple[Path, dict]
) -> None:
    teacher_run = partial_run[0]
    student_run = tmp_path / "student"
    metrics = train(
        tiny_image_config(tmp_path, strategy="partial", teacher=str(teacher_run), image_size=40), student_run
    ).metrics
    _, teacher_meta = load_checkpoint(teacher_run)
    assert metrics["teacher_test_accuracy"] == teacher_meta.metrics["test_accuracy"]
    _, meta = load_checkpoint(student_run)
    assert meta.config["teacher"] == str(teacher_run) and meta.model_args == {"image_size": 40}
