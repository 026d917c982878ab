"""onnxruntime sessions: which execution provider, which graph variant, and running a batch.

The provider is decided once, explicitly: CUDA asked for but not offered, or offered but failing
a one-node graph, is an error (``device=cuda``) or a logged, counted fallback (``device=auto``),
never a silent one; and after each session is made, ``session.get_providers()`` is checked,
because onnxruntime itself drops to CPU when a CUDA library is missing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fineserve.export.contract import ModelSpec, Variant
from fineserve.server import device_probe
from fineserve.server.config import Settings
from fineserve.server.threads import ORT_PREFIX, named

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = device_probe.CPU

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# onnxruntime's type strings -> numpy dtypes, for the types our graphs use.
_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class ProviderUnavailable(RuntimeError):
    """CUDA was required but onnxruntime cannot use it here."""


@dataclass(frozen=True)
class ProviderChoice:
    """The execution provider every session will use, and, when ``device=auto`` had to serve on
    CPU though onnxruntime offered CUDA, why (its startup probe failed); "" otherwise."""

    provider: str
    fallback_reason: str = ""


def cuda_options(settings: Settings) -> dict[str, Any]:
    """The CUDA provider options of every session (and of the startup probe)."""
    options: dict[str, Any] = {"cudnn_conv_algo_search": settings.cudnn_conv_algo_search}
    if settings.cuda_mem_limit_bytes:
        options["gpu_mem_limit"] = settings.cuda_mem_limit_bytes
    return options


def choose_provider(settings: Settings) -> ProviderChoice:
    """The execution provider every session will use, decided once at startup. CUDA counts only
    once a one-node graph has run on it (``device_probe``): onnxruntime-gpu offers it whatever
    the host has.

    Raises:
        ProviderUnavailable: ``device=cuda`` and onnxruntime has no CUDA provider, or its probe failed.
    """
    available = ort.get_available_providers()
    if settings.device == "cpu":
        return ProviderChoice(CPU)
    if CUDA not in available:
        if settings.device == "cuda":
            raise ProviderUnavailable(
                f"device=cuda but onnxruntime {ort.__version__} offers only {', '.join(available)}; "
                "install onnxruntime-gpu (the 'gpu' extra) or run with --device cpu"
            )
        offered = ", ".join(available)
        log.warning("CUDA execution provider not available (onnxruntime offers %s): serving on CPU", offered)
        return ProviderChoice(CPU)
    failure = device_probe.probe(CUDA, cuda_options(settings))
    if failure is None:
        return ProviderChoice(CUDA)
    if settings.device == "cuda":
        raise ProviderUnavailable(f"device=cuda but CUDA does not work here: {failure}")
    log.error("device=auto: CUDA does not work here, serving on CPU: %s", failure)
    return ProviderChoice(CPU, fallback_reason=failure)


def choose_variant(spec: ModelSpec, provider: str, settings: Settings) -> Variant:
    """The graph variant to serve for this provider and configuration (see ``Settings.precision``)."""
    if settings.precision != "auto":
        wanted = settings.precision
    elif provider == CUDA:
        wanted = "fp16"
    elif settings.prefer_int8_on_cpu:
        wanted = "int8"
    else:
        wanted = "fp32"
    if wanted in spec.variants:
        return spec.variants[wanted]
    fallback = "fp32" if "fp32" in spec.variants else sorted(spec.variants)[0]
    if settings.precision != "auto" or provider == CUDA:
        log.warning(
            "model %s version %d has no %s variant; serving %s", spec.name, spec.version, wanted, fallback
        )
    return spec.variants[fallback]


def session_options(
    intra_op_threads: int,
    inter_op_threads: int,
    *,
    spinning: bool,
    provider: str = CPU,
    graph_optimization: str = "all",
) -> ort.SessionOptions:
    """The onnxruntime session options the server uses (and the benchmarks' raw baseline).

    With ``spinning``, on the CPU provider, a run's threads spin between its operators instead of
    sleeping and being woken for each one, and stop the moment the run ends
    (``session.force_spinning_stop``), so no thread spins between batches on the cores the gRPC
    server needs. On CUDA a run's CPU threads mostly wait for the device: they never spin there,
    or they would spin through the device's whole run on cores image decoding could use.
    """
    spinning = spinning and provider == CPU
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = _GRAPH_LEVELS[graph_optimization]
    spin = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


@dataclass(frozen=True)
class Threads:
    """How one model version uses the CPU: batches that run at once, and threads inside each run."""

    instances: int
    intra_op: int  # 0: onnxruntime's own default


def cpu_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity (a container's cpuset), capped by a
    cgroup v2 CPU quota (a Kubernetes CPU limit), rounded down (at least 1): threads beyond the
    quota would only get the process throttled. Other cgroup layouts fall back to the affinity."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core counts
    cores = (len(affinity(0)) if affinity else os.cpu_count()) or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    try:
        return max(1, min(cores, int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return cores


def plan_threads(provider: str, instances: int, intra_op_threads: int) -> Threads:
    """Resolves ``intra_op_threads`` (0 = auto) for a model with ``instances`` instances.

    The instances share the version's one session, and so its one intra-op pool: a run works on
    its caller's thread plus whichever of the pool's ``intra_op_threads - 1`` workers are free. On
    CPU, auto sizes the pool so that all instances running at once keep every core busy exactly
    once: ``cores - instances + 1`` (so 1, no workers, with one instance per core). On CUDA the
    CPU threads matter little: onnxruntime decides.
    """
    if provider == CUDA or intra_op_threads:
        return Threads(instances, intra_op_threads)
    return Threads(instances, max(1, cpu_cores() - instances + 1))


@dataclass(frozen=True)
class InputMeta:
    """A graph input as the session reports it: shape entries are ints, or None when dynamic."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]


class ModelSession:
    """One onnxruntime session of one graph file, run on one provider.

    ``run`` is thread-safe (onnxruntime sessions are; several batches may run at once) and
    blocking: callers run it off the event loop. Inputs are cast to the dtypes the graph
    declares, so an fp16 graph with fp16 inputs takes the same float32 tensors as the fp32 graph.
    """

    def __init__(self, path: Path, provider: str, settings: Settings, intra_op_threads: int) -> None:
        options = session_options(
            intra_op_threads,
            settings.inter_op_threads,
            spinning=settings.intra_op_spinning,
            provider=provider,
            graph_optimization=settings.graph_optimization,
        )
        providers: list[Any] = [CPU]
        if provider == CUDA:
            providers = [(CUDA, cuda_options(settings)), CPU]
        # onnxruntime's intra-op workers start here and take this thread's name: ort:<model>.
        with named(f"{ORT_PREFIX}{path.parent.parent.name}"):
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        used = self.session.get_providers()
        if used[0] != provider:
            # onnxruntime falls back to CPU without raising when CUDA libraries are missing.
            raise ProviderUnavailable(
                f"{path}: asked for {provider}, onnxruntime gave {used[0]} (see its log)"
            )
        self.provider = provider
        self.path = path
        self.inputs = tuple(
            InputMeta(i.name, np.dtype(_ORT_DTYPES.get(i.type, np.float32)), _shape(i.shape))
            for i in self.session.get_inputs()
        )
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._use_io_binding = provider == CUDA and settings.io_binding

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch; returns every graph output as a host numpy array."""
        feed = {meta.name: np.ascontiguousarray(inputs[meta.name], dtype=meta.dtype) for meta in self.inputs}
        if self._use_io_binding:
            return self._run_bound(feed)
        outputs = self.session.run(list(self.output_names), feed)
        return {name: _as_float32(value) for name, value in zip(self.output_names, outputs, strict=True)}

    def _run_bound(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Outputs are allocated on the device and copied to the host once, after the run,
        # instead of onnxruntime's per-output host allocation on every call.
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        outputs = binding.copy_outputs_to_cpu()
        return {name: _as_float32(value) for name, value in zip(self.output_names, outputs, strict=True)}


def _shape(shape: Any) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def _as_float32(value: Any) -> np.ndarray:
    # fp16 graphs answer in float16; clients and the softmax get float32 either way.
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype == np.float16 else array
