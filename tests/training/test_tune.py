"""``fineserve tune`` on SQLite: trials, reports, the best recipe, the one test read, resuming,
pruning, and one-line errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import optuna
import pytest
import yaml

from fineserve.training.__main__ import build_parser, config_from_args, recipe_values
from fineserve.training.tuning.__main__ import main
from fineserve.training.tuning.search import parse_search
from fineserve.training.tuning.study import Tuning, open_study, run_trials
from tests.training.tune_fixtures import tiny_tune_recipe


def tune(*args: str) -> int:
    return main(list(args))


def one_line_error(capsys: pytest.CaptureFixture[str], status: int) -> str:
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_a_study_writes_its_reports_a_best_recipe_and_reads_the_test_split_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, out = tiny_tune_recipe(tmp_path), tmp_path / "study"
    assert tune(str(recipe), "--trials", "3", "--study", "s", "--output-dir", str(out), "--final") == 0
    printed = capsys.readouterr().out
    assert (out / "history.png").stat().st_size > 0 and (out / "importance.png").stat().st_size > 0
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,value,") and len(rows) == 1 + 3

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2]
    for trial in study.trials:
        # The trials select on validation alone: the pruner saw validation accuracy per epoch,
        # and no trial's record or run folder holds a test figure.
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert set(trial.intermediate_values) == {1, 2}
        assert trial.value == max(trial.intermediate_values.values())
        assert not any("test" in key for key in trial.user_attrs)
        run_dir = Path(trial.user_attrs["run_dir"])
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {key for m in metrics for key in m if "test" in key} == set()
        trial_meta = json.loads((run_dir / "metadata.json").read_text())
        assert trial_meta["finished"] is False and trial_meta["metrics"] == {}

    # The best trial as a recipe that `fineserve train` reads through its own path.
    best = max(study.trials, key=lambda t: t.value or 0)
    recipe_text = (out / "best.yaml").read_text()
    assert f"trial {best.number}" in recipe_text.splitlines()[0]
    cfg = config_from_args(build_parser().parse_args([str(out / "best.yaml"), "--output-dir", "x"]))
    assert cfg.lr == best.params["lr"] and cfg.trainable_blocks == best.params["trainable_blocks"]
    assert cfg.extra["tuned"] == {"study": "s", "trial": best.number, "val_accuracy": best.value}

    # The final row: the best recipe trained once, the one run of the study that read the test split.
    final = json.loads((out / "final.json").read_text())
    assert final["trial"] == best.number and final["params"] == best.params
    final_meta = json.loads((out / "best" / "metadata.json").read_text())
    assert final_meta["finished"] is True
    assert final["test_accuracy"] == final_meta["metrics"]["test_accuracy"]
    assert study.user_attrs["final"] == final
    assert f"test accuracy {final['test_accuracy']:.4f}" in printed

    # The same command continues the study, and does not read the test split again.
    written = (out / "best" / "metadata.json").stat().st_mtime_ns
    assert tune(str(recipe), "--trials", "1", "--study", "s", "--output-dir", str(out), "--final") == 0
    again = capsys.readouterr().out
    assert "the test split was already read for this study" in again
    assert [t.number for t in optuna.load_study(study_name="s", storage=study._storage).trials] == [
        0,
        1,
        2,
        3,
    ]
    assert (out / "best" / "metadata.json").stat().st_mtime_ns == written
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 4


def test_too_few_trials_for_importance_is_a_note_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    assert tune(str(tiny_tune_recipe(tmp_path)), "--trials", "1", "--output-dir", str(out)) == 0
    assert "note: importance.png: needs at least 3 completed trials" in capsys.readouterr().out
    assert (out / "history.png").is_file() and not (out / "importance.png").exists()


def test_the_pruner_stops_a_trial_after_the_epoch_it_falls_behind(tmp_path: Path) -> None:
    values = yaml.safe_load(tiny_tune_recipe(tmp_path).read_text())
    search = values.pop("search")
    tuning = Tuning("pruned", values, search, parse_search(search, values, "tiny"), tmp_path / "out")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    # Any validation accuracy under 1.01 falls behind: the first reported epoch ends the trial.
    study = open_study(tuning, storage, optuna.pruners.ThresholdPruner(lower=1.01))
    run_trials(study, tuning, 1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]  # epoch 2 of 2 never ran


def test_a_study_refuses_a_worker_with_another_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, out = tiny_tune_recipe(tmp_path), str(tmp_path / "study")
    assert tune(str(recipe), "--trials", "0", "--study", "s", "--output-dir", out) == 0
    line = one_line_error(
        capsys, tune(str(recipe), "--trials", "1", "--study", "s", "--output-dir", out, "--set", "epochs=3")
    )
    assert "study 's' was started with another recipe (epochs: 2 there, 3 now)" in line


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("not a url", "--storage not a url: not a database URL"),
        ("nosuchdb://x/y", "--storage nosuchdb://x/y: not a usable database URL"),
        ("sqlite:////no/such/folder/study.db", "cannot reach the database (unable to open database file)"),
    ],
)
def test_a_bad_storage_url_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], storage: str, message: str
) -> None:
    status = tune(str(tiny_tune_recipe(tmp_path)), "--trials", "1", "--storage", storage)
    assert message in one_line_error(capsys, status)


def test_an_unreachable_database_is_one_line_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql+psycopg://tuner:s3cret@127.0.0.1:{closed_port()}/study"
    line = one_line_error(capsys, tune(str(tiny_tune_recipe(tmp_path)), "--trials", "1", "--storage", url))
    assert "cannot reach the database" in line and "Connection refused" in line
    assert "tuner:***@127.0.0.1" in line and "s3cret" not in line


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (None, "the recipe has no `search:` section"),
        ({"learning_rate": [1, 2]}, "search.learning_rate: not a recipe key"),
        ({"lr": {"low": 1e-3}}, "search.lr: a range needs both low and high"),
        ({"lr": {"low": 1e-2, "high": 1e-3}}, "search.lr: low 0.01 is above high 0.001"),
        ({"lr": {"low": 0, "high": 1e-3, "log": True}}, "search.lr: a log range needs low > 0"),
        ({"epochs": {"low": 1.5, "high": 3}}, "search.epochs: low must be an integer"),
        ({"schedule": {"low": 1, "high": 2}}, "search.schedule: schedule is not a number"),
        ({"lr": {"low": 1e-3, "high": 1e-2, "scale": "log"}}, "search.lr: unknown field 'scale'"),
        ({"label_smoothing": {"low": 0.0, "high": 1.5}}, "search.label_smoothing: 1.5 cannot run"),
        ({"schedule": ["cosine", "sideways"]}, "search.schedule: 'sideways' cannot run"),
        ({"hflip": []}, "search.hflip: an empty list of choices"),
        ({"eval_every_epochs": [1, 2]}, "search.eval_every_epochs: cannot be searched"),
    ],
)
def test_a_bad_search_section_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], search: object, message: str
) -> None:
    status = tune(
        str(tiny_tune_recipe(tmp_path, search=search)), "--trials", "1", "--output-dir", str(tmp_path)
    )
    assert message in one_line_error(capsys, status)
    assert not (tmp_path / "study.db").exists()  # refused before any storage or training


def test_training_ignores_the_search_section() -> None:
    """`fineserve train fashion` still works now that the shipped recipes carry `search:`."""
    for name in ("fashion", "sentiment", "digits", "fashion-full", "sentiment-full"):
        cfg = config_from_args(build_parser().parse_args([name, "--output-dir", "x"]))
        assert cfg.dataset in ("fashion-mnist", "rotten-tomatoes", "mnist-subset")


@pytest.mark.parametrize("name", ["fashion", "sentiment", "digits", "fashion-full", "sentiment-full"])
def test_the_shipped_search_sections_are_valid(name: str) -> None:
    values = recipe_values(build_parser().parse_args([name, "--output-dir", "x"]))
    space = parse_search(values.pop("search"), values, name)
    keys = {d.key for d in space.dimensions}
    assert len(keys) >= 6 and {"lr", "weight_decay", "epochs", "label_smoothing"} <= keys


def test_a_plot_that_cannot_be_saved_leaves_no_figure_open(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from fineserve.training.tuning.report import _plot

    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    plt.close("all")
    with pytest.raises(OSError):
        _plot(optuna.visualization.matplotlib.plot_optimization_history, study, tmp_path / "gone" / "h.png")
    assert plt.get_fignums() == []  # pyplot would keep it for the life of the process
