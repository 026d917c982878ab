"""The inner loops: one training epoch, evaluation, and the resumable state in ``last.pt``.

A ``Step`` bundles what differs between runs (how a raw batch becomes model inputs on the
device, and the loss), so the loops themselves read the same for every strategy. A ``Stop`` ends
an epoch early: the epoch loop checks it after every optimiser step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fineserve.files import write_atomically
from fineserve.training import layers
from fineserve.training.data import Examples, epoch_order
from fineserve.training.distributed import Dist, all_sum

LAST = "last.pt"


@dataclass
class Step:
    """``prepare`` moves a raw batch to the device (and runs the image pipeline);
    ``loss`` turns (logits, prepared batch) into the training loss."""

    prepare: Callable[[dict[str, Tensor], bool], dict[str, Tensor]]
    loss: Callable[[Tensor, dict[str, Tensor]], Tensor]
    device: torch.device
    amp: bool = False

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass
class Progress:
    """Where a run stands; saved in ``last.pt`` so an interrupted run continues exactly."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # the next batch of that epoch
    step: int = 0  # optimiser steps taken
    best_accuracy: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0  # validations (not epochs, with eval_every_epochs) without a better accuracy
    # The training loss summed over the batches since the last validation, which records their
    # mean: saved, so a resumed run records the same mean as an uninterrupted one.
    train_loss_sum: float = 0.0
    train_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stop:
    """Whether the run ends before its last epoch, and why; checked after every optimiser step.

    ``after_steps`` (the recipe's ``stop_after_steps``) makes it due once that many steps are
    taken; setting ``reason`` requests a stop at the next check.
    """

    after_steps: int | None = None
    reason: str | None = None

    def due(self, step: int) -> bool:
        """True once a stop is due after ``step`` optimiser steps (or was requested)."""
        if self.reason is None and self.after_steps is not None and step >= self.after_steps:
            self.reason = f"stop_after_steps={self.after_steps} reached"
        return self.reason is not None


# group_by_length sorts by length within windows of this many batches: enough that each batch
# holds texts of about one length, few enough that the epoch is still well mixed.
LENGTH_WINDOW_BATCHES = 50


def epoch_batches(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    ctx: Dist,
    max_batches: int | None,
    lengths: Tensor | None = None,
) -> list[Tensor]:
    """This process's batches for ``epoch``, a pure function of (seed, epoch) so a resumed run
    sees the same ones. With ``lengths`` (text: tokens per example) each window of
    ``LENGTH_WINDOW_BATCHES`` batches is sorted by length before it is cut, and the batches are
    then shuffled: a batch pads to about its own texts' length, not to the longest of a random mix."""
    order = epoch_order(n, seed, epoch, ctx.rank, ctx.world)
    if lengths is not None:
        windows = order.split(batch_size * LENGTH_WINDOW_BATCHES)
        order = torch.cat([w[torch.argsort(lengths[w], descending=True, stable=True)] for w in windows])
    batches = list(order.split(batch_size))
    if lengths is not None:
        shuffle = torch.randperm(
            len(batches), generator=torch.Generator().manual_seed(seed * 1000 + epoch + 1)
        )
        batches = [batches[i] for i in shuffle]
    return batches[:max_batches] if max_batches else batches


def train_one_epoch(
    *,
    module: nn.Module,
    data: Examples,
    step: Step,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    batches: list[Tensor],
    grad_accum: int,
    grad_clip: float | None,
    set_train_mode: Callable[[], None],
    on_step: Callable[[float], None],
    stop: Stop,
    show: bool,
    desc: str,
) -> None:
    """Runs the batches from ``progress.batch`` on, adding each one's loss to
    ``progress.train_loss_sum``. ``on_step(loss)`` runs after each optimiser step (logging,
    saving last.pt); then the epoch ends there if ``stop`` is due (``progress`` says where to
    resume)."""
    set_train_mode()
    window = 0.0
    bar = tqdm(total=len(batches), initial=progress.batch, desc=desc, disable=not show, leave=False)
    for i in range(progress.batch, len(batches)):
        batch = step.prepare(data.batch(batches[i]), True)
        last_micro = (i + 1) % grad_accum == 0 or i + 1 == len(batches)
        # Under DDP, gradients are only averaged across processes on the last micro-batch.
        sync = module.no_sync() if hasattr(module, "no_sync") and not last_micro else contextlib.nullcontext()
        with sync:
            with step.autocast():
                loss = step.loss(layers.logits(module, batch).float(), batch)
            (loss / grad_accum).backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {progress.step}; lower the lr")
        window += value
        progress.train_loss_sum, progress.train_batches = (
            progress.train_loss_sum + value,
            progress.train_batches + 1,
        )
        if last_micro:
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in module.parameters() if p.grad is not None], grad_clip
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batch = i + 1
            on_step(window / (i % grad_accum + 1))
            window = 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if last_micro and stop.due(progress.step):
            break
    bar.close()


@torch.no_grad()
def predict(
    module: nn.Module, data: Examples, step: Step, batch_size: int, *, show: bool, desc: str
) -> tuple[Tensor, Tensor]:
    """Logits (float32, CPU) and labels of every example, in order; ``module`` in eval mode.

    Texts go through longest first, so each batch pads to about its own texts' length (a batch
    of 256 in dataset order pads nearly every text to the longest of them)."""
    was_training = module.training
    module.eval()
    mask = data.inputs.get("attention_mask")
    order = torch.arange(len(data)) if mask is None else mask.sum(dim=1).argsort(descending=True, stable=True)
    outputs = []
    for index in tqdm(list(order.split(batch_size)), desc=desc, disable=not show, leave=False):
        batch = step.prepare(data.batch(index), False)
        with step.autocast():
            outputs.append(layers.logits(module, batch).float().cpu())
    module.train(was_training)
    return torch.cat(outputs)[order.argsort()], data.labels


def evaluate(
    module: nn.Module, data: Examples, step: Step, batch_size: int, ctx: Dist, *, show: bool
) -> dict[str, float]:
    """Loss (plain cross-entropy) and accuracy; each process takes a shard, the sums are shared."""
    shard = Examples(
        {k: v[ctx.rank :: ctx.world] for k, v in data.inputs.items()}, data.labels[ctx.rank :: ctx.world]
    )
    logits, labels = predict(module, shard, step, batch_size, show=show, desc="eval")
    loss_sum = float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    correct = float((logits.argmax(1) == labels).sum())
    loss_sum, correct, n = all_sum([loss_sum, correct, float(len(labels))], ctx, step.device)
    return {"loss": loss_sum / n, "accuracy": correct / n}


def save_state(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    config: dict[str, Any],
) -> None:
    """Everything a resume needs; plain tensors and containers so ``weights_only`` loads it."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "config": config,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    write_atomically(path, lambda tmp: torch.save(state, tmp))  # never a truncated last.pt


def load_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[Progress, dict[str, Any]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(**state["progress"]), state["config"]


class StepLogger:
    """A plain progress line every ``every`` optimiser steps (readable in CI logs, unlike bars)."""

    def __init__(self, every: int, enabled: bool) -> None:
        self.every, self.enabled = every, enabled
        self.started = time.perf_counter()

    def __call__(self, message: str, step: int) -> None:
        if self.enabled and self.every > 0 and step % self.every == 0:
            elapsed = time.perf_counter() - self.started
            tqdm.write(f"{message} ({elapsed:.0f}s)")


def batches_per_epoch(n: int, batch_size: int, world: int, max_batches: int | None) -> int:
    count = math.ceil((n // world) / batch_size)
    return min(count, max_batches) if max_batches else count
