"""A request's decoded inputs checked against the model: exactly one of its two input forms
(ready tensors, or one BYTES input of encoded items), each input's datatype and shape, and a
batch within the model's ``max_batch_size``. Each failure is an ``InvalidInput`` naming the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fineserve.server.datatypes import BYTES
from fineserve.server.errors import InvalidInput
from fineserve.server.kserve.inputs import RequestInput
from fineserve.server.kserve.interface import ModelInterface
from fineserve.server.kserve.tensors import element_count
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.tensor_checks import ACCEPTED_FOR, check_shape, check_tensors


@dataclass(frozen=True)
class TensorRequest:
    """Ready tensors, keyed by graph input name, all with the same batch size."""

    inputs: dict[str, NDArray[np.generic]]
    batch_size: int


@dataclass(frozen=True)
class EncodedRequest:
    """Encoded images or UTF-8 texts, one item per batch element."""

    items: list[bytes]

    @property
    def batch_size(self) -> int:
        return len(self.items)


def check_declared_inputs(request: pb.ModelInferRequest, interface: ModelInterface, model: str) -> None:
    """Before anything is decoded, from the declared names and shapes alone: every input is one
    the model takes, a tensor (of its datatype, or one accepted for it: FP16 for FP32) has its
    rank and fixed dimensions, and no input holds more items
    than ``max_batch_size`` (a BYTES input: all its elements, whatever its shape). Decoding twenty
    million empty BYTES elements only to refuse them held the event loop for seconds."""
    tensors = {t.name: t for t in interface.tensor_inputs}
    for tensor in request.inputs:
        shape = list(tensor.shape)
        if tensor.name == interface.encoded_input.name:
            items = element_count(shape, f"input {tensor.name!r}")
        elif tensor.name in tensors:
            spec = tensors[tensor.name]
            if tensor.datatype not in (spec.datatype, *ACCEPTED_FOR.get(spec.datatype, ())):
                continue  # decoding says what is wrong with the datatype first, as it always did
            check_shape(spec, shape)
            items = shape[0]
        else:
            raise _no_such_input(interface, model, tensor.name)
        _check_not_over_max(interface, items, f"input {tensor.name!r}: ")


def check_inputs(
    interface: ModelInterface, model: str, inputs: Sequence[RequestInput]
) -> TensorRequest | EncodedRequest:
    """Checks the request's inputs against the model: exactly one of the two forms, right types."""
    by_name = {i.name: i for i in inputs}
    encoded = by_name.get(interface.encoded_input.name)
    if encoded is not None:
        if len(by_name) > 1:
            others = ", ".join(repr(n) for n in by_name if n != encoded.name)
            raise InvalidInput(
                f"model {model!r}: send {encoded.name!r} or the tensors, not both (also got {others})"
            )
        return _check_encoded(interface, encoded)
    expected = {t.name: t for t in interface.tensor_inputs}
    for name in by_name:
        if name not in expected:
            raise _no_such_input(interface, model, name)
    for name in expected:
        if name not in by_name:
            raise InvalidInput(
                f"model {model!r}: missing input {name!r}; it takes {interface.describe_inputs()}"
            )
    # The tensors themselves: the core's checks (the core runs them again for every transport).
    arrays = {spec.name: by_name[spec.name].array for spec in interface.tensor_inputs}
    batch_size = check_tensors(interface.tensor_inputs, arrays)
    _check_batch_size(interface, batch_size)
    return TensorRequest(arrays, batch_size)


def _check_encoded(interface: ModelInterface, given: RequestInput) -> EncodedRequest:
    where = f"input {given.name!r}"
    if given.datatype != BYTES:
        raise InvalidInput(f"{where}: datatype must be BYTES, got {given.datatype}")
    shape = given.array.shape
    # [N] is the declared shape; [N, 1] is what clients written for Triton's string inputs send.
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidInput(f"{where}: shape {list(shape)} must be [N] (or [N, 1]): one element per item")
    items = [bytes(x) for x in given.array.reshape(-1).tolist()]
    _check_batch_size(interface, len(items))
    return EncodedRequest(items)


def _check_batch_size(interface: ModelInterface, batch_size: int) -> None:
    if batch_size < 1:
        raise InvalidInput("the batch is empty: send at least one item")
    _check_not_over_max(interface, batch_size)


def _check_not_over_max(interface: ModelInterface, batch_size: int, where: str = "") -> None:
    if batch_size > interface.max_batch_size:
        raise InvalidInput(
            f"{where}batch size {batch_size} is over the model's max_batch_size {interface.max_batch_size}"
        )


def _no_such_input(interface: ModelInterface, model: str, name: str) -> InvalidInput:
    return InvalidInput(f"model {model!r} has no input {name!r}; it takes {interface.describe_inputs()}")
