"""``bench/gpu_cuda_shm.py`` without a usable CUDA runtime (named by ``--cuda-runtime-library``, so
on any host, GPU or not): it refuses clearly, before dialling the server, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fineserve.bench import gpu_cuda_shm
from fineserve.server.cuda_runtime import CudaRuntime
from fineserve.server.errors import DeviceUnavailable

NO_LIBCUDART = "/nonexistent/libcudart.so"


def test_refuses_without_a_cuda_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DeviceUnavailable) as here:
        CudaRuntime.load(NO_LIBCUDART)
    assert here.value.message == (
        "CUDA shared memory needs a CUDA device: the libcudart named by cuda_runtime_library does not load"
    )
    out = tmp_path / "cuda-shm.json"
    argv = ["--target", "127.0.0.1:1", "--model", "fashion", "--out", str(out)]
    assert gpu_cuda_shm.main([*argv, "--cuda-runtime-library", NO_LIBCUDART]) == 2
    assert f"gpu_cuda_shm: refused: {here.value.message}" in capsys.readouterr().err
    assert not out.exists()
