"""A request's inputs decoded into arrays: from typed contents, from raw contents, or copied out
of a shared memory region (``regions``). What they must be for the model is ``input_checks``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fineserve.server.errors import InvalidInput
from fineserve.server.kserve.regions import read_input, shared_memory_ref
from fineserve.server.kserve.tensors import decode_contents, decode_raw
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.shared_memory import NO_SHARED_MEMORY, SharedMemoryRegistry


@dataclass(frozen=True)
class RequestInput:
    """One decoded input tensor: the declared datatype and the array (object dtype for BYTES)."""

    name: str
    datatype: str
    array: NDArray[np.generic]


def decode_inputs(
    request: pb.ModelInferRequest, shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY
) -> list[RequestInput]:
    """All inputs of a request, in order. Raw contents are all-or-nothing, as the protocol says,
    over the inputs that are not in shared memory (those are copied out of their region)."""
    if not request.inputs:
        raise InvalidInput("the request has no inputs")
    names = [tensor.name for tensor in request.inputs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidInput(f"input {duplicates[0]!r} appears more than once")
    placed = [shared_memory_ref(tensor.parameters, f"input {tensor.name!r}") for tensor in request.inputs]
    raw = request.raw_input_contents
    in_message = sum(ref is None for ref in placed)
    if raw and len(raw) != in_message:
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has {in_message} inputs not in "
            "shared memory; give one per such input, in the order of inputs, or none"
        )
    decoded = []
    next_raw = 0
    for tensor, ref in zip(request.inputs, placed, strict=True):
        shape = list(tensor.shape)
        where = f"input {tensor.name!r}"
        if ref is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{where}: sets both contents and a shared memory region")
            array = read_input(shared_memory, ref, tensor.name, tensor.datatype, shape)
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{where}: sets both contents and raw_input_contents")
            array = decode_raw(tensor.name, tensor.datatype, shape, raw[next_raw])
            next_raw += 1
        else:
            array = decode_contents(tensor.name, tensor.datatype, shape, tensor.contents)
        decoded.append(RequestInput(tensor.name, tensor.datatype, array))
    return decoded
