"""How a model version is given the CPU: instances and threads per run, from the settings and the
cores this process may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fineserve.server.runtime import CPU, CUDA, Threads, cpu_cores, plan_threads, session_options


def write_cpu_max(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


def test_cores_follow_the_affinity_and_a_cgroup_quota_caps_them(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert cpu_cores(tmp_path / "missing") == affinity
    assert cpu_cores(write_cpu_max(tmp_path, "max 100000\n")) == affinity
    # A Kubernetes limit of 1.5 CPUs: one thread's worth, rounded down (more would be throttled).
    assert cpu_cores(write_cpu_max(tmp_path, "150000 100000\n")) == 1
    assert cpu_cores(write_cpu_max(tmp_path, "200000 100000\n")) == min(2, affinity)
    assert cpu_cores(write_cpu_max(tmp_path, "50000 100000\n")) == 1
    assert cpu_cores(write_cpu_max(tmp_path, "garbage\n")) == affinity


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fineserve.server.runtime.cpu_cores", lambda: 4)


@pytest.mark.usefixtures("four_cores")
def test_on_cpu_auto_sizes_the_shared_pool_so_all_instances_fill_the_cores_once() -> None:
    # The instances share one session's pool: a run uses its own thread plus free pool workers,
    # so N instances at once use N callers + (threads - 1) workers = the 4 cores.
    assert plan_threads(CPU, instances=1, intra_op_threads=0) == Threads(instances=1, intra_op=4)
    assert plan_threads(CPU, instances=2, intra_op_threads=0) == Threads(instances=2, intra_op=3)
    assert plan_threads(CPU, instances=4, intra_op_threads=0) == Threads(instances=4, intra_op=1)
    assert plan_threads(CPU, instances=8, intra_op_threads=0) == Threads(instances=8, intra_op=1)


@pytest.mark.usefixtures("four_cores")
def test_threads_given_are_taken_as_they_are() -> None:
    assert plan_threads(CPU, instances=2, intra_op_threads=3) == Threads(instances=2, intra_op=3)
    assert plan_threads(CUDA, instances=2, intra_op_threads=3) == Threads(instances=2, intra_op=3)


@pytest.mark.usefixtures("four_cores")
def test_on_cuda_auto_threads_are_left_to_onnxruntime() -> None:
    assert plan_threads(CUDA, instances=1, intra_op_threads=0) == Threads(instances=1, intra_op=0)


@pytest.mark.parametrize("spinning", [True, False])
def test_threads_spin_only_while_a_run_lasts(spinning: bool) -> None:
    options = session_options(2, 1, spinning=spinning)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    want = "1" if spinning else "0"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == want
    # Whether or not they spin during a run, they never do between runs.
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_threads_never_spin_for_the_cuda_provider() -> None:
    options = session_options(2, 1, spinning=True, provider=CUDA)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
