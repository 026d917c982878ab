"""``fineserve``: one command that dispatches to each part's program."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["train", "tune", "export", "serve", "predict", "bench"]


def _fineserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fineserve", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_answers_help_under_its_own_name(command: str) -> None:
    proc = _fineserve(command, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.lower().startswith(f"usage: fineserve {command}")


def test_without_a_command_it_lists_them_all() -> None:
    listed = _fineserve()
    assert listed.returncode == 0
    for command in COMMANDS:
        assert f"\n  {command} " in listed.stdout


def test_an_unknown_command_is_one_line_and_exit_2() -> None:
    unknown = _fineserve("fly")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "fineserve: unknown command 'fly'; choose one of: " + ", ".join(COMMANDS)


def test_version() -> None:
    shown = _fineserve("--version")
    assert shown.returncode == 0 and shown.stdout.startswith("fineserve 0.")


def test_the_command_passes_its_arguments_through(tmp_path: Path) -> None:
    """`fineserve serve ...` is `fineserve-serve ...`: the settings error comes from the server."""
    proc = _fineserve(
        "serve", "--model-repository", str(tmp_path / "nope"), "--grpc-port", "0", "--metrics-port", "-1"
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fineserve serve: error: model repository {tmp_path / 'nope'} is not a folder"
    )


def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    """An environment without torch (a serving install): `fineserve bench train` says what to install."""
    blocked = tmp_path / "torch"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError('no torch here', name='torch')\n")
    without_torch = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "fineserve", "bench", "train", "--help"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=without_torch,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "fineserve bench: needs the 'torch' package, which the 'serve,train' extra installs "
        "(from a checkout: pip install '.[serve,train]')"
    )
