"""``python -m export``: one-line ``error: ...`` messages and a non-zero exit for expected failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.__main__ import main
from tests.export.test_wrap import foreign_image_graph


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], capture_output=True, text=True, timeout=120
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_missing_checkpoint(tmp_path: Path) -> None:
    line = _one_error_line(
        _cli("checkpoint", str(tmp_path / "nope"), "--repository", str(tmp_path), "--name", "m")
    )
    assert "does not exist" in line


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Same as ``_cli`` without a new interpreter (torch imports once per test session)."""
    assert main(list(args)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _in_process(
        capsys, "checkpoint", str(tmp_path), "--repository", str(tmp_path / "r"), "--name", "m"
    )
    assert "metadata.json" in line


def test_unsupported_backbone_in_checkpoint(
    image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((image_run / "best.pt").read_bytes())
    meta = (image_run / "metadata.json").read_text().replace('"efficientnet-lite0"', '"resnet-50"')
    (run / "metadata.json").write_text(meta)
    line = _in_process(capsys, "checkpoint", str(run), "--repository", str(tmp_path / "r"), "--name", "m")
    assert "unsupported model" in line and "resnet-50" in line


def test_unsupported_task_in_wrap(tmp_path: Path) -> None:
    onnx.save(foreign_image_graph(), tmp_path / "g.onnx")
    line = _one_error_line(
        _cli(
            "wrap",
            str(tmp_path / "g.onnx"),
            "--repository",
            str(tmp_path / "r"),
            "--name",
            "m",
            "--task",
            "object-detection",
            "--labels",
            "a,b,c",
        )
    )
    assert "unsupported task 'object-detection'" in line


def test_failed_check_names_the_check_and_publishes_nothing(tmp_path: Path) -> None:
    onnx.save(foreign_image_graph(scale=1.01), tmp_path / "damaged.onnx")
    folder = tmp_path / "examples"
    folder.mkdir()
    # Real image files, so this runs the CLI's own example reading.
    from PIL import Image

    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    from export.contract import ImagePreprocessing
    from export.examples import read_examples
    from tests.export.test_validate import _reference

    read = read_examples(
        folder,
        "image-classification",
        ["a", "b", "c"],
        image=ImagePreprocessing(8, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    )
    np.save(tmp_path / "reference.npy", _reference(read))
    repository = tmp_path / "r"

    def wrap(graph: Path) -> subprocess.CompletedProcess[str]:
        # The same examples and reference logits for every graph.
        return _cli(
            "wrap",
            str(graph),
            "--repository",
            str(repository),
            "--name",
            "m",
            "--task",
            "image-classification",
            "--labels",
            "a,b,c",
            "--image-size",
            "8",
            "--mean",
            "0.5,0.5,0.5",
            "--std",
            "0.5,0.5,0.5",
            "--examples",
            str(folder),
            "--reference-logits",
            str(tmp_path / "reference.npy"),
        )

    line = _one_error_line(wrap(tmp_path / "damaged.onnx"))
    assert "check failed (ValueMismatchError)" in line and "nothing was published" in line
    assert list((repository / "m").iterdir()) == []
    # The intact graph with the same examples and reference passes and is published.
    onnx.save(foreign_image_graph(), tmp_path / "intact.onnx")
    ok = wrap(tmp_path / "intact.onnx")
    assert ok.returncode == 0, ok.stderr
    assert (repository / "m" / "1" / "model.json").is_file()


def test_bad_option_values_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(foreign_image_graph(), tmp_path / "g.onnx")
    base = [
        "wrap",
        str(tmp_path / "g.onnx"),
        "--repository",
        str(tmp_path / "r"),
        "--name",
        "m",
        "--task",
        "image-classification",
    ]
    assert main([*base, "--labels", "a"]) == 1
    assert "need at least 2 labels" in capsys.readouterr().err
    assert main([*base, "--labels", "a,b,c", "--image-size", "big"]) == 1
    assert "--image-size 'big'" in capsys.readouterr().err
    assert main([*base, "--labels", "a,b,c", "--image-size", "8", "--variants", "fp32,bf16"]) == 1
    assert "--variants" in capsys.readouterr().err
    assert main(["defaults", "--repository", str(tmp_path / "r"), "--only", "cifar"]) == 1
    assert "unknown default model 'cifar'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["checkpoint", "wrap", "defaults"])
def test_every_option_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--repository" in text
    from export.__main__ import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
