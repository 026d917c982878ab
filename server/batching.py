"""Dynamic batching: concurrent requests for one model version merged into batches, which are
formed and run on the batcher's own threads, off the event loop (a lone request for a graph
cheaper than that hand-off runs on the loop). ``Batching`` is how one version
batches; ``Batcher`` does it (docs/serving.md, Batching).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fineserve.server.errors import (
    Cancelled,
    DeadlineExceeded,
    InferenceFailed,
    Overloaded,
    ServerShuttingDown,
    ServingError,
)
from fineserve.server.threads import name_thread

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
# Merges the inputs of several requests into one batch (concatenating, padding as the model needs).
Collate = Callable[[Sequence[Tensors]], Tensors]
RunBatch = Callable[[Tensors], Tensors]
# The weight of the newest run in the moving average of run times: about the last 10 runs count.
RUN_TIME_WEIGHT = 0.1


@dataclass(frozen=True)
class Batching:
    """How one model version batches, decided once when it loads (``Settings.batching_for``, then
    ``for_model``) and read from there by its batcher, its handle and the transports."""

    max_batch_size: int
    """Rows per batch at most: the smaller of the settings' cap and the model's own."""
    max_queue_delay_s: float
    """How long the first request of a batch waits for others to join it, in seconds (the
    settings say it in ms, KServe's ModelConfig in µs: each converts at its edge)."""
    max_queue_size: int
    """Requests waiting at most; one more is rejected at once with ``Overloaded``."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes that run at once without waiting out the delay; none above ``max_batch_size``."""
    instances: int = 1
    """Batches that run at once, each on its own thread (0 in the settings: measured at load)."""
    inline_run_s: float = 0.0
    """A request that finds nobody to batch with runs on the event loop itself, without the
    hand-off to a batching thread and back, while this version's recent runs took at most this
    long (seconds, times the request's rows; 0: never). For graphs cheaper than the hand-off
    (``Settings.inline_run_us``; ``Batcher``)."""

    def for_model(self, model_max_batch_size: int) -> Batching:
        """These settings for a model whose own ``max_batch_size`` (model.json) caps the batch."""
        cap = min(self.max_batch_size, model_max_batch_size)
        preferred = tuple(b for b in self.preferred_batch_sizes if b <= cap)
        return dataclasses.replace(self, max_batch_size=cap, preferred_batch_sizes=preferred)


@dataclass(frozen=True)
class BatchTiming:
    """How one batch went, for statistics: rows and nanoseconds per stage."""

    batch_size: int
    input_ns: int
    infer_ns: int
    output_ns: int


# What a batching thread hands the loop for a batch: each request's outputs and the timing, the
# error every request gets, or None (nobody left to answer).
_Outcome = tuple[list[Tensors], BatchTiming] | ServingError | None


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


@dataclass(frozen=True)
class _Ran:
    """A batch a batching thread is done with, for the loop to answer."""

    started_ns: int
    live: list[_Pending]  # run (or failed) together
    dropped: list[tuple[_Pending, ServingError]]  # expired or cancelled before the run
    outcome: _Outcome


class Batcher:
    """Merges concurrent requests for one model version into batches, run on its own threads.

    ``start`` it inside the running event loop: requests are answered on that loop, each through
    its own future. The first request of a batch waits up to ``max_queue_delay_s`` for company
    (with ``more_coming``, only while more are known to be on their way); a preferred batch size
    ends the wait early. A full queue rejects at once with ``Overloaded`` (RESOURCE_EXHAUSTED),
    it never blocks. When a batch is formed, requests whose deadline has passed get
    ``DeadlineExceeded`` and cancelled ones are skipped: neither is run. If running a batch
    fails, every request in it gets the error.

    A thread that finishes a batch forms the next from the queue at once, so batches never wait
    behind the event loop, which only queues requests and answers each batch once
    (docs/performance.md); while every instance runs, the queue fills and batches grow.

    The exception: with ``inline_run_s`` and an adaptive wait, a request that finds nobody to
    batch with (the queue empty, no other request being prepared) runs on the loop at once while
    the version's runs stay that cheap: a near-free graph costs less than the hand-off to a
    thread and back. Such a run ends before the loop takes the next request, so for these
    versions requests rarely queue, even under load: each pays its own (cheap) run instead of a
    share of a batch's (docs/performance.md, "Runs on the loop", measures both).
    """

    def __init__(
        self,
        name: str,
        run: RunBatch,
        collate: Collate,
        batching: Batching,
        *,
        on_batch: Callable[[BatchTiming], None] | None = None,
        more_coming: Callable[[], bool] | None = None,
        thread_name: str | None = None,
    ) -> None:
        if batching.instances < 1:
            raise ValueError(f"instances must be at least 1, got {batching.instances}")
        self.name = name
        self.batching = batching
        # None: always wait up to max_queue_delay_s for company (a plain fixed delay). Called on a
        # batching thread, so it must only read.
        self._more_coming = more_coming
        self._preferred = frozenset(batching.preferred_batch_sizes)
        self._run = run
        self._on_batch = on_batch
        self._collate = collate
        self._thread_name = thread_name or f"batcher-{name}"
        # Guards the queue and the counts below; batching threads wait on it for requests.
        self._lock = threading.Condition()
        self._queue: collections.deque[_Pending] = collections.deque()
        # Requests submitted and not yet in a formed batch (cancelled ones leave the count at once).
        self._waiting = 0
        # Batches formed and not yet answered on the loop: close() waits for them.
        self._unanswered = 0
        self._stopping = False
        # One thread forms a batch at a time; the others wait their turn here, not for requests.
        self._forming = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # Moving average of how long a batch's run took (seconds; None until one has run), kept
        # on the loop: whether a lone request is cheaper to run there than to hand off.
        self._run_s: float | None = None

    def start(self) -> None:
        """Starts one batching thread per instance; answers go to the running loop."""
        self._loop = asyncio.get_running_loop()
        for index in range(self.batching.instances):
            thread = threading.Thread(target=self._work, name=f"{self._thread_name}_{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

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
            InferenceFailed: the batch it was in failed, or the batching threads are gone.
        """
        if self._loop is None or self._closing:
            raise ServerShuttingDown(f"model {self.name} is shutting down")
        if not 1 <= rows <= self.batching.max_batch_size:
            raise ValueError(f"rows {rows} outside 1..{self.batching.max_batch_size}")
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if not self._threads_alive():
            raise InferenceFailed(f"model {self.name}: its batching threads stopped; see the server log")
        if self._runs_inline(rows):
            if is_cancelled is not None and is_cancelled():
                raise Cancelled("request cancelled by the client")
            return self._run_inline(inputs, rows)
        pending = _Pending(inputs, rows, deadline, is_cancelled, self._loop.create_future())
        with self._lock:
            if self._waiting >= self.batching.max_queue_size:
                raise Overloaded(
                    f"model {self.name}: queue full ({self.batching.max_queue_size} requests waiting); "
                    "retry later"
                )
            self._queue.append(pending)
            self._waiting += 1
            self._lock.notify()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller is gone (client cancelled, gRPC deadline passed): its queue slot is free
            # now, not only when a batching thread reaches it, which then skips it.
            with self._lock:
                self._release(pending)
            raise

    def _runs_inline(self, rows: int) -> bool:
        """Nobody to batch with (none queued, none on the way), and a run cheaper than handing
        it to a thread and back: ``rows`` times the recent runs' average, to be safe. Never with
        a fixed wait (``more_coming`` None): whoever asked for batches to wait for company gets it."""
        limit = self.batching.inline_run_s
        if limit <= 0 or self._run_s is None or self._more_coming is None:
            return False
        return self._waiting == 0 and rows * self._run_s <= limit and not self._more_coming()

    def _run_inline(self, inputs: Tensors, rows: int) -> BatchedResult:
        """Runs one request on the loop's thread: a batch of one, answered at once."""
        try:
            [outputs], timing = self._collate_run_split([inputs], [rows])
        except ServingError:
            raise
        except Exception as err:
            log.exception("model %s: a request run on the event loop failed", self.name)
            raise InferenceFailed(f"model {self.name}: inference failed; see the server log") from err
        self._record(timing)
        return BatchedResult(outputs, 0, timing)

    def _release(self, pending: _Pending) -> None:
        # Holding self._lock.
        if pending.waiting:
            pending.waiting = False
            self._waiting -= 1

    async def close(self) -> None:
        """Stops taking requests, lets the queued ones run and be answered, then stops the threads."""
        self._closing = True
        # Threads that died (a bug) drain nothing: do not wait for them forever.
        while (self._waiting or self._unanswered) and self._threads_alive():
            await asyncio.sleep(0.005)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            left = list(self._queue)
            self._queue.clear()
            for pending in left:
                self._release(pending)
        _fail_all(left, ServerShuttingDown(f"model {self.name} is shutting down"))
        while self._threads_alive():
            await asyncio.sleep(0.005)

    def _threads_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    # --- the batching threads -------------------------------------------------------------------

    def _work(self) -> None:
        name_thread(self._thread_name)  # what top -H and py-spy show (server/threads.py)
        while True:
            batch: list[_Pending] = []
            formed = False
            try:
                with self._forming:
                    if not self._take_batch(batch):
                        return  # stopping
                formed = True
                self._run_batch(batch)
            except BaseException as err:
                # A bug (or the interpreter stopping the thread): the requests it holds still get
                # an answer, and a thread goes on with the next batch unless it must stop.
                log.exception("model %s: batching failed; its requests get an error", self.name)
                self._fail_taken(batch, formed)
                if not isinstance(err, Exception):
                    self._stop_thread()
                    return

    def _take_batch(self, batch: list[_Pending]) -> bool:
        """Moves the next batch off the queue into ``batch``, waiting for its first request;
        False: stopping, nothing taken."""
        with self._lock:
            rows = 0
            give_up_at = 0.0
            while rows < self.batching.max_batch_size and rows not in self._preferred:
                if not self._queue:
                    if self._stopping:
                        break
                    if not batch:
                        self._lock.wait()
                        continue
                    wait = give_up_at - time.monotonic()
                    if wait <= 0 or (self._more_coming is not None and not self._more_coming()):
                        break  # the delay is spent, or nobody is coming: waiting would only add latency
                    self._lock.wait(wait)
                    continue
                item = self._queue[0]
                if item.future.done():  # its caller left: it takes no room in a batch
                    self._queue.popleft()
                    self._release(item)
                    continue
                if rows + item.rows > self.batching.max_batch_size:
                    break  # it starts the next batch
                self._queue.popleft()
                if not batch:
                    give_up_at = time.monotonic() + self.batching.max_queue_delay_s
                batch.append(item)
                rows += item.rows
            if not batch:
                return False
            for pending in batch:  # counted as waiting while their batch was being formed
                self._release(pending)
            self._unanswered += 1
            return True

    def _fail_taken(self, batch: list[_Pending], formed: bool) -> None:
        """Answers requests a thread took off the queue with ``InferenceFailed``."""
        if not batch:
            return
        with self._lock:
            for pending in batch:
                self._release(pending)
            if not formed:
                self._unanswered += 1  # _finish counts it answered
        failed = InferenceFailed(f"model {self.name}: inference failed; see the server log")
        self._post(_Ran(0, batch, [], failed))

    def _stop_thread(self) -> None:
        """This thread ends early; if it is the last, nobody would take what is queued: fail it."""
        current = threading.current_thread()
        if any(t.is_alive() for t in self._threads if t is not current):
            return
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
        self._fail_taken(left, formed=False)

    def _run_batch(self, batch: list[_Pending]) -> None:
        """Runs one batch on this thread and hands every request's answer to the loop."""
        started_ns = time.perf_counter_ns()
        now = time.monotonic()
        dropped: list[tuple[_Pending, ServingError]] = []
        live: list[_Pending] = []
        for pending in batch:
            reason = pending.dropped_reason(now)
            if reason is not None:
                dropped.append((pending, reason))
            elif not pending.future.done():
                live.append(pending)
        outcome: _Outcome = None
        if live:
            try:
                outcome = self._collate_run_split([p.inputs for p in live], [p.rows for p in live])
            except ServingError as err:
                outcome = err
            except Exception:
                log.exception("model %s: batch of %d requests failed", self.name, len(live))
                outcome = InferenceFailed(f"model {self.name}: inference failed; see the server log")
        self._post(_Ran(started_ns, live, dropped, outcome))

    def _post(self, ran: _Ran) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._finish, ran)
        except RuntimeError:  # the loop is closed: nobody is left to answer
            log.warning("model %s: the event loop closed before a batch was answered", self.name)

    def _collate_run_split(self, inputs: list[Tensors], rows: list[int]) -> tuple[list[Tensors], BatchTiming]:
        """One batch of requests' ``inputs`` (``rows`` each) merged, run, and split back."""
        t0 = time.perf_counter_ns()
        merged = self._collate(inputs) if len(inputs) > 1 else inputs[0]
        t1 = time.perf_counter_ns()
        outputs = self._run(merged)
        t2 = time.perf_counter_ns()
        pieces: list[Tensors] = []
        start = 0
        for count in rows:
            stop = start + count
            pieces.append({name: value[start:stop] for name, value in outputs.items()})
            start = stop
        t3 = time.perf_counter_ns()
        return pieces, BatchTiming(sum(rows), t1 - t0, t2 - t1, t3 - t2)

    # --- back on the event loop -----------------------------------------------------------------

    def _finish(self, ran: _Ran) -> None:
        """Answers one batch's requests; whatever goes wrong, every one is answered."""
        try:
            for pending, reason in ran.dropped:
                if not pending.future.done():
                    pending.future.set_exception(reason)
            self._answer(ran)
        except Exception:
            log.exception("model %s: answering a batch of %d requests failed", self.name, len(ran.live))
            _fail_all(ran.live, InferenceFailed(f"model {self.name}: inference failed; see the server log"))
        finally:
            with self._lock:
                self._unanswered -= 1

    def _answer(self, ran: _Ran) -> None:
        if ran.outcome is None:
            return
        if isinstance(ran.outcome, ServingError):
            _fail_all(ran.live, ran.outcome)
            return
        outputs, timing = ran.outcome
        self._record(timing)
        for pending, result in zip(ran.live, outputs, strict=True):
            if not pending.future.done():
                pending.future.set_result(BatchedResult(result, ran.started_ns - pending.enqueued_ns, timing))

    def _record(self, timing: BatchTiming) -> None:
        """A batch ran (on the loop's thread): its statistics, and the run time the choice to
        run inline reads."""
        run_s = timing.infer_ns / 1e9
        self._run_s = run_s if self._run_s is None else self._run_s + RUN_TIME_WEIGHT * (run_s - self._run_s)
        if self._on_batch is not None:
            try:
                self._on_batch(timing)
            except Exception:
                # Statistics are not worth the answers: the batch ran, its callers get their rows.
                log.exception("model %s: recording a batch failed", self.name)


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


def length_buckets(max_length: int, lengths: Sequence[int]) -> tuple[int, ...]:
    """The ``lengths`` below ``max_length``, and ``max_length`` itself: the sequence lengths a text
    model's batches are padded to."""
    return tuple(sorted({n for n in lengths if n < max_length} | {max_length}))


# Rows and sequence positions of padding added to one batch (an on_padding callback's arguments).
OnPadding = Callable[[int, int], None]


def padded_to_buckets(
    run: RunBatch,
    buckets: Sequence[int],
    *,
    sequence_buckets: Sequence[int] = (),
    pad_values: Mapping[str, int | float] | None = None,
    on_padding: OnPadding | None = None,
) -> RunBatch:
    """Wraps a batch function so it only ever sees the batch sizes in ``buckets`` and, for the
    inputs named in ``pad_values`` (token ids, attention masks: ``[batch, sequence]``), the
    sequence lengths in ``sequence_buckets``.

    Rows are padded with zeros up to the next bucket and the outputs cut back; sequences are
    right-padded with each input's pad value (attention mask 0, so the model ignores the
    positions) up to the next length bucket. On CUDA every new input shape costs onnxruntime a
    slow first run (kernel and cuDNN algorithm selection, memory planning); with buckets, the few
    shapes are all warmed up at load and a stream of varying batches never pays that again.
    ``on_padding`` is told each batch's padding rows and positions (per real row, on the sequence
    axis), where any was added.
    """
    ordered = sorted(buckets)
    lengths = sorted(sequence_buckets)
    pad = dict(pad_values or {})

    def run_padded(inputs: Tensors) -> Tensors:
        rows = len(next(iter(inputs.values())))
        inputs, positions = _pad_sequences(inputs, lengths, pad)
        target = next((b for b in ordered if b >= rows), rows)
        if on_padding is not None and (target > rows or positions):
            on_padding(target - rows, positions * rows)
        if target == rows:
            return run(inputs)
        padded = {
            name: np.concatenate([value, np.zeros((target - rows, *value.shape[1:]), dtype=value.dtype)])
            for name, value in inputs.items()
        }
        return {name: value[:rows] for name, value in run(padded).items()}

    return run_padded


def _pad_sequences(
    inputs: Tensors, lengths: Sequence[int], pad_values: Mapping[str, int | float]
) -> tuple[Tensors, int]:
    """``inputs`` with their sequence axis padded to the next of ``lengths``, and the positions
    each row gained (0: no bucket fits, or nothing to pad)."""
    sequences = [name for name, value in inputs.items() if name in pad_values and value.ndim >= 2]
    if not lengths or not sequences:
        return inputs, 0
    length = inputs[sequences[0]].shape[1]
    target = next((n for n in lengths if n >= length), length)
    if target == length:
        return inputs, 0
    padded = dict(inputs)
    for name in sequences:
        padded[name] = _pad_axis1(inputs[name], target, pad_values[name])
    return padded, target - length
