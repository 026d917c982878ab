"""KServe v2 datatype names and numpy dtypes: the one table the core and the transports share.

Little-endian throughout: the protocol's raw contents are little-endian, and so are the hosts we
run on, so arrays decoded from the wire feed onnxruntime without a copy.
"""

from __future__ import annotations

import numpy as np

BYTES = "BYTES"

NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def datatype_name(dtype: np.dtype[np.generic]) -> str | None:
    """The KServe datatype of a numpy dtype (object arrays hold BYTES), or None if it has none."""
    if dtype == np.object_:
        return BYTES
    for name, candidate in NUMPY_DTYPES.items():
        if dtype.kind == candidate.kind and dtype.itemsize == candidate.itemsize:
            return name
    return None
