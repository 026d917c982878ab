"""Instances measured at load (``instances=0``): the choice rule on runs of known cost, then a
real session of a tiny graph."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fineserve.export.contract import read_model_spec
from fineserve.server.config import load_settings
from fineserve.server.model import synthetic_inputs
from fineserve.server.runtime import CPU, ModelSession, Threads, cpu_cores
from fineserve.server.tuning import Choice, Run, choose, rows_per_s, tune_instances
from tests.fixtures import publish_graph_that_fails_above_batch_1

ONE = Threads(instances=1, intra_op=2)
TWO = Threads(instances=2, intra_op=1)


def rows(count: int) -> dict[str, np.ndarray]:
    return {"x": np.zeros((count, 4), dtype=np.float32)}


def timed(lone_s: float, loaded_s: float, *, one_at_a_time: bool = False) -> Run:
    """A run that takes ``lone_s`` for one row and ``loaded_s`` for more; with ``one_at_a_time``
    runs side by side queue for each other (nothing gained from a second instance)."""
    lock = threading.Lock()

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds = lone_s if len(inputs["x"]) == 1 else loaded_s
        if one_at_a_time:
            with lock:
                time.sleep(seconds)
        else:
            time.sleep(seconds)
        return inputs

    return run


def test_two_instances_win_when_faster_alone_and_under_load() -> None:
    # Like fashion: one core runs a lone row faster than two, and two runs side by side beat one.
    choice = choose((ONE, timed(0.006, 0.006)), (TWO, timed(0.002, 0.006)), rows(1), lambda: rows(8))
    assert choice.chosen.threads == TWO
    assert choice.chosen.lone_ms < choice.rejected.lone_ms
    assert choice.chosen.rows_per_s is not None and choice.rejected.rows_per_s is not None
    assert choice.chosen.rows_per_s > 1.5 * choice.rejected.rows_per_s
    assert "2 instance(s) x 1 thread(s)" in choice.describe().split(" over ")[0]


def test_one_instance_stays_when_two_are_slower_for_a_lone_row() -> None:
    # Like sentiment: a lone text is slower on one core; throughput is not even measured.
    choice = choose((ONE, timed(0.002, 0.006)), (TWO, timed(0.006, 0.006)), rows(1), lambda: rows(8))
    assert choice.chosen.threads == ONE
    assert choice.chosen.rows_per_s is None and choice.rejected.rows_per_s is None


def test_one_instance_stays_when_two_serve_less_under_load() -> None:
    choice = choose(
        (ONE, timed(0.004, 0.004)), (TWO, timed(0.002, 0.016, one_at_a_time=True)), rows(1), lambda: rows(8)
    )
    assert choice.chosen.threads == ONE
    assert choice.chosen.rows_per_s is not None and choice.rejected.rows_per_s is not None
    assert choice.chosen.rows_per_s > choice.rejected.rows_per_s


def test_the_same_session_for_both_is_decided_by_load_with_a_margin() -> None:
    # A set intra_op_threads gives one and two instances the same session: lone rows tie, so load
    # decides, and only a clear lead takes two.
    scales = timed(0.003, 0.003)  # runs side by side overlap
    queues = timed(0.003, 0.003, one_at_a_time=True)  # they wait for each other
    assert choose((ONE, scales), (TWO, scales), rows(1), lambda: rows(8)).chosen.threads == TWO
    assert choose((ONE, queues), (TWO, queues), rows(1), lambda: rows(8)).chosen.threads == ONE


def test_a_run_failing_under_load_is_raised() -> None:
    calls: list[int] = []

    def fails_after_the_first_run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(1)
        if len(calls) > 1:  # the unmeasured first run passes; the callers' runs fail
            raise RuntimeError("a later run failed")
        return inputs

    with pytest.raises(RuntimeError, match="a later run failed"):
        rows_per_s(fails_after_the_first_run, rows(8), 8, callers=2)


def open_one(version: Path) -> tuple[ModelSession, Callable[[int], dict[str, np.ndarray]]]:
    spec = read_model_spec(version)
    session = ModelSession(version / spec.variant("fp32").file, CPU, load_settings(), cpu_cores())
    return session, lambda count: synthetic_inputs(spec, count, 8)


def test_a_real_session_is_measured(tiny_repository: Path) -> None:
    session, sample = open_one(tiny_repository / "tiny-image" / "1")
    started = time.perf_counter()
    threads, chosen, choice = tune_instances(session, load_settings(), sample=sample, max_rows=4)
    assert time.perf_counter() - started < 5
    assert next(iter(chosen.run(sample(3)).values())).shape[0] == 3
    if cpu_cores() < 2:
        assert (threads.instances, chosen, choice) == (1, session, None)
        return
    assert isinstance(choice, Choice)
    assert choice.chosen.threads == threads
    assert {choice.chosen.threads.instances, choice.rejected.threads.instances} == {1, 2}
    assert (chosen is session) == (threads.instances == 1)
    assert choice.chosen.lone_ms > 0


def test_a_run_that_fails_is_raised_and_the_version_runs_one_instance(tmp_path: Path) -> None:
    def fails_above_one_row(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs["x"]) > 1:
            raise RuntimeError("this graph runs one row at a time")
        return inputs

    with pytest.raises(RuntimeError, match="one row"):
        choose((ONE, timed(0.004, 0.004)), (TWO, fails_above_one_row), rows(1), lambda: rows(8))
    # A real graph that runs one row only: either two instances lose on a lone row, or measuring
    # them fails on the larger batch; one instance, the session as it was, either way.
    publish_graph_that_fails_above_batch_1(tmp_path)
    session, sample = open_one(tmp_path / "brittle" / "1")
    threads, chosen, choice = tune_instances(session, load_settings(), sample=sample, max_rows=4)
    assert (threads.instances, chosen) == (1, session)
    assert choice is None or choice.chosen.threads.instances == 1
