"""The raw datasets: each loader's examples, labels and one-line errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fineserve.training.datasets import (
    FASHION_SYSTEM_DIR,
    fashion_mnist_dir,
    image_folder,
    rotten_tomatoes,
    text_file,
)
from fineserve.training.errors import DatasetError


def test_rotten_tomatoes_drops_plot_rows_and_duplicates() -> None:
    raw = rotten_tomatoes()
    assert raw.names == ["rotten", "fresh"] and raw.texts is not None
    assert len(set(raw.texts)) == len(raw.texts)
    assert 12_000 < len(raw) < 12_808  # 7,403 fresh + 5,405 rotten, less duplicate texts


def test_text_file_csv_and_jsonl(tmp_path: Path) -> None:
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("sentence,tag\nnice one,pos\nbad one,neg\n")
    raw = text_file(csv_file, "sentence", "tag")
    assert raw.names == ["neg", "pos"] and raw.labels.tolist() == [1, 0]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "label": 1}) + "\n")
    with pytest.raises(DatasetError, match="at least 2 distinct labels"):
        text_file(jsonl, "text", "label")
    with pytest.raises(DatasetError, match="needs 'text' and 'missing'"):
        text_file(jsonl, "text", "missing")


def test_image_folder_reads_one_class_per_folder(tmp_path: Path) -> None:
    for name, value in (("cats", 30), ("dogs", 200)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), value + i, np.uint8)).save(tmp_path / name / f"{i}.png")
    raw = image_folder(tmp_path, size=16)
    assert raw.names == ["cats", "dogs"] and raw.images is not None
    assert raw.images.shape == (6, 3, 16, 16) and raw.images.dtype == torch.uint8
    (tmp_path / "dogs" / "broken.png").write_text("not an image")
    with pytest.raises(DatasetError, match="not a readable image"):
        image_folder(tmp_path, size=16)


@pytest.mark.skipif(FASHION_SYSTEM_DIR.is_dir(), reason="the Debian package is installed here")
def test_fashion_fallback_explains_a_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An apt-get that fails the way it does on a machine whose package lists are empty.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package dataset-fashion-mnist' >&2\nexit 100\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DatasetError, match="apt-get update") as info:
        fashion_mnist_dir(tmp_path / "cache")
    assert "Unable to locate package" in str(info.value)
