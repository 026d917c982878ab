"""``fineserve train rank``: candidates scored end to end on small real data, and one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fineserve.training.datasets import fashion_mnist
from fineserve.training.errors import ConfigError, ScoringError
from fineserve.training.rank import Candidate, Outputs, main, parse_candidate, scores
from tests.training.conftest import NEGATIVE, POSITIVE

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"logme", "leep", "probe_accuracy", "seconds", "examples"}


def run_rank(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FINESERVE_DATA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fineserve", "train", "rank", *args, "--no-progress", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 Fashion-MNIST training images, 20 per class, as an image folder."""
    tmp = tmp_path_factory.mktemp("fashion")
    raw = fashion_mnist(tmp / "cache")
    assert raw.images is not None
    root = tmp / "images"
    labels = raw.labels.numpy()
    for k, name in enumerate(raw.names):
        folder = root / f"{k}-{name.replace('/', '-')}"
        folder.mkdir(parents=True)
        for i in np.flatnonzero(labels == k)[:20]:
            Image.fromarray(raw.images[i, 0].numpy()).save(folder / f"{i}.png")
    return root


def test_rank_scores_pretrained_and_random_lite0_on_fashion(fashion_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "rank.json"
    pretrained, random = "efficientnet-lite0@64", "efficientnet-lite0+random@64"
    done = run_rank(
        "--data", str(fashion_folder), "--candidates", f"{pretrained},{random}", "--json", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert list(result) == [pretrained, random]
    assert all(set(row) == KEYS for row in result.values())
    assert all(row["examples"] == 200 for row in result.values())  # the whole folder (< --samples)
    assert result[random]["leep"] is None  # random weights: no source head to read
    leep = result[pretrained]["leep"]
    # LEEP is an average log-likelihood: between log(1/10), what a head that says nothing gets
    # on 10 balanced classes, and 0.
    assert math.log(0.1) < leep < 0
    for row in result.values():
        assert 0.0 <= row["probe_accuracy"] <= 1.0 and row["seconds"] > 0
    # ImageNet features transfer: pretrained beats the same network with random weights.
    assert result[pretrained]["logme"] > result[random]["logme"]
    assert result[pretrained]["probe_accuracy"] > result[random]["probe_accuracy"]
    header, *rows = done.stdout.splitlines()[1:]
    assert header.split() == ["candidate", "LogME", "LEEP", "probe", "acc", "seconds"]
    assert [row.split()[0] for row in rows] == [pretrained, random]
    assert rows[1].split()[2] == "-"  # LEEP of the random network


def test_rank_scores_text_candidates_from_a_csv(tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(100):
            words = POSITIVE if i % 2 else NEGATIVE
            # Distinct texts: with duplicates the features could fit the labels exactly (no LogME).
            writer.writerow(
                [
                    f"review {i}: the film was {words[i % 8]} and {words[(i // 2) % 8]}",
                    "pos" if i % 2 else "neg",
                ]
            )
    out = tmp_path / "rank.json"
    done = run_rank(
        "--data", str(data), "--candidates", "minilm-l6:3,minilm-l6:3+random", "--max-length", "16",
        "--json", str(out), tmp_path=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert list(result) == ["minilm-l6:3", "minilm-l6:3+random"]
    assert all(set(row) == KEYS and row["leep"] is None for row in result.values())  # no source head
    # One word decides each label: pretrained or random, a probe on token features separates them.
    # LogME is not compared: on this word-list task it favours the random network, and on real
    # reviews the 3-layer cut is a weak candidate too (docs/training.md).
    assert [row["probe_accuracy"] for row in result.values()] == [1.0, 1.0]


def test_candidate_syntax() -> None:
    assert parse_candidate("efficientnet-lite1@224") == Candidate(
        "efficientnet-lite1@224", "efficientnet-lite1", image_size=224
    )
    assert parse_candidate("efficientnet-lite0+random@64") == Candidate(
        "efficientnet-lite0+random@64", "efficientnet-lite0", pretrained=False, image_size=64
    )
    assert parse_candidate("minilm-l6:3+random") == Candidate(
        "minilm-l6:3+random", "minilm-l6", pretrained=False, num_layers=3
    )
    for bad, message in (
        ("minilm-l6@224", "@SIZE is for image"),
        ("efficientnet-lite0:3", ":LAYERS is for text"),
        ("efficientnet-lite0@64@96", "given twice"),
        ("efficientnet-lite0+pretrained", "cannot read"),
        ("efficientnet-lite0@8", "32..1024"),
        ("minilm-l6:7", "has 6 encoder layers"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_candidate(bad)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main([*argv, "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def write_images(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_unknown_backbone_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, ["--data", "digits", "--candidates", "efficientnet-lite0,resnet50"])
    assert "unknown backbone 'resnet50'" in line and "minilm-l6" in line


def test_one_class_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Two class folders, one of them empty: the data hold one class.
    root = write_images(tmp_path / "images", {"cats": 3, "dogs": 0})
    line = one_line_error(capsys, ["--data", str(root), "--candidates", "efficientnet-lite0@32"])
    assert "1 class" in line
    data = tmp_path / "one.csv"
    data.write_text("text,label\ngood,pos\nfine,pos\n")
    line = one_line_error(capsys, ["--data", str(data), "--candidates", "minilm-l6"])
    assert "at least 2 distinct labels" in line


def test_fewer_examples_than_classes_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = one_line_error(
        capsys, ["--data", "digits", "--samples", "5", "--candidates", "efficientnet-lite0"]
    )
    assert "fewer examples (5) than classes (10)" in line
    root = write_images(tmp_path / "images", {"a": 1, "b": 1, "c": 0})
    line = one_line_error(capsys, ["--data", str(root), "--candidates", "efficientnet-lite0@32"])
    assert "fewer examples (2) than classes (3)" in line


def test_mismatched_candidate_and_unknown_data_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, ["--data", "digits", "--samples", "20", "--candidates", "minilm-l6"])
    assert "reads texts" in line and "images" in line
    line = one_line_error(capsys, ["--data", "no-such-set", "--candidates", "minilm-l6"])
    assert "no-such-set" in line and "rotten-tomatoes" in line


def test_nan_features_are_refused() -> None:
    features = np.ones((4, 3))
    features[2, 1] = np.nan
    with pytest.raises(ScoringError, match=r"NaN or infinite values \(1 of 4 examples\)"):
        scores(Outputs(features, None), np.array([0, 1, 0, 1]))
