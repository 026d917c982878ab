"""Learning-rate groups, schedules and BatchNorm handling of the strategies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fineserve.training import finetune, layers
from fineserve.training.backbones import create_model


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return create_model("efficientnet-lite0", 10, image_size=32)


def test_param_groups_get_layer_wise_decayed_learning_rates(lite0: nn.Module) -> None:
    groups = finetune.param_groups(lite0, lr=1e-3, head_lr=5e-3, layer_decay=0.5, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    num_blocks = len(layers.blocks(lite0))
    assert by_name["head"]["lr"] == 5e-3
    top, below, bottom = f"block{num_blocks - 1}", f"block{num_blocks - 2}", "block0"
    assert by_name[top]["lr"] == pytest.approx(1e-3)
    assert by_name[below]["lr"] == pytest.approx(5e-4)
    assert by_name[bottom]["lr"] == pytest.approx(1e-3 * 0.5 ** (num_blocks - 1))
    # biases and norm weights: no weight decay; every parameter in exactly one group
    assert by_name["head.no_decay"]["weight_decay"] == 0.0 and by_name["head"]["weight_decay"] == 0.05
    assert all(p.ndim <= 1 for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    counted = [id(p) for g in groups for p in g["params"]]
    assert len(counted) == len(set(counted)) == len(list(lite0.parameters()))
    # the scheduler scales each group from its own base rate
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, finetune.lr_multiplier(10, 0, "linear"))
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(2.5e-3) and lrs[below] == pytest.approx(2.5e-4)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    for schedule in ("cosine", "linear"):
        f = finetune.lr_multiplier(100, 10, schedule)
        warm = [f(s) for s in range(10)]
        assert warm == sorted(warm) and warm[0] < 0.2 and f(10) == pytest.approx(1.0)
        assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert finetune.lr_multiplier(100, 0, "constant")(70) == 1.0


def test_partial_freezing_keeps_frozen_batchnorm_in_eval(lite0: nn.Module) -> None:
    finetune.set_trainable_blocks(lite0, 2)
    finetune.train_mode(lite0)
    blocks = layers.blocks(lite0)
    assert all(not p.requires_grad for b in blocks[:-2] for p in b.parameters())
    assert all(p.requires_grad for b in blocks[-2:] for p in b.parameters())
    assert all(p.requires_grad for p in layers.head(lite0).parameters())
    frozen_bn = [m for b in blocks[:-2] for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    trained_bn = [m for b in blocks[-2:] for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen_bn and all(not m.training for m in frozen_bn)
    assert trained_bn and all(m.training for m in trained_bn)
    # a training-mode forward pass leaves the frozen running statistics untouched
    before = [m.running_mean.clone() for m in frozen_bn]
    lite0(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, frozen_bn, strict=True))


def test_gradual_unfreezing_adds_one_block_per_period() -> None:
    assert [finetune.gradual_trainable_blocks(e, 2, 3) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert finetune.initial_trainable_blocks("full", 2, 18) == 18
    assert finetune.initial_trainable_blocks("partial", 30, 18) == 18
    assert finetune.initial_trainable_blocks("linear-probe", 2, 18) == 0
