"""How many batches of a model version run at once on CPU, measured at load (``instances=0``).

One run over every core, or two side by side on a core each: which serves more depends on the
model, so each CPU version measures both briefly on synthetic input and keeps two only where they
answer a lone row as fast and serve more rows under load (docs/performance.md, Instances
measured per model at load).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fineserve.server.config import Settings
from fineserve.server.runtime import CUDA, ModelSession, Threads, cpu_cores, plan_threads

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
Run = Callable[[Tensors], Tensors]

# Each measurement stops at a number of runs or a time, whichever comes first: a median of many
# lone runs of a small model, a few batches of a large one, and a load that stays about a second.
LONE_RUNS, LONE_BUDGET_S = 50, 0.05
LOAD_RUNS, LOAD_BUDGET_S = 20, 0.15
MIN_RUNS = 3
# Two instances must be this close to one for a lone row, and this much ahead under load: the
# measurements are short, on a machine other work shares. A lone request runs on one instance, so
# its latency must not pay for throughput; a near tie (as when a set intra_op_threads gives both
# the same session, and only load tells them apart) stays at one.
LONE_TOLERANCE = 1.05
LOAD_MARGIN = 1.05
# Rows per run when measuring under load: a batch a busy server forms, small enough that a large
# model still runs it several times within the budget. A busy server may form larger ones, which
# suit one instance better: the choice leans to two where they win only at small batches.
LOAD_ROWS = 8


@dataclass(frozen=True)
class Trial:
    """One way to run a version, measured: how many batches at once, threads in each run."""

    threads: Threads
    lone_ms: float  # median run of one row
    rows_per_s: float | None  # ``instances`` runs side by side; None: not measured (lost on lone_ms)

    def describe(self) -> str:
        load = f", {self.rows_per_s:,.0f} rows/s under load" if self.rows_per_s is not None else ""
        return (
            f"{self.threads.instances} instance(s) x {self.threads.intra_op} thread(s)"
            f" (lone row {self.lone_ms:.2f} ms{load})"
        )


@dataclass(frozen=True)
class Choice:
    chosen: Trial
    rejected: Trial
    seconds: float

    def describe(self) -> str:
        return f"{self.chosen.describe()} over {self.rejected.describe()}, measured in {self.seconds:.2f} s"


def choose(
    one: tuple[Threads, Run], two: tuple[Threads, Run], lone: Tensors, loaded: Callable[[], Tensors]
) -> Choice:
    """Measures ``one`` (one instance) and ``two`` (two) and keeps two only if it is as fast for a
    lone row and serves more rows under load (``loaded()``: a batch, made only then).

    Raises whatever a run raises."""
    started = time.perf_counter()
    (one_threads, one_run), (two_threads, two_run) = one, two
    one_lone = two_lone = float("inf")
    for _ in range(2):  # alternating rounds, best of each: noise on a shared machine hits one round
        one_lone = min(one_lone, lone_ms(one_run, lone))
        two_lone = min(two_lone, lone_ms(two_run, lone))
    if two_lone > one_lone * LONE_TOLERANCE:
        return Choice(
            Trial(one_threads, one_lone, None),
            Trial(two_threads, two_lone, None),
            time.perf_counter() - started,
        )
    # Only now a larger batch: a session keeps the memory of the largest it ran, and a version
    # that stays at one instance need not carry a measuring batch's worth of it.
    batch = loaded()
    rows = next(iter(batch.values())).shape[0]
    one_trial = Trial(one_threads, one_lone, rows_per_s(one_run, batch, rows, callers=1))
    two_trial = Trial(two_threads, two_lone, rows_per_s(two_run, batch, rows, callers=2))
    assert one_trial.rows_per_s is not None and two_trial.rows_per_s is not None
    seconds = time.perf_counter() - started
    if two_trial.rows_per_s >= one_trial.rows_per_s * LOAD_MARGIN:
        return Choice(two_trial, one_trial, seconds)
    return Choice(one_trial, two_trial, seconds)


def lone_ms(run: Run, inputs: Tensors, budget_s: float = LONE_BUDGET_S) -> float:
    """Median milliseconds of back-to-back runs of ``inputs`` (after one unmeasured run)."""
    run(inputs)
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < MIN_RUNS or (len(times) < LONE_RUNS and time.perf_counter() < end):
        start = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rows_per_s(run: Run, inputs: Tensors, rows: int, callers: int, budget_s: float = LOAD_BUDGET_S) -> float:
    """Rows per second with ``callers`` threads each running ``inputs`` back to back; raises what
    a run raised."""
    run(inputs)
    done = [0] * callers
    failures: list[Exception] = []
    gate = threading.Barrier(callers + 1)
    end = 0.0

    def caller(index: int) -> None:
        gate.wait()
        try:
            while done[index] < MIN_RUNS or (done[index] < LOAD_RUNS and time.perf_counter() < end):
                run(inputs)
                done[index] += 1
        except Exception as err:
            failures.append(err)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    end = start + budget_s
    gate.wait()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return sum(done) * rows / (time.perf_counter() - start)


def return_freed_memory() -> None:
    """Hands the heap that glibc kept from dropped objects back to the system (a no-op elsewhere).

    A session dropped after measuring leaves its weights' memory in glibc's free lists, counted in
    the process's resident memory until malloc_trim returns it (docs/performance.md).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def tune_instances(
    session: ModelSession,
    settings: Settings,
    *,
    sample: Callable[[int], Tensors],
    max_rows: int,
) -> tuple[Threads, ModelSession, Choice | None]:
    """Measures ``session`` (opened for one instance) against two instances and returns the
    winner's threads and session, and the measured choice. On CUDA, on one core, or where the
    measuring fails, one instance and ``session`` as they are (and no choice).

    ``sample(rows)`` makes synthetic inputs of up to ``max_rows`` rows.
    """
    one_threads = plan_threads(session.provider, 1, settings.intra_op_threads)
    if session.provider == CUDA or cpu_cores() < 2:
        return one_threads, session, None
    two_threads = plan_threads(session.provider, 2, settings.intra_op_threads)
    try:
        two = session
        if two_threads.intra_op != one_threads.intra_op:
            two = ModelSession(
                session.path,
                session.provider,
                settings,
                two_threads.intra_op,
                data_path=session.data_path,
                declared_outputs=session.declared_outputs,
            )
        loaded = functools.partial(sample, min(LOAD_ROWS, max_rows))
        choice = choose((one_threads, session.run), (two_threads, two.run), sample(1), loaded)
    except Exception as err:  # a graph that runs only some batch sizes still serves the others
        log.warning("%s: measuring instances failed (%s); running one", session.path, err)
        return one_threads, session, None
    if choice.chosen.threads.instances == 2:
        return two_threads, two, choice
    return one_threads, session, choice
