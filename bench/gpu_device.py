"""What ``fineserve bench gpu`` needs of the machine: the device's name, the GPU's utilisation
while a figure is measured (NVML, or ``nvidia-smi`` where pynvml is missing), and a ResNet-50 with
random weights to compare with the reference figures of ../shared/GPU.md."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESNET_SIZE = 224
_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=name,driver_version,utilization.gpu,memory.used",
    "--format=csv,noheader,nounits",
]


def describe_device(device: str) -> dict[str, Any]:
    """The machine a result was measured on: the GPU's name and driver on CUDA, and onnxruntime's
    version and providers. On CPU it says cpu, whatever GPU the host may have."""
    import onnxruntime as ort

    info: dict[str, Any] = {
        "device": device,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device == "cuda":
        sample = _smi()
        if sample is not None:
            info["gpu"], info["driver"] = sample[0], sample[1]
    return info


def cuda_library_env() -> dict[str, str]:
    """``LD_LIBRARY_PATH`` for a server process on a machine whose CUDA and cuDNN libraries come
    as torch's nvidia-* pip packages (the lent GPU machine): onnxruntime-gpu loads them when it
    makes its first CUDA session, and the server, unlike this process, never imports torch.
    Empty where those packages are absent (the Docker image has the libraries on the loader path)."""
    try:
        import nvidia  # the namespace of the nvidia-* wheels
    except ImportError:
        return {}
    folders = [
        str(lib)
        for base in nvidia.__path__
        for pattern in ("*/lib", "*/*/lib")
        for lib in sorted(Path(base).glob(pattern))
    ]
    existing = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    return {"LD_LIBRARY_PATH": ":".join([*folders, *existing])} if folders else {}


def _smi() -> list[str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        line = subprocess.run(_SMI_QUERY, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    fields = [f.strip() for f in line.splitlines()[0].split(",")] if line.strip() else []
    return fields if len(fields) == 4 else None


def _nvml_reader() -> Callable[[], tuple[float, float]] | None:
    """(utilisation %, memory used MiB) of GPU 0 through NVML, or None where pynvml is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except pynvml.NVMLError:
        return None

    def read() -> tuple[float, float]:
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return float(rates.gpu), memory.used / (1 << 20)

    return read


def _smi_reader() -> tuple[float, float] | None:
    fields = _smi()
    return (float(fields[2]), float(fields[3])) if fields else None


class GpuUtilisation:
    """Samples the GPU's utilisation in a thread, every ``interval`` seconds, while ``window()``
    is open; ``source`` says how (nvml, nvidia-smi, or none on a machine without a GPU)."""

    def __init__(self, device: str, interval: float = 0.1) -> None:
        self._read: Callable[[], tuple[float, float] | None] | None = None
        self.source = "none"
        if device == "cuda":
            nvml = _nvml_reader()
            if nvml is not None:
                self._read, self.source = nvml, "nvml"
            elif _smi_reader() is not None:
                self._read, self.source = _smi_reader, "nvidia-smi"
                interval = max(interval, 0.25)  # each sample is a process
        self._interval = interval

    @contextlib.contextmanager
    def window(self) -> Iterator[dict[str, Any]]:
        """Yields a dict that holds, once the block ends, the mean and peak utilisation (%) and
        the peak memory used (MiB) over the block; empty without a GPU."""
        summary: dict[str, Any] = {}
        if self._read is None:
            yield summary
            return
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            assert self._read is not None
            while not stop.is_set():
                value = self._read()
                if value is not None:
                    samples.append(value)
                stop.wait(self._interval)

        thread = threading.Thread(target=sample, name="gpu-utilisation", daemon=True)
        thread.start()
        try:
            yield summary
        finally:
            stop.set()
            thread.join()
            if samples:
                summary["gpu_util_mean_pct"] = sum(s[0] for s in samples) / len(samples)
                summary["gpu_util_peak_pct"] = max(s[0] for s in samples)
                summary["gpu_memory_peak_mib"] = max(s[1] for s in samples)
                summary["gpu_samples"] = len(samples)


def build_resnet(repository: Path, *, tiny: bool = False) -> Path:
    """``<repository>/resnet50/1``: torchvision's ResNet-50 with random weights (throughput does
    not depend on them) as fp32 ONNX plus its fp16 variant (fp32 inputs and outputs). ``tiny``:
    a three-layer convolution net of the same interface, for a run on a machine without torchvision."""
    import onnx
    import torch
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from fineserve.export.contract import ImagePreprocessing, ModelSpec, TensorSpec, Variant, write_model_spec

    version_dir = repository / "resnet50" / "1"
    if (version_dir / "model.json").is_file():
        return version_dir
    # A build cut short left a folder without model.json: built again from nothing.
    shutil.rmtree(version_dir, ignore_errors=True)
    version_dir.mkdir(parents=True)
    if tiny:
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 1000),
        )
    else:
        import torchvision

        net = torchvision.models.resnet50()
    fp32 = version_dir / "model.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice: it still exports a plain CNN exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net.eval(),
            (torch.randn(1, 3, RESNET_SIZE, RESNET_SIZE),),
            str(fp32),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    fp16 = version_dir / "model.fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
    spec = ModelSpec(
        name="resnet50",
        version=1,
        task="image-classification",
        labels=tuple(f"class_{i}" for i in range(1000)),
        inputs=(TensorSpec("pixel_values", "FP32", (-1, 3, RESNET_SIZE, RESNET_SIZE)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 1000)),),
        variants={
            "fp32": Variant("model.onnx", "fp32", fp32.stat().st_size),
            "fp16": Variant("model.fp16.onnx", "fp16", fp16.stat().st_size),
        },
        max_batch_size=256,
        image=ImagePreprocessing(
            height=RESNET_SIZE, width=RESNET_SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
        ),
        source={"note": "random weights" + (", tiny stand-in net" if tiny else ", torchvision resnet50")},
    )
    write_model_spec(version_dir, spec)
    return version_dir


def elapsed_since(start: float) -> float:
    return time.perf_counter() - start
