"""A tuning study: Optuna's TPE sampler proposes recipe values, each trial is an ordinary
training run scored on its validation split, and a pruner stops trials whose per-epoch
validation accuracy falls behind the others'.

Trials never read the test split (``train(score_test=False)``): the study selects on validation
accuracy alone. ``final`` then trains the best recipe once, as ``fineserve train`` would, and
that run's test accuracy is the study's one look at the test split.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from fineserve.training.config import build_config, load_recipe
from fineserve.training.errors import ConfigError, TrainingError
from fineserve.training.run import train
from fineserve.training.tuning.search import SearchSpace

# Study attributes: what the study was started with (every worker must run the same), and the
# final row once the test split has been read.
RECIPE_ATTR = "recipe"
SEARCH_ATTR = "search"
FINAL_ATTR = "final"
TRIALS_DIR = "trials"
FINAL_DIR = "best"
# The median pruner compares a trial's epoch with the same epoch of earlier trials; it waits for
# a few finished trials to compare with, and never judges a trial on its first epoch alone.
PRUNER_STARTUP_TRIALS = 4
PRUNER_WARMUP_EPOCHS = 1


@dataclass(frozen=True)
class Tuning:
    """What every trial of a study shares."""

    study_name: str
    base: dict[str, Any]  # the recipe with the command line's overrides, without `search:`
    search: dict[str, Any]  # the recipe's `search:` section as written
    space: SearchSpace
    output_dir: Path  # results: trials/<number>/, reports, best.yaml, best/


def default_pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
    )


def open_study(
    tuning: Tuning, storage: optuna.storages.BaseStorage, pruner: optuna.pruners.BasePruner | None = None
) -> optuna.Study:
    """The study ``tuning.study_name`` in ``storage``: created, or loaded to continue it.

    Raises:
        ConfigError: the study exists but was started with another recipe or search space.
    """
    study = optuna.create_study(
        study_name=tuning.study_name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(),
        pruner=pruner or default_pruner(),
        load_if_exists=True,
    )
    for attr, given in ((RECIPE_ATTR, tuning.base), (SEARCH_ATTR, tuning.search)):
        value = json.loads(json.dumps(given))  # as the storage returns it
        saved = study.user_attrs.get(attr)
        if saved is None:
            study.set_user_attr(attr, value)
        elif saved != value:
            raise ConfigError(
                f"study {tuning.study_name!r} was started with another {_difference(attr, saved, value)}; "
                "run the same recipe and overrides to continue it, or give a new --study"
            )
    return study


def _difference(attr: str, saved: dict[str, Any], now: dict[str, Any]) -> str:
    key = next(k for k in sorted(set(saved) | set(now), key=str) if saved.get(k) != now.get(k))
    where = "search" if attr == SEARCH_ATTR else "recipe"
    return f"{where} ({key}: {saved.get(key)!r} there, {now.get(key)!r} now)"


def run_trials(study: optuna.Study, tuning: Tuning, trials: int) -> None:
    """``trials`` more trials of ``study`` in this process (other workers may run beside it)."""
    study.optimize(
        objective(tuning),
        n_trials=trials,
        catch=(FloatingPointError,),  # a diverged trial fails alone; the study goes on
        callbacks=[say_trial],
    )


def objective(tuning: Tuning) -> Callable[[optuna.Trial], float]:
    """One trial: the recipe with the sampled values, trained into ``trials/<number>/``, scored by
    its best validation accuracy; each validation's is reported to the pruner (at its epoch)."""

    def run_trial(trial: optuna.Trial) -> float:
        params = tuning.space.suggest(trial)
        # A trial folder is never resumed: a trial that stopped has failed and is not re-run.
        cfg = build_config({**tuning.base, **params, "resume": False})
        run_dir = tuning.output_dir / TRIALS_DIR / str(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("host", socket.gethostname())

        def report(record: dict[str, Any]) -> None:
            trial.report(record["val_accuracy"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"epoch {record['epoch']}: val accuracy {record['val_accuracy']:.4f}"
                )

        try:
            result = train(cfg, run_dir, on_epoch=report, score_test=False)
        except FloatingPointError as err:
            trial.set_user_attr("failed", str(err))
            raise
        if result.stopped:
            raise ConfigError(f"stop_after_steps: a tuning trial must run to its end ({result.stopped})")
        trial.set_user_attr("best_epoch", result.metrics["best_epoch"])
        return float(result.metrics["val_accuracy"])

    return run_trial


def say_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial, and the best so far."""
    state = trial.state.name.lower()
    if trial.state == optuna.trial.TrialState.COMPLETE:
        line = f"trial {trial.number}: val accuracy {trial.value:.4f}"
    elif trial.state == optuna.trial.TrialState.FAIL:
        line = f"trial {trial.number}: failed ({trial.user_attrs.get('failed', 'see above')})"
    else:
        line = f"trial {trial.number}: {state}"
    best = best_trial(study)
    if best is not None:
        line += f"; best so far trial {best.number} ({best.value:.4f})"
    print(f"{line}; params {trial.params}", flush=True)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed trial with the highest validation accuracy, None before the first."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def final(study: optuna.Study, tuning: Tuning, best_recipe: Path) -> tuple[dict[str, Any], bool]:
    """The study's final row: ``best_recipe`` trained once into ``best/`` by the path ``fineserve
    train`` takes, and that run's test accuracy. Once measured, it is kept in the study and
    returned again without training (the test split is read once per study).

    Returns the row, and whether it was measured now.

    Raises:
        TrainingError: no trial has completed yet.
    """
    saved = study.user_attrs.get(FINAL_ATTR)
    if saved is not None:
        return saved, False
    best = best_trial(study)
    if best is None:
        raise TrainingError(f"study {tuning.study_name!r} has no completed trial yet; run trials first")
    run_dir = tuning.output_dir / FINAL_DIR
    metrics = train(build_config(load_recipe(best_recipe)), run_dir).metrics
    row = {
        "study": tuning.study_name,
        "trial": best.number,
        "params": best.params,
        "trial_val_accuracy": best.value,
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "recipe": str(best_recipe),
        "run_dir": str(run_dir),
    }
    study.set_user_attr(FINAL_ATTR, row)
    return row, True
