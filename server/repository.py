"""The model repository at run time: which versions are served, loading, polling, switching.

Which versions: the version policy (newest N, all, or specific ones). A version is loaded
(session, preprocessing, batcher), warmed up, and only then marked READY; an older version is
retired only after its replacement is READY, and only once the requests that already resolved it
have finished. A version that fails to load is marked FAILED (with the reason, in the log and the
index) and the previous one keeps serving; it is not retried until its folder changes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fineserve.export.contract import MODEL_NAME, ModelSpecError, list_models, list_versions, read_model_spec
from fineserve.server.config import Settings
from fineserve.server.errors import ModelNotFound
from fineserve.server.logs import untrusted
from fineserve.server.metrics import Metrics, WatchedVersion
from fineserve.server.model import LoadFailed, ServedVersion

log = logging.getLogger(__name__)


class VersionState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    FAILED = "FAILED"


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    state: VersionState
    reason: str = ""
    served: ServedVersion | None = None


class Repository:
    """Loads and serves the versions the policy picks; ``sync`` brings it in line with the disk."""

    def __init__(
        self,
        settings: Settings,
        provider: str,
        metrics: Metrics,
        image_pool: concurrent.futures.Executor,
    ) -> None:
        self.root = settings.model_repository
        self._settings = settings
        self._provider = provider
        self._metrics = metrics
        self._image_pool = image_pool
        # name -> version -> the loaded version; only READY versions are in here.
        self.served: dict[str, dict[int, ServedVersion]] = {}
        self._loading: set[tuple[str, int]] = set()
        # (name, version) -> (reason, the folder's files when it failed): not retried until they change.
        self._failed: dict[tuple[str, int], tuple[str, _Signature]] = {}
        self._unloaded: set[str] = set()
        self._lock = asyncio.Lock()
        # Folders already reported as not a model or not a version (each is logged once).
        self._ignored: set[Path] = set()

    # --- what is on disk and what should be served ----------------------------------------------

    def model_names(self) -> list[str]:
        return list_models(self.root)

    def _scan(self) -> list[str]:
        """The models on disk (as ``model_names``), logging once each the folders that look meant
        to be served but never will be: a model folder whose name is not a model name
        (``My Model``), a version folder that is not a plain positive number (``v2``, ``02``).
        Hidden folders (a publish in progress) are skipped."""
        names = []
        for model in _folders(self.root):
            if not MODEL_NAME.match(model.name):
                self._ignore(model, "model names are 1-64 of a-z, 0-9, - and _, not starting with - or _")
                continue
            versions = set(map(str, list_versions(model)))
            for version in _folders(model):
                if version.name not in versions:
                    self._ignore(
                        version, "version folders are numbers in 1..2**63-1 written without leading zeros"
                    )
            if versions:
                names.append(model.name)
        return names

    def _ignore(self, folder: Path, why: str) -> None:
        if folder not in self._ignored:
            self._ignored.add(folder)
            # Folder names are anyone's text: escaped, so a newline or a terminal escape in one
            # cannot forge or garble log lines.
            log.warning("ignoring %s: %s", untrusted(folder.relative_to(self.root)), why)

    def versions_on_disk(self, name: str) -> list[int]:
        # Only names a model may have are looked up: a client's "../x" or "/abs" never becomes a
        # path outside the repository (load would serve it), and an over-long name never an OSError.
        if not MODEL_NAME.match(name):
            return []
        return list_versions(self.root / name)

    def unloaded(self, name: str) -> bool:
        return name in self._unloaded

    def selected(self, name: str) -> bool:
        """Whether the version policy picks a version of ``name`` on disk (failed ones count),
        unless it was unloaded: the models readiness waits for."""
        if name in self._unloaded or not MODEL_NAME.match(name):
            return False
        on_disk = self.versions_on_disk(name)
        if self._settings.version_policy == "specific":
            return bool(set(on_disk) & set(self._settings.specific_versions.get(name, [])))
        return bool(on_disk)

    def _wanted(self, name: str, on_disk: list[int]) -> list[int]:
        if name in self._unloaded:
            return []
        usable = [v for v in on_disk if not self._still_failed(name, v)]
        policy = self._settings.version_policy
        if policy == "all":
            return usable
        if policy == "specific":
            chosen = set(self._settings.specific_versions.get(name, []))
            return [v for v in usable if v in chosen]
        return usable[-self._settings.latest_versions :]

    def _still_failed(self, name: str, version: int) -> bool:
        failed = self._failed.get((name, version))
        return failed is not None and failed[1] == _signature(self.root / name / str(version))

    def status(self, name: str) -> list[VersionStatus]:
        """Every version of ``name`` on disk or served, oldest first, with its state."""
        served = self.served.get(name, {})
        statuses = []
        for version in sorted(set(self.versions_on_disk(name)) | set(served)):
            if version in served:
                statuses.append(VersionStatus(name, version, VersionState.READY, served=served[version]))
            elif (name, version) in self._loading:
                statuses.append(VersionStatus(name, version, VersionState.LOADING))
            elif (name, version) in self._failed:
                statuses.append(
                    VersionStatus(name, version, VersionState.FAILED, self._failed[(name, version)][0])
                )
            else:
                why = "unloaded" if name in self._unloaded else "not selected by the version policy"
                statuses.append(VersionStatus(name, version, VersionState.UNAVAILABLE, why))
        return statuses

    # --- bringing the served set in line --------------------------------------------------------

    async def sync(self) -> None:
        """Loads what the policy wants and is not loaded; retires what it no longer wants."""
        async with self._lock:
            names = set(self._scan()) | set(self.served)
            for name in sorted(names):
                await self._sync_model(name)

    async def load(self, name: str) -> None:
        """Serves ``name`` again after an unload (or loads it now); raises ModelNotFound."""
        async with self._lock:
            if not self.versions_on_disk(name):
                raise ModelNotFound(f"model {name[:80]!r} is not in the repository")
            self._unloaded.discard(name)
            for key in [k for k in self._failed if k[0] == name]:
                del self._failed[key]  # an explicit load retries failed versions
            await self._sync_model(name)

    async def unload(self, name: str) -> None:
        """Stops serving ``name`` (requests already running finish); polling leaves it unloaded."""
        async with self._lock:
            if name not in self.served and not self.versions_on_disk(name):
                raise ModelNotFound(f"model {name[:80]!r} is not in the repository")
            self._unloaded.add(name)
            await self._sync_model(name)

    async def close(self) -> None:
        async with self._lock:
            for name in list(self.served):
                for version in list(self.served[name]):
                    await self._retire(name, version)

    async def _sync_model(self, name: str) -> None:
        self._metrics.model_seen(name)
        on_disk = self.versions_on_disk(name)
        served = self.served.setdefault(name, {})
        while True:
            wanted = self._wanted(name, on_disk)
            to_load = [v for v in wanted if v not in served]
            if not to_load:
                break
            for version in to_load:
                await self._load(name, version)
        # Retire only now: every replacement that could load is READY.
        for version in [v for v in served if v not in wanted]:
            await self._retire(name, version)
        if not served:
            del self.served[name]

    async def _load(self, name: str, version: int) -> None:
        path = self.root / name / str(version)
        self._loading.add((name, version))
        started = time.perf_counter()
        # Taken before the files are read: a file still being written while it is read (and so
        # failing) has changed by the next poll, which then tries again. Taken after, it would
        # match the finished file and the version would stay FAILED.
        files_before = _signature(path)
        try:
            served = await asyncio.to_thread(self._build, path)
            served.start()
        except Exception as err:  # a bad version must never take the server down
            reason = _client_reason(err)
            # The reason is what clients read (the index); the log gets the whole error, with the
            # library's own text and paths, under the same model and version.
            log.error("model %s version %d failed to load: %s", name, version, reason, exc_info=err)
            self._failed[(name, version)] = (reason, files_before)
            self._metrics.version_failed(name)
            return
        finally:
            self._loading.discard((name, version))
        # A version that failed before and loads now (its files were fixed) is no longer FAILED:
        # once retired or unloaded it must read UNAVAILABLE, not an old error.
        self._failed.pop((name, version), None)
        self.served.setdefault(name, {})[version] = served
        self._metrics.version_loaded(
            name,
            version,
            seconds=time.perf_counter() - started,
            provider=served.provider,
            variant=served.variant,
            watched=WatchedVersion(
                queue_depth=lambda: served.batcher.queue_depth,
                queue_capacity=served.batching.max_queue_size,
                in_flight=lambda: served.in_flight,
            ),
        )
        log.info("model %s version %d READY (%s, %s)", name, version, served.provider, served.variant)

    def _build(self, path: Path) -> ServedVersion:
        spec = read_model_spec(path, shown_as=f"{path.parent.name}/{path.name}")
        # The version's batching, decided here once: the settings for its model, capped by its own
        # max_batch_size (model.json).
        batching = self._settings.batching_for(spec.name).for_model(spec.max_batch_size)
        served = ServedVersion(
            spec,
            path,
            self._provider,
            self._settings,
            batching,
            image_pool=self._image_pool,
            batch_metrics=self._metrics.batch_recorder(spec.name, spec.version),
            padding_metrics=self._metrics.padding_recorder(spec.name, spec.version),
        )
        if self._settings.warmup:
            served.warmup()
        return served

    async def _retire(self, name: str, version: int) -> None:
        served = self.served.get(name, {}).pop(version, None)
        if served is None:
            return
        self._metrics.version_retired(name, version)
        await served.close()
        log.info("model %s version %d retired", name, version)


def _client_reason(err: Exception) -> str:
    """Why a version failed, as clients may read it: the contract's and the loader's own messages
    (relative file names, the field and its range); for anything else only its kind, since its
    text may hold absolute paths or a library's internals."""
    if isinstance(err, ModelSpecError | LoadFailed):
        return str(err)
    return f"{type(err).__name__} while loading (see the server log)"


_Signature = frozenset[tuple[str, int, int]]


def _signature(path: Path) -> _Signature:
    """Names, sizes and modification times of a version folder's files: a rewritten file changes it
    (the folder's own mtime would not)."""
    try:
        return frozenset(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()
        )
    except OSError:
        return frozenset()


def _folders(path: Path) -> list[Path]:
    """Sub-folders of ``path`` that are not hidden; none if it cannot be listed."""
    try:
        return sorted(c for c in path.iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError:
        return []
