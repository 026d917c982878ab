"""``fineserve/files.py``: whole-file writes, shared by the server's pool folder and training's reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from fineserve.files import write_atomically, write_text_atomically


def test_a_write_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "ready"
    write_text_atomically(path, "123")
    write_text_atomically(path, "45")
    assert path.read_text() == "45"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "trials.csv"
    path.write_text("old")

    def half_then_fail(temporary: Path) -> None:
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials.csv"]
