"""Fine-tuning strategies: which blocks train, at which learning rate, on which schedule.

- linear-probe: nothing of the backbone trains (the head is fitted on cached features).
- partial: the last ``trainable_blocks`` blocks and the head train, the rest is frozen.
- full: everything trains; block ``d`` steps below the head gets ``lr * layer_decay**d``.
- gradual: starts like linear-probe and unfreezes one more block every ``unfreeze_every`` epochs.
- ``head_warmup_epochs`` (full, partial): only the head trains for the first epochs, then the
  strategy's blocks too: LP-FT (Kumar et al., ICLR 2022). A random head's first, large gradients
  would otherwise flow into the pretrained blocks and distort the features the head will need.

Frozen blocks run in eval mode: their BatchNorm layers keep the pretrained running statistics
(updating them from a frozen network's new inputs would silently change what the frozen
weights compute) and their dropout is off, so a frozen block is a fixed function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from fineserve.training import layers

if TYPE_CHECKING:
    from fineserve.training.config import TrainConfig


def set_trainable_blocks(model: nn.Module, n: int) -> None:
    """The head and the last ``n`` blocks train; every other parameter is frozen."""
    model.requires_grad_(False)
    groups = layers.blocks(model)
    for block in groups[len(groups) - n :] if n > 0 else []:
        block.requires_grad_(True)
    layers.head(model).requires_grad_(True)


def initial_trainable_blocks(strategy: str, trainable_blocks: int, num_blocks: int) -> int:
    if strategy == "full":
        return num_blocks
    if strategy == "partial":
        return min(trainable_blocks, num_blocks)
    return 0  # linear-probe, and gradual before its first unfreezing


def trainable_blocks_in(epoch: int, cfg: TrainConfig, num_blocks: int) -> int | None:
    """Blocks that train in ``epoch`` (0-based) when the strategy changes them between epochs
    (gradual unfreezing, a head-only warm-up), else None: what started trains throughout."""
    if cfg.strategy == "gradual":
        return gradual_trainable_blocks(epoch, cfg.unfreeze_every, num_blocks)
    if cfg.head_warmup_epochs:
        if epoch < cfg.head_warmup_epochs:
            return 0
        return initial_trainable_blocks(cfg.strategy, cfg.trainable_blocks, num_blocks)
    return None


def gradual_trainable_blocks(epoch: int, unfreeze_every: int, num_blocks: int) -> int:
    """Blocks that train in ``epoch`` (0-based): one more every ``unfreeze_every`` epochs."""
    return min(num_blocks, epoch // unfreeze_every)


def set_batchnorm_momentum(model: nn.Module, momentum: float | None) -> None:
    """Running statistics must follow the new domain: the TF-ported EfficientNet-Lite uses
    momentum 0.01, which in a few hundred steps leaves eval-mode statistics mostly ImageNet's."""
    if momentum is None:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def train_mode(model: nn.Module) -> None:
    """``model.train()``, except that fully frozen blocks and frozen norm layers stay in eval."""
    model.train()
    for block in layers.blocks(model):
        if not any(p.requires_grad for p in block.parameters()):
            block.eval()
            continue
        for module in block.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()


def param_groups(
    model: nn.Module, *, lr: float, head_lr: float, layer_decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: the head at ``head_lr``; block ``d`` below the head at ``lr * layer_decay**d``.

    Biases and norm weights (1-d tensors) get no weight decay. Every parameter is in a group,
    frozen ones included: AdamW skips parameters without a gradient, and gradual unfreezing
    only has to flip ``requires_grad``.
    """
    named: list[tuple[str, nn.Module, float]] = [("head", layers.head(model), head_lr)]
    backbone = layers.blocks(model)
    for depth, block in enumerate(reversed(backbone)):
        named.append((f"block{len(backbone) - 1 - depth}", block, lr * layer_decay**depth))
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, module, group_lr in named:
        decay, no_decay = [], []
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 else decay).append(p)
        for suffix, params, wd in (("", decay, weight_decay), (".no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": name + suffix, "params": params, "lr": group_lr, "weight_decay": wd})
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:  # parameters outside blocks and head (none for the known backbones)
        groups.append({"name": "other", "params": rest, "lr": lr, "weight_decay": weight_decay})
    return groups


def lr_multiplier(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warmup from ~0 to 1, then cosine/linear decay to 0 (or constant) at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
