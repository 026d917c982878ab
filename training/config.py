"""One typed training configuration: YAML recipe -> CLI overrides -> checked once, up front.

Every field carries its help text in ``FIELD_HELP`` so ``--help`` explains each option; rules
that involve several fields live in ``TrainConfig.check`` (not where the values are used).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fineserve.training.backbones import BACKBONES
from fineserve.training.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
STRATEGIES = ("linear-probe", "partial", "full", "gradual")
SCHEDULES = ("cosine", "linear", "constant")
# The recipe section that declares a tuning search space (not a training key).
SEARCH_KEY = "search"
DATASETS = ("fashion-mnist", "mnist-subset", "digits", "rotten-tomatoes", "imagefolder", "text-file")


@dataclass
class TrainConfig:
    # --- what to train on
    backbone: str = "efficientnet-lite0"
    pretrained: bool = True
    dataset: str = "fashion-mnist"
    data_path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None
    train_samples: int | None = None
    train_fraction: float | None = None
    val_samples: int | None = None
    test_samples: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    image_size: int | None = None
    max_length: int | None = None
    num_layers: int | None = None
    # --- how: strategy
    strategy: str = "full"
    trainable_blocks: int = 2
    cache_frozen: bool = False
    bn_momentum: float | None = 0.1
    layer_decay: float = 0.75
    unfreeze_every: int = 1
    head_warmup_epochs: int = 0
    # --- optimisation
    epochs: int = 3
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    amp: bool = True
    hflip: bool = False
    crop_padding: int = 0
    max_steps_per_epoch: int | None = None
    group_by_length: bool = False
    early_stopping_patience: int | None = None
    eval_every_epochs: int = 1
    # --- distillation
    teacher: str | None = None
    distill_alpha: float = 0.7
    distill_temperature: float = 4.0
    student_layers: list[int] | None = None
    # --- calibration, run control
    calibrate: bool = True
    plots: bool = True
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    threads: int | None = None
    resume: bool = True
    save_every_steps: int = 0
    stop_after_steps: int | None = None
    log_every: int = 20
    progress: bool = True
    data_cache: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> TrainConfig:
        """Raises ``ConfigError`` for any value or combination that cannot run."""
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone: {self.backbone!r} is not one of {', '.join(sorted(BACKBONES))}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda")
        text_backbone = BACKBONES[self.backbone].kind == "text"
        text_data = self.dataset in ("rotten-tomatoes", "text-file")
        if text_backbone != text_data:
            kind = "text" if text_backbone else "image"
            raise ConfigError(f"dataset: {self.dataset!r} does not fit the {kind} backbone {self.backbone!r}")
        if self.dataset in ("imagefolder", "text-file") and not self.data_path:
            raise ConfigError(f"data_path: dataset {self.dataset!r} needs data_path")
        self._check_ranges()
        if self.bn_momentum is not None and not (0 < self.bn_momentum <= 1):
            raise ConfigError(f"bn_momentum: must be in (0, 1], got {self.bn_momentum}")
        if not (0 < self.layer_decay <= 1):
            raise ConfigError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")
        if not (0 <= self.warmup_fraction < 1):
            raise ConfigError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if not (0 <= self.label_smoothing < 1):
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not (0 <= self.distill_alpha <= 1):
            raise ConfigError(f"distill_alpha: must be in [0, 1], got {self.distill_alpha}")
        if not (0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ConfigError("val_fraction/test_fraction: must be fractions in (0, 1)")
        if self.train_fraction is not None and not (0 < self.train_fraction <= 1):
            raise ConfigError(f"train_fraction: must be in (0, 1], got {self.train_fraction}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("val_fraction + test_fraction: must leave training data (< 1)")
        if self.image_size is not None and (text_backbone or self.image_size < 32):
            raise ConfigError("image_size: only for image backbones, and at least 32 pixels")
        if self.max_length is not None and (not text_backbone or self.max_length < 4):
            raise ConfigError("max_length: only for text backbones, and at least 4 tokens")
        if self.group_by_length and not text_backbone:
            raise ConfigError("group_by_length: only for text backbones")
        if self.num_layers is not None and not text_backbone:
            raise ConfigError("num_layers: only for text backbones")
        if self.student_layers is not None and not self.teacher:
            raise ConfigError("student_layers: only with a teacher (distillation)")
        if self.teacher and self.strategy == "linear-probe":
            raise ConfigError(
                "teacher: distillation needs a strategy that trains the student, not linear-probe"
            )
        if self.head_warmup_epochs:
            self._check_head_warmup()
        if self.cache_frozen and self.strategy != "linear-probe":  # a probe always caches
            self._check_cache_frozen()
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ConfigError("labels: has duplicates")
        return self

    def _check_cache_frozen(self) -> None:
        """What a cache of the frozen blocks' outputs cannot hold: trained blocks below the top
        (any strategy but partial), random crops (only flips are cached, as a second view), or a
        teacher (it would need the raw inputs every step)."""
        if self.strategy != "partial":
            raise ConfigError(
                f"cache_frozen: only with strategy partial (or linear-probe), not {self.strategy!r}"
            )
        if self.crop_padding:
            raise ConfigError(
                "cache_frozen: random crops cannot be cached; set crop_padding to 0 (hflip is kept)"
            )
        if self.teacher:
            raise ConfigError("cache_frozen: distillation needs the raw inputs every step; drop one of them")

    def _check_head_warmup(self) -> None:
        """Head-only epochs need blocks to unfreeze afterwards, and epochs left to train them in."""
        if self.strategy not in ("full", "partial"):
            why = "trains only the head" if self.strategy == "linear-probe" else "starts head-only already"
            raise ConfigError(
                f"head_warmup_epochs: only with strategy full or partial ({self.strategy} {why})"
            )
        if self.head_warmup_epochs >= self.epochs:
            raise ConfigError(
                f"head_warmup_epochs: {self.head_warmup_epochs} head-only epochs leave none of the "
                f"{self.epochs} epochs to fine-tune in"
            )

    def _check_ranges(self) -> None:
        """One key at a time: counts, sizes and rates that no run can use (a negative learning
        rate or sample count would otherwise train silently on nonsense). ``None`` means the
        key's default behaviour and always passes."""
        for name, minimum in INT_MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: must be a finite number, got {value}")
        for name in POSITIVE_FLOATS:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        for name in NON_NEGATIVE_FLOATS:
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The smallest value of each integer key (where zero means "off", it is allowed).
INT_MINIMUMS: dict[str, int] = {
    "epochs": 1,
    "batch_size": 1,
    "eval_batch_size": 1,
    "grad_accum": 1,
    "trainable_blocks": 1,
    "unfreeze_every": 1,
    "head_warmup_epochs": 0,
    "train_samples": 1,
    "val_samples": 1,
    "test_samples": 1,
    "num_layers": 1,
    "crop_padding": 0,
    "max_steps_per_epoch": 1,
    "early_stopping_patience": 1,
    "eval_every_epochs": 1,
    "seed": 0,
    "threads": 0,
    "save_every_steps": 0,
    "stop_after_steps": 1,
    "log_every": 0,
}
POSITIVE_FLOATS = ("lr", "head_lr", "distill_temperature")
NON_NEGATIVE_FLOATS = ("weight_decay", "grad_clip")

FIELD_HELP: dict[str, str] = {
    "backbone": "pretrained network: efficientnet-lite0/1/2 (images) or minilm-l6 (text)",
    "pretrained": "start from the offline pretrained weights; false = same architecture, random init",
    "dataset": f"one of {', '.join(DATASETS)}",
    "data_path": "imagefolder: root with one folder per class; text-file: a .csv or .jsonl file",
    "text_column": "text-file: the column/key holding the text",
    "label_column": "text-file: the column/key holding the label",
    "labels": "expected class names; the run fails if the data's labels differ (order = output order)",
    "train_samples": "use at most this many training examples (seeded subset; quick recipes)",
    "train_fraction": "then keep this fraction of them (0 < f <= 1; seeded, and nested: the 1% draw "
    "lies inside the 10% one of the same seed), e.g. to measure what fewer labels cost",
    "val_samples": "validate on at most this many examples (seeded subset)",
    "test_samples": "evaluate on at most this many test examples (seeded subset)",
    "val_fraction": "share of the data held out for validation (early stopping, calibration)",
    "test_fraction": "share held out for testing where the dataset has no official test split",
    "image_size": "training/serving resolution in pixels (default: the backbone's native size)",
    "max_length": "tokens per text after truncation (default: the backbone's 128)",
    "num_layers": "text: keep only the first N encoder layers (smaller, faster model)",
    "strategy": "linear-probe (frozen backbone, cached features), partial (last trainable_blocks "
    "blocks), full (all layers, layer-wise decayed LRs), gradual (unfreeze one block per unfreeze_every)",
    "trainable_blocks": "partial: how many of the last blocks/layers train besides the head",
    "cache_frozen": "partial: compute the frozen blocks' outputs once and train the top on them "
    "(epochs cost only the top; flips are cached as a second view, crops cannot be)",
    "bn_momentum": "momentum of the BatchNorm running statistics while fine-tuning (null = the backbone's "
    "own; EfficientNet-Lite ships 0.01, too slow to follow a new domain in a short run)",
    "layer_decay": "full/gradual: LR multiplier per block below the head (1 = same LR everywhere)",
    "unfreeze_every": "gradual: epochs between unfreezing the next-lower block",
    "head_warmup_epochs": "full/partial: train only the head for the first N epochs, then the blocks "
    "as well (LP-FT: a random head's first updates would otherwise distort the pretrained features; "
    "helps most with few labels)",
    "epochs": "passes over the training data",
    "batch_size": "examples per optimiser step per process (times grad_accum)",
    "eval_batch_size": "examples per forward pass when evaluating and caching features",
    "lr": "peak learning rate of the top backbone block",
    "head_lr": "peak learning rate of the new head (default: lr)",
    "weight_decay": "AdamW decoupled weight decay (not applied to biases and norm weights)",
    "warmup_fraction": "share of the optimiser steps spent in linear warmup",
    "schedule": "LR decay after warmup: cosine, linear or constant",
    "label_smoothing": "cross-entropy label smoothing",
    "grad_clip": "clip the global gradient norm to this (null or 0 = off)",
    "grad_accum": "accumulate gradients over this many batches per optimiser step",
    "amp": "mixed precision (bfloat16 autocast) on CUDA; ignored on CPU",
    "hflip": "images: random horizontal flips while training",
    "crop_padding": "images: pad by this many pixels and random-crop back (0 = off)",
    "group_by_length": "text: batch texts of about the same length (fewer padded tokens, faster "
    "epochs; the batch order stays seeded)",
    "max_steps_per_epoch": "stop each epoch after this many batches (smoke tests)",
    "early_stopping_patience": "stop after this many validations without a better validation accuracy",
    "eval_every_epochs": "validate (keep best.pt, write last.pt) every N epochs and after the last: "
    "for many short epochs, e.g. a few labels trained for many passes",
    "teacher": "distillation: run folder of a fine-tuned teacher with the same labels",
    "distill_alpha": "distillation: weight of the soft-target loss (1 - alpha on the hard labels)",
    "distill_temperature": "distillation: softmax temperature of the soft targets",
    "student_layers": "text distillation: teacher layers copied into the student (default: every 2nd)",
    "calibrate": "fit a softmax temperature on the validation split (stored with the checkpoint)",
    "plots": "write learning_curves.png and confusion_matrix.png",
    "seed": "seed of splits, subsets, shuffling, init and augmentation",
    "deterministic": "deterministic kernels (torch.use_deterministic_algorithms); slower",
    "device": "auto (CUDA if present), cpu or cuda",
    "threads": "CPU threads for torch (null or 0: torch's choice)",
    "resume": "continue from OUTPUT_DIR/last.pt if it exists",
    "save_every_steps": "also write last.pt every N optimiser steps (0 = at epoch ends only)",
    "stop_after_steps": "save last.pt and stop as if interrupted after N optimiser steps (tests resume)",
    "log_every": "print a progress line every N optimiser steps (0 = never)",
    "progress": "show tqdm progress bars",
    "data_cache": "where fetched data and cached features go (default $FINESERVE_DATA_CACHE or data-cache/)",
    "extra": "free-form notes recorded with the run",
}


def recipe_path(recipe: str) -> Path:
    """``fashion`` -> ``training/configs/fashion.yaml``; a path is taken as it is."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe} does not exist")
        return path
    named = CONFIG_DIR / f"{recipe}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {known} (or give a .yaml path)")
    return named


def load_recipe(path: Path) -> dict[str, Any]:
    """The keys of a YAML recipe. An empty one is refused: it would silently start a full run
    of every default (dataset, backbone, epochs), which nobody writes an empty file to get."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a recipe is a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the recipe ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None or data == {}:
        raise ConfigError(f"{path}: the recipe is empty; give at least its dataset (see training/configs/)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``lr=1e-3``, ``labels=[a, b]``, ``teacher=null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip().replace("-", "_"), value


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Checks key names and value types, then the cross-field rules. A recipe's ``search:``
    section is for ``fineserve tune`` (``training.tuning.search``); a training run ignores it."""
    values = {k: v for k, v in values.items() if k != SEARCH_KEY}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; see --help for the known keys")
    defaults = TrainConfig()
    coerced = {k: _coerce(k, v, getattr(defaults, k), str(fields[k].type)) for k, v in values.items()}
    return TrainConfig(**coerced).check()


def _coerce(key: str, value: Any, default: Any, type_text: str) -> Any:
    if value is None:
        if "None" in type_text:
            return None
        raise ConfigError(f"{key}: may not be null")
    if type_text.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if type_text.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if type_text.startswith("float"):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if type_text.startswith("str"):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if type_text.startswith("list[str]"):
        if isinstance(value, list) and value:
            return [str(v) for v in value]
        raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
    if type_text.startswith("list[int]"):
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return value
        raise ConfigError(f"{key}: expected a non-empty list of integers, got {value!r}")
    if type_text.startswith("dict"):
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value  # pragma: no cover - every field type is handled above
