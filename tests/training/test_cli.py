"""The command line: one-line errors with a non-zero exit for bad recipes, data and labels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fineserve.training.__main__ import build_parser, config_from_args, main
from fineserve.training.config import ConfigError
from tests.training.conftest import TINY_IMAGE

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FINESERVE_DATA_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "fineserve.training", *args, "--output-dir", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_config_value_is_a_one_line_error(tmp_path: Path) -> None:
    line = one_line_error(run_cli("digits", "--set", "strategy=everything", tmp_path=tmp_path))
    assert "strategy" in line and "linear-probe" in line


def test_missing_dataset_is_a_one_line_error(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"dataset: imagefolder\ndata_path: {tmp_path / 'nowhere'}\nimage_size: 32\n")
    line = one_line_error(run_cli(str(recipe), tmp_path=tmp_path))
    assert "nowhere" in line and "does not exist" in line


def test_label_mismatch_is_a_one_line_error(tmp_path: Path) -> None:
    recipe = tmp_path / "digits.yaml"
    recipe.write_text('dataset: digits\nlabels: ["0", "1", "2", "cat"]\nimage_size: 32\n')
    line = one_line_error(run_cli(str(recipe), tmp_path=tmp_path))
    assert "label mismatch" in line and "cat" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchrecipe"], "unknown recipe 'nosuchrecipe'"),
        (["digits", "--set", "learning_rate=1"], "unknown key 'learning_rate'"),
        (["digits", "--epochs", "two"], "epochs: expected an integer"),
        (["digits", "--set", "lr=0"], "lr: must be > 0"),
        (["sentiment", "--set", "dataset=digits"], "does not fit the text backbone"),
        (["digits", "--set", "teacher=x", "--set", "strategy=linear-probe"], "teacher: distillation"),
        (["digits", "--set", "val_fraction=0.6", "--set", "test_fraction=0.5"], "must leave training data"),
        (["digits", "--threads", "-2"], "threads: must be >= 0, got -2"),
        (["digits", "--head-lr", "-1"], "head_lr: must be > 0, got -1.0"),
        (["digits", "--weight-decay", "-1"], "weight_decay: must be >= 0, got -1.0"),
        (["digits", "--grad-clip", "-1"], "grad_clip: must be >= 0, got -1.0"),
        (["digits", "--crop-padding", "-3"], "crop_padding: must be >= 0, got -3"),
        (["digits", "--train-samples", "-5"], "train_samples: must be >= 1, got -5"),
        (["digits", "--test-samples", "0"], "test_samples: must be >= 1, got 0"),
        (["digits", "--seed", "-1"], "seed: must be >= 0, got -1"),
        (["digits", "--lr", ".inf"], "lr: must be a finite number, got inf"),
    ],
)
def test_config_errors_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_overrides_apply_in_order_recipe_then_options_then_set(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["fashion", "--output-dir", str(tmp_path), "--epochs", "5", "--set", "epochs=7", "--lr", "5e-4"]
    )
    cfg = config_from_args(args)
    assert cfg.epochs == 7 and cfg.lr == 5e-4 and cfg.dataset == "fashion-mnist"
    with pytest.raises(ConfigError, match="key=value"):
        config_from_args(build_parser().parse_args(["fashion", "--output-dir", "x", "--set", "novalue"]))


def test_help_explains_each_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--strategy",
        "--layer-decay",
        "--grad-accum",
        "--teacher",
        "--set",
        "linear-probe",
        "last.pt",
    ):
        assert option in out


def test_quick_recipes_are_valid() -> None:
    for name in ("fashion", "digits", "sentiment"):
        cfg = config_from_args(build_parser().parse_args([name, "--output-dir", "x"]))
        assert cfg.labels is not None and len(cfg.labels) >= 2


def test_zero_stays_valid_where_it_means_off() -> None:
    args = ["digits", "--output-dir", "x", "--weight-decay", "0", "--grad-clip", "0", "--crop-padding", "0"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.weight_decay == 0 and cfg.grad_clip == 0 and cfg.crop_padding == 0


def _error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_recipe_that_is_not_utf8_or_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_bytes("dataset: digits\n# caf\u00e9\n".encode("latin-1"))
    run = ["--output-dir", str(tmp_path / "run")]
    assert "not UTF-8 text" in _error_line(capsys, str(recipe), *run)
    for empty in ("", "# nothing but a comment\n", "{}\n"):
        recipe.write_text(empty)
        assert "the recipe is empty" in _error_line(capsys, str(recipe), *run)
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_or_is_below_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("a file")
    assert "is a file, not a folder" in _error_line(capsys, "digits", "--output-dir", str(a_file))
    line = _error_line(capsys, "digits", "--output-dir", str(a_file / "run"))
    assert f"{a_file} is a file, not a folder" in line


def _tiny_digits(**changes: object) -> list[str]:
    """``digits --set KEY=VALUE ...``: the tiny image recipe as command-line arguments."""
    values = {key: value for key, value in TINY_IMAGE.items() if key != "dataset"} | changes
    return ["digits", *(arg for key, value in values.items() for arg in ("--set", f"{key}={value}"))]


def test_stop_after_steps_ends_like_an_interrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The recipe's stop: the same one line as Ctrl-C, exit 130, and last.pt to resume from."""
    run = tmp_path / "run"
    args = _tiny_digits(strategy="linear-probe", stop_after_steps=1, data_cache=tmp_path / "cache")
    assert main([*args, "--output-dir", str(run)]) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"error: interrupted; rerun the same command to resume from {run}/last.pt"
    ]
    assert (run / "last.pt").is_file()


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path) -> None:
    """A scheduler's SIGTERM gets the same one line as Ctrl-C, saying how to resume (exit 143)."""
    run = tmp_path / "run"
    env = {**os.environ, "FINESERVE_DATA_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "fineserve.training",
        *_tiny_digits(epochs=500),
        "--output-dir",
        str(run),
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "args.yaml").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # args.yaml: the run has started (its config checked)
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == [
        f"error: stopped (SIGTERM); rerun the same command to resume from {run}/last.pt"
    ]
