"""``bench/gpu_cuda_shm.py`` on a host without CUDA (CI, the development machine): it refuses
clearly, before dialling the server, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fineserve.bench import gpu_cuda_shm
from fineserve.server.cuda_runtime import CudaRuntime
from fineserve.server.errors import DeviceUnavailable


def test_refuses_without_a_cuda_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DeviceUnavailable) as here:
        CudaRuntime.load()  # the premise: this host has no usable CUDA device
    out = tmp_path / "cuda-shm.json"
    argv = ["--target", "127.0.0.1:1", "--model", "fashion", "--out", str(out)]
    assert gpu_cuda_shm.main(argv) == 2
    assert f"gpu_cuda_shm: refused: {here.value.message}" in capsys.readouterr().err
    assert not out.exists()
