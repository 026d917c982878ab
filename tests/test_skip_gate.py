"""tests/skip_gate.py: a run with --fail-on-skip fails on a skip that the allow-list does not name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.skip_gate import allowed_patterns, unexpected

ROOT = Path(__file__).resolve().parent.parent


def test_allow_list_patterns_ignore_comments_and_blank_lines(tmp_path: Path) -> None:
    listed = tmp_path / "allowed.txt"
    listed.write_text("# why\n\ntests/a.py::test_one  # machine fact\ntests/b.py::test_*\n")
    assert allowed_patterns(listed) == ["tests/a.py::test_one", "tests/b.py::test_*"]


def test_only_skips_off_the_list_are_unexpected() -> None:
    skipped = {"tests/a.py::test_one": "cuda here", "tests/b.py::test_x": "x", "tests/c.py::test_y": "y"}
    assert unexpected(skipped, ["tests/a.py::test_one", "tests/b.py::test_*"]) == {"tests/c.py::test_y": "y"}


def test_every_allow_listed_test_exists() -> None:
    for pattern in allowed_patterns():
        path, _, name = pattern.partition("::")
        source = (ROOT / path).read_text()
        assert f"def {name.rstrip('*')}" in source, pattern


def _run(tmp_path: Path, body: str, *flags: str) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_gate_case.py"
    test.write_text("import pytest\n\n" + body)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-c", str(tmp_path / "none.ini"), "--rootdir", str(tmp_path),
         "-p", "tests.skip_gate", "-p", "no:cacheprovider", *flags, str(test)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def test_a_skip_off_the_list_fails_the_run_and_is_named(tmp_path: Path) -> None:
    (tmp_path / "none.ini").write_text("[pytest]\n")
    body = "def test_skips():\n    pytest.skip('tool missing')\n\ndef test_passes():\n    pass\n"
    gated = _run(tmp_path, body, "--fail-on-skip")
    assert gated.returncode == 1, gated.stdout
    assert "unexpected skip: test_gate_case.py::test_skips: Skipped: tool missing" in gated.stdout
    assert "skip gate: 1 skipped, 1 not on the allow-list" in gated.stdout
    assert _run(tmp_path, body).returncode == 0  # without the flag, a skip is only reported


def test_a_module_skipped_at_import_counts_too(tmp_path: Path) -> None:
    (tmp_path / "none.ini").write_text("[pytest]\n")
    gated = _run(tmp_path, "pytest.importorskip('no_such_module_here')\n", "--fail-on-skip")
    assert gated.returncode != 0, gated.stdout
    assert "skip gate: 1 skipped, 1 not on the allow-list" in gated.stdout
