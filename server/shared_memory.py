"""System shared memory: tensors passed through POSIX shared-memory objects instead of the socket.

A client on the same host creates an object (``shm_open``; tritonclient's
``tritonclient.utils.shared_memory``), registers a region of it under a name, and then names
that region in an input's or a requested output's parameters (``shared_memory_region``,
``shared_memory_byte_size``, ``shared_memory_offset``). The request then carries a few bytes
instead of the tensor: no copy through gRPC, protobuf and the loopback socket, which for large
tensors costs more CPU than a small model does (docs/performance.md).

Off by default (``system_shared_memory``): a registered region lets a client have the server
read and write that object, so only turn it on where every client that can reach the port may
use this host's shared memory.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fineserve.server.errors import AlreadyExists, InvalidInput, PermissionDenied, RegionNotFound

SHM_ROOT = Path("/dev/shm")
# A POSIX shared-memory key: one leading slash at most, then a plain file name (no "..", no "/").
_KEY = re.compile(r"^/?((?!\.\.?\Z)[A-Za-z0-9_.-]{1,200})\Z")
# Region names are the client's labels; kept printable and short so errors can quote them.
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")


@dataclass(frozen=True)
class Region:
    """A registered region: ``byte_size`` bytes from ``offset`` of the object ``key``.

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

    def _span(self, offset: int, byte_size: int, where: str) -> int:
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInput(
                f"{where}: offset {offset} + byte size {byte_size} is outside shared memory region "
                f"{self.name!r} ({self.byte_size} bytes)"
            )
        return self.offset + offset

    def _shrunk(self, where: str) -> InvalidInput:
        return InvalidInput(
            f"{where}: shared memory region {self.name!r}: its object {self.key!r} is smaller than "
            "when it was registered; register it again"
        )


class SharedMemoryRegistry:
    """The regions clients registered, by name. Thread-safe; ``enabled`` False refuses everything."""

    def __init__(
        self,
        enabled: bool,
        max_regions: int = 1024,
        root: Path = SHM_ROOT,
        max_read_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        # The most one variable-size (BYTES) input may read: what a request message may carry.
        self.max_read_bytes = max_read_bytes
        self._root = root
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Maps ``byte_size`` bytes at ``offset`` of the object ``key`` under ``name``.

        Raises:
            PermissionDenied: shared memory is off on this server.
            AlreadyExists: ``name`` is registered already.
            InvalidInput: a bad name or key, an object that does not exist, a region outside it.
        """
        self._check_enabled()
        if not _NAME.match(name):
            raise InvalidInput(f"shared memory region name {name[:80]!r}: use 1-128 letters, digits, _.:-")
        match = _KEY.match(key)
        if match is None:
            raise InvalidInput(f"shared memory key {key[:80]!r} is not a POSIX shared-memory name ('/name')")
        if byte_size <= 0 or offset < 0:
            raise InvalidInput(f"shared memory region {name!r}: byte_size must be > 0 and offset >= 0")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region {name!r} is already registered")
            if len(self._regions) >= self.max_regions:
                raise InvalidInput(f"at most {self.max_regions} shared memory regions may be registered")
            fd, size = self._open(match.group(1), key)
            if offset + byte_size > size:
                os.close(fd)
                raise InvalidInput(
                    f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is past the "
                    f"end of {key!r} ({size} bytes)"
                )
            self._regions[name] = Region(name, key, offset, byte_size, fd)

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
            size = info.st_size
            if size == 0:
                raise InvalidInput(f"shared memory key {key!r}: the object is empty")
            return fd, size
        except BaseException:
            os.close(fd)
            raise

    def unregister(self, name: str) -> None:
        """Forgets ``name`` (empty: every region). Unknown names are not an error, as in Triton."""
        self._check_enabled()
        with self._lock:
            gone = list(self._regions.values()) if not name else [r for r in [self._regions.get(name)] if r]
            for region in gone:
                del self._regions[region.name]
        for region in gone:
            os.close(region.fd)

    def status(self, name: str) -> list[Region]:
        """Every region (empty ``name``), or the one named; NOT_FOUND if it is not registered."""
        self._check_enabled()
        with self._lock:
            if not name:
                return sorted(self._regions.values(), key=lambda r: r.name)
            region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"shared memory region {name[:80]!r} is not registered")
        return [region]

    def get(self, name: str, where: str) -> Region:
        """The region a request names; INVALID_ARGUMENT (the request is wrong) if there is none."""
        self._check_enabled()
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"{where}: shared memory region {name[:80]!r} is not registered")
        return region

    def close(self) -> None:
        """Unmaps every region (at shutdown)."""
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            os.close(region.fd)

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise PermissionDenied(
                "system shared memory is disabled on this server (system_shared_memory=false)"
            )


# What a server without shared memory has: a registry that refuses every use (PERMISSION_DENIED).
NO_SHARED_MEMORY = SharedMemoryRegistry(enabled=False)
