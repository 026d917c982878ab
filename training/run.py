"""One training run, top to bottom: setup, data, model, strategy, optimiser, resume, the epoch
loop, then calibration, test metrics, plots and the checkpoint metadata export reads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fineserve.training import distributed, finetune, layers, plots
from fineserve.training.backbones import (
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
    CheckpointError,
    CheckpointMetadata,
    read_metadata,
    save_checkpoint,
    write_atomically,
    write_metadata,
)
from fineserve.training.config import ConfigError, TrainConfig
from fineserve.training.data import (
    Examples,
    ImagePipeline,
    check_labels,
    image_encoder,
    make_splits,
    text_encoder,
)
from fineserve.training.datasets import default_cache_dir, load_dataset
from fineserve.training.distill import (
    default_student_layers,
    distillation_loss,
    init_text_student,
    load_teacher,
)
from fineserve.training.loop import (
    LAST,
    Progress,
    Step,
    StepLogger,
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


def train(cfg: TrainConfig, output_dir: Path) -> dict[str, Any]:
    """Trains per ``cfg`` into ``output_dir``; returns the final metrics (main process).

    Raises:
        ConfigError, DatasetError, CheckpointError: bad recipe, data or teacher (one-line messages).
    """
    started = time.perf_counter()
    # --- setup: output folder, device, processes, seeds ---------------------------------------
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
    show = cfg.progress and ctx.main
    say = print if ctx.main else (lambda *a, **k: None)

    # --- data ----------------------------------------------------------------------------------
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
    is_text = backbone.kind == "text"
    max_length = cfg.max_length or backbone.max_length
    image_size = cfg.image_size or backbone.image_size
    encode = text_encoder(tokenizer_file(cfg.backbone), max_length) if is_text else image_encoder
    splits = make_splits(raw, cfg, encode)
    names = splits.names
    say(f"data: {cfg.dataset} {splits.record['train']}/{splits.record['val']}/{splits.record['test']} "
        f"train/val/test, {len(names)} classes")  # fmt: skip

    # --- model (and teacher) ------------------------------------------------------------------
    teacher = teacher_meta = None
    if cfg.teacher:
        teacher, teacher_meta = load_teacher(Path(cfg.teacher), names)
        teacher.to(device)
    model_args: dict[str, Any] = {} if is_text else {"image_size": image_size}
    if is_text and teacher is not None:
        teacher_layers = len(teacher.bert.encoder.layer)
        copied = cfg.student_layers or default_student_layers(teacher_layers)
        if not all(0 <= i < teacher_layers for i in copied):
            raise ConfigError(f"student_layers: {copied} must index the teacher's {teacher_layers} layers")
        model_args["num_layers"] = len(copied)
        model = create_model(cfg.backbone, len(names), pretrained=False, **model_args)
        init_text_student(model, teacher, copied)
    else:
        if is_text and cfg.num_layers is not None:
            model_args["num_layers"] = cfg.num_layers
        model = create_model(cfg.backbone, len(names), pretrained=cfg.pretrained, **model_args)
    model.to(device)
    pipeline = ImagePipeline(image_size, backbone.mean, backbone.std, cfg.hflip, cfg.crop_padding)
    teacher_size = (teacher_meta.model_args.get("image_size") if teacher_meta else None) or image_size

    def prepare(batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if "pixels" in out:
            raw_pixels = out["pixels"]
            out["pixels"] = pipeline(raw_pixels, train=train)
            if teacher is not None:
                out["teacher_pixels"] = (
                    out["pixels"]
                    if teacher_size == image_size
                    else pipeline(raw_pixels, train=False, size=teacher_size)
                )
        return out

    def loss(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        if teacher is None:
            return functional.cross_entropy(logits, batch["labels"], label_smoothing=cfg.label_smoothing)
        teacher_batch = dict(batch, pixels=batch["teacher_pixels"]) if "teacher_pixels" in batch else batch
        with torch.no_grad():
            teacher_logits = layers.logits(teacher, teacher_batch).float()
        return distillation_loss(
            logits,
            teacher_logits,
            batch["labels"],
            temperature=cfg.distill_temperature,
            alpha=cfg.distill_alpha,
            label_smoothing=cfg.label_smoothing,
        )

    step = Step(prepare, loss, device, amp=cfg.amp)

    # --- strategy: what trains, on what -------------------------------------------------------
    num_blocks = len(layers.blocks(model))
    finetune.set_batchnorm_momentum(model, cfg.bn_momentum)
    finetune.set_trainable_blocks(
        model, finetune.initial_trainable_blocks(cfg.strategy, cfg.trainable_blocks, num_blocks)
    )
    train_set, val_set, test_set = splits.train, splits.val, splits.test
    trained: nn.Module = model
    if cfg.strategy == "linear-probe":
        # The frozen backbone computes the same features every epoch: compute them once.
        train_set, val_set, test_set = cached_features(model, splits, step, cfg, cache=cache, show=show)
        trained = layers.head(model)
        probe_step = Step(lambda b, _t: {k: v.to(device) for k, v in b.items()}, loss, device, amp=cfg.amp)
        step = probe_step

    def set_train_mode() -> None:
        if cfg.strategy == "linear-probe":
            trained.train()
        else:
            finetune.train_mode(model)

    # --- optimiser and schedule -------------------------------------------------------------
    decay = cfg.layer_decay if cfg.strategy in ("full", "gradual") else 1.0
    groups = finetune.param_groups(
        model, lr=cfg.lr, head_lr=cfg.head_lr or cfg.lr, layer_decay=decay, weight_decay=cfg.weight_decay
    )
    optimizer = torch.optim.AdamW(groups)
    max_batches = cfg.max_steps_per_epoch * cfg.grad_accum if cfg.max_steps_per_epoch else None
    per_epoch = math.ceil(
        batches_per_epoch(len(train_set), cfg.batch_size, ctx.world, max_batches) / cfg.grad_accum
    )
    total_steps = per_epoch * cfg.epochs
    warmup = round(cfg.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, finetune.lr_multiplier(total_steps, warmup, cfg.schedule)
    )

    # --- resume ----------------------------------------------------------------------------------
    progress = Progress()
    last = output_dir / LAST
    if cfg.resume and last.is_file():
        progress, saved_config = load_state(last, model, optimizer, scheduler)
        changed = sorted(
            k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved_config.get(k) != v
        )
        if changed:
            raise ConfigError(f"{last} was written with a different {changed[0]!r}; use another --output-dir")
        say(f"resume: epoch {progress.epoch + 1} batch {progress.batch} step {progress.step}")
    # Only now, with a refused resume behind us, may the folder change: args.yaml describes
    # last.pt, and the metrics file always matches the history (no duplicates after a resume).
    if ctx.main:
        (output_dir / ARGS).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (output_dir / METRICS).write_text("".join(json.dumps(h) + "\n" for h in progress.history))
        mark_unfinished(output_dir)

    # --- the epoch loop --------------------------------------------------------------------------
    def save_resumable_state() -> None:
        """Everything ``--resume`` needs, to ``last`` (mid-epoch and at each epoch's end)."""
        save_state(
            last,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            progress=progress,
            config=cfg.to_dict(),
        )

    logger = StepLogger(cfg.log_every, ctx.main)
    for epoch in range(progress.epoch, cfg.epochs):
        if cfg.strategy == "gradual":
            finetune.set_trainable_blocks(
                model, finetune.gradual_trainable_blocks(epoch, cfg.unfreeze_every, num_blocks)
            )
        # DDP records which parameters train when it is built: rebuild it each epoch.
        module = DistributedDataParallel(trained) if ctx.enabled else trained
        batches = epoch_batches(
            len(train_set), cfg.batch_size, seed=cfg.seed, epoch=epoch, ctx=ctx, max_batches=max_batches
        )

        def on_step(step_loss: float, epoch: int = epoch) -> None:
            lr = optimizer.param_groups[0]["lr"]
            logger(
                f"epoch {epoch + 1}/{cfg.epochs} step {progress.step} loss {step_loss:.4f} lr {lr:.2e}",
                progress.step,
            )
            stop = cfg.stop_after_steps is not None and progress.step >= cfg.stop_after_steps
            if ctx.main and (stop or (cfg.save_every_steps and progress.step % cfg.save_every_steps == 0)):
                save_resumable_state()
            if stop:
                distributed.barrier(ctx)
                raise KeyboardInterrupt(f"stop_after_steps={cfg.stop_after_steps} reached")

        train_loss = train_one_epoch(
            module=module,
            data=train_set,
            step=step,
            optimizer=optimizer,
            scheduler=scheduler,
            progress=progress,
            batches=batches,
            grad_accum=cfg.grad_accum,
            grad_clip=cfg.grad_clip,
            set_train_mode=set_train_mode,
            on_step=on_step,
            show=show,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
        )
        val = evaluate(trained, val_set, step, cfg.eval_batch_size, ctx, show=show)
        record = {
            "epoch": epoch + 1,
            "step": progress.step,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed_s": round(time.perf_counter() - started, 2),
        }
        progress.history.append(record)
        say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
            f"val accuracy {val['accuracy']:.4f}")  # fmt: skip
        improved = val["accuracy"] > progress.best_accuracy
        if improved:
            progress.best_accuracy, progress.best_epoch, progress.stale_epochs = val["accuracy"], epoch + 1, 0
        else:
            progress.stale_epochs += 1
        progress.epoch, progress.batch = epoch + 1, 0
        if ctx.main:
            with (output_dir / METRICS).open("a") as f:
                f.write(json.dumps(record) + "\n")
            if improved:
                save_checkpoint(
                    output_dir,
                    model,
                    metadata(
                        cfg,
                        names=names,
                        model_args=model_args,
                        max_length=max_length,
                        image_size=image_size,
                        splits=splits,
                    ),
                )
            save_resumable_state()
        if cfg.early_stopping_patience and progress.stale_epochs >= cfg.early_stopping_patience:
            say(f"early stopping: no better validation accuracy for {progress.stale_epochs} epochs")
            break

    # --- finish: best weights, calibration, test metrics, plots, metadata (main process) -------
    distributed.barrier(ctx)
    if not ctx.main:
        distributed.teardown(ctx)  # waits for the main process to finish first
        return {}
    best = torch.load(output_dir / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    model.eval()
    val_logits, val_labels = predict(trained, val_set, step, cfg.eval_batch_size, show=show, desc="val")
    test_logits, test_labels = predict(trained, test_set, step, cfg.eval_batch_size, show=show, desc="test")
    predicted = test_logits.argmax(1)
    meta = metadata(
        cfg, names=names, model_args=model_args, max_length=max_length, image_size=image_size, splits=splits
    )
    meta.metrics = {
        "test_accuracy": float((predicted == test_labels).float().mean()),
        "test_loss": float(functional.cross_entropy(test_logits, test_labels)),
        "val_accuracy": progress.best_accuracy,
        "best_epoch": progress.best_epoch,
        "epochs_run": len(progress.history),
        "optimizer_steps": progress.step,
        "parameters": count_parameters(model),
        "size_bytes": model_size_bytes(model),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "device": str(device),
        "world_size": ctx.world,
    }
    if teacher_meta is not None:
        meta.metrics["teacher_test_accuracy"] = teacher_meta.metrics.get("test_accuracy")
        meta.metrics["teacher_backbone"] = teacher_meta.backbone
    if cfg.calibrate:
        report = calibration_report(val_logits, val_labels, test_logits, test_labels)
        meta.temperature = float(report["temperature"])
        meta.calibration = report
    matrix = plots.confusion_matrix(predicted, test_labels, names)
    meta.metrics["confusion_matrix"] = matrix.tolist()
    if is_text:
        shutil.copyfile(tokenizer_file(cfg.backbone), output_dir / TOKENIZER)
    if not cfg.plots:
        pass
    elif plots.available():
        plots.learning_curves(progress.history, output_dir / "learning_curves.png")
        plots.confusion_plot(matrix, names, output_dir / "confusion_matrix.png", f"{cfg.dataset} test")
    else:
        say("plots skipped: matplotlib is not installed (pip install -e '.[train]')")
    # Last: export takes a run only once its metadata says finished, with everything above in place.
    meta.finished = True
    write_metadata(output_dir, meta)
    say(f"test accuracy {meta.metrics['test_accuracy']:.4f}; temperature {meta.temperature:.3f}; "
        f"run folder {output_dir}")  # fmt: skip
    distributed.teardown(ctx)
    return meta.metrics


def metadata(
    cfg: TrainConfig,
    *,
    names: list[str],
    model_args: dict[str, Any],
    max_length: int,
    image_size: int,
    splits: Any,
) -> CheckpointMetadata:
    backbone = backbone_config(cfg.backbone)
    if backbone.kind == "text":
        preprocessing: dict[str, Any] = {"text": {"tokenizer_file": TOKENIZER, "max_length": max_length}}
    else:
        preprocessing = {
            "image": {
                "height": image_size,
                "width": image_size,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
                # Training resizes the whole (square) image: no center crop.
                "crop_fraction": 1.0,
                "interpolation": "bilinear",
                "channel_order": "RGB",
                "layout": "NCHW",
            }
        }
    return CheckpointMetadata(
        backbone=cfg.backbone,
        task="text-classification" if backbone.kind == "text" else "image-classification",
        labels=list(names),
        preprocessing=preprocessing,
        model_args=dict(model_args),
        config=cfg.to_dict(),
        split=dict(splits.record),
        seed=cfg.seed,
        git_commit=git_commit(),
        finished=False,
    )


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


def mark_unfinished(output_dir: Path) -> None:
    """A run that trains again (resumed for more epochs, or retrained over an old folder) is not
    finished until it completes again, even before its first improved epoch rewrites the files."""
    try:
        meta = read_metadata(output_dir)
    except CheckpointError:  # none yet, or unreadable: export refuses that folder anyway
        return
    if meta.finished is not False:
        meta.finished = False
        write_metadata(output_dir, meta)


def cached_features(
    model: nn.Module, splits: Any, step: Step, cfg: TrainConfig, *, cache: Path, show: bool
) -> tuple[Examples, Examples, Examples]:
    """Head inputs of the frozen backbone for each split, cached on disk by what determines them."""
    key_source = {
        "backbone": cfg.backbone,
        "pretrained": cfg.pretrained,
        "dataset": cfg.dataset,
        "data_path": cfg.data_path,
        "split": splits.record,
        "image_size": cfg.image_size,
        "max_length": cfg.max_length,
        "num_layers": cfg.num_layers,
        "labels": splits.names,
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache / "features" / f"{key}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        parts = [stored[name] for name in ("train", "val", "test")]
    else:
        model.eval()
        parts = []
        for name, data in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            outputs = []
            chunks = list(torch.arange(len(data)).split(cfg.eval_batch_size))
            for index in tqdm(chunks, desc=f"features {name}", disable=not show, leave=False):
                with torch.no_grad(), step.autocast():
                    prepared = step.prepare(data.batch(index), False)
                    outputs.append(layers.features(model, prepared).float().cpu())
            parts.append(torch.cat(outputs))
        path.parent.mkdir(parents=True, exist_ok=True)
        features = dict(zip(("train", "val", "test"), parts, strict=True))
        write_atomically(path, lambda tmp: torch.save(features, tmp))
    return tuple(  # type: ignore[return-value]
        Examples({"features": feats}, data.labels)
        for feats, data in zip(parts, (splits.train, splits.val, splits.test), strict=True)
    )


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


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
