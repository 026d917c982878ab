"""One base for the expected export failures: each prints one ``error: ...`` line, a bug its traceback."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fineserve.export import __main__ as cli
from fineserve.export import errors
from fineserve.export.contract import ModelSpecError
from fineserve.training import errors as training_errors

EXPORT_DIR = Path(errors.__file__).resolve().parent


def _classes(module: ModuleType) -> list[type[Exception]]:
    """The exception classes a module defines (not those it imports)."""
    return [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]


EXPORT_ERRORS = _classes(errors)
TRAINING_ERRORS = _classes(training_errors)


def test_every_export_error_derives_from_the_one_base() -> None:
    assert len(EXPORT_ERRORS) > 15
    for error in [*EXPORT_ERRORS, ModelSpecError]:
        assert issubclass(error, errors.ExportError), error
    for error in TRAINING_ERRORS:
        assert issubclass(error, training_errors.TrainingError), error


def test_separate_types_keep_their_builtin_bases() -> None:
    """Callers that catch ValueError (the server reading model.json) still catch these."""
    assert issubclass(ModelSpecError, ValueError)
    assert issubclass(errors.UsageError, ValueError) and issubclass(errors.WrapError, ValueError)
    assert issubclass(errors.PublishError, RuntimeError)
    assert issubclass(errors.ExpectationError, errors.ValidationError)
    assert issubclass(training_errors.UnfinishedRunError, training_errors.CheckpointError)


def _raised_names(path: Path) -> set[str]:
    """The names of the classes a module raises by name (``raise Name(...)``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            if isinstance(func, ast.Name):
                names.add(func.id)
    return names


@pytest.mark.parametrize("path", sorted(EXPORT_DIR.glob("*.py")), ids=lambda p: p.name)
def test_every_error_export_raises_is_expected(path: Path) -> None:
    """No export module raises a bare ValueError or RuntimeError that the command line would not know."""
    module = importlib.import_module(f"fineserve.export.{path.stem}")
    for name in _raised_names(path):
        raised = getattr(module, name)
        assert issubclass(raised, errors.ExportError | training_errors.TrainingError), (path.name, name)


def _kinds() -> list[tuple[BaseException, str]]:
    """One instance of every expected error, with the line the command line prints for it."""
    cases: list[tuple[BaseException, str]] = []
    for error in [*EXPORT_ERRORS, ModelSpecError, *TRAINING_ERRORS]:
        if issubclass(error, errors.ValidationError):
            line = f"check failed ({error.__name__}): what went wrong; nothing was published"
        elif error is training_errors.UnknownBackboneError:
            line = "unsupported model: what went wrong"
        else:
            line = "what went wrong"
        cases.append((error("what went wrong"), line))
    cases.append((KeyboardInterrupt(), "interrupted; nothing was published"))
    return cases


def _fail_with(monkeypatch: pytest.MonkeyPatch, raised: BaseException) -> None:
    """Makes ``fineserve export defaults`` raise ``raised`` where it would start its work."""

    def run(args: object) -> None:
        raise raised

    monkeypatch.setattr(cli, "_run_defaults", run)


@pytest.mark.parametrize(
    ("raised", "line"), _kinds(), ids=lambda v: "" if isinstance(v, str) else type(v).__name__
)
def test_cli_prints_one_line_for_each_kind(
    raised: BaseException,
    line: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fail_with(monkeypatch, raised)
    assert cli.main(["defaults", "--repository", str(tmp_path)]) == cli.EXIT_FAILED
    assert capsys.readouterr().err.splitlines() == [f"error: {line}"]


def test_cli_prints_the_first_line_of_a_longer_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_with(monkeypatch, errors.WrapError("the graph has no logits\nits outputs: ..."))
    assert cli.main(["defaults", "--repository", str(tmp_path)]) == cli.EXIT_FAILED
    assert capsys.readouterr().err.splitlines() == ["error: the graph has no logits"]


def test_cli_lets_a_bug_keep_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_with(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(["defaults", "--repository", str(tmp_path)])


def test_a_bug_prints_a_traceback_in_a_real_process(tmp_path: Path) -> None:
    program = (
        "import sys\n"
        "from fineserve.export import __main__ as cli\n"
        "def bug(args):\n"
        "    raise ZeroDivisionError('a bug')\n"
        "cli._run_defaults = bug\n"
        f"sys.exit(cli.main(['defaults', '--repository', {str(tmp_path)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError: a bug" in done.stderr
    assert not done.stderr.startswith("error: ")
