"""One served model version: its session, preprocessing, batcher and statistics, built together.

The batcher is attached here, around the session, not built into it: the session only runs
batches. Statistics are kept in the KServe ModelStatistics shape (counts and nanoseconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fineserve.export.contract import ModelSpec, TensorSpec
from fineserve.server.batching import (
    Batcher,
    Batching,
    BatchTiming,
    Collate,
    OnPadding,
    RunBatch,
    Tensors,
    batch_buckets,
    concat_padded,
    length_buckets,
    padded_to_buckets,
)
from fineserve.server.classification import probabilities
from fineserve.server.config import Settings
from fineserve.server.datatypes import NUMPY_DTYPES
from fineserve.server.errors import InvalidInput
from fineserve.server.preprocess import ImagePreprocessor, Limits, TextPreprocessor
from fineserve.server.runtime import (
    CUDA,
    DataPath,
    GraphCaptureUnavailable,
    ModelSession,
    ProviderUnavailable,
    choose_variant,
    plan_data_path,
    plan_threads,
)
from fineserve.server.threads import INFER_PREFIX
from fineserve.server.tuning import Choice, return_freed_memory, tune_instances

log = logging.getLogger(__name__)

WARMUP_SEQUENCE_LENGTH = 8
# Tokens per text when measuring instances (server/tuning.py): about a review sentence, so the
# model's cost per row is near what it serves.
TUNING_SEQUENCE_LENGTH = 32
# The ordinary items warmup sends through a request's whole path: a 4:3 photo-sized image (resized
# and centre-cropped as any other) and a short sentence.
WARMUP_IMAGE_SIZE = (64, 48)
WARMUP_TEXT = "the plot was good and the acting was fine"


class LoadFailed(ValueError):
    """A version that cannot be served. Its message is what clients read (the index's reason): file
    names inside the version folder and a short cause, never an absolute path or a library's own
    error text, which stays in ``__cause__`` for the server log."""


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
        padding_metrics: OnPadding | None = None,
    ) -> None:
        self.spec = spec
        self.path = path
        variant = choose_variant(spec, provider, settings)
        self.variant = variant.precision
        self.threads = plan_threads(provider, batching.instances or 1, settings.intra_op_threads)
        pad = settings.pad_batches == "on" or (settings.pad_batches == "auto" and provider == CUDA)
        fixed_shapes = all(d > 0 for t in (*spec.inputs, *spec.outputs) for d in t.shape[1:])
        data_path, notes = plan_data_path(settings, provider, padded=pad, fixed_shapes=fixed_shapes)
        for note in notes:
            log.warning("model %s version %d: %s", spec.name, spec.version, note)
        self.session = _open_session(
            path / variant.file, provider, settings, self.threads.intra_op, data_path, outputs=spec.outputs
        )
        self.provider = self.session.provider
        graph_inputs = {meta.name for meta in self.session.inputs}
        declared = {t.name for t in spec.inputs}
        if graph_inputs != declared:
            raise LoadFailed(
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
        pad_values: dict[str, int | float] = {}
        if spec.image is not None:
            self.preprocess = ImagePreprocessor(spec.inputs[0].name, spec.image, limits, image_pool)
        else:
            assert spec.text is not None
            try:
                self.preprocess = TextPreprocessor(
                    path / spec.text.tokenizer_file, spec.text, [t.name for t in spec.inputs], limits
                )
            except Exception as err:  # tokenizers raises a bare Exception with its parser's text
                raise LoadFailed(
                    f"{spec.text.tokenizer_file} could not be loaded by tokenizers (see the server log)"
                ) from err
            pad_values = self.preprocess.pad_values
        collate: Collate = concat_padded(pad_values)
        # Measured at load (instances=0) or as set: the count the batcher runs.
        # On CUDA a run on the loop would hold it while the device works: always hand off there.
        inline = 0.0 if self.provider == CUDA else batching.inline_run_s
        self.batching = dataclasses.replace(batching, instances=self.threads.instances, inline_run_s=inline)
        self.stats = StatsRecorder(spec.name, spec.version)
        # The batch sizes and text lengths warmup runs: with padding, every shape a batch can have.
        self.warmup_batch_sizes = batch_buckets(self.batching.max_batch_size) if pad else (1,)
        lengths: tuple[int, ...] = ()
        if pad and spec.text is not None and settings.sequence_buckets:
            lengths = length_buckets(spec.text.max_length, settings.sequence_buckets)
        self.warmup_lengths = lengths or (WARMUP_SEQUENCE_LENGTH,)

        def through_data_path(on_padding: OnPadding | None) -> RunBatch:
            if not pad:
                return self.session.run
            return padded_to_buckets(
                self.session.run,
                self.warmup_batch_sizes,
                sequence_buckets=lengths,
                pad_values=pad_values,
                on_padding=on_padding,
            )

        run_graph = through_data_path(padding_metrics)
        # Warmup and the serving-path check run what serving runs: padded rows and sequences
        # (attention mask 0), the same few shapes; only their padding is not counted in the metrics.
        self._run_graph = through_data_path(None)

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
        """Blocking: sends one ordinary item through a request's whole path (``check_serving_path``),
        then runs each batch size the version will see on synthetic input, so no request pays for
        a first run. Both go through the batches' own data path (padded to the buckets where
        ``pad_batches`` is on), so they run exactly the shapes, and the padding, that serving runs.

        Raises:
            LoadFailed: the version cannot answer ordinary requests; the message says why.
        """
        started = time.perf_counter()
        self.check_serving_path()
        for rows in self.warmup_batch_sizes:
            for tokens in self.warmup_lengths:
                outputs = self._run_warmup(synthetic_inputs(self.spec, rows, tokens))
                _check_warmup_scores(self.spec, outputs)
        lengths = ""
        if self.spec.text is not None:
            lengths = f" x lengths {','.join(map(str, self.warmup_lengths))}"
        log.info(
            "model %s version %d warmed up (batch sizes %s%s) in %.1f ms on %s (%s; %s)",
            self.spec.name,
            self.spec.version,
            ",".join(map(str, self.warmup_batch_sizes)),
            lengths,
            (time.perf_counter() - started) * 1000,
            self.provider,
            self.variant,
            self.session.data_path.describe(),
        )

    def check_serving_path(self) -> None:
        """One ordinary item (an image or a sentence) through the path every request takes: the
        version's preprocessing (its mean, std, crop and limits), the graph as batches reach it
        (padded rows, and for text padded positions with attention mask 0, where batches are
        padded), and the softmax with its temperature. A version whose answers would be refusals,
        NaN, or one score for every class fails here, with the reason, instead of loading READY.

        Raises:
            LoadFailed: the item is refused, the graph fails on it, or the scores are not finite,
                or all equal although the logits differ (the temperature erased the ranking).
        """
        what = "an ordinary image" if self.spec.image is not None else "an ordinary text"
        try:
            tensors = self.preprocess([_warmup_item(self.spec, self.preprocess.limits)])
        except InvalidInput as err:
            raise LoadFailed(f"its preprocessing refuses {what}: {err.message}") from err
        outputs = self._run_warmup(tensors)
        _check_warmup_scores(self.spec, outputs)
        logits = outputs[self.spec.outputs[0].name]
        if not np.isfinite(logits).all():
            raise LoadFailed(f"the graph's scores for {what} are NaN or infinite")
        scores = probabilities(logits, self.spec.temperature)
        if not np.isfinite(scores).all():
            raise LoadFailed(
                f"temperature {self.spec.temperature:g} makes the scores for {what} NaN or infinite"
            )
        if np.ptp(logits) > 0 and np.ptp(scores) == 0:
            raise LoadFailed(
                f"every score for {what} is equal (temperature {self.spec.temperature:g}) although the "
                "graph's logits differ: the softmax erases the model's ranking"
            )

    def _run_warmup(self, inputs: Tensors) -> Tensors:
        try:
            return self._run_graph(inputs)
        except GraphCaptureUnavailable as err:
            raise LoadFailed(
                f"{self.session.path.name}: cuda_graph is on but onnxruntime cannot capture this graph "
                "(see the server log)"
            ) from err
        except Exception as err:
            raise LoadFailed(
                f"{self.session.path.name} failed in onnxruntime on its warmup input (see the server log)"
            ) from err

    async def close(self) -> None:
        """Waits for the requests that resolved this version, then stops its batcher."""
        while self.in_flight:
            await asyncio.sleep(0.01)
        await self.batcher.close()


def _open_session(
    path: Path,
    provider: str,
    settings: Settings,
    intra_op_threads: int,
    data_path: DataPath,
    *,
    outputs: Sequence[TensorSpec],
) -> ModelSession:
    try:
        return ModelSession(
            path, provider, settings, intra_op_threads, data_path=data_path, declared_outputs=outputs
        )
    except ProviderUnavailable as err:
        raise LoadFailed(
            f"{path.name}: onnxruntime could not run it on {provider} (see the server log)"
        ) from err
    except GraphCaptureUnavailable as err:
        raise LoadFailed(
            f"{path.name}: cuda_graph is on but onnxruntime cannot capture this graph (see the server log)"
        ) from err
    except Exception as err:  # onnxruntime's own error types, with its text and the absolute path
        raise LoadFailed(f"{path.name} could not be loaded by onnxruntime (see the server log)") from err


def _check_warmup_scores(spec: ModelSpec, outputs: Mapping[str, np.ndarray]) -> None:
    try:
        check_scores(spec, outputs)
    except ValueError as err:
        raise LoadFailed(str(err)) from None


def _warmup_item(spec: ModelSpec, limits: Limits) -> bytes:
    """An ordinary item for ``spec``: a PNG with a colour gradient (so its channels differ) or a
    sentence (cut to ``max_text_chars``: the check is of the model, not of that limit), as a
    client would send it."""
    if spec.image is None:
        return WARMUP_TEXT[: limits.max_text_chars].encode("utf-8")
    width, height = WARMUP_IMAGE_SIZE
    x = np.linspace(0, 255, width, dtype=np.float32)[np.newaxis, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, np.newaxis]
    pixels = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
