"""Building KServe requests and decoded inputs for the tests of ``server/kserve/``."""

from __future__ import annotations

import numpy as np
import pytest

from fineserve.server.errors import InvalidInput
from fineserve.server.kserve.inputs import RequestInput
from fineserve.server.kserve.regions import SHM_BYTE_SIZE, SHM_OFFSET, SHM_REGION, SharedMemoryRef
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from tests.fixtures import TINY_IMAGE_SIZE


def request_with(*tensors: tuple[str, str, list[int], bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def raw(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def invalid(match: str) -> pytest.RaisesContext[InvalidInput]:
    return pytest.raises(InvalidInput, match=match)


def decoded(*tensors: tuple[str, str, np.ndarray]) -> list[RequestInput]:
    return [RequestInput(name, datatype, array) for name, datatype, array in tensors]


def pixels(n: int, size: int = TINY_IMAGE_SIZE) -> np.ndarray:
    return np.zeros((n, 3, size, size), np.float32)


def texts(*items: bytes) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def shm_parameters(**values: str | int) -> dict[str, pb.InferParameter]:
    """Parameters as a tensor carries them: strings as string_param, ints as int64_param."""
    parameters = {}
    for key, value in values.items():
        param = pb.InferParameter()
        if isinstance(value, str):
            param.string_param = value
        else:
            param.int64_param = value
        parameters[key] = param
    return parameters


def placed_input(
    request: pb.ModelInferRequest, name: str, datatype: str, shape: list[int], ref: SharedMemoryRef
) -> None:
    """Adds an input that lies in shared memory (what tritonclient's set_shared_memory sends)."""
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    tensor.parameters[SHM_REGION].string_param = ref.region
    tensor.parameters[SHM_BYTE_SIZE].int64_param = ref.byte_size
    if ref.offset:
        tensor.parameters[SHM_OFFSET].int64_param = ref.offset
