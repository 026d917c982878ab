"""One tensor's data on the wire <-> a numpy array: datatypes, BYTES elements, raw and typed
contents. Each decoding error is an ``InvalidInput`` naming the tensor and the problem.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from math import prod

import numpy as np
from numpy.typing import NDArray

from fineserve.server.datatypes import BYTES, NUMPY_DTYPES, datatype_name
from fineserve.server.errors import InvalidInput
from fineserve.server.pb.inference import grpc_service_pb2 as pb

# Which InferTensorContents field carries each datatype; FP16 and BF16 have none (raw only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
ALL_CONTENTS_FIELDS = tuple(sorted(set(CONTENTS_FIELDS.values())))
# No tensor in a request may claim more elements than this (guards the shape arithmetic).
MAX_ELEMENTS = 1 << 31
# A BYTES element: a 4-byte little-endian length, then the bytes.
_LENGTH = struct.Struct("<I")


# --- datatypes and shapes -------------------------------------------------------------------------


def dtype_of(datatype: str, where: str) -> np.dtype[np.generic]:
    """The numpy dtype of a numeric KServe datatype; ``where`` names the tensor in errors."""
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        known = ", ".join([*NUMPY_DTYPES, BYTES])
        raise InvalidInput(f"{where}: datatype {datatype!r} is not supported (supported: {known})") from None


def datatype_of(array: NDArray[np.generic]) -> str:
    """The KServe datatype of an array; object arrays (of bytes) are BYTES."""
    name = datatype_name(array.dtype)
    if name is None:
        raise TypeError(f"no KServe datatype for numpy dtype {array.dtype}")
    return name


def element_count(shape: Sequence[int], where: str) -> int:
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"{where}: shape {list(shape)} has a negative dimension")
    count = prod(shape)
    # Zero elements still need every other dimension in range: numpy refuses shapes whose
    # non-zero dimensions multiply past its index type.
    spanned = prod(max(dim, 1) for dim in shape)
    if spanned > MAX_ELEMENTS:
        raise InvalidInput(f"{where}: shape {list(shape)} spans {spanned} elements, over {MAX_ELEMENTS}")
    return count


# --- BYTES: each element is a 4-byte little-endian length followed by the bytes -------------------


def encode_bytes_elements(items: Iterable[bytes]) -> bytes:
    parts = []
    for item in items:
        parts.append(_LENGTH.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_bytes_elements(raw: bytes | memoryview, count: int, where: str) -> list[bytes]:
    """Exactly ``count`` length-prefixed elements filling ``raw`` to its last byte."""
    view = memoryview(raw)
    items: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise InvalidInput(
                f"{where}: BYTES contents end after {index} elements, but the shape needs {count}"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(
                f"{where}: BYTES element {index} claims {length} bytes but only {len(raw) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(raw):
        raise InvalidInput(
            f"{where}: BYTES contents have {len(raw) - offset} bytes after the {count} elements of the shape"
        )
    return items


def _object_array(items: Sequence[bytes], shape: Sequence[int]) -> NDArray[np.object_]:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array.reshape(tuple(shape))


# --- a tensor's contents ----------------------------------------------------------------------------


def decode_raw(
    name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview
) -> NDArray[np.generic]:
    """A tensor from its raw contents, whose length must match the shape exactly."""
    where = f"input {name!r}"
    count = element_count(shape, where)
    if datatype == BYTES:
        return _object_array(decode_bytes_elements(raw, count, where), shape)
    if datatype == "BF16":
        raise InvalidInput(f"{where}: datatype BF16 is not supported (no numpy type); send FP32")
    dtype = dtype_of(datatype, where)
    needed = count * dtype.itemsize
    if len(raw) != needed:
        raise InvalidInput(
            f"{where}: raw contents have {len(raw)} bytes, but shape {list(shape)} of {datatype} "
            f"needs {needed}"
        )
    # Read-only view of the request's bytes, in the host's byte order (a no-op on little-endian).
    array = np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))
    return array.astype(dtype.newbyteorder("="), copy=False)


def decode_contents(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> NDArray[np.generic]:
    """A tensor from typed ``contents``: the one field of its datatype, of exactly the shape's size."""
    where = f"input {name!r}"
    count = element_count(shape, where)
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        dtype_of(datatype, where)  # unknown datatype: that error first
        raise InvalidInput(f"{where}: {datatype} has no typed contents field; send it in raw_input_contents")
    for other in ALL_CONTENTS_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidInput(f"{where}: datatype {datatype} belongs in contents.{field}, not {other}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"{where}: contents.{field} has {len(values)} elements, but shape {list(shape)} needs {count}"
        )
    if datatype == BYTES:
        return _object_array(list(values), shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind in "iu":
        wide = np.array(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
        info = np.iinfo(dtype.name)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(f"{where}: contents.{field} has values outside the range of {datatype}")
        return wide.astype(dtype.newbyteorder("=")).reshape(tuple(shape))
    return np.array(values, dtype=dtype.newbyteorder("=")).reshape(tuple(shape))


def encode_raw(array: NDArray[np.generic], datatype: str) -> bytes:
    """An array's raw contents: little-endian values, or BYTES elements for an object array."""
    if datatype == BYTES:
        return encode_bytes_elements(bytes(x) for x in array.reshape(-1).tolist())
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
