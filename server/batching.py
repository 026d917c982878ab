"""Dynamic batching: requests for one model version merged into batches, run off the event loop.

A ``Batcher`` has two settings that matter, ``max_batch_size`` (rows) and ``max_batch_time``
(seconds the first request waits for company); optional preferred batch sizes end the wait early.
With ``more_coming`` the wait only lasts while requests are known to be on their way (being
preprocessed): a lone request runs at once instead of sitting out the delay, and under load
batches still grow, because the queue fills while the previous batch runs.
Each request gets its own future. What a full queue does: the request is rejected at once
with ``Overloaded`` (RESOURCE_EXHAUSTED), never blocked. When a batch is formed, requests whose
deadline has passed get ``DeadlineExceeded`` and cancelled requests are skipped: neither is run.
If running a batch fails, every request in it gets the error. Up to ``instances`` batches run
at once per batcher (per model version); a batch is formed when an instance comes free, so while
they all run the queue fills up, which is what makes batches grow under load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.errors import (
    Cancelled,
    DeadlineExceeded,
    InferenceFailed,
    Overloaded,
    ServerShuttingDown,
    ServingError,
)

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
# Merges the inputs of several requests into one batch (concatenating, padding as the model needs).
Collate = Callable[[Sequence[Tensors]], Tensors]
RunBatch = Callable[[Tensors], Tensors]


@dataclass(frozen=True)
class BatchTiming:
    """How one batch went, for statistics: rows and nanoseconds per stage."""

    batch_size: int
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(frozen=True)
class BatchedResult:
    """One request's slice of its batch's outputs, and how long it waited in the queue."""

    outputs: Tensors
    queue_ns: int
    batch: BatchTiming


@dataclass
class _Pending:
    inputs: Tensors
    rows: int
    deadline: float | None
    is_cancelled: Callable[[], bool] | None
    future: asyncio.Future[BatchedResult]
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    # Counted in the batcher's queue depth: from submit until its batch is formed or its caller leaves.
    waiting: bool = True

    def dropped_reason(self, now: float) -> ServingError | None:
        if self.future.done():  # cancelled by the caller's task
            return None
        if self.is_cancelled is not None and self.is_cancelled():
            return Cancelled("request cancelled by the client")
        if self.deadline is not None and now >= self.deadline:
            return DeadlineExceeded("deadline passed while the request was queued; it was not run")
        return None


class Batcher:
    """Merges concurrent requests for one model version into batches.

    Create it inside the running event loop (``start``): its queue belongs to that loop.
    """

    def __init__(
        self,
        name: str,
        run: RunBatch,
        collate: Collate,
        executor: concurrent.futures.Executor,
        *,
        instances: int = 1,
        max_batch_size: int,
        max_batch_time: float,
        max_queue_size: int,
        preferred_batch_sizes: Sequence[int] = (),
        on_batch: Callable[[BatchTiming], None] | None = None,
        more_coming: Callable[[], bool] | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        self.name = name
        self.instances = instances
        # None: always wait up to max_batch_time for company (a plain fixed delay).
        self._more_coming = more_coming
        self.max_batch_size = max_batch_size
        self.max_batch_time = max_batch_time
        self.max_queue_size = max_queue_size
        self.preferred_batch_sizes = frozenset(preferred_batch_sizes)
        self._run = run
        self._on_batch = on_batch
        self._collate = collate
        self._executor = executor
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        # Requests submitted and not yet running: in the queue, or in the batch being formed.
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._running_rows = 0
        # Batches running now, each a task: close() waits for them.
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Creates the queue and the batching task in the running loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    @property
    def queue_depth(self) -> int:
        """Requests waiting: queued, or in the batch being formed (not yet running)."""
        return self._waiting

    async def submit(
        self,
        inputs: Tensors,
        rows: int,
        *,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> BatchedResult:
        """Queues one request of ``rows`` rows (1..max_batch_size) and waits for its outputs.

        Raises:
            Overloaded: the queue is full (at once, without waiting).
            DeadlineExceeded: the deadline passed before the request ran.
            Cancelled: ``is_cancelled`` said so before the request ran.
            ServerShuttingDown: the batcher is closing.
            InferenceFailed: the batch it was in failed.
        """
        if self._queue is None or self._closing:
            raise ServerShuttingDown(f"model {self.name} is shutting down")
        if not 1 <= rows <= self.max_batch_size:
            raise ValueError(f"rows {rows} outside 1..{self.max_batch_size}")
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if self._waiting >= self.max_queue_size:
            raise Overloaded(
                f"model {self.name}: queue full ({self.max_queue_size} requests waiting); retry later"
            )
        pending = _Pending(inputs, rows, deadline, is_cancelled, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        self._waiting += 1
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller is gone (client cancelled, gRPC deadline passed): its queue slot is free
            # now, not only when the batcher reaches it, which then skips it (its future is cancelled).
            self._release(pending)
            raise

    def _release(self, pending: _Pending) -> None:
        if pending.waiting:
            pending.waiting = False
            self._waiting -= 1

    async def close(self) -> None:
        """Stops taking requests, lets the queued ones run, then stops the batching task."""
        self._closing = True
        if self._queue is not None:
            # A batching task that died (a bug) drains nothing: do not wait for it forever.
            while (self.queue_depth or self._running_rows) and not self._loop_ended():
                await asyncio.sleep(0.005)
            if self._loop_ended():
                self._fail_queued(ServerShuttingDown(f"model {self.name} is shutting down"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._running:  # only if the batching task ended early: let its batches answer
            await asyncio.gather(*self._running, return_exceptions=True)

    def _loop_ended(self) -> bool:
        return self._task is None or self._task.done()

    def _fail_queued(self, err: ServingError) -> None:
        """Answers every request still waiting (queued or carried over) with ``err``."""
        assert self._queue is not None
        left = [self._carry] if self._carry is not None else []
        self._carry = None
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        for pending in left:
            self._release(pending)
        _fail_all(left, err)

    # --- the batching task ----------------------------------------------------------------------

    async def _loop(self) -> None:
        free = asyncio.Semaphore(self.instances)
        while True:
            # The next batch is formed only once an instance is free to run it: until then
            # requests keep joining the queue, and the batch grows.
            await free.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                free.release()
                raise
            for pending in batch:
                self._release(pending)
            live = self._drop_unrunnable(batch)
            if not live:
                free.release()
                continue
            rows = sum(p.rows for p in live)
            self._running_rows += rows
            task = asyncio.get_running_loop().create_task(self._run_batch(live))
            self._running.add(task)  # also a reference: the task is not garbage-collected

            def finished(task: asyncio.Task[None], rows: int = rows) -> None:
                self._running.discard(task)
                self._running_rows -= rows
                free.release()

            task.add_done_callback(finished)

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, rows = [first], first.rows
        give_up_at = time.monotonic() + self.max_batch_time
        while rows < self.max_batch_size and rows not in self.preferred_batch_sizes:
            if self._queue.empty():
                wait = give_up_at - time.monotonic()
                if wait <= 0 or (self._more_coming is not None and not self._more_coming()):
                    break  # the delay is spent, or nobody is coming: waiting would only add latency
                try:
                    item = await asyncio.wait_for(self._queue.get(), wait)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if rows + item.rows > self.max_batch_size:
                self._carry = item  # starts the next batch
                break
            batch.append(item)
            rows += item.rows
        return batch

    def _drop_unrunnable(self, batch: list[_Pending]) -> list[_Pending]:
        now = time.monotonic()
        live = []
        for pending in batch:
            reason = pending.dropped_reason(now)
            if reason is not None:
                pending.future.set_exception(reason)
            elif not pending.future.done():
                live.append(pending)
        return live

    async def _run_batch(self, batch: list[_Pending]) -> None:
        """Runs one batch and answers its requests; whatever goes wrong, every one is answered."""
        try:
            await self._run_and_answer(batch)
        except asyncio.CancelledError:
            _fail_all(batch, ServerShuttingDown(f"model {self.name} is shutting down"))
            raise
        except Exception:
            log.exception("model %s: answering a batch of %d requests failed", self.name, len(batch))
            _fail_all(batch, InferenceFailed(f"model {self.name}: inference failed; see the server log"))

    async def _run_and_answer(self, batch: list[_Pending]) -> None:
        started_ns = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        try:
            outputs, timing = await loop.run_in_executor(self._executor, self._collate_run_split, batch)
        except ServingError as err:
            _fail_all(batch, err)
            return
        except Exception:
            log.exception("model %s: batch of %d requests failed", self.name, len(batch))
            _fail_all(batch, InferenceFailed(f"model {self.name}: inference failed; see the server log"))
            return
        if self._on_batch is not None:
            try:
                self._on_batch(timing)
            except Exception:
                # Statistics are not worth the answers: the batch ran, its callers get their rows.
                log.exception("model %s: recording a batch failed", self.name)
        for pending, result in zip(batch, outputs, strict=True):
            if not pending.future.done():
                queue_ns = started_ns - pending.enqueued_ns
                pending.future.set_result(BatchedResult(result, queue_ns, timing))

    def _collate_run_split(self, batch: list[_Pending]) -> tuple[list[Tensors], BatchTiming]:
        # Runs in the executor: merging, inference and slicing all stay off the event loop.
        t0 = time.perf_counter_ns()
        merged = self._collate([p.inputs for p in batch]) if len(batch) > 1 else batch[0].inputs
        t1 = time.perf_counter_ns()
        outputs = self._run(merged)
        t2 = time.perf_counter_ns()
        pieces: list[Tensors] = []
        start = 0
        for pending in batch:
            stop = start + pending.rows
            pieces.append({name: value[start:stop] for name, value in outputs.items()})
            start = stop
        t3 = time.perf_counter_ns()
        rows = sum(p.rows for p in batch)
        return pieces, BatchTiming(rows, t1 - t0, t2 - t1, t3 - t2)


def _fail_all(batch: list[_Pending], err: ServingError) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(err)


def concat_padded(pad_values: dict[str, int | float]) -> Collate:
    """A collate function: concatenates along the batch axis; inputs named in ``pad_values`` are
    right-padded on axis 1 to the longest request first (token ids, attention masks)."""

    def collate(requests: Sequence[Tensors]) -> Tensors:
        merged: Tensors = {}
        for name in requests[0]:
            parts = [r[name] for r in requests]
            if name in pad_values and parts[0].ndim >= 2:
                longest = max(p.shape[1] for p in parts)
                parts = [_pad_axis1(p, longest, pad_values[name]) for p in parts]
            merged[name] = np.concatenate(parts, axis=0)
        return merged

    return collate


def _pad_axis1(array: np.ndarray, length: int, value: int | float) -> np.ndarray:
    missing = length - array.shape[1]
    if missing == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[1] = (0, missing)
    return np.pad(array, widths, constant_values=value)


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def padded_to_buckets(run: RunBatch, buckets: Sequence[int]) -> RunBatch:
    """Wraps a batch function so it only ever sees the batch sizes in ``buckets``.

    Rows are padded with zeros up to the next bucket and the outputs cut back. On CUDA every new
    input shape costs onnxruntime a slow first run (kernel and cuDNN algorithm selection, memory
    planning); with buckets, the few shapes are all warmed up at load and a stream of
    varying batch sizes never pays that again.
    """
    ordered = sorted(buckets)

    def run_padded(inputs: Tensors) -> Tensors:
        rows = len(next(iter(inputs.values())))
        target = next((b for b in ordered if b >= rows), rows)
        if target == rows:
            return run(inputs)
        padded = {
            name: np.concatenate([value, np.zeros((target - rows, *value.shape[1:]), dtype=value.dtype)])
            for name, value in inputs.items()
        }
        return {name: value[:rows] for name, value in run(padded).items()}

    return run_padded
