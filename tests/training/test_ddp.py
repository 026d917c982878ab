"""The same CLI command trains data-parallel under torchrun: 2 CPU processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.training.conftest import TINY_IMAGE

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_gloo_processes(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_IMAGE, "strategy": "partial", "threads": 1, "device": "cpu"}))
    run = tmp_path / "run"
    env = {**os.environ, "FINESERVE_DATA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "fineserve.training", str(recipe), "--output-dir", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["metrics"]["world_size"] == 2
    # 64 examples / 2 processes / batch 32 = 1 step per epoch (not 2 as in a single process)
    assert meta["metrics"]["optimizer_steps"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
