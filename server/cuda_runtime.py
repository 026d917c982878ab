"""The few CUDA runtime calls CUDA shared memory needs, through ctypes on ``libcudart``.

No CUDA Python package is needed: the library comes from where torch and onnxruntime-gpu get it
(the ``nvidia-cuda-runtime`` wheels: ``site-packages/nvidia/*/lib/libcudart.so.*``), else from
the system's library path, or exactly the one the operator names (``cuda_runtime_library``).
``CudaRuntime.load`` says why it cannot be used (no library, no
driver, no device) in a ``DeviceUnavailable`` whose message a client may read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from collections.abc import Iterator

import numpy as np

from fineserve.server.errors import DeviceUnavailable, InvalidInput

IPC_HANDLE_SIZE = 64  # sizeof(cudaIpcMemHandle_t)
_IPC_LAZY_ENABLE_PEER_ACCESS = 1
_MEMCPY_HOST_TO_DEVICE = 1
_MEMCPY_DEVICE_TO_HOST = 2
# Sonames tried after the wheels' copies, newest first.
_SONAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


class IpcMemHandle(ctypes.Structure):
    """``cudaIpcMemHandle_t``: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


def library_candidates() -> Iterator[str]:
    """Where libcudart may be: the nvidia wheels on sys.path (as torch loads it), then the system's."""
    for entry in sys.path:
        yield from sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libcudart.so*")))
    found = ctypes.util.find_library("cudart")
    if found:
        yield found
    yield from _SONAMES


class CudaRuntime:
    """libcudart and libcuda, loaded; every call raises ``DeviceUnavailable`` on a CUDA error."""

    def __init__(self, cudart: ctypes.CDLL, cuda: ctypes.CDLL, device_count: int) -> None:
        self._cudart = cudart
        self._cuda = cuda
        self.device_count = device_count
        self._cudart.cudaGetErrorString.restype = ctypes.c_char_p
        self._cudart.cudaIpcOpenMemHandle.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            IpcMemHandle,
            ctypes.c_uint,
        ]
        self._cudart.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(IpcMemHandle), ctypes.c_void_p]
        self._cudart.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        self._cudart.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._cuda.cuMemGetAddressRange_v2.argtypes = [
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_uint64,
        ]

    @classmethod
    def load(cls, library: str | None = None) -> CudaRuntime:
        """The runtime of ``library`` (a libcudart path or soname), or else of the first libcudart
        that loads, once a device answers.

        Raises:
            DeviceUnavailable: no libcudart (or not the one named) or libcuda (the driver), or no
                device.
        """
        if library is not None:
            try:
                cudart = ctypes.CDLL(library)
            except OSError:
                # The operator's path stays in the server's settings: clients read this message.
                raise DeviceUnavailable(
                    "CUDA shared memory needs a CUDA device: the libcudart named by "
                    "cuda_runtime_library does not load"
                ) from None
        else:
            cudart = _first_that_loads()
        try:
            cuda = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise DeviceUnavailable(
                "CUDA shared memory needs a CUDA device: no CUDA driver (libcuda.so.1)"
            ) from None
        count = ctypes.c_int(0)
        code = cudart.cudaGetDeviceCount(ctypes.byref(count))
        if code != 0:
            cudart.cudaGetErrorString.restype = ctypes.c_char_p
            why = (cudart.cudaGetErrorString(code) or b"error %d" % code).decode(errors="replace")
            raise DeviceUnavailable(f"CUDA shared memory needs a CUDA device: {why}")
        if count.value == 0:
            raise DeviceUnavailable("CUDA shared memory needs a CUDA device: none found")
        return cls(cudart, cuda, count.value)

    def open_ipc_handle(self, raw_handle: bytes, device_id: int) -> tuple[int, int]:
        """Maps another process's allocation: (device pointer, bytes from it to the allocation's end).

        Raises:
            InvalidInput: a handle of the wrong size, a device this host lacks, or one that does
                not open (not a live allocation's handle).
        """
        if len(raw_handle) != IPC_HANDLE_SIZE:
            raise InvalidInput(
                f"raw_handle has {len(raw_handle)} bytes; a cudaIpcMemHandle_t has {IPC_HANDLE_SIZE}"
            )
        if not 0 <= device_id < self.device_count:
            raise InvalidInput(
                f"device_id {device_id}: this host has CUDA devices 0..{self.device_count - 1}"
            )
        handle = IpcMemHandle()
        ctypes.memmove(handle.reserved, raw_handle, IPC_HANDLE_SIZE)
        pointer = ctypes.c_void_p()
        self._use(device_id)
        code = self._cudart.cudaIpcOpenMemHandle(ctypes.byref(pointer), handle, _IPC_LAZY_ENABLE_PEER_ACCESS)
        if code != 0 or not pointer.value:
            raise InvalidInput(f"raw_handle does not open on device {device_id}: {self._error(code)}")
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        if self._cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), pointer.value) != 0:
            self.close_ipc_handle(pointer.value, device_id)
            raise InvalidInput("raw_handle opened, but its allocation's size could not be read")
        return pointer.value, base.value + size.value - pointer.value

    def close_ipc_handle(self, pointer: int, device_id: int = 0) -> None:
        self._use(device_id)
        self._check(self._cudart.cudaIpcCloseMemHandle(pointer), "cudaIpcCloseMemHandle")

    def ipc_handle(self, pointer: int) -> bytes:
        """The IPC handle of an allocation of this process (for clients and benchmarks)."""
        handle = IpcMemHandle()
        self._check(self._cudart.cudaIpcGetMemHandle(ctypes.byref(handle), pointer), "cudaIpcGetMemHandle")
        return bytes(handle.reserved)

    def malloc(self, byte_size: int, device_id: int) -> int:
        """A device allocation of this process (for clients and benchmarks); ``free`` releases it."""
        self._use(device_id)
        pointer = ctypes.c_void_p()
        self._check(self._cudart.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(byte_size)), "cudaMalloc")
        return int(pointer.value or 0)

    def free(self, pointer: int) -> None:
        self._check(self._cudart.cudaFree(ctypes.c_void_p(pointer)), "cudaFree")

    def copy_to_host(self, pointer: int, byte_size: int, device_id: int) -> memoryview:
        """``byte_size`` bytes from device memory, in a fresh host buffer."""
        buffer = np.empty(byte_size, dtype=np.uint8)
        self._copy(buffer.ctypes.data, pointer, byte_size, _MEMCPY_DEVICE_TO_HOST, device_id)
        return buffer.data.toreadonly()

    def copy_to_device(self, pointer: int, data: bytes | memoryview, device_id: int) -> None:
        source = np.frombuffer(data, dtype=np.uint8)
        self._copy(pointer, source.ctypes.data, source.nbytes, _MEMCPY_HOST_TO_DEVICE, device_id)

    def _copy(self, destination: int, source: int, byte_size: int, kind: int, device_id: int) -> None:
        if byte_size:
            self._use(device_id)
            self._check(self._cudart.cudaMemcpy(destination, source, byte_size, kind), "cudaMemcpy")

    def _use(self, device_id: int) -> None:
        # The current device belongs to the calling thread: set by each call that needs it.
        self._check(self._cudart.cudaSetDevice(device_id), "cudaSetDevice")

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            raise DeviceUnavailable(f"{call} failed: {self._error(code)}")

    def _error(self, code: int) -> str:
        text: bytes | None = self._cudart.cudaGetErrorString(code)
        return (text or b"").decode(errors="replace") or f"CUDA error {code}"


def _first_that_loads() -> ctypes.CDLL:
    for candidate in library_candidates():
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    raise DeviceUnavailable(
        "CUDA shared memory needs a CUDA device: no libcudart (looked in site-packages "
        "nvidia/*/lib and the system's library path)"
    )
