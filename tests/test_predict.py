"""``fineserve predict`` against a real server: tables, JSON, stdin, and one-line errors."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fineserve.predict import main
from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_models
from tests.server.running import RunningServer

ROOT = Path(__file__).resolve().parent.parent
IMAGE_LABELS = {f"class_{i}" for i in range(10)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = publish_tiny_models(tmp_path_factory.mktemp("predict") / "models")
    with RunningServer(repository, metrics_port=-1) as running:
        yield running


@pytest.fixture
def png(tmp_path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(
        0, 255, (TINY_IMAGE_SIZE * 4, TINY_IMAGE_SIZE * 4, 3), np.uint8
    )
    path = tmp_path / "cat.png"
    Image.fromarray(pixels).save(path)
    return path


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_an_image_gets_its_top_k_as_a_table(server: RunningServer, png: Path, capsys) -> None:
    code, out, err = _predict(
        capsys, "--url", server.target, "--model", "tiny-image", "--top-k", "3", str(png)
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(png) and len(lines) == 4
    ranks = [line.split() for line in lines[1:]]
    assert [r[0] for r in ranks] == ["1", "2", "3"]
    assert {r[1] for r in ranks} <= IMAGE_LABELS
    scores = [float(r[2]) for r in ranks]
    assert scores == sorted(scores, reverse=True)


def test_json_for_scripts_holds_each_input_with_its_labels(server: RunningServer, png: Path, capsys) -> None:
    code, out, _ = _predict(
        capsys, "--url", server.target, "--model", "tiny-image", "--json", "--top-k", "2", str(png), str(png)
    )
    assert code == 0
    rows = json.loads(out)
    assert [row["input"] for row in rows] == [str(png), str(png)]
    assert all(len(row["labels"]) == 2 and row["labels"][0]["label"] in IMAGE_LABELS for row in rows)
    assert rows[0]["labels"] == rows[1]["labels"]  # the same image twice: the same answer


def test_texts_get_a_label_and_score_each(server: RunningServer, capsys) -> None:
    code, out, err = _predict(capsys, "--url", server.target, "--model", "tiny-text", "a warm film", "dull")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["label", "score", "text"]
    assert [row.split(maxsplit=2)[2] for row in rows] == ["a warm film", "dull"]
    assert all(row.split()[0] in ("negative", "positive") for row in rows)


def test_texts_from_stdin_one_a_line(server: RunningServer, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("first text\n\nsecond text\n"))
    code, out, _ = _predict(capsys, "--url", server.target, "--model", "tiny-text", "--json", "-")
    assert code == 0
    rows = json.loads(out)
    assert [row["input"] for row in rows] == ["first text", "second text"]
    assert all(len(row["scores"]) == 2 for row in rows)


def test_an_unknown_model_names_the_served_ones(server: RunningServer, capsys) -> None:
    code, out, err = _predict(capsys, "--url", server.target, "--model", "nope", "text")
    assert (code, out) == (2, "")
    assert err == "fineserve predict: the server has no model 'nope' (models: tiny-image, tiny-text)\n"


def test_a_missing_image_file_is_one_line(server: RunningServer, tmp_path: Path, capsys) -> None:
    code, _, err = _predict(capsys, "--url", server.target, "--model", "tiny-image", str(tmp_path / "no.jpg"))
    assert code == 2
    assert err == f"fineserve predict: cannot read image '{tmp_path / 'no.jpg'}': No such file or directory\n"


def test_a_refused_call_reports_the_status(server: RunningServer, tmp_path: Path, capsys) -> None:
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    code, _, err = _predict(capsys, "--url", server.target, "--model", "tiny-image", str(not_an_image))
    assert code == 1
    assert err.startswith("fineserve predict: INVALID_ARGUMENT: ") and err.count("\n") == 1


def test_bad_arguments_are_refused_before_calling(capsys) -> None:
    code, _, err = _predict(capsys, "--url", "localhost:1", "--model", "m", "--top-k", "0", "x")
    assert (code, err) == (2, "fineserve predict: --top-k must be at least 1\n")


def test_no_server_is_one_line_naming_the_address(capsys) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
    code, _, err = _predict(capsys, "--url", url, "--timeout", "5", "--model", "m", "x")
    assert code == 1
    assert err.startswith(f"fineserve predict: no server answering at {url} (UNAVAILABLE: ")
    assert err.count("\n") == 1


def test_the_shell_command_end_to_end(server: RunningServer) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fineserve", "predict", "--url", server.target, "--model", "tiny-text",
         "--json", "a warm film"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["input"] == "a warm film" and row["label"] in ("negative", "positive")
