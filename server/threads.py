"""The server's threads by role: the names the operating system shows (``top -H``, py-spy), and
CPU time per role for ``fineserve_thread_cpu_seconds_total`` (docs/observability.md).

Python names threads only for itself; ``name_thread`` sets the OS name with ``prctl(PR_SET_NAME)``
(Linux; elsewhere it does nothing).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

# The roles, as metric label values.
EVENT_LOOP = "event_loop"
INFERENCE = "inference"
PREPROCESSING = "preprocessing"
GRPC = "grpc"
OTHER = "other"
ROLES = (EVENT_LOOP, INFERENCE, PREPROCESSING, GRPC, OTHER)

# The event loop runs on the thread that started the server and keeps its name (the process's).
INFER_PREFIX = "infer:"  # + model: a version's batching thread, which runs onnxruntime
ORT_PREFIX = "ort:"  # + model: onnxruntime's intra-op workers (a new thread takes its creator's name)
DECODE_NAME = "fs-decode"  # image decoding
WORKER_NAME = "fs-worker"  # other blocking work: tokenising, model loading
# Thread names gRPC's core gives its own threads.
_GRPC_PREFIXES = ("event_engine", "grpc", "lifeguard", "default-executo", "resolver-executo")

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_GET_NAME = 16
_NAME_BYTES = 15  # the kernel keeps 15 bytes and a NUL


def _load_prctl() -> Callable[..., int] | None:
    if not Path("/proc/self/task").is_dir():
        return None  # not Linux
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] | None = getattr(libc, "prctl", None)
    return prctl


_prctl = _load_prctl()


def name_thread(name: str) -> None:
    """Gives the calling thread ``name`` (its first 15 bytes) in the operating system."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, name.encode()[:_NAME_BYTES], 0, 0, 0)


def set_parent_death_signal(signum: int) -> None:
    """The kernel sends this process ``signum`` when its parent exits (Linux; elsewhere nothing):
    a worker process never outlives its supervisor, even one killed with SIGKILL."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def thread_name() -> str:
    """The calling thread's operating-system name ("" where there is none)."""
    if _prctl is None:
        return ""
    buffer = ctypes.create_string_buffer(_NAME_BYTES + 1)
    _prctl(_PR_GET_NAME, buffer, 0, 0, 0)
    return buffer.value.decode(errors="replace")


@contextlib.contextmanager
def named(name: str) -> Iterator[None]:
    """The calling thread carries ``name`` meanwhile: threads it starts inherit it."""
    before = thread_name()
    name_thread(name)
    try:
        yield
    finally:
        name_thread(before)


def role_of(name: str, tid: int, loop_tid: int | None) -> str:
    """A thread's role, from its operating-system name (and whether it runs the event loop)."""
    if tid == loop_tid:
        return EVENT_LOOP
    if name.startswith((INFER_PREFIX, ORT_PREFIX)):
        return INFERENCE
    if name.startswith((DECODE_NAME, WORKER_NAME)):
        return PREPROCESSING
    if name.startswith(_GRPC_PREFIXES):
        return GRPC
    return OTHER


def thread_cpu(pid: int | str = "self") -> dict[int, tuple[str, float]]:
    """Every live thread of process ``pid``: its id -> (its name, user + system CPU seconds).
    Empty where there is no /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    root = Path(f"/proc/{pid}/task")
    try:
        tids = [int(entry.name) for entry in root.iterdir()]
    except OSError:
        return {}
    for tid in tids:
        try:
            name = (root / str(tid) / "comm").read_text().rstrip("\n")
            stat = (root / str(tid) / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        threads[tid] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return threads


class RoleCpu:
    """CPU seconds per role since the process started, never decreasing (a Prometheus counter).

    Each live thread's time counts to its role from the reading it was first seen in that role; a
    thread that ends keeps what it had in its role, and one renamed into another role (a loading
    thread while it creates a session) leaves its time so far where it was and counts on in the
    new one. Readings are serialised: two scrapes at once cannot count a thread twice.
    """

    def __init__(self, pid: int | str = "self") -> None:
        self.pid = pid
        # The event loop's thread id, once the server runs (its name is the process's).
        self.loop_tid: int | None = None
        # tid -> (role, seconds at the last reading, seconds when it entered that role)
        self._seen: dict[int, tuple[str, float, float]] = {}
        self._ended = dict.fromkeys(ROLES, 0.0)  # what threads left behind in each role
        self._lock = threading.Lock()

    def read(self) -> dict[str, float]:
        with self._lock:
            now = thread_cpu(self.pid)
            seen: dict[int, tuple[str, float, float]] = {}
            carried_on: set[int] = set()  # same thread, same role as at the last reading
            for tid, (name, seconds) in now.items():
                role = role_of(name, tid, self.loop_tid)
                old = self._seen.get(tid)
                if old is None or seconds < old[1]:  # a new thread (its id maybe reused)
                    base = 0.0
                elif role != old[0]:  # renamed into another role: counts there from now on
                    base = old[1]
                else:
                    base = old[2]
                    carried_on.add(tid)
                seen[tid] = (role, seconds, base)
            for tid, (role, seconds, base) in self._seen.items():
                if tid not in carried_on:  # it ended, or left this role: its time there stays
                    self._ended[role] += seconds - base
            self._seen = seen
            totals = dict(self._ended)
            for role, seconds, base in seen.values():
                totals[role] += seconds - base
            return totals
