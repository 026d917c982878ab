"""One served model version: its session, preprocessing, batcher and statistics, built together.

The batcher is attached here, around the session, not built into it: the session only runs
batches. Statistics are kept in the KServe ModelStatistics shape (counts and nanoseconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fineserve.export.contract import ModelSpec
from fineserve.server.batching import (
    Batcher,
    Batching,
    BatchTiming,
    Collate,
    RunBatch,
    Tensors,
    batch_buckets,
    concat_padded,
    padded_to_buckets,
)
from fineserve.server.config import Settings
from fineserve.server.datatypes import NUMPY_DTYPES
from fineserve.server.preprocess import ImagePreprocessor, Limits, TextPreprocessor
from fineserve.server.runtime import CUDA, ModelSession, choose_variant, plan_threads
from fineserve.server.threads import INFER_PREFIX
from fineserve.server.tuning import Choice, return_freed_memory, tune_instances

log = logging.getLogger(__name__)

WARMUP_SEQUENCE_LENGTH = 8
# Tokens per text when measuring instances (server/tuning.py): about a review sentence, so the
# model's cost per row is near what it serves.
TUNING_SEQUENCE_LENGTH = 32


def check_scores(spec: ModelSpec, outputs: Mapping[str, np.ndarray]) -> None:
    """The scores must have one column per label of model.json: a graph with dynamic output shapes
    would otherwise load READY and fail every answer. Checked at warmup (the version then fails
    to load, with this reason) and on every batch (its requests get a generic INTERNAL; the reason
    is logged).

    Raises:
        ValueError: they do not (a broken model, not a bad request).
    """
    scores = outputs[spec.outputs[0].name]
    labels = len(spec.labels)
    if labels and (scores.ndim != 2 or scores.shape[1] != labels):
        raise ValueError(
            f"model {spec.name} version {spec.version}: model.json has {labels} labels but the graph's "
            f"output {spec.outputs[0].name!r} has shape {list(scores.shape)}"
        )


def synthetic_inputs(spec: ModelSpec, rows: int, tokens: int) -> dict[str, np.ndarray]:
    """Inputs of ``rows`` rows in the model's shapes (ones), ``tokens`` long on a text axis."""
    inputs = {}
    for tensor in spec.inputs:
        shape = [rows] + [d if d > 0 else tokens for d in tensor.shape[1:]]
        dtype = NUMPY_DTYPES.get(tensor.datatype, np.dtype(np.float32))
        inputs[tensor.name] = np.ones(shape, dtype=dtype)
    return inputs


@dataclass(frozen=True)
class Duration:
    """A KServe StatisticDuration: how many, and their total nanoseconds."""

    count: int = 0
    ns: int = 0

    def plus(self, ns: int, count: int = 1) -> Duration:
        return Duration(self.count + count, self.ns + ns)


@dataclass(frozen=True)
class BatchStats:
    """Per batch size: how many batches of that size ran and their total stage durations."""

    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class ModelStats:
    """What KServe's ModelStatistics message needs, for one model version."""

    name: str
    version: int
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batch_stats: tuple[BatchStats, ...]

    def plus(self, other: ModelStats) -> ModelStats:
        """The statistics of both (another worker process's, of the same version)."""
        batches = {b.batch_size: b for b in self.batch_stats}
        for b in other.batch_stats:
            mine = batches.get(b.batch_size)
            batches[b.batch_size] = b if mine is None else BatchStats(
                b.batch_size,
                mine.compute_input.plus(b.compute_input.ns, b.compute_input.count),
                mine.compute_infer.plus(b.compute_infer.ns, b.compute_infer.count),
                mine.compute_output.plus(b.compute_output.ns, b.compute_output.count),
            )  # fmt: skip
        return ModelStats(
            name=self.name,
            version=self.version,
            last_inference_ms=max(self.last_inference_ms, other.last_inference_ms),
            inference_count=self.inference_count + other.inference_count,
            execution_count=self.execution_count + other.execution_count,
            success=self.success.plus(other.success.ns, other.success.count),
            fail=self.fail.plus(other.fail.ns, other.fail.count),
            queue=self.queue.plus(other.queue.ns, other.queue.count),
            compute_input=self.compute_input.plus(other.compute_input.ns, other.compute_input.count),
            compute_infer=self.compute_infer.plus(other.compute_infer.ns, other.compute_infer.count),
            compute_output=self.compute_output.plus(other.compute_output.ns, other.compute_output.count),
            batch_stats=tuple(batches[size] for size in sorted(batches)),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelStats:
        """The inverse of ``dataclasses.asdict`` (statistics another worker wrote as JSON)."""

        def duration(value: dict[str, int]) -> Duration:
            return Duration(int(value["count"]), int(value["ns"]))

        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            last_inference_ms=int(data["last_inference_ms"]),
            inference_count=int(data["inference_count"]),
            execution_count=int(data["execution_count"]),
            success=duration(data["success"]),
            fail=duration(data["fail"]),
            queue=duration(data["queue"]),
            compute_input=duration(data["compute_input"]),
            compute_infer=duration(data["compute_infer"]),
            compute_output=duration(data["compute_output"]),
            batch_stats=tuple(
                BatchStats(
                    int(b["batch_size"]),
                    duration(b["compute_input"]),
                    duration(b["compute_infer"]),
                    duration(b["compute_output"]),
                )
                for b in data["batch_stats"]
            ),
        )


@dataclass
class StatsRecorder:
    """Accumulates a version's statistics; only touched from the event loop thread."""

    name: str
    version: int
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: dict[int, tuple[Duration, Duration, Duration]] = field(default_factory=dict)

    def record_batch(self, timing: BatchTiming) -> None:
        self.execution_count += 1
        self.inference_count += timing.batch_size
        self.last_inference_ms = int(time.time() * 1000)
        i, n, o = self.batches.get(timing.batch_size, (Duration(), Duration(), Duration()))
        self.batches[timing.batch_size] = (
            i.plus(timing.input_ns),
            n.plus(timing.infer_ns),
            o.plus(timing.output_ns),
        )

    def record_request(
        self, ok: bool, total_ns: int, queue_ns: int = 0, timings: tuple[int, int, int] = (0, 0, 0)
    ) -> None:
        if not ok:
            self.fail = self.fail.plus(total_ns)
            return
        self.success = self.success.plus(total_ns)
        self.queue = self.queue.plus(queue_ns)
        self.compute_input = self.compute_input.plus(timings[0])
        self.compute_infer = self.compute_infer.plus(timings[1])
        self.compute_output = self.compute_output.plus(timings[2])

    def snapshot(self) -> ModelStats:
        return ModelStats(
            name=self.name,
            version=self.version,
            last_inference_ms=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            success=self.success,
            fail=self.fail,
            queue=self.queue,
            compute_input=self.compute_input,
            compute_infer=self.compute_infer,
            compute_output=self.compute_output,
            batch_stats=tuple(
                BatchStats(size, *durations) for size, durations in sorted(self.batches.items())
            ),
        )


class ServedVersion:
    """A loaded model version: session + preprocessing + batcher + statistics.

    ``batching`` is the one batching object the version was given (already capped by the model's
    own ``max_batch_size``), kept with its instance count resolved: the batcher, the model's
    handle and the transports all read this one. ``in_flight`` counts requests that resolved
    this version and have not finished; the repository retires a version only once it drops to
    zero, so a version switch drops nothing.
    """

    def __init__(
        self,
        spec: ModelSpec,
        path: Path,
        provider: str,
        settings: Settings,
        batching: Batching,
        *,
        image_pool: concurrent.futures.Executor,
        batch_metrics: Callable[[int, int], None] | None = None,
    ) -> None:
        self.spec = spec
        self.path = path
        variant = choose_variant(spec, provider, settings)
        self.variant = variant.precision
        self.threads = plan_threads(provider, batching.instances or 1, settings.intra_op_threads)
        self.session = ModelSession(path / variant.file, provider, settings, self.threads.intra_op)
        self.provider = self.session.provider
        graph_inputs = {meta.name for meta in self.session.inputs}
        declared = {t.name for t in spec.inputs}
        if graph_inputs != declared:
            raise ValueError(
                f"model.json declares inputs {sorted(declared)} but {variant.file} has {sorted(graph_inputs)}"
            )
        self.tuning: Choice | None = None
        if batching.instances == 0:
            self.threads, self.session, self.tuning = tune_instances(
                self.session,
                settings,
                sample=lambda rows: synthetic_inputs(spec, rows, TUNING_SEQUENCE_LENGTH),
                max_rows=batching.max_batch_size,
            )
        if self.tuning is not None:
            return_freed_memory()  # the losing session is gone now
            log.info("model %s version %d runs %s", spec.name, spec.version, self.tuning.describe())
        limits = Limits(
            settings.max_image_pixels,
            settings.max_request_bytes,
            settings.max_items_per_request,
            settings.max_text_chars,
        )
        self.preprocess: ImagePreprocessor | TextPreprocessor
        collate: Collate
        if spec.image is not None:
            self.preprocess = ImagePreprocessor(spec.inputs[0].name, spec.image, limits, image_pool)
            collate = concat_padded({})
        else:
            assert spec.text is not None
            self.preprocess = TextPreprocessor(
                path / spec.text.tokenizer_file, spec.text, [t.name for t in spec.inputs], limits
            )
            collate = concat_padded(self.preprocess.pad_values)
        # Measured at load (instances=0) or as set: the count the batcher runs.
        self.batching = dataclasses.replace(batching, instances=self.threads.instances)
        self.stats = StatsRecorder(spec.name, spec.version)
        pad = settings.pad_batches == "on" or (settings.pad_batches == "auto" and self.provider == CUDA)
        # The batch sizes warmup runs: with padding, every size a batch can have.
        self.warmup_batch_sizes = batch_buckets(self.batching.max_batch_size) if pad else (1,)
        run_graph: RunBatch = (
            padded_to_buckets(self.session.run, self.warmup_batch_sizes) if pad else self.session.run
        )

        def run(inputs: Tensors) -> Tensors:
            outputs = run_graph(inputs)
            check_scores(spec, outputs)
            return outputs

        # Up to ``instances`` batches run at once, each on a thread of this version's own: the
        # threads that call onnxruntime stay the same, warm in cache and scheduled, which served
        # lone requests faster than a shared pool (docs/performance.md).
        self.batcher = Batcher(
            f"{spec.name}/{spec.version}",
            run,
            collate,
            self.batching,
            thread_name=f"{INFER_PREFIX}{spec.name}",
            on_batch=self._on_batch,
            more_coming=(lambda: self.preparing > 0) if settings.batch_wait == "adaptive" else None,
        )
        self._batch_metrics = batch_metrics
        self.in_flight = 0
        # Requests being validated or preprocessed, about to join the batcher's queue.
        self.preparing = 0

    def start(self) -> None:
        self.batcher.start()

    def _on_batch(self, timing: BatchTiming) -> None:
        self.stats.record_batch(timing)
        if self._batch_metrics is not None:
            self._batch_metrics(timing.batch_size, timing.infer_ns)

    def warmup(self) -> None:
        """Blocking: runs each batch size the version will see on synthetic input, so no request
        pays for a first run."""
        started = time.perf_counter()
        for rows in self.warmup_batch_sizes:
            outputs = self.session.run(synthetic_inputs(self.spec, rows, WARMUP_SEQUENCE_LENGTH))
            check_scores(self.spec, outputs)
        log.info(
            "model %s version %d warmed up (batch sizes %s) in %.1f ms on %s (%s)",
            self.spec.name,
            self.spec.version,
            ",".join(map(str, self.warmup_batch_sizes)),
            (time.perf_counter() - started) * 1000,
            self.provider,
            self.variant,
        )

    async def close(self) -> None:
        """Waits for the requests that resolved this version, then stops its batcher."""
        while self.in_flight:
            await asyncio.sleep(0.01)
        await self.batcher.close()
