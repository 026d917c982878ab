"""CUDA shared memory: tensors passed in another process's GPU allocation, named by an IPC handle.

A client on the same host allocates device memory, gets its ``cudaIpcMemHandle_t``
(tritonclient's ``tritonclient.utils.cuda_shared_memory``), and registers it with
CudaSharedMemoryRegister. Requests then name the region as they name a system one
(``server/kserve/regions.py``). The server opens the handle once (``cudaIpcOpenMemHandle``),
copies inputs out with cudaMemcpy device -> host and outputs in host -> device, as Triton does
for models that run on the CPU. Binding the device pointer directly as an onnxruntime IO-binding
input or output (no host copy) is the next step for models served on CUDA.

Off by default (``cuda_shared_memory``); on a host without a usable CUDA runtime registering
answers FAILED_PRECONDITION with the reason, while status and unregister still answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fineserve.server.cuda_runtime import IPC_HANDLE_SIZE, CudaRuntime
from fineserve.server.errors import DeviceUnavailable, InvalidInput
from fineserve.server.shared_memory import span_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaRegion:
    """A registered CUDA region: ``byte_size`` bytes at ``pointer`` (this process's mapping of the
    client's allocation) on ``device_id``."""

    name: str
    device_id: int
    byte_size: int
    pointer: int
    runtime: CudaRuntime
    kind: Literal["cuda"] = "cuda"

    def read(self, offset: int, byte_size: int, where: str) -> memoryview:
        """A host copy of ``byte_size`` bytes at ``offset`` (the client may reuse the region as
        soon as the request is decoded)."""
        self.check_span(offset, byte_size, where)
        return self.runtime.copy_to_host(self.pointer + offset, byte_size, self.device_id)

    def write(self, offset: int, data: bytes | memoryview, byte_size: int, where: str) -> None:
        self.check_span(offset, byte_size, where)
        if len(data) > byte_size:
            raise InvalidInput(
                f"{where}: the output has {len(data)} bytes, more than shared_memory_byte_size {byte_size}"
            )
        self.runtime.copy_to_device(self.pointer + offset, data, self.device_id)

    def check_span(self, offset: int, byte_size: int, where: str) -> None:
        error = span_error(self.name, self.byte_size, offset, byte_size, where)
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.runtime.close_ipc_handle(self.pointer, self.device_id)
        except DeviceUnavailable as err:  # the client's process may be gone: nothing left to do
            log.warning("closing CUDA shared memory region %r: %s", self.name, err.message)


class CudaSharedMemory:
    """Whether CUDA shared memory is on, and the CUDA runtime it uses, loaded once on first need
    (or at start, by ``probe``); a runtime that fails to load keeps its reason for every call."""

    def __init__(self, enabled: bool, load: Callable[[], CudaRuntime] = CudaRuntime.load) -> None:
        self.enabled = enabled
        self._load = load
        self._runtime: CudaRuntime | None = None
        self._unavailable: DeviceUnavailable | None = None
        self._lock = threading.Lock()

    def runtime(self) -> CudaRuntime:
        """The loaded runtime.

        Raises:
            DeviceUnavailable: no usable CUDA device here (FAILED_PRECONDITION), with the reason.
        """
        with self._lock:
            if self._runtime is None and self._unavailable is None:
                try:
                    self._runtime = self._load()
                except DeviceUnavailable as err:
                    self._unavailable = err
            if self._unavailable is not None:
                raise DeviceUnavailable(self._unavailable.message)
            assert self._runtime is not None
            return self._runtime

    def probe(self) -> str | None:
        """None when CUDA shared memory works here, else why not (for the startup log)."""
        try:
            self.runtime()
        except DeviceUnavailable as err:
            return err.message
        return None

    def open(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> CudaRegion:
        """The region of ``byte_size`` bytes of the allocation ``raw_handle`` on ``device_id``.

        Raises:
            DeviceUnavailable: no usable CUDA device here.
            InvalidInput: a bad handle or device, or a region past the allocation's end.
        """
        if len(raw_handle) != IPC_HANDLE_SIZE:
            raise InvalidInput(
                f"shared memory region {name!r}: raw_handle has {len(raw_handle)} bytes; a "
                f"cudaIpcMemHandle_t has {IPC_HANDLE_SIZE}"
            )
        runtime = self.runtime()
        pointer, available = runtime.open_ipc_handle(raw_handle, device_id)
        if byte_size > available:
            runtime.close_ipc_handle(pointer, device_id)
            raise InvalidInput(
                f"shared memory region {name!r}: byte_size {byte_size} is past the end of the CUDA "
                f"allocation ({available} bytes)"
            )
        return CudaRegion(name, device_id, byte_size, pointer, runtime)
