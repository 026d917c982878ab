"""A study's results, next to its trials: ``trials.csv``, ``history.png``, ``importance.png``,
``best.yaml`` (the best trial as an ordinary recipe) and, after ``--final``, ``final.json``.

Every worker rewrites them from the storage when it finishes, so they describe the whole study
(all workers' trials). Each file is written beside its name and renamed into place: two workers
on one machine never leave a torn file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml

from fineserve.files import write_atomically
from fineserve.training.tuning.study import best_trial

TRIALS_CSV = "trials.csv"
HISTORY_PNG = "history.png"
IMPORTANCE_PNG = "importance.png"
BEST_YAML = "best.yaml"
FINAL_JSON = "final.json"
# Parameter importance fits a model of accuracy over the parameters: it needs a few finished
# trials and more than one parameter to say anything.
IMPORTANCE_MIN_TRIALS = 3


def write_reports(study: optuna.Study, output_dir: Path, *, recipe: str) -> list[str]:
    """Writes the reports of ``study`` into ``output_dir``; returns notes on what was left out."""
    output_dir.mkdir(parents=True, exist_ok=True)
    notes = []
    write_atomically(output_dir / TRIALS_CSV, lambda tmp: study.trials_dataframe().to_csv(tmp, index=False))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        _plot(optuna.visualization.matplotlib.plot_optimization_history, study, output_dir / HISTORY_PNG)
    else:
        notes.append(f"{HISTORY_PNG}: no completed trial yet")
    params = {name for t in complete for name in t.params}
    if len(complete) >= IMPORTANCE_MIN_TRIALS and len(params) > 1:
        _plot(optuna.visualization.matplotlib.plot_param_importances, study, output_dir / IMPORTANCE_PNG)
    else:
        notes.append(
            f"{IMPORTANCE_PNG}: needs at least {IMPORTANCE_MIN_TRIALS} completed trials and 2 searched "
            f"keys (has {len(complete)} and {len(params)})"
        )
    best = best_trial(study)
    if best is not None:
        write_best_recipe(study, best, output_dir / BEST_YAML, recipe=recipe)
    return notes


def write_best_recipe(
    study: optuna.Study, best: optuna.trial.FrozenTrial, path: Path, *, recipe: str
) -> Path:
    """The recipe the study started from (its overrides included, its ``search:`` left out) with
    the best trial's values: a file ``fineserve train`` and ``fineserve export`` take as it is."""
    values: dict[str, Any] = {**study.user_attrs["recipe"], **best.params}
    tuned = {"study": study.study_name, "trial": best.number, "val_accuracy": best.value}
    values["extra"] = {**(values.get("extra") or {}), "tuned": tuned}
    header = (
        f"# The best trial of tuning study {study.study_name!r}: trial {best.number}, validation "
        f"accuracy {best.value:.4f}.\n"
        f"# Recipe {recipe} with the tuning command's overrides and the trial's values:\n"
        + "".join(f"#   {key}: {value!r}\n" for key, value in best.params.items())
        + "# Written by `fineserve tune`; train it with `fineserve train THIS_FILE --output-dir ...`.\n"
    )
    write_atomically(path, lambda tmp: tmp.write_text(header + yaml.safe_dump(values, sort_keys=False)))
    return path


def write_final(row: dict[str, Any], output_dir: Path) -> Path:
    path = output_dir / FINAL_JSON
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(row, indent=2) + "\n"))
    return path


def _plot(draw: Callable[[optuna.Study], Any], study: optuna.Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = draw(study)
    figure = axes.figure
    try:  # pyplot keeps every open figure: a failed save must not leak one per study
        figure.tight_layout()
        write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(figure)
