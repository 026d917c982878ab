"""The batcher alone (no gRPC): merging, a full queue, deadlines, cancellation, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fineserve.server.batching import (
    Batcher,
    Batching,
    BatchTiming,
    RunBatch,
    Tensors,
    batch_buckets,
    concat_padded,
    length_buckets,
    padded_to_buckets,
)
from fineserve.server.errors import (
    Cancelled,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    Overloaded,
    ServerShuttingDown,
)


class Doubler:
    """A batch function that records the batch sizes it saw."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, inputs: Tensors) -> Tensors:
        self.batches.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}


BATCHING_FIELDS = {field.name for field in dataclasses.fields(Batching)}


def make(run: RunBatch, **options: Any) -> Batcher:
    """A batcher over ``run`` with small defaults; a Batching field or Batcher option given
    replaces its default."""
    settings = {"max_batch_size": 8, "max_queue_delay_s": 0.05, "max_queue_size": 16}
    batching = Batching(**(settings | {k: v for k, v in options.items() if k in BATCHING_FIELDS}))
    rest = {k: v for k, v in options.items() if k not in BATCHING_FIELDS}
    return Batcher("test", run, concat_padded({}), batching, **rest)


def rows(*values: float) -> Tensors:
    return {"x": np.array(values, dtype=np.float32)}


def test_concurrent_requests_share_a_batch_and_get_their_own_rows() -> None:
    async def scenario() -> list[np.ndarray]:
        run = Doubler()
        batcher = make(run)
        batcher.start()
        results = await asyncio.gather(
            batcher.submit(rows(1, 2), 2), batcher.submit(rows(3), 1), batcher.submit(rows(4, 5, 6), 3)
        )
        await batcher.close()
        assert run.batches == [6]
        return [r.outputs["y"] for r in results]

    got = asyncio.run(scenario())
    assert [g.tolist() for g in got] == [[2, 4], [6], [8, 10, 12]]


def test_batches_never_exceed_max_batch_size() -> None:
    async def scenario() -> list[int]:
        run = Doubler()
        batcher = make(run, max_batch_size=4)
        batcher.start()
        await asyncio.gather(*(batcher.submit(rows(i, i), 2) for i in range(5)))
        await batcher.close()
        return run.batches

    batches = asyncio.run(scenario())
    assert sum(batches) == 10
    assert max(batches) <= 4


def test_a_full_queue_rejects_at_once() -> None:
    async def scenario() -> None:
        batcher = make(Doubler(), max_queue_size=2, max_queue_delay_s=0.3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1), 1))
        second = asyncio.ensure_future(batcher.submit(rows(2), 1))
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        started = time.monotonic()
        with pytest.raises(Overloaded, match="queue full"):
            await batcher.submit(rows(3), 1)
        assert time.monotonic() - started < 0.05
        assert [(await f).outputs["y"].tolist() for f in (first, second)] == [[2], [4]]
        assert batcher.queue_depth == 0
        await batcher.close()

    asyncio.run(scenario())


def test_expired_and_cancelled_requests_are_not_run() -> None:
    async def scenario() -> None:
        run = Doubler()
        batcher = make(run, max_queue_delay_s=0.2)
        batcher.start()
        expired = asyncio.ensure_future(batcher.submit(rows(1), 1, deadline=time.monotonic() + 0.05))
        cancelled = asyncio.ensure_future(batcher.submit(rows(2), 1, is_cancelled=lambda: True))
        aborted = asyncio.ensure_future(batcher.submit(rows(3), 1))
        kept = asyncio.ensure_future(batcher.submit(rows(4), 1))
        await asyncio.sleep(0.01)
        aborted.cancel()
        with pytest.raises(DeadlineExceeded):
            await expired
        with pytest.raises(Cancelled):
            await cancelled
        assert (await kept).outputs["y"].tolist() == [8]
        assert run.batches == [1]
        await batcher.close()

    asyncio.run(scenario())


def test_a_failed_batch_fails_every_request_in_it() -> None:
    def broken(inputs: Tensors) -> Tensors:
        raise RuntimeError("boom (internal detail)")

    async def scenario() -> None:
        batcher = make(broken, max_queue_size=8)
        batcher.start()
        results = await asyncio.gather(
            batcher.submit(rows(1), 1), batcher.submit(rows(2), 1), return_exceptions=True
        )
        assert all(isinstance(r, InferenceFailed) for r in results)
        assert "boom" not in str(results[0])
        await batcher.close()

    asyncio.run(scenario())


def test_a_failing_batch_hook_neither_loses_answers_nor_hangs_close() -> None:
    hook_calls: list[int] = []

    def broken_hook(timing: BatchTiming) -> None:
        hook_calls.append(timing.batch_size)
        raise RuntimeError("metrics broke")

    async def scenario() -> None:
        batcher = make(
            Doubler(),
            max_batch_size=2,
            max_queue_delay_s=0.01,
            max_queue_size=8,
            on_batch=broken_hook,
        )
        batcher.start()
        # Three batches of two: the hook fails after each, and later batches still run.
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(rows(i), 1) for i in range(6))), timeout=10
        )
        assert [r.outputs["y"].tolist() for r in results] == [[2 * i] for i in range(6)]
        assert len(hook_calls) >= 3
        await asyncio.wait_for(batcher.close(), timeout=5)

    asyncio.run(scenario())


def test_a_bug_while_forming_a_batch_fails_its_requests_and_batching_goes_on() -> None:
    calls = []

    def more_coming() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in more_coming")
        return False

    async def scenario() -> None:
        batcher = make(Doubler(), max_queue_delay_s=5.0, more_coming=more_coming)
        batcher.start()
        # Taken off the queue, then the bug: the request is answered, not lost.
        with pytest.raises(InferenceFailed):
            await asyncio.wait_for(batcher.submit(rows(1), 1), timeout=5)
        assert batcher.queue_depth == 0
        assert (await asyncio.wait_for(batcher.submit(rows(2), 1), timeout=5)).outputs["y"].tolist() == [4]
        await asyncio.wait_for(batcher.close(), timeout=5)

    asyncio.run(scenario())


class Stop(BaseException):
    """What stops a thread for good (as SystemExit would)."""


def test_when_the_last_batching_thread_stops_every_request_is_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        gate = threading.Event()
        batcher = make(Doubler(), max_batch_size=1, max_queue_delay_s=0.0, thread_name="doomed")

        def stopped(batch: object) -> None:
            gate.wait(5)
            raise Stop

        monkeypatch.setattr(batcher, "_run_batch", stopped)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(rows(1), 1))
        queued = asyncio.ensure_future(batcher.submit(rows(2), 1))
        await asyncio.sleep(0.05)
        assert batcher.queue_depth == 1  # one taken, one waiting behind it
        gate.set()
        for request in (running, queued):
            with pytest.raises(InferenceFailed):
                await asyncio.wait_for(request, timeout=5)
        for _ in range(500):
            if not any(t.name.startswith("doomed") for t in threading.enumerate()):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(InferenceFailed, match="threads stopped"):
            await batcher.submit(rows(3), 1)
        assert batcher.queue_depth == 0
        await asyncio.wait_for(batcher.close(), timeout=5)

    asyncio.run(scenario())


def test_the_next_batch_starts_while_the_event_loop_is_busy() -> None:
    # Batches are formed and started on the batching thread: a loop busy with other work
    # (receiving requests, sending answers) does not leave the model idle between batches.
    started: list[float] = []

    def run(inputs: Tensors) -> Tensors:
        started.append(time.monotonic())
        time.sleep(0.05)
        return {"y": inputs["x"] * 2}

    async def scenario() -> tuple[float, float, list[list[float]]]:
        batcher = make(run, max_batch_size=1, max_queue_delay_s=0.0)
        batcher.start()
        requests = [asyncio.ensure_future(batcher.submit(rows(i), 1)) for i in range(3)]
        await asyncio.sleep(0.01)  # all three queued, the first running
        blocked_from = time.monotonic()
        time.sleep(0.4)  # the loop is busy
        blocked_until = time.monotonic()
        results = await asyncio.gather(*requests)
        await batcher.close()
        return blocked_from, blocked_until, [r.outputs["y"].tolist() for r in results]

    blocked_from, blocked_until, got = asyncio.run(scenario())
    assert got == [[0.0], [2.0], [4.0]]
    assert len(started) == 3
    assert all(blocked_from < t < blocked_until for t in started[1:]), (blocked_from, started, blocked_until)


def test_preferred_batch_size_runs_without_waiting_out_the_delay() -> None:
    async def scenario() -> float:
        batcher = make(
            Doubler(),
            max_batch_size=8,
            max_queue_delay_s=5.0,
            max_queue_size=8,
            preferred_batch_sizes=(2,),
        )
        batcher.start()
        started = time.monotonic()
        await asyncio.gather(batcher.submit(rows(1), 1), batcher.submit(rows(2), 1))
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 1.0


def test_a_lone_request_runs_at_once_when_nobody_is_coming() -> None:
    async def scenario() -> float:
        batcher = make(
            Doubler(),
            max_batch_size=8,
            max_queue_delay_s=5.0,
            max_queue_size=8,
            more_coming=lambda: False,
        )
        batcher.start()
        started = time.monotonic()
        await batcher.submit(rows(1), 1)
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 1.0


def test_the_batch_waits_for_a_request_that_is_on_its_way() -> None:
    async def scenario() -> list[int]:
        run = Doubler()
        preparing = [1]  # one request is being preprocessed when the first one arrives
        batcher = make(
            run,
            max_batch_size=8,
            max_queue_delay_s=5.0,
            max_queue_size=8,
            more_coming=lambda: preparing[0] > 0,
        )
        batcher.start()

        async def late() -> None:
            await asyncio.sleep(0.05)
            preparing[0] = 0
            await batcher.submit(rows(2), 1)

        await asyncio.gather(batcher.submit(rows(1), 1), late())
        await batcher.close()
        return run.batches

    assert asyncio.run(scenario()) == [2]


def test_padding_collate_pads_token_axes() -> None:
    collate = concat_padded({"input_ids": 0})
    merged = collate([{"input_ids": np.array([[5, 6, 7]])}, {"input_ids": np.array([[8]])}])
    assert merged["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]


def test_bucket_padding_runs_only_bucket_sizes_and_cuts_outputs_back() -> None:
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert batch_buckets(1) == (1,)
    run = Doubler()
    padded = padded_to_buckets(run, batch_buckets(24))
    for rows in (1, 3, 5, 17, 24):
        x = np.arange(rows, dtype=np.float32)
        assert padded({"x": x})["y"].tolist() == (x * 2).tolist()
    assert run.batches == [1, 4, 8, 24, 24]


def test_sequence_padding_reaches_the_next_length_bucket_with_pad_values() -> None:
    assert length_buckets(16, [4, 8, 16, 32]) == (4, 8, 16)
    assert length_buckets(6, [4, 8]) == (4, 6)
    seen: list[Tensors] = []

    def run(inputs: Tensors) -> Tensors:
        seen.append(inputs)
        return {"logits": inputs["attention_mask"].sum(axis=1, keepdims=True).astype(np.float32)}

    padding: list[tuple[int, int]] = []
    padded = padded_to_buckets(
        run,
        (1, 2, 4),
        sequence_buckets=length_buckets(16, [4, 8]),
        pad_values={"input_ids": 7, "attention_mask": 0},
        on_padding=lambda rows, positions: padding.append((rows, positions)),
    )
    ids = np.array([[2, 5, 6, 3, 7], [2, 5, 3, 7, 7], [2, 3, 7, 7, 7]], np.int64)
    outputs = padded({"input_ids": ids, "attention_mask": (ids != 7).astype(np.int64)})
    assert outputs["logits"].ravel().tolist() == [4, 3, 2]  # cut back to the 3 real rows
    [batch] = seen
    assert batch["input_ids"].shape == (4, 8)  # rows to the bucket 4, length 5 to the bucket 8
    assert batch["input_ids"][:3, 5:].tolist() == [[7, 7, 7]] * 3
    assert batch["attention_mask"][:3, 5:].tolist() == [[0, 0, 0]] * 3
    assert padding == [(1, 3 * 3)]  # one zero row; 3 positions on each of the 3 real rows
    padded({"input_ids": ids[:1, :4], "attention_mask": np.ones((1, 4), np.int64)})
    assert seen[-1]["input_ids"].shape == (1, 4) and len(padding) == 1  # a warmed shape: no padding


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    max_batch_size=st.integers(6, 10),
    pad=st.booleans(),
    instances=st.integers(1, 3),
)
def test_every_request_gets_exactly_its_own_rows(
    sizes: list[int], max_batch_size: int, pad: bool, instances: int
) -> None:
    run = Doubler()
    batch_function = padded_to_buckets(run, batch_buckets(max_batch_size)) if pad else run

    async def scenario() -> list[list[float]]:
        batcher = make(
            batch_function,
            instances=instances,
            max_batch_size=max_batch_size,
            max_queue_delay_s=0.002,
            max_queue_size=64,
        )
        batcher.start()
        starts = np.cumsum([0, *sizes])
        requests = [rows(*range(int(a), int(b))) for a, b in itertools.pairwise(starts)]
        results = await asyncio.gather(*(batcher.submit(r, len(r["x"])) for r in requests))
        await batcher.close()
        return [r.outputs["y"].tolist() for r in results]

    got = asyncio.run(scenario())
    starts = np.cumsum([0, *sizes])
    assert got == [[2.0 * i for i in range(a, b)] for a, b in itertools.pairwise(starts)]
    assert all(size <= max_batch_size for size in run.batches)


class Overlap:
    """A batch function that takes ``seconds`` and records how many batches ran at once, at most."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Tensors) -> Tensors:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return {"y": inputs["x"] * 2}


@pytest.mark.parametrize("instances", [1, 3])
def test_at_most_instances_batches_run_at_once(instances: int) -> None:
    run = Overlap(0.05)

    async def scenario() -> list[list[float]]:
        batcher = make(run, instances=instances, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=16)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(i), 1) for i in range(6)))
        await asyncio.wait_for(batcher.close(), timeout=5)
        return [r.outputs["y"].tolist() for r in results]

    got = asyncio.run(scenario())
    assert got == [[2.0 * i] for i in range(6)]
    assert run.most == instances


def test_with_two_instances_a_slow_batch_does_not_hold_up_the_next() -> None:
    # Each batch waits at a barrier for a second batch to be running too: that only passes when
    # the two run side by side (with one instance the barrier breaks and the batch fails).
    barrier = threading.Barrier(2, timeout=5)

    def run(inputs: Tensors) -> Tensors:
        barrier.wait()
        return {"y": inputs["x"] * 2}

    async def scenario() -> list[list[float]]:
        batcher = make(run, instances=2, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=4)
        batcher.start()
        results = await asyncio.wait_for(
            asyncio.gather(batcher.submit(rows(1), 1), batcher.submit(rows(2), 1)), timeout=10
        )
        await batcher.close()
        return [r.outputs["y"].tolist() for r in results]

    assert asyncio.run(scenario()) == [[2.0], [4.0]]


def test_close_waits_for_every_running_batch() -> None:
    run = Overlap(0.2)

    async def scenario() -> None:
        batcher = make(run, instances=2, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=4)
        batcher.start()
        requests = [asyncio.ensure_future(batcher.submit(rows(i), 1)) for i in range(2)]
        await asyncio.sleep(0.05)  # both running now
        await asyncio.wait_for(batcher.close(), timeout=5)
        assert all(r.done() for r in requests)
        assert [r.result().outputs["y"].tolist() for r in requests] == [[0.0], [2.0]]
        with pytest.raises(ServerShuttingDown):
            await batcher.submit(rows(9), 1)

    asyncio.run(scenario())
    assert run.most == 2


def test_batching_for_a_model_caps_rows_and_preferred_sizes() -> None:
    settings = Batching(
        max_batch_size=32,
        max_queue_delay_s=0.002,
        max_queue_size=8,
        preferred_batch_sizes=(4, 8, 16),
        instances=2,
    )
    assert settings.for_model(8) == Batching(
        max_batch_size=8, max_queue_delay_s=0.002, max_queue_size=8, preferred_batch_sizes=(4, 8), instances=2
    )
    assert settings.for_model(64) == settings


def test_instances_must_be_positive() -> None:
    with pytest.raises(ValueError, match="instances"):
        make(Doubler(), instances=0)


def test_every_request_is_answered_even_when_answering_its_batch_breaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        batcher = make(Doubler(), instances=2, max_batch_size=1, max_queue_delay_s=0.0)

        def broken(*args: object) -> None:
            raise RuntimeError("a bug past the inference")

        monkeypatch.setattr(batcher, "_answer", broken)
        batcher.start()
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(rows(i), 1) for i in range(3)), return_exceptions=True), timeout=5
        )
        assert all(isinstance(r, InferenceFailed) for r in results), results
        await asyncio.wait_for(batcher.close(), timeout=5)

    asyncio.run(scenario())


class WhereItRan(Doubler):
    """A Doubler that also records which thread ran each batch, and can be made slow or failing."""

    def __init__(self, seconds: float = 0.0, fail: Exception | None = None) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.seconds = seconds
        self.fail = fail

    def __call__(self, inputs: Tensors) -> Tensors:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        if self.fail is not None:
            raise self.fail
        return super().__call__(inputs)


def test_a_cheap_graph_runs_lone_requests_on_the_loop_once_its_run_time_is_known() -> None:
    async def scenario() -> WhereItRan:
        run = WhereItRan()
        batcher = make(run, inline_run_s=0.01, more_coming=lambda: False)
        batcher.start()
        results = [await batcher.submit(rows(i), 1) for i in range(4)]  # one at a time: queue empty
        assert [r.outputs["y"].tolist() for r in results] == [[0], [2], [4], [6]]
        assert [r.queue_ns == 0 for r in results] == [False, True, True, True]
        await batcher.close()
        return run

    run = asyncio.run(scenario())
    # the first run, of unknown cost, went to a batching thread; the others ran on the loop
    assert run.threads[0].startswith("batcher-test") and run.threads[1:] == ["MainThread"] * 3


@pytest.mark.parametrize(
    ("options", "seconds", "request_rows"),
    [
        ({"inline_run_s": 0.0}, 0.0, 1),  # off
        ({"inline_run_s": 0.001}, 0.01, 1),  # the graph is too slow
        ({"inline_run_s": 0.004}, 0.001, 6),  # 6 rows x the average run would be too slow
        ({"inline_run_s": 0.01, "more_coming": lambda: True}, 0.0, 1),  # company is on its way
        ({"inline_run_s": 0.01, "more_coming": None}, 0.0, 1),  # a fixed wait was asked for
    ],
)
def test_requests_go_to_the_threads_unless_inline_is_on_cheap_and_alone(
    options: dict, seconds: float, request_rows: int
) -> None:
    async def scenario() -> WhereItRan:
        run = WhereItRan(seconds)
        batcher = make(run, **({"more_coming": lambda: False} | options))
        batcher.start()
        for i in range(3):
            await batcher.submit(rows(*[i] * request_rows), request_rows)
        await batcher.close()
        return run

    assert all(name.startswith("batcher-test") for name in asyncio.run(scenario()).threads)


def test_a_run_on_the_loop_is_recorded_and_a_cancelled_request_is_not_run() -> None:
    timings: list[BatchTiming] = []

    async def scenario() -> WhereItRan:
        run = WhereItRan()
        batcher = make(run, inline_run_s=0.01, more_coming=lambda: False, on_batch=timings.append)
        batcher.start()
        await batcher.submit(rows(0), 1)
        await batcher.submit(rows(1, 2), 2)  # on the loop
        with pytest.raises(Cancelled):
            await batcher.submit(rows(3), 1, is_cancelled=lambda: True)
        await batcher.close()
        return run

    run = asyncio.run(scenario())
    assert run.threads[1:] == ["MainThread"] and run.batches == [1, 2]
    assert [t.batch_size for t in timings] == [1, 2] and timings[1].infer_ns > 0


def test_with_requests_queued_a_new_one_joins_the_queue_instead_of_running_ahead() -> None:
    release = threading.Event()

    class Held(WhereItRan):
        def __call__(self, inputs: Tensors) -> Tensors:
            if len(self.threads) == 1:  # the second run waits until released
                release.wait(5)
            return super().__call__(inputs)

    async def scenario() -> Held:
        run = Held()
        batcher = make(run, inline_run_s=0.01, max_queue_delay_s=0.0, more_coming=lambda: False)
        batcher.start()
        await batcher.submit(rows(0), 1)  # learns the run time, on a thread
        # Fill the queue behind a held batch (inline off for a moment: a lone request would run on the loop).
        batcher.batching = dataclasses.replace(batcher.batching, inline_run_s=0.0)
        first = asyncio.ensure_future(batcher.submit(rows(2), 1))
        await asyncio.sleep(0.05)  # its batch is running, held
        second = asyncio.ensure_future(batcher.submit(rows(3), 1))
        await asyncio.sleep(0.05)
        assert batcher.queue_depth == 1
        batcher.batching = dataclasses.replace(batcher.batching, inline_run_s=0.01)
        third = asyncio.ensure_future(batcher.submit(rows(4), 1))
        await asyncio.sleep(0.05)
        assert not third.done()  # queued behind the others, not run ahead of them on the loop
        release.set()
        assert [(await f).outputs["y"].tolist() for f in (first, second, third)] == [[4], [6], [8]]
        await batcher.close()
        return run

    run = asyncio.run(scenario())
    assert all(name.startswith("batcher-test") for name in run.threads)


def test_a_run_on_the_loop_that_fails_answers_its_request_with_the_error() -> None:
    async def scenario() -> None:
        run = WhereItRan()
        batcher = make(run, inline_run_s=0.01, more_coming=lambda: False)
        batcher.start()
        await batcher.submit(rows(0), 1)
        run.fail = RuntimeError("broken graph")
        with pytest.raises(InferenceFailed, match="inference failed"):
            await batcher.submit(rows(1), 1)
        run.fail = InvalidInput("bad row")
        with pytest.raises(InvalidInput, match="bad row"):
            await batcher.submit(rows(2), 1)
        await batcher.close()
        assert run.threads[1:] == ["MainThread", "MainThread"]

    asyncio.run(scenario())
