"""``fineserve export``: one-line ``error: ...`` messages and a non-zero exit for expected failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fineserve.export.__main__ import main
from tests.export.graphs import foreign_image_graph, tiny_image_reference


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fineserve.export", *args], capture_output=True, text=True, timeout=120
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
    (tmp_path / "afile").write_text("not a run")
    line = _one_error_line(
        _cli("checkpoint", str(tmp_path / "afile"), "--repository", str(tmp_path), "--name", "m")
    )
    assert "is a file, not a run folder" in line


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
    from fineserve.export.contract import ImagePreprocessing
    from fineserve.export.examples import read_examples

    read = read_examples(
        folder,
        "image-classification",
        ["a", "b", "c"],
        image=ImagePreprocessing(8, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    )
    np.save(tmp_path / "reference.npy", tiny_image_reference(read))
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


FINITE = "must be a finite number in"
FORGES = "(control and bidirectional characters are not allowed)"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--mean", "nan,0.5,0.5"], "error: --mean: must be finite, got nan"),
        (["--mean", "0.5,0.5,2"], "error: --mean: must be a finite number in [0.0, 1.0], got 2.0"),
        (["--std", "inf,inf,inf"], "error: --std: must be finite, got inf"),
        (["--std", "0.5,1e-300,0.5"], "error: --std: must be a finite number in [0.001, 10.0], got 1e-300"),
        (
            ["--crop-fraction", "0.001"],
            "error: --crop-fraction: must be a finite number in [0.25, 1.0], got 0.001",
        ),
        (
            ["--labels", "a,\x1b[31mb,c"],
            f"error: --labels[1]: '\\x1b[31mb' holds '\\x1b' {FORGES}",
        ),
        (
            ["--labels", "a,b\u202ec,d"],
            f"error: --labels[1]: 'b\\u202ec' holds '\\u202e' {FORGES}",
        ),
    ],
)
def test_preprocessing_and_labels_out_of_contract_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    """These used to publish a version that fails (NaN mean, infinite std) or refuses ordinary
    images (a crop of 0.001) at the server, or serves labels that forge text on clients' screens."""
    onnx.save(foreign_image_graph(), tmp_path / "g.onnx")
    repository = tmp_path / "r"
    args = ["wrap", str(tmp_path / "g.onnx"), "--repository", str(repository), "--name", "m"]
    args += ["--task", "image-classification", "--image-size", "8", "--labels", "a,b,c", *option]
    assert _in_process(capsys, *args) == message
    assert not (repository / "m").exists()


@pytest.mark.parametrize("command", ["checkpoint", "wrap", "defaults"])
def test_every_option_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--repository" in text
    from fineserve.export.__main__ import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"


def _run_copy(source: Path, dst: Path, **metadata_changes: object) -> Path:
    """A copy of a run folder with some metadata.json fields replaced."""
    import json

    dst.mkdir()
    for file in source.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    meta = json.loads((source / "metadata.json").read_text())
    meta.update(metadata_changes)
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize(
    "changes",
    [
        {"finished": False},  # written by an improved epoch of a run that then stopped
        {"metrics": {}},  # metadata from before "finished" existed: no test metrics, not finished
    ],
    ids=["finished-false", "legacy-without-test-metrics"],
)
def test_unfinished_run_is_refused(
    image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, object]
) -> None:
    run = _run_copy(image_run, tmp_path / "run", **changes)
    repository = tmp_path / "r"
    line = _in_process(capsys, "checkpoint", str(run), "--repository", str(repository), "--name", "m")
    assert "did not finish" in line and "resumes from last.pt" in line and str(run) in line
    assert not (repository / "m").exists()


def _damage(run: Path, case: str) -> None:
    best, meta = run / "best.pt", run / "metadata.json"
    if case == "empty-best":
        best.write_bytes(b"")
    elif case == "garbage-best":
        best.write_bytes(b"this is not a torch checkpoint" * 4)
    elif case == "truncated-best":
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    elif case == "metadata-not-utf8":
        meta.write_bytes(b"\xff\xfe" + meta.read_bytes())
    elif case == "image-size-abc":
        meta.write_text(meta.read_text().replace('"image_size": 64', '"image_size": "abc"'))
    elif case == "temperature-hot":
        meta.write_text(meta.read_text().replace('"temperature": 1.3', '"temperature": "hot"'))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty-best", "best.pt: is empty"),
        ("garbage-best", "best.pt: unreadable, truncated or not a torch checkpoint"),
        ("truncated-best", "best.pt: unreadable, truncated or not a torch checkpoint"),
        ("metadata-not-utf8", "metadata.json: not a readable JSON file"),
        ("image-size-abc", "model_args.image_size must be an integer >= 32, got 'abc'"),
        ("temperature-hot", "temperature must be a number, got 'hot'"),
    ],
)
def test_damaged_run_files_are_one_line_errors(
    image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    run = _run_copy(image_run, tmp_path / "run")
    _damage(run, case)
    line = _in_process(capsys, "checkpoint", str(run), "--repository", str(tmp_path / "r"), "--name", "m")
    assert message in line and "does not fit" not in line


def test_repository_that_is_a_file_is_refused(
    image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "models"
    a_file.write_text("not a folder")
    checkpoint = ["checkpoint", str(image_run), "--name", "m", "--repository"]
    assert "is a file, not a folder" in _in_process(capsys, *checkpoint, str(a_file))
    assert f"{a_file} is a file" in _in_process(capsys, *checkpoint, str(a_file / "below"))
    line = _in_process(capsys, "defaults", "--repository", str(a_file), "--runs-dir", str(tmp_path / "runs"))
    assert "--repository" in line and "is a file" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size 0: must be in 1..1024"),
        (["--max-batch-size", "100000"], "--max-batch-size 100000: must be in 1..1024"),
        (["--max-examples", "-1"], "--max-examples -1: must be in 1..10000"),
        (["--max-examples", "100000"], "--max-examples 100000: must be in 1..10000"),
    ],
)
def test_defaults_checks_its_options_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    runs = tmp_path / "runs"
    line = _in_process(
        capsys, "defaults", "--repository", str(tmp_path / "r"), "--runs-dir", str(runs), *options
    )
    assert message in line
    assert not runs.exists() and not (tmp_path / "r").exists()  # nothing trained, nothing exported


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--opset", "999"], "opset 999: the torchscript exporter takes opsets 13 to 20"),
        (["--opset", "12"], "opset 12: the torchscript exporter takes opsets 13 to 20"),
        (["--exporter", "dynamo", "--opset", "17"], "opset 17: the dynamo exporter takes opsets 18 to 23"),
        (["--max-batch-size", "100000"], "--max-batch-size 100000: must be in 1..1024"),
        (["--max-examples", "-5"], "--max-examples -5: must be in 1..10000"),
    ],
)
def test_checkpoint_checks_its_options_before_any_work(
    image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    repository = tmp_path / "r"
    line = _in_process(
        capsys, "checkpoint", str(image_run), "--repository", str(repository), "--name", "m", *options
    )
    assert message in line
    assert not repository.exists()


def test_opset_out_of_range_prints_one_line_not_the_graph(image_run: Path, tmp_path: Path) -> None:
    # A new interpreter: the exporter's graph dump goes straight to the process's stderr.
    done = _cli(
        "checkpoint", str(image_run), "--repository", str(tmp_path / "r"), "--name", "m", "--opset", "0"
    )
    assert "opset 0: the torchscript exporter takes opsets" in _one_error_line(done)
    assert done.stdout == ""


def test_labels_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(foreign_image_graph(), tmp_path / "g.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_bytes("caf\u00e9\nth\u00e9\n".encode("latin-1"))
    line = _in_process(
        capsys,
        *("wrap", str(tmp_path / "g.onnx"), "--repository", str(tmp_path / "r"), "--name", "m"),
        *("--task", "image-classification", "--image-size", "8", "--labels", str(labels)),
    )
    assert f"--labels {labels}: not UTF-8 text" in line


@pytest.mark.parametrize(
    ("tokenizer_bytes", "options", "message"),
    [
        (b"", [], "is empty"),
        (b'{"version": "1.0", "model": 42}', [], "is not a readable tokenizers JSON"),
        (None, ["--max-length", "0"], "--max-length 0: must be in 2..8192"),
    ],
    ids=["empty-tokenizer", "invalid-tokenizer", "max-length-0"],
)
def test_wrap_text_refuses_a_tokenizer_or_length_the_server_cannot_use(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tokenizer_bytes: bytes | None,
    options: list[str],
    message: str,
) -> None:
    from tests.fixtures import tiny_text_graph, tiny_vocab, write_tiny_tokenizer

    onnx.save(tiny_text_graph(len(tiny_vocab())), tmp_path / "text.onnx")
    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer.json")
    if tokenizer_bytes is not None:
        tokenizer.write_bytes(tokenizer_bytes)
    repository = tmp_path / "r"
    line = _in_process(
        capsys,
        *("wrap", str(tmp_path / "text.onnx"), "--repository", str(repository), "--name", "s"),
        *("--task", "text-classification", "--labels", "negative,positive", "--tokenizer", str(tokenizer)),
        *options,
    )
    assert message in line
    if tokenizer_bytes is not None:
        assert str(tokenizer) in line
    assert not repository.exists()
