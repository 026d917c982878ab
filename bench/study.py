"""A grid of training runs for a study (not a test): one whole recipe per run, trained side by side.

Each run's recipe is written to ``OUT/recipes/NAME.yaml`` and trained into ``OUT/runs/NAME`` by
``export.defaults.train_runs`` (``PARALLEL`` at a time, periodic lines named after the run): a
study that stops part-way keeps its finished runs, and the same command carries on from there.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class StudyRun:
    name: str  # unique in the study: the recipe file's stem and the run folder's name
    recipe: dict[str, Any]  # every key a recipe may hold (training/config.py)
    cost: float = 1.0  # relative; the dearest runs start first, so the last ones finish together


def run_study(
    runs: Sequence[StudyRun], out: Path, *, parallel: int, log: Callable[[str], Any] = print
) -> dict[str, dict[str, Any]]:
    """Trains every run not yet finished in ``out``; returns each finished run's metrics (those
    of ``metadata.json``) by name. A failed run is reported and left out.

    Raises:
        training.errors.ConfigError: a recipe that cannot run, before anything trains.
    """
    from fineserve.export.defaults import train_runs
    from fineserve.training.checkpoint import read_metadata
    from fineserve.training.config import build_config

    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"study runs must have unique names: {names}")
    recipes, folders = out / "recipes", out / "runs"
    for run in runs:
        wanted = build_config(run.recipe).to_dict()  # one line for a bad recipe, before hours of training
        _check_same_recipe(folders / run.name, wanted)
    recipes.mkdir(parents=True, exist_ok=True)
    order = sorted(runs, key=lambda run: -run.cost)
    for run in order:
        (recipes / f"{run.name}.yaml").write_text(yaml.safe_dump(run.recipe, sort_keys=False))
    trained = train_runs(
        [(str(recipes / f"{run.name}.yaml"), folders / run.name) for run in order],
        parallel=parallel,
        log=log,
    )
    for recipe, code in trained.failed.items():
        log(f"{Path(recipe).stem}: training failed (exit {code}); left out of the results")
    failed = {Path(recipe).stem for recipe in trained.failed}
    return {run.name: read_metadata(folders / run.name).metrics for run in runs if run.name not in failed}


def _check_same_recipe(run_dir: Path, wanted: dict[str, Any]) -> None:
    """A folder already trained is reused only if it was trained from this recipe (a study run
    again with another size or recipe into the same ``--out`` must not mix the two).

    Raises:
        training.errors.ConfigError: the folder's ``args.yaml`` differs in a key that changes results.
    """
    from fineserve.training.errors import ConfigError
    from fineserve.training.run import RESUMABLE_CHANGES

    args = run_dir / "args.yaml"
    if not args.is_file():
        return
    trained = yaml.safe_load(args.read_text()) or {}
    changed = sorted(k for k, v in wanted.items() if k not in RESUMABLE_CHANGES and trained.get(k, v) != v)
    if changed:
        key = changed[0]
        raise ConfigError(
            f"{run_dir} was trained with {key}={trained[key]!r}, not {wanted[key]!r}; "
            "use another --out for a different study"
        )


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one value), min and max of repeated measurements."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def add_study_options(parser: argparse.ArgumentParser, *, writes: str, sizes: Iterable[str]) -> None:
    """``--out``, ``--device``, ``--parallel`` and ``--size`` (one of ``sizes``), as every study
    takes them."""
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {writes}, and the runs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[auto]")
    parser.add_argument(
        "--parallel", type=int, default=0, help="runs side by side (0: one per core on CPU, 1 on a GPU)"
    )
    parser.add_argument("--size", choices=sorted(sizes), default="cpu", help="[cpu]; one --out per size")


def side_by_side(args: argparse.Namespace) -> int:
    """How many runs train at once: ``--parallel``, else one per usable core, or one GPU run."""
    from fineserve.export.defaults import usable_cores

    return int(args.parallel) or (1 if args.device == "cuda" else usable_cores())


def threads_per_run(parallel: int) -> int:
    """Torch threads for each run: one when runs share the cores side by side, else torch's choice."""
    return 1 if parallel > 1 else 0


def chosen(text: str, known: Iterable[str], option: str) -> list[str]:
    """The comma-separated names of ``text``, each one of ``known``.

    Raises:
        ValueError: an unknown name, or none (one line, naming ``option`` and the choices).
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = list(known)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        what = f"unknown {', '.join(unknown)}" if unknown else "none given"
        raise ValueError(f"{option}: {what}; choose from {', '.join(known)}")
    return names
