"""Tensors placed in shared memory: an input's or requested output's ``shared_memory_*``
parameters (tritonclient's ``set_shared_memory``) name a registered region; this module parses
them, checks the span, and does the I/O: it reads inputs out of their region and writes outputs
into theirs (the regions themselves are ``server/shared_memory.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fineserve.server.datatypes import BYTES
from fineserve.server.errors import InvalidInput, LimitExceeded
from fineserve.server.kserve.tensors import decode_raw, dtype_of, element_count
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.shared_memory import SharedMemoryRegistry

# An input's or requested output's parameters that place it in shared memory (tritonclient's names).
SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"


@dataclass(frozen=True)
class SharedMemoryRef:
    """Where a tensor lies in shared memory: ``byte_size`` bytes at ``offset`` of ``region``."""

    region: str
    byte_size: int
    offset: int = 0


def shared_memory_ref(parameters: Mapping[str, pb.InferParameter], where: str) -> SharedMemoryRef | None:
    """A tensor's ``shared_memory_*`` parameters (tritonclient's ``set_shared_memory``), if any."""
    keys = [key for key in parameters if key.startswith("shared_memory")]
    if not keys:
        return None
    unknown = sorted(set(keys) - {SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET})
    if unknown:
        raise InvalidInput(f"{where}: parameter {unknown[0]!r} is not supported")
    if SHM_REGION not in parameters or SHM_BYTE_SIZE not in parameters:
        raise InvalidInput(f"{where}: shared memory needs both {SHM_REGION!r} and {SHM_BYTE_SIZE!r}")
    region = parameters[SHM_REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"{where}: parameter {SHM_REGION!r} must be a string")
    return SharedMemoryRef(
        region.string_param,
        _non_negative(parameters[SHM_BYTE_SIZE], SHM_BYTE_SIZE, where),
        _non_negative(parameters[SHM_OFFSET], SHM_OFFSET, where) if SHM_OFFSET in parameters else 0,
    )


def _non_negative(param: pb.InferParameter, key: str, where: str) -> int:
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"{where}: parameter {key!r} must be an integer, got {choice}")
    value = int(getattr(param, choice))
    if value < 0:
        raise InvalidInput(f"{where}: parameter {key!r} must be >= 0, got {value}")
    return value


def read_input(
    shared_memory: SharedMemoryRegistry, ref: SharedMemoryRef, name: str, datatype: str, shape: Sequence[int]
) -> NDArray[np.generic]:
    """An input copied out of its region, once the span is known to fit what the tensor needs."""
    where = f"input {name!r}"
    region = shared_memory.get(ref.region, where)
    _check_region_size(name, datatype, shape, ref.byte_size, shared_memory.max_read_bytes)
    data = region.read(ref.offset, ref.byte_size, where)
    return decode_raw(name, datatype, shape, data)


def _check_region_size(name: str, datatype: str, shape: Sequence[int], byte_size: int, limit: int) -> None:
    """Before a byte is read: no more than a request message could carry, and for a fixed-size
    tensor exactly what its shape needs (as raw contents must)."""
    where = f"input {name!r}"
    if byte_size > limit:
        raise LimitExceeded(
            f"{where}: shared_memory_byte_size {byte_size} is over {limit} bytes, what a request "
            "message may carry (max_receive_message_bytes)"
        )
    if datatype == BYTES:
        return
    needed = element_count(shape, where) * dtype_of(datatype, where).itemsize
    if byte_size != needed:
        raise InvalidInput(
            f"{where}: shared_memory_byte_size is {byte_size}, but shape {list(shape)} of {datatype} "
            f"needs {needed}"
        )


def check_output_span(
    shared_memory: SharedMemoryRegistry, ref: SharedMemoryRef, name: str, needed: int | None
) -> None:
    """Before the model runs: the output's region is registered, its span lies inside it, and
    holds ``needed`` bytes (None: a size known only once the output is computed)."""
    where = f"requested output {name!r}"
    shared_memory.get(ref.region, where).check_span(ref.offset, ref.byte_size, where)
    if needed is not None and needed > ref.byte_size:
        raise InvalidInput(
            f"{where}: the output has {needed} bytes, more than shared_memory_byte_size {ref.byte_size}"
        )


def write_output(
    shared_memory: SharedMemoryRegistry,
    ref: SharedMemoryRef,
    data: bytes,
    tensor: pb.ModelInferResponse.InferOutputTensor,
) -> None:
    """Writes an output's raw contents into its region (checked again: the region may have
    changed since) and says where in the output's parameters, as tritonclient reads them."""
    where = f"requested output {tensor.name!r}"
    shared_memory.get(ref.region, where).write(ref.offset, data, ref.byte_size, where)
    tensor.parameters[SHM_REGION].string_param = ref.region
    tensor.parameters[SHM_BYTE_SIZE].int64_param = len(data)
    if ref.offset:
        tensor.parameters[SHM_OFFSET].int64_param = ref.offset
