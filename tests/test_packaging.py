"""Packaging: one import name, a lean serving install, and every command answers --help."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = {"torch", "transformers", "tensorflow", "jax", "onnxruntime-gpu"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_serve_extra_declares_no_training_dependencies() -> None:
    serve = _names(PYPROJECT["project"]["optional-dependencies"]["serve"])
    assert not serve & HEAVY, serve & HEAVY


def test_gpu_extra_swaps_onnxruntime_for_the_gpu_build() -> None:
    gpu = _names(PYPROJECT["project"]["optional-dependencies"]["gpu"])
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert not gpu & (HEAVY - {"onnxruntime-gpu"})


@pytest.mark.slow
def test_serve_install_resolves_without_torch(tmp_path: Path) -> None:
    """Resolves `fineserve[serve]` from scratch (what a serving image installs) and checks that
    nothing in the whole dependency tree is torch or transformers."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), f"{ROOT}[serve]"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime" in installed and "grpcio" in installed
    assert not installed & HEAVY, installed & HEAVY


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel `pip wheel --no-deps .` builds from a copy of this checkout (setuptools leaves a
    build/ folder in the source tree, whose stale files a later build would pack)."""
    source = tmp_path_factory.mktemp("source") / "fineserve"

    def skip(folder: str, names: list[str]) -> set[str]:
        # At the top: what a fresh clone lacks (dot-folders, build output, models, runs).
        top = {
            n
            for n in names
            if n.startswith(".") or n.endswith(".egg-info") or n in {"build", "dist", "models", "runs"}
        }
        return (top if Path(folder) == ROOT else set()) | {n for n in names if n == "__pycache__"}

    shutil.copytree(ROOT, source, symlinks=True, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    [built] = out.glob("fineserve-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_installs_one_import_name(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fineserve"}, top_level
    [declared] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(declared).decode().split() == ["fineserve"]


def test_wheel_holds_every_part_and_no_results_or_tests(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for needed in (
        "fineserve/cli.py",
        "fineserve/client.py",
        "fineserve/files.py",  # shared by the server and training
        "fineserve/server/app.py",
        "fineserve/server/pb/inference/grpc_service_pb2.py",
        "fineserve/server/pb/py.typed",
        "fineserve/training/configs/fashion.yaml",
        "fineserve/export/contract.py",
        "fineserve/bench/suite.py",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("fineserve/bench/results/", "tests/"))]


def test_console_scripts_point_into_the_package() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["fineserve"] == "fineserve.cli:main"
    for alias, part in [("fineserve-serve", "server"), ("fineserve-train", "training"),
                        ("fineserve-export", "export"), ("fineserve-bench", "bench")]:  # fmt: skip
        assert scripts[alias] == f"fineserve.{part}.__main__:main"


def test_the_client_extra_and_imports_stay_small() -> None:
    """A calling service installs `fineserve[client]`: the client and `predict` import no runtime."""
    client = _names(PYPROJECT["project"]["optional-dependencies"]["client"])
    assert client == {"grpcio", "protobuf"}
    probe = (
        "import sys, fineserve.client, fineserve.predict; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnxruntime', 'torch', 'PIL', 'tokenizers', "
        "'pydantic', 'prometheus_client', 'yaml'}))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
