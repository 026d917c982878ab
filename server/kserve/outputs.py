"""The outputs a request asks for: which, in what order, as top-k classifications (the
classification extension) or not, and whether into a shared memory region, whose span is
checked before the model runs. Then the arrays to return, selected from the results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod

import numpy as np
from numpy.typing import NDArray

from fineserve.server.classification import top_classes
from fineserve.server.datatypes import NUMPY_DTYPES
from fineserve.server.errors import InvalidInput
from fineserve.server.kserve.interface import ModelInterface
from fineserve.server.kserve.regions import SharedMemoryRef, check_output_span, shared_memory_ref
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.shared_memory import NO_SHARED_MEMORY, SharedMemoryRegistry


@dataclass(frozen=True)
class RequestedOutput:
    """An output to return; ``class_count`` > 0 asks for the classification extension's top-k."""

    name: str
    class_count: int = 0
    # Set: the output is written into this shared memory region instead of the response.
    shared_memory: SharedMemoryRef | None = None


def requested_outputs(request: pb.ModelInferRequest, interface: ModelInterface) -> list[RequestedOutput]:
    """The outputs to return: those requested, in request order, else all of them."""
    if not request.outputs:
        return [RequestedOutput(name) for name in interface.output_names]
    wanted: list[RequestedOutput] = []
    for output in request.outputs:
        where = f"requested output {output.name!r}"
        if output.name not in interface.output_names:
            known = ", ".join(repr(n) for n in interface.output_names)
            raise InvalidInput(f"{where} does not exist (outputs: {known})")
        if any(w.name == output.name for w in wanted):
            raise InvalidInput(f"{where} is requested more than once")
        class_count = 0
        placed = shared_memory_ref(output.parameters, where)
        for key, param in output.parameters.items():
            if key.startswith("shared_memory"):
                continue
            if key != "classification":
                raise InvalidInput(f"{where}: parameter {key!r} is not supported")
            if param.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
                raise InvalidInput(
                    f"{where}: parameter 'classification' must be an integer (how many classes)"
                )
            class_count = int(param.int64_param or param.uint64_param)
            if class_count < 1:
                raise InvalidInput(f"{where}: parameter 'classification' must be >= 1, got {class_count}")
        wanted.append(RequestedOutput(output.name, class_count, placed))
    return wanted


def check_output_regions(
    wanted: Sequence[RequestedOutput],
    interface: ModelInterface,
    batch_size: int,
    shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY,
) -> None:
    """Before the model runs: every output to be written into shared memory names a registered
    region, its span lies inside it, and (for fixed-size outputs) it holds the whole output.
    A wrong region then costs no inference; the write checks again, as the region may change."""
    specs = {t.name: t for t in interface.outputs}
    for output in wanted:
        if output.shared_memory is None:
            continue
        spec = specs[output.name]
        dtype = NUMPY_DTYPES.get(spec.datatype)
        needed = None  # BYTES, or a size known only once it is computed
        if not (output.class_count or dtype is None or any(d < 0 for d in spec.shape[1:])):
            needed = batch_size * prod(spec.shape[1:]) * dtype.itemsize
        check_output_span(shared_memory, output.shared_memory, output.name, needed)


def classify(scores: NDArray[np.generic], class_count: int, labels: Sequence[str]) -> NDArray[np.object_]:
    """The classification extension: per row, the top ``class_count`` classes (at most all of
    them), best first, each as ``b"<score>:<index>:<label>"`` (score printed like C's ``%f``)."""
    ranked = top_classes(scores, class_count, labels)
    out = np.empty((len(ranked), len(ranked[0])), dtype=np.object_)
    for r, row in enumerate(ranked):
        for c, found in enumerate(row):
            out[r, c] = f"{found.score:f}:{found.index}:{found.label}".encode()
    return out


def select_outputs(
    outputs: Mapping[str, NDArray[np.generic]], wanted: Sequence[RequestedOutput], labels: Sequence[str]
) -> dict[str, NDArray[np.generic]]:
    """The arrays to return, by name: as computed, or as top-k classifications where asked."""
    return {
        w.name: classify(outputs[w.name], w.class_count, labels) if w.class_count else outputs[w.name]
        for w in wanted
    }
