"""``fineserve tune`` / ``python -m fineserve.training.tuning``: an Optuna study over a recipe.

Thin on purpose: argument parsing and error reporting here, the work in ``study`` and ``report``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fineserve.training.__main__ import add_override_arguments, recipe_values
from fineserve.training.config import SEARCH_KEY, recipe_path
from fineserve.training.errors import TrainingError

if TYPE_CHECKING:
    import optuna

    from fineserve.training.tuning.study import Tuning

DESCRIPTION = """Search a recipe's `search:` section with Optuna (TPE sampler; a median pruner on
each validated epoch's accuracy). Each trial is a training run scored on the validation split
only, in OUTPUT_DIR/trials/NUMBER/. After its trials the command rewrites the study's reports in
OUTPUT_DIR: trials.csv, history.png, importance.png, and best.yaml (the best trial as a recipe
that `fineserve train` and `fineserve export` take).

--final then trains best.yaml once into OUTPUT_DIR/best/ and measures its test accuracy
(final.json): the one time the study reads the test split. Run it after all workers are done.

The same command continues a study (N more trials). Workers on several machines each run the
same command against one PostgreSQL URL (postgresql+psycopg://user:password@host:5432/db);
the default is SQLite in OUTPUT_DIR/study.db, for workers on one machine."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineserve tune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="recipe name (training/configs/NAME.yaml) or path; needs `search:`")
    parser.add_argument("--trials", type=int, required=True, metavar="N", help="trials this command runs")
    parser.add_argument("--study", help="study name (default: the recipe's name)")
    parser.add_argument("--storage", metavar="URL", help="SQLAlchemy URL (default: sqlite in OUTPUT_DIR)")
    parser.add_argument(
        "--output-dir", type=Path, help="the study's results (default: runs/tune/STUDY; trials go below it)"
    )
    parser.add_argument(
        "--final", action="store_true", help="after the trials, measure the best recipe's test accuracy once"
    )
    add_override_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trials < 0:
        print("error: --trials must be >= 0", file=sys.stderr)
        return 2
    try:
        return tune(args)
    except (TrainingError, FloatingPointError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to continue the study", file=sys.stderr)
        return 130


def tune(args: argparse.Namespace) -> int:
    # Every check that needs no torch comes first: a bad recipe or search space fails at once.
    from fineserve.training.tuning.search import parse_search

    recipe = recipe_path(args.recipe)
    values = recipe_values(args)
    search = values.pop(SEARCH_KEY, None)
    space = parse_search(search, values, str(recipe))
    study_name = args.study or recipe.stem
    output_dir = args.output_dir or Path("runs") / "tune" / study_name

    import optuna

    from fineserve.training.tuning import report, storage, study

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours (study.say_trial)
    url = args.storage or storage.default_storage(output_dir)
    tuning = study.Tuning(study_name, values, search, space, output_dir)
    opened = study.open_study(tuning, storage.open_storage(url))
    study.run_trials(opened, tuning, args.trials)
    for note in report.write_reports(opened, output_dir, recipe=str(recipe)):
        print(f"note: {note}")
    best = study.best_trial(opened)
    if best is not None:
        print(f"best: trial {best.number}, val accuracy {best.value:.4f} -> {output_dir / report.BEST_YAML}")
    if args.final:
        final(opened, tuning, output_dir)
    return 0


def final(opened: optuna.Study, tuning: Tuning, output_dir: Path) -> None:
    import optuna

    from fineserve.training.tuning import report, study

    running = opened.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        print(f"note: {len(running)} trials are still running elsewhere; the best may still change")
    row, measured = study.final(opened, tuning, output_dir / report.BEST_YAML)
    path = report.write_final(row, output_dir)
    if not measured:
        print(f"note: the test split was already read for this study (trial {row['trial']}); not again")
    print(
        f"final: trial {row['trial']}, val accuracy {row['val_accuracy']:.4f}, "
        f"test accuracy {row['test_accuracy']:.4f} -> {path}"
    )


if __name__ == "__main__":
    sys.exit(main())
