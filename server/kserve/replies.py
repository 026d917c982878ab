"""The infer reply: the selected outputs appended to a ``ModelInferResponse``, their data raw
(what tritonclient reads) or written into their shared memory region (``regions``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from fineserve.server.kserve.outputs import RequestedOutput
from fineserve.server.kserve.regions import write_output
from fineserve.server.kserve.tensors import datatype_of, encode_raw
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.shared_memory import NO_SHARED_MEMORY, SharedMemoryRegistry


def encode_outputs(
    outputs: Mapping[str, NDArray[np.generic]],
    wanted: Sequence[RequestedOutput],
    response: pb.ModelInferResponse,
    shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY,
) -> None:
    """Appends the wanted outputs to ``response``, their data raw (what tritonclient reads), or
    written into their shared memory region. Those keep an empty raw entry, so every output's
    data stays at its own index (tritonclient counts outputs to find an output's raw data)."""
    for output in wanted:
        array = outputs[output.name]
        datatype = datatype_of(array)
        tensor = response.outputs.add()
        tensor.name = output.name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        data = encode_raw(array, datatype)
        if output.shared_memory is None:
            response.raw_output_contents.append(data)
            continue
        write_output(shared_memory, output.shared_memory, data, tensor)
        response.raw_output_contents.append(b"")
