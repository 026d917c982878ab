"""onnxruntime sessions: which execution provider, which graph variant, and running a batch.

The provider is decided once, explicitly: CUDA asked for but not offered, or offered but failing
a one-node graph, is an error (``device=cuda``) or a logged, counted fallback (``device=auto``),
never a silent one; and after each session is made, ``session.get_providers()`` is checked,
because onnxruntime itself drops to CPU when a CUDA library is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fineserve.export.contract import ModelSpec, TensorSpec, Variant
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


@dataclass(frozen=True)
class DataPath:
    """How a session's batches travel (resolved from the settings by ``plan_data_path``).

    ``io_binding``: inputs bound from host arrays, outputs bound on ``device`` and copied back once.
    ``fixed_buffers``: each input shape gets input and output buffers on ``device`` allocated once
    and reused, which CUDA graphs need (a captured graph replays on the addresses it was captured
    with). ``cuda_graph``: each such shape is captured once and replayed.
    """

    io_binding: bool = False
    device: str = "cpu"
    fixed_buffers: bool = False
    cuda_graph: bool = False
    conv_algo_search: str = "HEURISTIC"

    def describe(self) -> str:
        if not self.io_binding:
            return "session.run"
        held = ", fixed buffers per shape" if self.fixed_buffers else ""
        graphs = ", CUDA graphs" if self.cuda_graph else ""
        return f"IO binding on {self.device}{held}{graphs}"


def plan_data_path(
    settings: Settings, provider: str, *, padded: bool, fixed_shapes: bool
) -> tuple[DataPath, list[str]]:
    """The data path of a session on ``provider``: with ``padded`` batches (only a few batch
    sizes) and ``fixed_shapes`` (every input and output fixed past the batch axis). Also returns
    why a setting asked for is not used here, one line each, for the log.
    """
    notes: list[str] = []
    search = settings.cudnn_conv_algo_search
    if search == "auto":
        # Padded, each of the few shapes is searched once, at warmup; unpadded, every new batch
        # size would pay an exhaustive search in the middle of serving.
        search = "EXHAUSTIVE" if padded else "HEURISTIC"
    on_cuda = provider == CUDA
    binding = settings.io_binding == "on" or (settings.io_binding == "auto" and on_cuda)
    graph = settings.cuda_graph == "on" or (settings.cuda_graph == "auto" and on_cuda)
    if graph:
        missing = [
            why
            for why, lacking in (
                ("it runs on CUDA only", not on_cuda),
                ("batches are not padded (pad_batches)", not padded),
                ("io_binding is off", not binding),
                ("the inputs or outputs vary past the batch axis", not fixed_shapes),
            )
            if lacking
        ]
        if missing:
            graph = False
            if settings.cuda_graph == "on":
                notes.append(f"cuda_graph is on but not used here: {'; '.join(missing)}")
    device = "cuda" if on_cuda else "cpu"
    return DataPath(binding, device, graph, graph, search), notes


def cuda_options(settings: Settings, path: DataPath | None = None) -> dict[str, Any]:
    """The CUDA provider options of a session with data path ``path`` (none: the startup probe's)."""
    if path is None:
        path, _ = plan_data_path(settings, CUDA, padded=False, fixed_shapes=False)
    options: dict[str, Any] = {"cudnn_conv_algo_search": path.conv_algo_search}
    if settings.cuda_mem_limit_bytes:
        options["gpu_mem_limit"] = settings.cuda_mem_limit_bytes
    if path.cuda_graph:
        options["enable_cuda_graph"] = "1"
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
    How batches reach onnxruntime is ``data_path`` (default: what the settings give this provider
    for unpadded batches of varying shapes). ``declared_outputs`` (model.json's) size the output
    buffers of fixed-buffer runs: a graph may leave a dimension symbolic that the contract fixes.

    With ``cuda_graph=auto``, a graph onnxruntime refuses to capture (when the session opens, or
    when a shape's first bound runs capture it, at warmup) runs without CUDA graphs, logged; with
    ``on`` that is ``GraphCaptureUnavailable``.

    Raises (on creation):
        ProviderUnavailable: onnxruntime runs the graph on another provider than asked.
        GraphCaptureUnavailable: ``cuda_graph=on`` and onnxruntime cannot capture this graph.
    """

    def __init__(
        self,
        path: Path,
        provider: str,
        settings: Settings,
        intra_op_threads: int,
        *,
        data_path: DataPath | None = None,
        declared_outputs: Sequence[TensorSpec] = (),
    ) -> None:
        if data_path is None:
            data_path, _ = plan_data_path(settings, provider, padded=False, fixed_shapes=False)
        self.provider = provider
        self.path = path
        self.settings = settings
        self.intra_op_threads = intra_op_threads
        self.declared_outputs = tuple(declared_outputs)
        try:
            self.session = self._open(data_path)
        except ProviderUnavailable:
            raise
        except Exception as err:  # onnxruntime refuses to capture: an operator is not on CUDA, say
            if not data_path.cuda_graph:
                raise
            if settings.cuda_graph == "on":
                raise GraphCaptureUnavailable(
                    f"{path}: cuda_graph is on but onnxruntime refuses: {err}"
                ) from err
            log.warning("%s: CUDA graphs not used, onnxruntime refuses them: %s", path, err)
            data_path = dataclasses.replace(data_path, cuda_graph=False)
            self.session = self._open(data_path)
        self.data_path = data_path
        self.inputs = tuple(
            InputMeta(i.name, np.dtype(_ORT_DTYPES.get(i.type, np.float32)), _shape(i.shape))
            for i in self.session.get_inputs()
        )
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._output_meta = tuple(
            InputMeta(o.name, np.dtype(_ORT_DTYPES.get(o.type, np.float32)), _shape(o.shape))
            for o in self.session.get_outputs()
        )
        self._fixed: dict[tuple[tuple[int, ...], ...], _FixedBuffers] = {}
        # One bound run at a time through the fixed buffers: they are shared by every run of a
        # shape (so a version's instances take turns on this data path: docs/serving.md).
        self._fixed_lock = threading.Lock()

    def _open(self, data_path: DataPath) -> ort.InferenceSession:
        settings = self.settings
        options = session_options(
            self.intra_op_threads,
            settings.inter_op_threads,
            spinning=settings.intra_op_spinning,
            provider=self.provider,
            graph_optimization=settings.graph_optimization,
        )
        providers: list[Any] = [CPU]
        if self.provider == CUDA:
            providers = [(CUDA, cuda_options(settings, data_path)), CPU]
        # onnxruntime's intra-op workers start here and take this thread's name: ort:<model>.
        with named(f"{ORT_PREFIX}{self.path.parent.parent.name}"):
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        used = session.get_providers()
        if used[0] != self.provider:
            # onnxruntime falls back to CPU without raising when CUDA libraries are missing.
            raise ProviderUnavailable(
                f"{self.path}: asked for {self.provider}, onnxruntime gave {used[0]} (see its log)"
            )
        return session

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch; returns every graph output as a host numpy array."""
        feed = {meta.name: np.ascontiguousarray(inputs[meta.name], dtype=meta.dtype) for meta in self.inputs}
        if self.data_path.fixed_buffers:
            outputs = self._run_fixed(feed)
        elif self.data_path.io_binding:
            outputs = self._run_bound(feed)
        else:
            outputs = self.session.run(list(self.output_names), feed)
        return {name: _as_float32(value) for name, value in zip(self.output_names, outputs, strict=True)}

    def _run_bound(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # Outputs are allocated on the device and copied to the host once, after the run,
        # instead of onnxruntime's per-output host allocation on every call.
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.data_path.device)
        self.session.run_with_iobinding(binding)
        outputs: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return outputs

    def _run_fixed(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._fixed_lock:
            return self._run_fixed_held(feed)

    def _run_fixed_held(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        shapes = tuple(value.shape for value in feed.values())
        buffers = self._fixed.get(shapes)
        new = buffers is None
        if buffers is None:
            buffers = self._fixed[shapes] = self._make_buffers(feed, graph_id=len(self._fixed))
        for name, value in feed.items():
            buffers.inputs[name].update_inplace(value)
        if new and self.data_path.cuda_graph:
            # The first runs of a graph id run plainly and capture it: done here, at warmup,
            # so no request pays for the capture.
            try:
                self._capture(buffers)
            except Exception as err:  # onnxruntime's own error types, raised while capturing
                self._drop_graphs(err)
                return self._run_fixed_held(feed)  # once more, without graphs
        else:
            self.session.run_with_iobinding(buffers.binding, buffers.run_options)
        # New host arrays (onnxruntime copies out of the buffers), so the next batch of this
        # shape cannot overwrite an answer still on its way to a client.
        return list(buffers.binding.copy_outputs_to_cpu())

    def _capture(self, buffers: _FixedBuffers) -> None:
        """A new shape's first two bound runs: onnxruntime captures its CUDA graph in them."""
        self.session.run_with_iobinding(buffers.binding, buffers.run_options)
        self.session.run_with_iobinding(buffers.binding, buffers.run_options)

    def _drop_graphs(self, err: Exception) -> None:
        """Capturing failed: under ``cuda_graph=auto`` the session reopens without CUDA graphs (the
        failed capture may have left it unusable) and every shape gets new buffers; under ``on``
        the model fails to load. Called with the fixed-buffer lock held."""
        if self.settings.cuda_graph == "on":
            raise GraphCaptureUnavailable(
                f"{self.path}: cuda_graph is on but onnxruntime failed to capture: {err}"
            ) from err
        log.warning("%s: CUDA graphs not used, onnxruntime failed to capture one: %s", self.path, err)
        self.data_path = dataclasses.replace(self.data_path, cuda_graph=False)
        self.session = self._open(self.data_path)
        self._fixed.clear()

    def _make_buffers(self, feed: dict[str, np.ndarray], graph_id: int) -> _FixedBuffers:
        device = self.data_path.device
        rows = len(next(iter(feed.values())))
        binding = self.session.io_binding()
        inputs = {}
        for name, value in feed.items():
            inputs[name] = ort.OrtValue.ortvalue_from_numpy(value, device, 0)
            binding.bind_ortvalue_input(name, inputs[name])
        declared = {t.name: t.shape for t in self.declared_outputs}
        for meta in self._output_meta:
            shape = [rows, *self._output_dims(meta, declared.get(meta.name))]
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, meta.dtype, device, 0)
            binding.bind_ortvalue_output(meta.name, value)
        run_options = None
        if self.data_path.cuda_graph:
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return _FixedBuffers(binding, inputs, run_options)

    def _output_dims(self, meta: InputMeta, declared: tuple[int, ...] | None) -> list[int]:
        """An output's dimensions past the batch axis: model.json's (the contract checked them
        against the graph at export), else the graph's own; fixed buffers need every one."""
        dims = list(declared[1:]) if declared is not None else [d or -1 for d in meta.shape[1:]]
        if any(d < 1 for d in dims):
            raise ValueError(
                f"{self.path.name}: output {meta.name!r} has no fixed shape past the batch axis "
                "for its fixed buffers"
            )
        return dims


@dataclass(frozen=True)
class _FixedBuffers:
    """One input shape's buffers, bound once: a CUDA graph replays on exactly these addresses."""

    binding: Any
    inputs: dict[str, Any]
    run_options: Any


class GraphCaptureUnavailable(RuntimeError):
    """``cuda_graph=on`` but onnxruntime cannot capture this graph."""


def _shape(shape: Any) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def _as_float32(value: Any) -> np.ndarray:
    # fp16 graphs answer in float16; clients and the softmax get float32 either way.
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype == np.float16 else array
