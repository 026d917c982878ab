"""Ready tensors against a model's declared inputs: the one set of checks every transport gets.

Run by the core on every tensor request (fineserve.v1, KServe, embedded use); KServe's input
checks (``server/kserve/input_checks.py``) run it too, before their own rule that a batch may not
exceed the model's ``max_batch_size``. Each failure is an ``InvalidInput`` whose message names the
input and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fineserve.export.contract import TensorSpec
from fineserve.server.datatypes import NUMPY_DTYPES, datatype_name
from fineserve.server.errors import InvalidInput


def check_tensors(declared: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> int:
    """Checks every declared input's array (all must be present); returns the batch size.

    Datatype (the declared one, or one ``ACCEPTED_FOR`` it: ``as_declared`` casts those), rank,
    fixed dimensions, no empty dimension, finite floats; inputs declared alike
    (``input_ids`` and ``attention_mask``) must come alike; one batch size for all, at least 1.
    """
    shapes: dict[tuple[int, ...], tuple[str, tuple[int, ...]]] = {}
    batch_size = -1
    for spec in declared:
        array = arrays[spec.name]
        _check_one(spec, array)
        shape = tuple(array.shape)
        first = shapes.setdefault(tuple(spec.shape), (spec.name, shape))
        if first[1] != shape:
            raise InvalidInput(
                f"input {spec.name!r} has shape {list(shape)} but {first[0]!r} has {list(first[1])}; "
                "they must match"
            )
        if batch_size not in (-1, shape[0]):
            raise InvalidInput(f"input {spec.name!r} has batch size {shape[0]}, other inputs {batch_size}")
        batch_size = shape[0]
    if batch_size < 1:
        raise InvalidInput("the batch is empty: send at least one item")
    return batch_size


# Datatypes a client may send in place of the declared one, cast by the server (``as_declared``):
# FP16 for FP32, half the bytes on the wire, no more error than the fp16 graph variants add.
ACCEPTED_FOR = {"FP32": ("FP16",)}


def as_declared(declared: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The checked arrays in their declared dtypes: an FP16 array for an FP32 input is cast here,
    before batching, so a batch holds one dtype whatever its requests sent (FP16, FP32, decoded
    images). An fp16 graph variant's session casts the batch back to fp16 (``ModelSession.run``):
    exact for values that came as FP16, so only a pass over them is lost, not precision."""
    out = dict(arrays)
    for spec in declared:
        want = NUMPY_DTYPES[spec.datatype]
        if out[spec.name].dtype != want:
            out[spec.name] = out[spec.name].astype(want)
    return out


def _check_one(spec: TensorSpec, array: np.ndarray) -> None:
    where = f"input {spec.name!r}"
    want = NUMPY_DTYPES.get(spec.datatype)
    accepted = [NUMPY_DTYPES[name] for name in ACCEPTED_FOR.get(spec.datatype, ())]
    if want is None or (array.dtype != want and array.dtype not in accepted):
        got = datatype_name(array.dtype) or str(array.dtype)
        also = "".join(f" ({name} is accepted too)" for name in ACCEPTED_FOR.get(spec.datatype, ()))
        raise InvalidInput(f"{where}: datatype must be {spec.datatype}, got {got}{also}")
    check_shape(spec, array.shape)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # NaN or infinity in would be NaN scores out: refused, not computed.
        raise InvalidInput(f"{where}: contains NaN or infinite values")


def check_shape(spec: TensorSpec, shape: Sequence[int]) -> None:
    """Rank and fixed dimensions as declared, no empty dimension past the batch axis; also run by
    KServe's input checks on the declared shape, before any byte is decoded."""
    where = f"input {spec.name!r}"
    shape = tuple(shape)
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"{where}: shape {list(shape)} must have {len(spec.shape)} dimensions {list(spec.shape)}"
        )
    for axis, (wanted, got_size) in enumerate(zip(spec.shape, shape, strict=True)):
        if wanted not in (-1, got_size):
            raise InvalidInput(
                f"{where}: shape {list(shape)} does not match {list(spec.shape)} "
                f"(dimension {axis} must be {wanted})"
            )
        if axis > 0 and got_size == 0:
            raise InvalidInput(f"{where}: shape {list(shape)} has an empty dimension {axis}")
