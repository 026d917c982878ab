"""System shared memory: tensors passed through POSIX shared-memory objects instead of the socket.

A client on the same host creates an object (``shm_open``; tritonclient's
``tritonclient.utils.shared_memory``), registers a region of it under a name, and then names
that region in an input's or a requested output's parameters (``shared_memory_region``,
``shared_memory_byte_size``, ``shared_memory_offset``). The request then carries a few bytes
instead of the tensor: no copy through gRPC, protobuf and the loopback socket, which for large
tensors costs more CPU than a small model does (docs/performance.md).

Off by default (``system_shared_memory``): a registered region lets a client have the server
read and write that object, so only turn it on where every client that can reach the port may
use this host's shared memory. Registering is management: with tokens on, it needs the admin
token (``server/security.py``), and only objects of the server's own user are taken.

System and CUDA regions (``server/cuda_shared_memory.py``) share one registry and one namespace
of names, as in Triton; an inference request names a region of either kind. Each system region
keeps a descriptor open, so how many regions there may be comes from the open-files limit
(``server/open_files.py``).
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from fineserve.server.errors import (
    AlreadyExists,
    InvalidInput,
    PermissionDenied,
    RegionLimitReached,
    RegionNotFound,
)

if TYPE_CHECKING:
    from fineserve.server.cuda_shared_memory import CudaSharedMemory

SHM_ROOT = Path("/dev/shm")
# A POSIX shared-memory key: one leading slash at most, then a plain file name (no "..", no "/").
_KEY = re.compile(r"^/?((?!\.\.?\Z)[A-Za-z0-9_.-]{1,200})\Z")
# Region names are the client's labels; kept printable and short so errors can quote them.
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
# What glibc keeps in /dev/shm besides shared-memory objects: named semaphores ("sem.NAME").
# Writing an output into one would corrupt another program's semaphore.
_NOT_OBJECTS = ("sem.",)

Kind = Literal["system", "cuda"]
KINDS: tuple[Kind, ...] = ("system", "cuda")


class SharedRegion(Protocol):
    """What an inference request does with a region of either kind."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> Kind: ...

    def read(self, offset: int, byte_size: int, where: str) -> memoryview: ...

    def write(self, offset: int, data: bytes | memoryview, byte_size: int, where: str) -> None: ...

    def check_span(self, offset: int, byte_size: int, where: str) -> None: ...

    def close(self) -> None: ...


def span_error(name: str, region_size: int, offset: int, byte_size: int, where: str) -> InvalidInput | None:
    """INVALID_ARGUMENT (returned) unless ``byte_size`` bytes at ``offset`` lie inside a region."""
    if offset < 0 or byte_size < 0 or offset + byte_size > region_size:
        return InvalidInput(
            f"{where}: offset {offset} + byte size {byte_size} is outside shared memory region "
            f"{name!r} ({region_size} bytes)"
        )
    return None


@dataclass(frozen=True)
class Region:
    """A registered system region: ``byte_size`` bytes from ``offset`` of the object ``key``.

    Read and written through the object's descriptor (``pread``/``pwrite``), never mapped: a
    client that shrinks its object while the server copies from it then costs a short read, an
    ``INVALID_ARGUMENT``, where touching a mapped page past the new end would kill the server
    (SIGBUS).
    """

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    kind: Kind = "system"

    def read(self, offset: int, byte_size: int, where: str) -> memoryview:
        """A copy of ``byte_size`` bytes at ``offset`` in the region, in a fresh aligned buffer.

        Copied, not viewed: the model run touches its inputs later, on another thread, after the
        client may have reused the region.
        """
        start = self._span(offset, byte_size, where)
        buffer = np.empty(byte_size, dtype=np.uint8)  # not zeroed: every byte is read into it
        view = buffer.data
        done = 0
        while done < byte_size:
            got = os.preadv(self.fd, [view[done:]], start + done)
            if got == 0:
                raise self._shrunk(where)
            done += got
        return view.toreadonly()

    def write(self, offset: int, data: bytes | memoryview, byte_size: int, where: str) -> None:
        """Writes ``data`` at ``offset``; it must fit in the ``byte_size`` the client set aside."""
        start = self._span(offset, byte_size, where)
        if len(data) > byte_size:
            raise InvalidInput(
                f"{where}: the output has {len(data)} bytes, more than shared_memory_byte_size {byte_size}"
            )
        # An object shrunk since registering is refused rather than grown back by the write.
        if os.fstat(self.fd).st_size < start + len(data):
            raise self._shrunk(where)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], start + done)

    def check_span(self, offset: int, byte_size: int, where: str) -> None:
        """INVALID_ARGUMENT unless ``byte_size`` bytes at ``offset`` lie inside the region."""
        self._span(offset, byte_size, where)

    def close(self) -> None:
        os.close(self.fd)

    def _span(self, offset: int, byte_size: int, where: str) -> int:
        error = span_error(self.name, self.byte_size, offset, byte_size, where)
        if error is not None:
            raise error
        return self.offset + offset

    def _shrunk(self, where: str) -> InvalidInput:
        return InvalidInput(
            f"{where}: shared memory region {self.name!r}: its object {self.key!r} is smaller than "
            "when it was registered; register it again"
        )


class SharedMemoryRegistry:
    """The regions clients registered, by name, system and CUDA ones in one namespace.

    Thread-safe. ``enabled`` False refuses every system-memory call (PERMISSION_DENIED); CUDA
    calls follow ``cuda`` (None: refused the same way). At most ``max_regions`` regions of both
    kinds together (RESOURCE_EXHAUSTED past that). Only objects owned by ``owner_uid`` (the
    server's user) are registered.
    """

    def __init__(
        self,
        enabled: bool,
        max_regions: int = 1024,
        root: Path = SHM_ROOT,
        max_read_bytes: int = 64 * 1024 * 1024,
        *,
        owner_uid: int | None = None,
        cuda: CudaSharedMemory | None = None,
    ) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        # The most one variable-size (BYTES) input may read: what a request message may carry.
        self.max_read_bytes = max_read_bytes
        self.cuda = cuda
        self._root = root
        self._owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self._regions: dict[str, SharedRegion] = {}
        self._lock = threading.Lock()

    @property
    def cuda_enabled(self) -> bool:
        return self.cuda is not None and self.cuda.enabled

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Registers ``byte_size`` bytes at ``offset`` of the object ``key`` under ``name``.

        Raises:
            PermissionDenied: system shared memory is off on this server.
            AlreadyExists: ``name`` is registered already (as a region of either kind).
            RegionLimitReached: as many regions are registered as the server takes.
            InvalidInput: a bad name or key, an object that does not exist, is not a plain
                shared-memory object of the server's user, or a region outside it.
        """
        self._check_enabled("system")
        _check_name(name)
        match = _KEY.match(key)
        if match is None or match.group(1).startswith(_NOT_OBJECTS):
            raise InvalidInput(f"shared memory key {key[:80]!r} is not a POSIX shared-memory name ('/name')")
        if byte_size <= 0 or offset < 0:
            raise InvalidInput(f"shared memory region {name!r}: byte_size must be > 0 and offset >= 0")
        with self._lock:
            self._check_room(name)
            fd, size = self._open(match.group(1), key)
            if offset + byte_size > size:
                os.close(fd)
                raise InvalidInput(
                    f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is past the "
                    f"end of {key!r} ({size} bytes)"
                )
            self._regions[name] = Region(name, key, offset, byte_size, fd)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Registers ``byte_size`` bytes of the device allocation ``raw_handle`` (a cudaIpcMemHandle_t
        of another process) on ``device_id`` under ``name``.

        Raises:
            PermissionDenied: CUDA shared memory is off on this server.
            DeviceUnavailable: it is on, but this host has no usable CUDA device (FAILED_PRECONDITION).
            AlreadyExists, RegionLimitReached, InvalidInput: as ``register``.
        """
        self._check_enabled("cuda")
        assert self.cuda is not None
        _check_name(name)
        if byte_size <= 0 or device_id < 0:
            raise InvalidInput(f"shared memory region {name!r}: byte_size must be > 0 and device_id >= 0")
        with self._lock:
            self._check_room(name)
            self._regions[name] = self.cuda.open(name, raw_handle, device_id, byte_size)

    def _check_room(self, name: str) -> None:
        if name in self._regions:
            raise AlreadyExists(f"shared memory region {name!r} is already registered")
        if len(self._regions) >= self.max_regions:
            raise RegionLimitReached(
                f"at most {self.max_regions} shared memory regions may be registered on this server "
                "(what its open-files limit leaves room for); unregister some first"
            )

    def _open(self, file_name: str, key: str) -> tuple[int, int]:
        path = self._root / file_name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise InvalidInput(f"shared memory key {key!r}: no such shared-memory object") from None
        except OSError as err:
            raise InvalidInput(f"shared memory key {key!r}: cannot open it ({err.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"shared memory key {key!r} is not a shared-memory object")
            # The server must not write, for a client, into the memory of another user's programs,
            # though it could open it (a server running as root can open anything).
            if info.st_uid != self._owner_uid:
                raise InvalidInput(
                    f"shared memory key {key!r} belongs to uid {info.st_uid}, not to the server's user "
                    f"(uid {self._owner_uid}); create it as that user"
                )
            size = info.st_size
            if size == 0:
                raise InvalidInput(f"shared memory key {key!r}: the object is empty")
            return fd, size
        except BaseException:
            os.close(fd)
            raise

    def unregister(self, name: str, kind: Kind = "system") -> None:
        """Forgets the region ``name`` of ``kind`` (empty: every region of that kind). Unknown
        names, and regions of the other kind, are not an error, as in Triton."""
        self._check_enabled(kind)
        with self._lock:
            gone = [
                region
                for region in self._regions.values()
                if region.kind == kind and (not name or region.name == name)
            ]
            for region in gone:
                del self._regions[region.name]
        for region in gone:
            region.close()

    def status(self, name: str, kind: Kind = "system") -> list[SharedRegion]:
        """Every region of ``kind`` (empty ``name``), or the one named; NOT_FOUND if it is not
        registered as a region of that kind."""
        self._check_enabled(kind)
        with self._lock:
            if not name:
                return sorted((r for r in self._regions.values() if r.kind == kind), key=lambda r: r.name)
            region = self._regions.get(name)
        if region is None or region.kind != kind:
            raise RegionNotFound(f"{kind} shared memory region {name[:80]!r} is not registered")
        return [region]

    def get(self, name: str, where: str) -> SharedRegion:
        """The region a request names, of either kind; INVALID_ARGUMENT (the request is wrong) if
        there is none."""
        if not (self.enabled or self.cuda_enabled):
            self._check_enabled("system")
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"{where}: shared memory region {name[:80]!r} is not registered")
        return region

    def counts(self) -> dict[str, int]:
        """Registered regions by kind (for the metrics)."""
        with self._lock:
            regions = list(self._regions.values())
        return {kind: sum(1 for r in regions if r.kind == kind) for kind in KINDS}

    def close(self) -> None:
        """Releases every region (at shutdown)."""
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            region.close()

    def _check_enabled(self, kind: Kind) -> None:
        if kind == "system" and not self.enabled:
            raise PermissionDenied(
                "system shared memory is disabled on this server (system_shared_memory=false)"
            )
        if kind == "cuda" and not self.cuda_enabled:
            raise PermissionDenied("CUDA shared memory is disabled on this server (cuda_shared_memory=false)")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidInput(f"shared memory region name {name[:80]!r}: use 1-128 letters, digits, _.:-")


# What a server without shared memory has: a registry that refuses every use (PERMISSION_DENIED).
NO_SHARED_MEMORY = SharedMemoryRegistry(enabled=False)
