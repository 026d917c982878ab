"""The folder a supervisor and its worker processes share (``--workers N``): plain files, no daemon.

The supervisor makes a fresh one per start and deletes it on exit. Each file has one writer:

- ``pool.json``: how many workers, the CPUs each may use, and the supervisor's pid (the supervisor).
- ``ready/<index>``: present while that worker's models are ready, holding its pid (the worker);
  the health of every worker reads them all, so the server says SERVING only once every worker
  is ready. A worker that is killed leaves its flag up: while it restarts, its siblings serve its
  share (it joins the port again only once ready), and the supervisor knows the new process is
  ready when the flag holds its pid.
- ``metrics/<index>``: the loopback port of that worker's own ``/metrics`` (the worker); the
  supervisor merges them into the one ``/metrics``.
- ``control.log``: model load/unload calls, one JSON line each, appended by the worker that
  answered the call (one ``write`` of a short line with ``O_APPEND``: lines never interleave);
  every worker applies the lines of the others, a restarted worker all of them.
- ``applied/<index>``: how many lines of ``control.log`` that worker has applied (the worker).
- ``stats/<pid>.json``: a worker process's KServe statistics, rewritten as they change; a dead
  worker's file stays, so its counts stay in the whole server's statistics.

Writes that replace a file go through a temporary file and ``os.replace``
(``fineserve/files.py``): a reader sees the old content or the new, never half.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fineserve.files import write_text_atomically

_SUBFOLDERS = ("ready", "metrics", "applied", "stats")


@dataclass(frozen=True)
class ControlEntry:
    """One load or unload call as a worker applied it; ``seq`` counts lines from 1."""

    seq: int
    pid: int
    action: str  # "load" | "unload"
    model: str


class PoolDir:
    """The shared folder at ``root``; ``create`` makes a new one, the constructor opens one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        described = json.loads((root / "pool.json").read_text())
        self.workers = int(described["workers"])
        self.cpus: list[list[int]] = described["cpus"]
        self.supervisor_pid = int(described["supervisor_pid"])

    @classmethod
    def create(cls, root: Path, workers: int, cpus: list[list[int]]) -> PoolDir:
        for name in _SUBFOLDERS:
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / "control.log").touch()
        described = {"workers": workers, "cpus": cpus, "supervisor_pid": os.getpid()}
        write_text_atomically(root / "pool.json", json.dumps(described))
        return cls(root)

    def take_cpus(self, index: int) -> None:
        """Confines the calling process (and the threads it starts from now on) to worker
        ``index``'s CPUs, so each worker's auto thread counts (``runtime.cpu_cores``) size to its
        share and the workers' onnxruntime pools never run more threads than there are cores."""
        setaffinity = getattr(os, "sched_setaffinity", None)  # Linux; elsewhere the OS spreads them
        if setaffinity is not None and self.cpus[index]:
            setaffinity(0, self.cpus[index])

    # --- readiness ------------------------------------------------------------------------------

    def set_ready(self, index: int, ready: bool) -> None:
        """Raises or lowers worker ``index``'s flag; it holds the pid of the process that raised it."""
        flag = self.root / "ready" / str(index)
        if ready:
            write_text_atomically(flag, str(os.getpid()))
        else:
            flag.unlink(missing_ok=True)

    def ready_pid(self, index: int) -> int | None:
        try:
            return int((self.root / "ready" / str(index)).read_text())
        except (OSError, ValueError):
            return None

    def ready_count(self) -> int:
        return sum((self.root / "ready" / str(i)).exists() for i in range(self.workers))

    def all_ready(self) -> bool:
        return self.ready_count() == self.workers

    # --- metrics --------------------------------------------------------------------------------

    def write_metrics_port(self, index: int, port: int) -> None:
        write_text_atomically(self.root / "metrics" / str(index), str(port))

    def metrics_port(self, index: int) -> int | None:
        try:
            return int((self.root / "metrics" / str(index)).read_text())
        except (OSError, ValueError):
            return None

    def forget_metrics_port(self, index: int) -> None:
        (self.root / "metrics" / str(index)).unlink(missing_ok=True)

    # --- model control --------------------------------------------------------------------------

    def append_control(self, action: str, model: str) -> int:
        """Appends a load or unload; returns its line number (``seq``)."""
        token = uuid.uuid4().hex
        line = json.dumps({"pid": os.getpid(), "action": action, "model": model, "id": token}) + "\n"
        fd = os.open(self.root / "control.log", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        for entry, raw in self._control_lines():
            if raw.get("id") == token:
                return entry.seq
        raise RuntimeError("control.log lost the line just appended")  # pragma: no cover

    def control_since(self, applied: int) -> list[ControlEntry]:
        """The lines after the first ``applied`` ones."""
        return [entry for entry, _ in self._control_lines() if entry.seq > applied]

    def _control_lines(self) -> list[tuple[ControlEntry, dict[str, Any]]]:
        lines = (self.root / "control.log").read_text().splitlines()
        entries = []
        for seq, line in enumerate(lines, start=1):
            raw = json.loads(line)
            entries.append((ControlEntry(seq, int(raw["pid"]), str(raw["action"]), str(raw["model"])), raw))
        return entries

    def write_applied(self, index: int, seq: int) -> None:
        write_text_atomically(self.root / "applied" / str(index), str(seq))

    def applied(self, index: int) -> int:
        try:
            return int((self.root / "applied" / str(index)).read_text())
        except (OSError, ValueError):
            return 0

    # --- statistics -----------------------------------------------------------------------------

    def write_stats(self, pid: int, stats: list[dict[str, Any]]) -> None:
        write_text_atomically(self.root / "stats" / f"{pid}.json", json.dumps(stats))

    def stats_of_others(self, pid: int) -> list[list[dict[str, Any]]]:
        """Every other worker process's statistics, dead ones' included."""
        found = []
        for path in sorted((self.root / "stats").glob("*.json")):
            if path.stem != str(pid):
                try:
                    found.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue  # gone or replaced meanwhile: its next write counts
        return found
