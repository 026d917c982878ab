"""Thread names for the operating system, and CPU time by thread role (server/threads.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fineserve.server import threads
from fineserve.server.threads import RoleCpu, name_thread, named, role_of, thread_name

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def in_thread(target: object) -> None:
    thread = threading.Thread(target=target)  # type: ignore[arg-type]
    thread.start()
    thread.join()


def test_a_thread_can_name_itself_and_its_children_inherit_the_name() -> None:
    seen: dict[str, str] = {}

    def child() -> None:
        seen["child"] = os_name(threading.get_native_id())

    def parent() -> None:
        name_thread("infer:a-model-with-a-long-name")
        seen["named"] = thread_name()
        with named("ort:m"):
            seen["inside"] = os_name(threading.get_native_id())
            in_thread(child)  # how onnxruntime's workers get ort:<model>
        seen["after"] = thread_name()

    in_thread(parent)
    assert seen == {
        "named": "infer:a-model-w",  # the kernel keeps 15 bytes
        "inside": "ort:m",
        "child": "ort:m",
        "after": "infer:a-model-w",
    }


def test_roles_come_from_names_and_the_loop_from_its_thread_id() -> None:
    assert role_of("python", 7, loop_tid=7) == threads.EVENT_LOOP
    assert role_of("infer:fashion", 8, loop_tid=7) == threads.INFERENCE
    assert role_of("ort:sentiment", 8, loop_tid=7) == threads.INFERENCE
    assert role_of("fs-decode", 8, loop_tid=7) == threads.PREPROCESSING
    assert role_of("fs-worker", 8, loop_tid=7) == threads.PREPROCESSING
    assert role_of("event_engine", 8, loop_tid=7) == threads.GRPC
    assert role_of("grpc_global_tim", 8, loop_tid=None) == threads.GRPC
    assert role_of("python", 8, loop_tid=7) == threads.OTHER


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_role_cpu_counts_each_phase_of_a_renamed_thread_once_and_keeps_ended_ones() -> None:
    role_cpu = RoleCpu()
    role_cpu.loop_tid = -1
    steps = [threading.Event() for _ in range(3)]
    done = [threading.Event() for _ in range(3)]

    def worker() -> None:
        name_thread("fs-worker")  # preprocessing, then inference (as a loading thread's session)
        burn(0.3)
        done[0].set()
        steps[0].wait(10)
        name_thread("infer:renamed")
        burn(0.3)
        done[1].set()
        steps[1].wait(10)

    thread = threading.Thread(target=worker)
    start = role_cpu.read()
    thread.start()
    done[0].wait(10)
    first = role_cpu.read()
    steps[0].set()
    done[1].wait(10)
    # Scrapes at once (Prometheus' HTTP server answers each on its own thread): counted once.
    readers = [threading.Thread(target=role_cpu.read) for _ in range(8)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    second = role_cpu.read()
    steps[1].set()
    thread.join()
    after = role_cpu.read()

    def grew(a: dict[str, float], b: dict[str, float], role: str) -> float:
        return b[role] - a[role]

    # /proc counts in 10 ms ticks: each phase's 0.3 s shows as 0.25-0.4 s.
    assert 0.25 <= grew(start, first, threads.PREPROCESSING) <= 0.4
    assert 0.25 <= grew(first, second, threads.INFERENCE) <= 0.4
    assert grew(first, after, threads.PREPROCESSING) < 0.05  # its first phase stayed, no more
    assert 0.25 <= grew(start, after, threads.INFERENCE) <= 0.4  # ended: kept, counted once
    assert all(after[role] >= second[role] >= first[role] for role in threads.ROLES)


def test_role_cpu_counts_a_thread_that_ended_and_never_goes_back() -> None:
    role_cpu = RoleCpu()
    role_cpu.loop_tid = threading.get_native_id()
    go = threading.Event()

    def burn() -> None:
        name_thread("infer:burner")
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        go.wait(10)

    worker = threading.Thread(target=burn)
    worker.start()
    while worker.is_alive() and role_cpu.read()[threads.INFERENCE] < 0.25:
        time.sleep(0.02)
    during = role_cpu.read()
    go.set()
    worker.join()
    after = role_cpu.read()
    assert during[threads.INFERENCE] >= 0.25
    # Gone from /proc, its time stays counted: the totals are a Prometheus counter.
    assert after[threads.INFERENCE] >= during[threads.INFERENCE]
    assert all(after[role] >= during[role] for role in threads.ROLES)
