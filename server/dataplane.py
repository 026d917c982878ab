"""The serving core, transport-agnostic: both gRPC services call this and nothing below it.

It speaks numpy arrays and our dataclasses; protobuf and grpc stop at the transports. Inputs
are validated against the model's declared inputs before anything is queued; requests larger
than the model's batch size are split into batch-sized chunks that are queued together.
Deadlines are absolute ``time.monotonic()`` values.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fineserve.export.contract import MODEL_NAME, ModelSpec
from fineserve.server import classification
from fineserve.server.batching import BatchedResult, Batching, Tensors
from fineserve.server.config import Settings
from fineserve.server.errors import (
    DeadlineExceeded,
    InvalidInput,
    LimitExceeded,
    ModelFault,
    ModelNotFound,
    ModelNotReady,
    PermissionDenied,
    ServingError,
)
from fineserve.server.model import ModelStats, ServedVersion
from fineserve.server.observe import RequestObservation, Telemetry, current_request
from fineserve.server.preprocess import TextPreprocessor, check_items
from fineserve.server.repository import Repository, VersionState
from fineserve.server.tensor_checks import as_declared, check_tensors

log = logging.getLogger(__name__)

__all__ = ["DataPlane", "InferResult", "ModelHandle", "ModelIndexEntry", "ModelStats"]


@dataclass(frozen=True)
class ModelHandle:
    """A resolved, READY model version: what a transport needs to describe it and its outputs."""

    name: str
    version: int
    spec: ModelSpec
    provider: str
    variant: str
    # Every READY version of this model, ascending.
    versions: tuple[int, ...]
    # How this version batches (rows, queue delay, queue size, instances), as its batcher does.
    batching: Batching


@dataclass(frozen=True)
class ModelIndexEntry:
    """One model version in the repository and its state (READY, LOADING, UNAVAILABLE, FAILED)."""

    name: str
    version: int
    state: str
    reason: str = ""
    provider: str = ""
    variant: str = ""
    spec: ModelSpec | None = None


@dataclass(frozen=True)
class InferResult:
    """Raw graph outputs (e.g. logits) with the batch axis, one row per item, request order."""

    handle: ModelHandle
    outputs: dict[str, np.ndarray]

    def probabilities(self) -> np.ndarray:
        """Calibrated probabilities of the model's scores (its first output, the logits).

        Raises:
            ModelFault: they are NaN or infinite; never answered as if they were scores.
        """
        spec = self.handle.spec
        scores = classification.probabilities(self.outputs[spec.outputs[0].name], spec.temperature)
        if not np.isfinite(scores).all():
            log.error(
                "model %s version %d: NaN or infinite scores (temperature %g)",
                spec.name,
                spec.version,
                spec.temperature,
            )
            raise ModelFault(_model_fault(spec))
        return scores


class DataPlane:
    """Resolves models, validates and preprocesses inputs, batches, runs, and keeps statistics.

    Its parts are built by the app (``app.build_dataplane``) and handed in: the repository (and
    the image-decoding pool its versions preprocess on) and the telemetry. ``close`` releases
    them.
    """

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        telemetry: Telemetry,
        image_pool: concurrent.futures.Executor,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.telemetry = telemetry
        self._image_pool = image_pool
        self._started = False
        self._closing = False
        self._models_ready = False  # as settings.readiness asks; refreshed when the models change
        # Called with the new answer of ready() when the models change it (the server's health).
        self.on_ready_change: Callable[[bool], Awaitable[None]] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        # With worker processes: told of each load or unload this process answered, to pass it
        # on to the other workers (server/worker.py) until the call's deadline, and asked for
        # their statistics.
        self.on_model_control: Callable[[str, str, float | None], Awaitable[None]] | None = None
        self.other_workers_statistics: Callable[[], list[ModelStats]] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads and warms up every model the policy selects, then starts polling for versions.

        Raises:
            FileNotFoundError: the model repository is not a folder.
        """
        if not self.repository.root.is_dir():
            raise FileNotFoundError(f"model repository {self.repository.root} is not a folder")
        await self.repository.sync()
        await self._refresh_readiness()
        self._started = True
        if self.settings.repository_poll_s > 0:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")

    async def close(self) -> None:
        """Stops polling, lets queued requests finish, releases the sessions."""
        self._closing = True
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await self.repository.close()
        self._image_pool.shutdown(wait=False, cancel_futures=True)
        if self.telemetry.tracer is not None:
            self.telemetry.tracer.shutdown()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.repository.sync()
            except Exception:
                log.exception("repository poll failed; will retry")
            await self._refresh_readiness()  # a repository it cannot read is not ready; never raises

    # --- health ---------------------------------------------------------------------------------

    def live(self) -> bool:
        return not self._closing

    def ready(self) -> bool:
        """The initial load has settled, we are not shutting down, and the models are ready as
        ``settings.readiness`` asks: ``any`` (a READY version of some model the version policy
        selects) or ``all`` (of every one). With nothing selected (an empty repository, every
        model unloaded on purpose) it is ready; with the repository's folder gone, not.

        ``any`` is the default because every replica reads the same repository: under ``all`` a
        broken or still-loading model would take every replica out of service at once, the healthy
        models with it. Either way, a server none of whose models loaded is not ready. What each
        model does is also its own readiness (``model_ready``, the index).
        """
        return self._started and not self._closing and self._models_ready

    async def _refresh_readiness(self) -> None:
        """Re-reads the models' states (after a sync, a load or an unload) for ``ready``, and tells
        ``on_ready_change`` when its answer changed."""
        before = self.ready()
        self._models_ready = self._models_are_ready()
        if self.on_ready_change is not None and self.ready() != before:
            await self.on_ready_change(self.ready())

    def _models_are_ready(self) -> bool:
        repository = self.repository
        try:
            if not repository.root.is_dir():  # the repository's volume went away
                return False
            selected = {name for name in repository.model_names() if repository.selected(name)}
        except OSError:
            log.exception("cannot read the model repository; not ready")
            return False
        selected |= {name for name, versions in repository.served.items() if versions}
        ready = {name for name in selected if repository.served.get(name)}
        if not selected:  # nothing to wait for: an empty repository, or every model unloaded
            return True
        if self.settings.readiness == "all":
            return ready == selected
        return bool(ready)

    def model_ready(self, name: str, version: int | None) -> bool:
        try:
            self.resolve(name, version)
        except ServingError:
            return False
        return True

    # --- models ---------------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None) -> ModelHandle:
        """The READY version asked for (None or 0: the newest READY one).

        Raises:
            ModelNotFound: no such model, or no such version on disk.
            ModelNotReady: it exists but is loading, failed, unloaded or not selected.
        """
        return self._handle(self._served(name, version))

    def _served(self, name: str, version: int | None) -> ServedVersion:
        served = self._find_served(name, version)
        observation = current_request()
        if observation is not None:
            observation.version = served.spec.version
        return served

    def _find_served(self, name: str, version: int | None) -> ServedVersion:
        if not MODEL_NAME.match(name):
            # Also keeps client text out of file paths (no "../").
            raise ModelNotFound(f"no model is named {name[:80]!r}")
        served = self.repository.served.get(name, {})
        if version:
            if version in served:
                return served[version]
        elif served:
            return served[max(served)]
        on_disk = self.repository.versions_on_disk(name)
        if not on_disk:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        if version and version not in on_disk:
            raise ModelNotFound(f"model {name!r} has no version {version} (has {_versions(on_disk)})")
        what = f"model {name!r} version {version}" if version else f"model {name!r}"
        for status in self.repository.status(name):
            if status.version == (version or max(on_disk)) and status.state != VersionState.READY:
                raise ModelNotReady(f"{what} is {status.state.value.lower()}")
        raise ModelNotReady(f"{what} is not ready")

    def _handle(self, served: ServedVersion) -> ModelHandle:
        return ModelHandle(
            name=served.spec.name,
            version=served.spec.version,
            spec=served.spec,
            provider=served.provider,
            variant=served.variant,
            versions=tuple(sorted(self.repository.served.get(served.spec.name, {}))),
            batching=served.batching,
        )

    def index(self) -> list[ModelIndexEntry]:
        """Every model version on disk or served, with its state; sorted by name and version."""
        entries = []
        for name in sorted(set(self.repository.model_names()) | set(self.repository.served)):
            for status in self.repository.status(name):
                served = status.served
                entries.append(
                    ModelIndexEntry(
                        name=name,
                        version=status.version,
                        state=status.state.value,
                        reason=status.reason,
                        provider=served.provider if served else "",
                        variant=served.variant if served else "",
                        spec=served.spec if served else None,
                    )
                )
        return entries

    async def load(self, name: str, deadline: float | None = None) -> None:
        """Serves ``name`` (again). Raises PermissionDenied when model control is off.

        ``deadline`` (``time.monotonic()``, None: none) bounds the wait for other workers."""
        self._check_control("load")
        await self.apply_control("load", name)
        if not self.repository.served.get(name):
            raise ModelNotReady(f"model {name!r} failed to load; see the server log")
        if self.on_model_control is not None:
            await self.on_model_control("load", name, deadline)

    async def unload(self, name: str, deadline: float | None = None) -> None:
        self._check_control("unload")
        await self.apply_control("unload", name)
        if self.on_model_control is not None:
            await self.on_model_control("unload", name, deadline)

    async def apply_control(self, action: str, name: str) -> None:
        """Loads or unloads ``name`` here; a worker applies its siblings' calls through this."""
        if action == "load":
            await self.repository.load(name)
        else:
            await self.repository.unload(name)
        await self._refresh_readiness()

    def _check_control(self, what: str) -> None:
        if not self.settings.allow_model_control:
            raise PermissionDenied(f"model {what} is disabled on this server (allow_model_control=false)")

    def statistics(self, name: str | None, version: int | None) -> list[ModelStats]:
        """Statistics of every served version, or of one model (and version) by name; with worker
        processes, each version's counts are those of every worker."""
        local = self.local_statistics(name, version)
        if self.other_workers_statistics is None:
            return local
        others = self.other_workers_statistics()
        return [_summed(stats, others) for stats in local]

    def local_statistics(self, name: str | None, version: int | None) -> list[ModelStats]:
        if name:
            if version:
                return [self._served(name, version).stats.snapshot()]
            self._served(name, None)  # raises for unknown or unready models
            served = self.repository.served.get(name, {})
            return [served[v].stats.snapshot() for v in sorted(served)]
        return [
            versions[v].stats.snapshot()
            for _, versions in sorted(self.repository.served.items())
            for v in sorted(versions)
        ]

    # --- inference ------------------------------------------------------------------------------

    def observe(
        self, model: str, *, items: int = 0, headers: Mapping[str, str] | None = None
    ) -> contextlib.AbstractContextManager[RequestObservation]:
        """Transports wrap each inference request in this: metrics, request log and trace, once."""
        return self.telemetry.observe(model, items=items, headers=headers)

    async def infer(
        self,
        name: str,
        version: int | None,
        inputs: dict[str, np.ndarray],
        *,
        deadline: float | None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> InferResult:
        """Runs ready tensors (with the batch axis) through the model; returns its raw outputs.

        Raises:
            InvalidInput: names, dtypes or shapes that do not match the model's inputs.
            ModelNotFound, ModelNotReady, Overloaded, DeadlineExceeded, Cancelled, InferenceFailed.
        """
        served = self._served(name, version)

        async def prepare() -> tuple[Tensors, int]:
            tensors, rows = _validate(served.spec, inputs)
            if isinstance(served.preprocess, TextPreprocessor):
                served.preprocess.check_token_ids(tensors)
            limit = self.settings.max_items_per_request
            if rows > limit:
                raise LimitExceeded(f"{rows} items exceed max_items_per_request ({limit})")
            return tensors, rows

        return await self._run(served, deadline, is_cancelled, prepare, server_made_inputs=False)

    async def infer_encoded(
        self,
        name: str,
        version: int | None,
        items: Sequence[bytes],
        *,
        deadline: float | None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> InferResult:
        """Preprocesses encoded images (image models) or UTF-8 texts (text models), then runs them.

        Raises:
            LimitExceeded: too many items, bytes, pixels or characters (the message names the limit).
            InvalidInput: an undecodable image or invalid UTF-8, naming the item.
            ModelNotFound, ModelNotReady, Overloaded, DeadlineExceeded, Cancelled, InferenceFailed.
        """
        served = self._served(name, version)
        limits = served.preprocess.limits
        check_items(items, limits)

        async def prepare() -> tuple[Tensors, int]:
            tensors = await asyncio.to_thread(served.preprocess, list(items))
            return tensors, len(items)

        return await self._run(served, deadline, is_cancelled, prepare, server_made_inputs=True)

    async def _run(
        self,
        served: ServedVersion,
        deadline: float | None,
        is_cancelled: Callable[[], bool] | None,
        prepare: Callable[[], Awaitable[tuple[Tensors, int]]],
        *,
        server_made_inputs: bool,
    ) -> InferResult:
        """``server_made_inputs``: the tensors come from the version's own preprocessing (encoded
        items), so NaN or infinite outputs are the model's fault, not the request's."""
        observation = current_request()
        if observation is None:  # called without a transport (embedded, tests): observed here
            with self.observe(served.spec.name):
                return await self._run(
                    served, deadline, is_cancelled, prepare, server_made_inputs=server_made_inputs
                )
        observation.version = served.spec.version
        # Counted before the first await: a version switch waits for this request to finish.
        served.in_flight += 1
        started = time.perf_counter_ns()
        try:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed before the request was processed")
            served.preparing += 1  # the batcher waits for company only while some is coming
            try:
                tensors, rows = await prepare()
            finally:
                served.preparing -= 1
            prepare_ns = time.perf_counter_ns() - started
            observation.items = rows
            results = await self._submit_chunks(served, tensors, rows, deadline, is_cancelled)
            if len(results) == 1:
                outputs = results[0].outputs
            else:
                outputs = {k: np.concatenate([r.outputs[k] for r in results]) for k in results[0].outputs}
            _check_finite(served.spec, outputs, server_made_inputs)
        except BaseException:
            elapsed = time.perf_counter_ns() - started
            served.stats.record_request(False, elapsed)
            raise
        finally:
            served.in_flight -= 1
        elapsed = time.perf_counter_ns() - started
        # Chunks wait side by side (the longest wait counts) and run one after another (summed);
        # preprocessing counts as computing the input, as in Triton's statistics.
        queue_ns = max(r.queue_ns for r in results)
        timings = (
            prepare_ns + sum(r.batch.input_ns for r in results),
            sum(r.batch.infer_ns for r in results),
            sum(r.batch.output_ns for r in results),
        )
        served.stats.record_request(True, elapsed, queue_ns, timings)
        observation.completed(rows, timings[0], queue_ns, timings[1])
        return InferResult(self._handle(served), outputs)

    async def _submit_chunks(
        self,
        served: ServedVersion,
        tensors: Tensors,
        rows: int,
        deadline: float | None,
        is_cancelled: Callable[[], bool] | None,
    ) -> list[BatchedResult]:
        size = served.batching.max_batch_size
        chunks = [
            ({k: v[start : start + size] for k, v in tensors.items()}, min(size, rows - start))
            for start in range(0, rows, size)
        ]
        if len(chunks) == 1:
            [(chunk, n)] = chunks
            return [await served.batcher.submit(chunk, n, deadline=deadline, is_cancelled=is_cancelled)]
        # One failed chunk fails the request: the task group cancels the other chunks, which frees
        # their queue slots and keeps the batcher from computing rows nobody will read.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        served.batcher.submit(chunk, n, deadline=deadline, is_cancelled=is_cancelled)
                    )
                    for chunk, n in chunks
                ]
        except BaseExceptionGroup as failed:
            raise _first_error(failed) from None
        return [task.result() for task in tasks]


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that failed a split request, as if it had not been split (callers map its type)."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def _validate(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> tuple[Tensors, int]:
    """Checks tensors against the model's declared inputs; returns them and the batch size."""
    declared = {t.name: t for t in spec.inputs}
    missing = sorted(set(declared) - set(inputs))
    unknown = sorted(set(inputs) - set(declared))
    if missing or unknown:
        raise InvalidInput(
            f"model {spec.name!r} takes inputs {sorted(declared)}; missing {missing}, unknown {unknown}"
        )
    rows = check_tensors(spec.inputs, inputs)
    return as_declared(spec.inputs, inputs), rows


def _check_finite(spec: ModelSpec, outputs: Tensors, server_made_inputs: bool) -> None:
    """Never an OK answer with NaN or infinite outputs. Finite tensors a client sent far outside
    what the model was trained on (pixels of 3e38) can overflow to NaN scores: refused as the
    request's fault, as NaN or infinite inputs are. Items the server preprocessed itself (decoded
    images, tokenized texts) are in the model's own range, so there it is the model's fault.
    Only this request's rows are checked, so its batch-mates are answered as usual."""
    for name, value in outputs.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            if server_made_inputs:
                log.error(
                    "model %s version %d: output %r is NaN or infinite for preprocessed items",
                    spec.name,
                    spec.version,
                    name,
                )
                raise ModelFault(_model_fault(spec))
            raise InvalidInput(
                f"the model's output {name!r} for this request is NaN or infinite: its inputs are far "
                "outside the range the model was trained on"
            )


def _model_fault(spec: ModelSpec) -> str:
    return (
        f"model {spec.name!r} version {spec.version} produced NaN or infinite scores for this request; "
        "the model is at fault, not the request (see the server log)"
    )


def _versions(versions: Sequence[int]) -> str:
    return ", ".join(map(str, versions)) or "none"


def _summed(stats: ModelStats, others: Sequence[ModelStats]) -> ModelStats:
    """``stats`` plus the other workers' statistics of the same model version."""
    for other in others:
        if (other.name, other.version) == (stats.name, stats.version):
            stats = stats.plus(other)
    return stats
