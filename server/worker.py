"""One worker process of ``--workers N``: what it shares with its siblings through the pool folder.

The supervisor (``server/supervisor.py``) starts N of these; each is a whole server (its own
repository, batching, sessions) on the one gRPC port. This part keeps the pool in step:

- readiness: the worker's ready flag follows its models; its health says SERVING only while every
  worker's flag is up (a client cannot choose which worker its connection lands on);
- model control: a load or unload this worker answered is appended to the control log, and the
  call returns once every live, ready worker has applied it; the others' calls are applied here
  as they appear (a worker that is dead, restarting or still loading is not waited for: it
  replays them all before it joins the port);
- statistics: this worker's KServe statistics are written for the others to add to theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fineserve.server.dataplane import DataPlane
from fineserve.server.model import ModelStats
from fineserve.server.pool import PoolDir

log = logging.getLogger(__name__)

# How often siblings' readiness, their model control calls and our statistics are looked at.
POLL_S = 0.2
# A load or unload answers once every live worker applied it, or after this or the call's deadline
# (the log then says which worker lags; it applies the call when it can).
CONTROL_WAIT_S = 120.0


class WorkerRole:
    """Worker ``index`` of the pool at ``pool_dir``; ``Server`` drives it."""

    def __init__(self, pool_dir: Path, index: int) -> None:
        self.pool = PoolDir(pool_dir)
        self.index = index
        self.pid = os.getpid()
        self._applied = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._stats_written: list[dict[str, object]] | None = None
        self._dataplane: DataPlane | None = None

    def attach(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane
        dataplane.on_model_control = self.broadcast
        dataplane.other_workers_statistics = self.other_statistics

    # --- readiness ------------------------------------------------------------------------------

    def own_ready(self, ready: bool) -> None:
        self.pool.set_ready(self.index, ready)

    def begin_stop(self) -> None:
        """The worker drains: its flag goes down and a load or unload it answered waits no more."""
        self._stopping = True
        self.pool.set_ready(self.index, False)

    def serving(self, own_ready: bool) -> bool:
        """Health: this worker's models are ready and so are every other worker's."""
        return own_ready and self.pool.all_ready()

    # --- model control --------------------------------------------------------------------------

    async def catch_up(self) -> None:
        """Applies the load and unload calls the other workers answered since we last looked."""
        assert self._dataplane is not None
        for entry in self.pool.control_since(self._applied):
            if entry.pid != self.pid:
                log.info("applying %s of model %s (answered by another worker)", entry.action, entry.model)
                try:
                    await self._dataplane.apply_control(entry.action, entry.model)
                except Exception as err:  # the model is gone from disk here too: nothing to apply
                    log.warning("could not %s model %s: %s", entry.action, entry.model, err)
            self._applied = entry.seq
            self.pool.write_applied(self.index, entry.seq)

    async def broadcast(self, action: str, model: str, deadline: float | None = None) -> None:
        """Passes a load or unload this worker applied to the others; returns once every live one
        did, at the call's ``deadline`` (``time.monotonic()``), or when this worker stops."""
        seq = self.pool.append_control(action, model)
        give_up = time.monotonic() + CONTROL_WAIT_S
        if deadline is not None:
            give_up = min(give_up, deadline)
        while not self._stopping:
            lagging = [i for i in self._live_siblings() if self.pool.applied(i) < seq]
            if not lagging:
                return
            if time.monotonic() > give_up:
                log.warning("%s of model %s: workers %s have not applied it yet", action, model, lagging)
                return
            await asyncio.sleep(POLL_S / 4)

    def _live_siblings(self) -> list[int]:
        """The other workers whose ready flag holds a live process. One that is dead, waiting to
        be restarted or still loading is not waited for: it replays the log before it joins."""
        return [i for i in range(self.pool.workers) if i != self.index and _running(self.pool.ready_pid(i))]

    # --- statistics -----------------------------------------------------------------------------

    def write_statistics(self) -> None:
        """Writes this worker's statistics if they changed since the last write."""
        assert self._dataplane is not None
        stats = [dataclasses.asdict(s) for s in self._dataplane.local_statistics(None, None)]
        if stats != self._stats_written:
            self.pool.write_stats(self.pid, stats)
            self._stats_written = stats

    def other_statistics(self) -> list[ModelStats]:
        return [ModelStats.from_dict(s) for worker in self.pool.stats_of_others(self.pid) for s in worker]

    # --- the loop that keeps it in step ---------------------------------------------------------

    def start(self, on_health: Callable[[], Awaitable[None]]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(on_health), name="worker-pool")

    async def _follow(self, on_health: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.catch_up()
                self.write_statistics()
                await on_health()
            except Exception:  # the pool folder is the supervisor's; a hiccup must not stop serving
                log.exception("worker pool update failed; will retry")

    async def stop(self) -> None:
        self.begin_stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            self.write_statistics()


def _running(pid: int | None) -> bool:
    """Whether ``pid`` is a process that runs (a killed one its parent has not reaped yet, a zombie,
    does not)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux), or it just went: the next look tells
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
