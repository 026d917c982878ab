"""One training run, top to bottom: ``train`` names the steps (set up, data, model, loss,
strategy, optimiser, resume, fit, finish) and each step is a function below it, in that order."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel

from fineserve.training import distributed, finetune, layers, plots
from fineserve.training.backbones import (
    BackboneConfig,
    backbone_config,
    count_parameters,
    create_model,
    model_size_bytes,
    tokenizer_file,
)
from fineserve.training.calibration import calibration_report
from fineserve.training.checkpoint import (
    BEST,
    TOKENIZER,
    CheckpointMetadata,
    mark_unfinished,
    run_metadata,
    save_checkpoint,
    write_metadata,
)
from fineserve.training.config import TrainConfig
from fineserve.training.data import (
    Examples,
    ImagePipeline,
    PrepareBatch,
    Splits,
    check_labels,
    image_encoder,
    make_splits,
    text_encoder,
)
from fineserve.training.datasets import default_cache_dir, load_dataset
from fineserve.training.distill import (
    DistillationLoss,
    default_student_layers,
    init_text_student,
    load_teacher,
)
from fineserve.training.errors import ConfigError
from fineserve.training.features import cached_features
from fineserve.training.frozen_prefix import cached_prefix, choose_views
from fineserve.training.loop import (
    LAST,
    Progress,
    Step,
    StepLogger,
    Stop,
    batches_per_epoch,
    epoch_batches,
    evaluate,
    load_state,
    predict,
    save_state,
    train_one_epoch,
)

METRICS = "metrics.jsonl"
ARGS = "args.yaml"
# Keys that may change between an interrupted run and its resume.
RESUMABLE_CHANGES = {
    "stop_after_steps",
    "epochs",
    "progress",
    "log_every",
    "resume",
    "save_every_steps",
    "device",
    "threads",
}


@dataclass(frozen=True)
class RunResult:
    """What ``train`` returns: the final metrics, or why the run stopped before finishing."""

    metrics: dict[str, Any] = field(default_factory=dict)  # empty on all but the main process
    stopped: str | None = None  # e.g. "stop_after_steps=3 reached"; rerunning resumes from last.pt


@dataclass(frozen=True)
class Run:
    """What every step shares: the recipe, the run folder, the processes and the device."""

    cfg: TrainConfig
    output_dir: Path
    ctx: distributed.Dist
    device: torch.device
    started: float

    @property
    def show(self) -> bool:
        """Progress bars: on the main process, when the recipe asks for them."""
        return self.cfg.progress and self.ctx.main

    def say(self, message: str) -> None:
        if self.ctx.main:
            print(message)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 2)


@dataclass(frozen=True)
class Data:
    """The encoded splits and the input sizes the model is built for."""

    splits: Splits
    backbone: BackboneConfig
    image_size: int
    max_length: int
    cache: Path

    @property
    def is_text(self) -> bool:
        return self.backbone.kind == "text"


@dataclass(frozen=True)
class Net:
    """The classifier being fine-tuned, its ``metadata.json`` (unfinished), and its teacher, if any."""

    model: nn.Module
    meta: CheckpointMetadata
    teacher: nn.Module | None = None
    teacher_meta: CheckpointMetadata | None = None


@dataclass(frozen=True)
class Trainee:
    """What the optimiser trains, how batches reach it, and the splits it sees: the whole model
    on the encoded splits, for a linear probe the head alone on cached backbone features, or
    with ``cache_frozen`` the top blocks on the cached outputs of the frozen ones."""

    module: nn.Module
    step: Step
    train_mode: Callable[[], None]
    train: Examples
    val: Examples
    test: Examples
    # What val and test are scored with, when not ``module``/``step`` (cache_frozen: the whole
    # model on the real inputs, i.e. what export writes out).
    scorer: nn.Module | None = None
    score_step: Step | None = None

    @property
    def scored_by(self) -> tuple[nn.Module, Step]:
        scorer = self.scorer if self.scorer is not None else self.module
        return scorer, self.score_step if self.score_step is not None else self.step


def train(
    cfg: TrainConfig,
    output_dir: Path,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    score_test: bool = True,
) -> RunResult:
    """Trains per ``cfg`` into ``output_dir``.

    Returns the final metrics (on the main process), or, when ``stop_after_steps`` ended the run
    early, why it stopped: ``last.pt`` then holds the state the same command resumes from.

    ``on_epoch`` gets each validated epoch's record (``epoch``, ``val_accuracy``, ...); an
    exception it raises ends the run there (a tuning trial pruned). With ``score_test=False`` the
    run never reads its test split: it stops after the epochs with only the validation metrics
    (``val_accuracy``, ``best_epoch``, ``epochs_run``), and its ``metadata.json`` stays marked
    unfinished, so export refuses the folder (a tuning trial, which selects on validation alone).

    Raises:
        ConfigError, DatasetError, CheckpointError: bad recipe, data or teacher (one-line messages).
    """
    run = set_up(cfg, output_dir)
    data = load_data(run)
    net = build_model(run, data)
    step = Step(prepare_batch(run, data, net), loss_function(cfg, net.teacher), run.device, amp=cfg.amp)
    trainee = choose_what_trains(run, data, net, step)
    optimizer, scheduler = build_optimiser(cfg, net.model, len(trainee.train), run.ctx.world)
    progress = resume(run, net.model, optimizer, scheduler)
    stopped = fit(run, net, trainee, progress, optimizer=optimizer, scheduler=scheduler, on_epoch=on_epoch)
    if stopped:
        metrics: dict[str, Any] = {}
    elif score_test:
        metrics = finish(run, data, net, trainee, progress)
    else:
        metrics = validation_metrics(progress)
    distributed.teardown(run.ctx)  # waits for the main process to finish first
    return RunResult(metrics, stopped)


def set_up(cfg: TrainConfig, output_dir: Path) -> Run:
    """The run folder, the device, the processes (under torchrun) and the seeds."""
    started = time.perf_counter()
    create_output_dir(output_dir)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.deterministic and use_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    ctx = distributed.setup("cuda" if use_cuda else "cpu")
    device = torch.device(f"cuda:{ctx.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    return Run(cfg, output_dir, ctx, device, started)


def load_data(run: Run) -> Data:
    """The dataset, its labels in the recipe's order, split and encoded for the backbone."""
    cfg = run.cfg
    cache = Path(cfg.data_cache) if cfg.data_cache else default_cache_dir()
    raw = load_dataset(
        cfg.dataset,
        data_path=cfg.data_path,
        cache=cache,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
    )
    raw = check_labels(raw, cfg.labels)
    backbone = backbone_config(cfg.backbone)
    max_length = cfg.max_length or backbone.max_length
    image_size = cfg.image_size or backbone.image_size
    encode = (
        text_encoder(tokenizer_file(cfg.backbone), max_length) if backbone.kind == "text" else image_encoder
    )
    splits = make_splits(raw, cfg, encode)
    run.say(f"data: {cfg.dataset} {splits.record['train']}/{splits.record['val']}/{splits.record['test']} "
            f"train/val/test, {len(splits.names)} classes")  # fmt: skip
    return Data(splits, backbone, image_size, max_length, cache)


def build_model(run: Run, data: Data) -> Net:
    """The backbone with a new head for the labels; a text student starts from its teacher's layers."""
    cfg, names = run.cfg, data.splits.names
    teacher = teacher_meta = None
    if cfg.teacher:
        teacher, teacher_meta = load_teacher(Path(cfg.teacher), names)
        teacher.to(run.device)
    args: dict[str, Any] = {} if data.is_text else {"image_size": data.image_size}
    if data.is_text and teacher is not None:
        teacher_layers = len(teacher.bert.encoder.layer)
        copied = cfg.student_layers or default_student_layers(teacher_layers)
        if not all(0 <= i < teacher_layers for i in copied):
            raise ConfigError(f"student_layers: {copied} must index the teacher's {teacher_layers} layers")
        args["num_layers"] = len(copied)
        model = create_model(cfg.backbone, len(names), pretrained=False, **args)
        init_text_student(model, teacher, copied)
    else:
        if data.is_text and cfg.num_layers is not None:
            args["num_layers"] = cfg.num_layers
        model = create_model(cfg.backbone, len(names), pretrained=cfg.pretrained, **args)
    model.to(run.device)
    meta = run_metadata(
        cfg,
        names,
        data.splits.record,
        image_size=data.image_size,
        max_length=data.max_length,
        model_args=args,
    )
    return Net(model, meta, teacher, teacher_meta)


def prepare_batch(run: Run, data: Data, net: Net) -> PrepareBatch:
    cfg = run.cfg
    pipeline = ImagePipeline(
        data.image_size, data.backbone.mean, data.backbone.std, cfg.hflip, cfg.crop_padding
    )
    teacher_size = None
    if net.teacher_meta is not None:
        teacher_size = net.teacher_meta.model_args.get("image_size") or data.image_size
    return PrepareBatch(run.device, pipeline, teacher_size)


def loss_function(
    cfg: TrainConfig, teacher: nn.Module | None
) -> Callable[[Tensor, dict[str, Tensor]], Tensor]:
    """Cross-entropy on the labels, or with a teacher the distillation loss."""
    if teacher is not None:
        return DistillationLoss(teacher, cfg.distill_temperature, cfg.distill_alpha, cfg.label_smoothing)
    return functools.partial(label_loss, label_smoothing=cfg.label_smoothing)


def label_loss(logits: Tensor, batch: dict[str, Tensor], *, label_smoothing: float) -> Tensor:
    return functional.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)


def choose_what_trains(run: Run, data: Data, net: Net, step: Step) -> Trainee:
    """The strategy: which blocks train from the start, and on what."""
    cfg, model = run.cfg, net.model
    finetune.set_batchnorm_momentum(model, cfg.bn_momentum)
    num_blocks = len(layers.blocks(model))
    finetune.set_trainable_blocks(
        model, finetune.initial_trainable_blocks(cfg.strategy, cfg.trainable_blocks, num_blocks)
    )
    if cfg.strategy == "linear-probe":
        # The frozen backbone computes the same features every epoch: compute them once.
        train, val, test = cached_features(model, data.splits, step, cfg, cache=data.cache, show=run.show)
        head = layers.head(model)
        return Trainee(head, step, head.train, train, val, test)
    splits = data.splits
    train_mode = functools.partial(finetune.train_mode, model)
    if cfg.cache_frozen:
        # The frozen blocks compute the same outputs every epoch: compute them once (frozen_prefix).
        top, train = cached_prefix(
            model,
            splits,
            ImagePipeline(data.image_size, data.backbone.mean, data.backbone.std),
            cfg,
            cache=data.cache,
            device=run.device,
            say=run.say,
            show=run.show,
        )
        top_step = replace(step, prepare=functools.partial(_cached_batch, device=run.device))
        return Trainee(top, top_step, train_mode, train, splits.val, splits.test, model, step)
    return Trainee(model, step, train_mode, splits.train, splits.val, splits.test)


def _cached_batch(batch: dict[str, Tensor], train: bool, *, device: torch.device) -> dict[str, Tensor]:
    """A batch of cached prefix outputs on the device, with the view chosen for training."""
    return {k: v.to(device, non_blocking=True) for k, v in choose_views(batch, train).items()}


def build_optimiser(
    cfg: TrainConfig, model: nn.Module, train_size: int, world: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the parameter groups (layer-wise decay for full and gradual), and the schedule."""
    decay = cfg.layer_decay if cfg.strategy in ("full", "gradual") else 1.0
    groups = finetune.param_groups(
        model, lr=cfg.lr, head_lr=cfg.head_lr or cfg.lr, layer_decay=decay, weight_decay=cfg.weight_decay
    )
    optimizer = torch.optim.AdamW(groups)
    batches = batches_per_epoch(train_size, cfg.batch_size, world, max_batches(cfg))
    total_steps = math.ceil(batches / cfg.grad_accum) * cfg.epochs
    warmup = round(cfg.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, finetune.lr_multiplier(total_steps, warmup, cfg.schedule)
    )
    return optimizer, scheduler


def max_batches(cfg: TrainConfig) -> int | None:
    """Batches per epoch that ``max_steps_per_epoch`` allows (None: all)."""
    return cfg.max_steps_per_epoch * cfg.grad_accum if cfg.max_steps_per_epoch else None


def resume(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    """Where the run stands: from ``last.pt`` if resuming (the same recipe only), else the start.
    Then the folder's ``args.yaml`` and ``metrics.jsonl`` are rewritten to match it."""
    cfg, last = run.cfg, run.output_dir / LAST
    progress = Progress()
    if cfg.resume and last.is_file():
        progress, saved_config = load_state(last, model, optimizer, scheduler)
        # A key the saved run predates (added to TrainConfig since) had its default then.
        defaults = TrainConfig().to_dict()
        changed = sorted(
            k
            for k, v in cfg.to_dict().items()
            if k not in RESUMABLE_CHANGES and saved_config.get(k, defaults[k]) != v
        )
        if changed:
            raise ConfigError(f"{last} was written with a different {changed[0]!r}; use another --output-dir")
        run.say(f"resume: epoch {progress.epoch + 1} batch {progress.batch} step {progress.step}")
    # Only now, with a refused resume behind us, may the folder change: args.yaml describes
    # last.pt, and the metrics file always matches the history (no duplicates after a resume).
    if run.ctx.main:
        (run.output_dir / ARGS).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run.output_dir / METRICS).write_text("".join(json.dumps(h) + "\n" for h in progress.history))
        mark_unfinished(run.output_dir)
    return progress


def fit(
    run: Run,
    net: Net,
    trainee: Trainee,
    progress: Progress,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> str | None:
    """The epochs from ``progress`` on; those that validate (``validates_after``) end in
    ``end_epoch``, ``last.pt`` and ``on_epoch`` with the record. Returns why a stop ended the run
    early (``last.pt`` then holds where), None if it ran to the end (all epochs, or until early
    stopping)."""
    cfg, ctx = run.cfg, run.ctx
    num_blocks = len(layers.blocks(net.model))
    logger = StepLogger(cfg.log_every, ctx.main)
    stop = Stop(after_steps=cfg.stop_after_steps)

    def save_last() -> None:
        """Everything ``--resume`` needs, to ``last.pt`` (mid-epoch, and after each validation)."""
        if ctx.main:
            save_state(
                run.output_dir / LAST,
                model=net.model,
                optimizer=optimizer,
                scheduler=scheduler,
                progress=progress,
                config=cfg.to_dict(),
            )

    def after_step(loss: float) -> None:
        lr = optimizer.param_groups[0]["lr"]
        logger(f"epoch {progress.epoch + 1}/{cfg.epochs} step {progress.step} loss {loss:.4f} lr {lr:.2e}",
               progress.step)  # fmt: skip
        if cfg.save_every_steps and progress.step % cfg.save_every_steps == 0:
            save_last()

    for epoch in range(progress.epoch, cfg.epochs):
        trainable = finetune.trainable_blocks_in(epoch, cfg, num_blocks)
        if trainable is not None:
            finetune.set_trainable_blocks(net.model, trainable)
        # DDP records which parameters train when it is built: rebuild it each epoch.
        module = DistributedDataParallel(trainee.module) if ctx.enabled else trainee.module
        batches = epoch_batches(
            len(trainee.train),
            cfg.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            ctx=ctx,
            max_batches=max_batches(cfg),
            lengths=text_lengths(trainee.train) if cfg.group_by_length else None,
        )
        train_one_epoch(
            module=module,
            data=trainee.train,
            step=trainee.step,
            optimizer=optimizer,
            scheduler=scheduler,
            progress=progress,
            batches=batches,
            grad_accum=cfg.grad_accum,
            grad_clip=cfg.grad_clip,
            set_train_mode=trainee.train_mode,
            on_step=after_step,
            stop=stop,
            show=run.show,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
        )
        if stop.reason is not None:  # mid-epoch: progress says which batch comes next
            save_last()
            return stop.reason
        if not validates_after(epoch, cfg):
            # No last.pt here (a stop or save_every_steps still writes one): a run killed outright
            # resumes from the last validated epoch.
            progress.epoch, progress.batch = epoch + 1, 0
            continue
        train_loss = progress.train_loss_sum / max(1, progress.train_batches)
        progress.train_loss_sum, progress.train_batches = 0.0, 0
        end_epoch(run, net, trainee, progress, train_loss=train_loss, lr=optimizer.param_groups[0]["lr"])
        save_last()
        if on_epoch is not None:
            on_epoch(progress.history[-1])
        # Not during head-only epochs: the blocks have not trained yet.
        warming_up = epoch < cfg.head_warmup_epochs
        if (
            cfg.early_stopping_patience
            and not warming_up
            and progress.stale_epochs >= cfg.early_stopping_patience
        ):
            run.say(f"early stopping: no better validation accuracy for {progress.stale_epochs} validations")
            break
    return None


def validates_after(epoch: int, cfg: TrainConfig) -> bool:
    """Whether the (0-based) ``epoch`` ends in a validation: every ``eval_every_epochs``-th, and
    the last (the run's best model is chosen among the validated epochs)."""
    return (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs


def text_lengths(data: Examples) -> Tensor | None:
    """Tokens per example for ``group_by_length`` (None for images: nothing to group)."""
    mask = data.inputs.get("attention_mask")
    return None if mask is None else mask.sum(dim=1)


def end_epoch(
    run: Run, net: Net, trainee: Trainee, progress: Progress, *, train_loss: float, lr: float
) -> None:
    """Scores the epoch on the validation split, records it in ``progress`` and ``metrics.jsonl``,
    and keeps an improved model as ``best.pt`` with its metadata."""
    cfg, epoch = run.cfg, progress.epoch
    scorer, score_step = trainee.scored_by
    val = evaluate(scorer, trainee.val, score_step, cfg.eval_batch_size, run.ctx, show=run.show)
    record = {
        "epoch": epoch + 1,
        "step": progress.step,
        "train_loss": train_loss,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": lr,
        "elapsed_s": run.elapsed(),
    }
    progress.history.append(record)
    run.say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
            f"val accuracy {val['accuracy']:.4f}")  # fmt: skip
    improved = val["accuracy"] > progress.best_accuracy
    if improved:
        progress.best_accuracy, progress.best_epoch, progress.stale_epochs = val["accuracy"], epoch + 1, 0
    else:
        progress.stale_epochs += 1
    progress.epoch, progress.batch = epoch + 1, 0
    if run.ctx.main:
        with (run.output_dir / METRICS).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if improved:
            save_checkpoint(run.output_dir, net.model, net.meta)


def validation_metrics(progress: Progress) -> dict[str, Any]:
    """What a run that never reads its test split reports: the best validation accuracy."""
    return {
        "val_accuracy": progress.best_accuracy,
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
    }


def finish(run: Run, data: Data, net: Net, trainee: Trainee, progress: Progress) -> dict[str, Any]:
    """The best weights scored on the test split, the tokenizer and plots beside them, and last the
    metadata that marks the run finished (main process; the others return no metrics)."""
    distributed.barrier(run.ctx)
    if not run.ctx.main:
        return {}
    best = torch.load(run.output_dir / BEST, map_location="cpu", weights_only=True)
    net.model.load_state_dict(best["model"])
    net.model.eval()
    meta, matrix = score(run, net, trainee, progress)
    if data.is_text:
        shutil.copyfile(tokenizer_file(run.cfg.backbone), run.output_dir / TOKENIZER)
    if run.cfg.plots:
        draw_plots(run, progress, matrix, data.splits.names)
    # Last: export takes a run only once its metadata says finished, with everything above in place.
    meta.finished = True
    write_metadata(run.output_dir, meta)
    run.say(f"test accuracy {meta.metrics['test_accuracy']:.4f}; temperature {meta.temperature:.3f}; "
            f"run folder {run.output_dir}")  # fmt: skip
    return meta.metrics


def score(run: Run, net: Net, trainee: Trainee, progress: Progress) -> tuple[CheckpointMetadata, Tensor]:
    """The model's metadata with its test metrics (and the temperature fitted on the validation
    split, if the recipe calibrates), and the test confusion matrix."""
    cfg, model = run.cfg, net.model
    scorer, score_step = trainee.scored_by
    scored = functools.partial(
        predict, scorer, step=score_step, batch_size=cfg.eval_batch_size, show=run.show
    )
    val_logits, val_labels = scored(trainee.val, desc="val")
    test_logits, test_labels = scored(trainee.test, desc="test")
    predicted = test_logits.argmax(1)
    meta = replace(net.meta)
    meta.metrics = {
        "test_accuracy": float((predicted == test_labels).float().mean()),
        "test_loss": float(functional.cross_entropy(test_logits, test_labels)),
        "val_accuracy": progress.best_accuracy,
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "optimizer_steps": progress.step,
        "parameters": count_parameters(model),
        "size_bytes": model_size_bytes(model),
        "wall_time_s": run.elapsed(),
        "device": str(run.device),
        "world_size": run.ctx.world,
    }
    if net.teacher_meta is not None:
        meta.metrics["teacher_test_accuracy"] = net.teacher_meta.metrics.get("test_accuracy")
        meta.metrics["teacher_backbone"] = net.teacher_meta.backbone
    if cfg.calibrate:
        report = calibration_report(val_logits, val_labels, test_logits, test_labels)
        meta.temperature = float(report["temperature"])
        meta.calibration = report
    matrix = plots.confusion_matrix(predicted, test_labels, meta.labels)
    meta.metrics["confusion_matrix"] = matrix.tolist()
    return meta, matrix


def draw_plots(run: Run, progress: Progress, matrix: Tensor, names: list[str]) -> None:
    if not plots.available():
        run.say("plots skipped: matplotlib is not installed (pip install -e '.[train]')")
        return
    plots.learning_curves(progress.history, run.output_dir / "learning_curves.png")
    plots.confusion_plot(matrix, names, run.output_dir / "confusion_matrix.png", f"{run.cfg.dataset} test")


def create_output_dir(output_dir: Path) -> None:
    """Creates the run folder, or says in one line why it cannot (a file in the way, permissions)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir}: is a file, not a folder")
    blocking = next((p for p in output_dir.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--output-dir {output_dir}: {blocking} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--output-dir {output_dir}: cannot create it ({err.strerror})") from None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a base dependency
        pass
    # Only touch the switch when it changes: the first call imports torch._dynamo (seconds).
    if deterministic != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
