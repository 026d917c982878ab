"""Packaging: the serving install stays lean, and every console script answers --help."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = {"torch", "transformers", "tensorflow", "jax", "onnxruntime-gpu"}


def _names(requirements: list[str]) -> set[str]:
    import re

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


@pytest.mark.parametrize(
    ("script", "module"),
    [("fineserve-serve", "server"), ("fineserve-train", "training"), ("fineserve-export", "export"),
     ("fineserve-bench", "bench")],
)  # fmt: skip
def test_console_script_help(script: str, module: str) -> None:
    assert PYPROJECT["project"]["scripts"][script] == f"{module}.__main__:main"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
