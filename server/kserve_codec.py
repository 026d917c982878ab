"""KServe v2 messages <-> numpy arrays and our own types: the protocol's edge, without grpc.

Everything here is pure: it reads and builds protobuf messages and numpy arrays, and raises
``InvalidInput`` (INVALID_ARGUMENT) with a message naming the input and the problem. The
servicer in ``kserve.py`` converts, calls the core, converts back; nothing below it sees protobuf.

How a model looks through KServe: under its own name it takes EITHER its graph's ready tensors
(e.g. ``pixel_values``, or ``input_ids`` + ``attention_mask``) OR one BYTES input (``images``:
encoded JPEG/PNG/WebP files; ``texts``: UTF-8 texts) that the server preprocesses. It returns its
graph outputs (``logits``) and ``probabilities`` (softmax of logits / calibrated temperature).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fineserve.export.contract import ModelSpec, TensorSpec
from fineserve.server.classification import top_classes
from fineserve.server.datatypes import BYTES, NUMPY_DTYPES, datatype_name
from fineserve.server.errors import InvalidInput, LimitExceeded
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.pb.inference import model_config_pb2 as mc
from fineserve.server.shared_memory import NO_SHARED_MEMORY, SharedMemoryRegistry
from fineserve.server.tensor_checks import check_shape, check_tensors

if TYPE_CHECKING:
    from fineserve.server.model import Duration, ModelStats

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
PROBABILITIES = "probabilities"
# An input's or requested output's parameters that place it in shared memory (tritonclient's names).
SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"
# The BYTES input per task: one element per encoded image or per text.
ENCODED_INPUT_NAMES = {"image-classification": "images", "text-classification": "texts"}

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
CONFIG_DATATYPES = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64,
    "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    BYTES: mc.TYPE_STRING,
    "BF16": mc.TYPE_BF16,
}
# No tensor in a request may claim more elements than this (guards the shape arithmetic).
MAX_ELEMENTS = 1 << 31
_LENGTH = struct.Struct("<I")


# --- datatypes ------------------------------------------------------------------------------------


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


# --- request inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestInput:
    """One decoded input tensor: the declared datatype and the array (object dtype for BYTES)."""

    name: str
    datatype: str
    array: NDArray[np.generic]


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
            region = shared_memory.get(ref.region, where)
            limit = shared_memory.max_read_bytes
            _check_region_size(tensor.name, tensor.datatype, shape, ref.byte_size, limit)
            data = region.read(ref.offset, ref.byte_size, where)
            array = decode_raw(tensor.name, tensor.datatype, shape, data)
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{where}: sets both contents and raw_input_contents")
            array = decode_raw(tensor.name, tensor.datatype, shape, raw[next_raw])
            next_raw += 1
        else:
            array = decode_contents(tensor.name, tensor.datatype, shape, tensor.contents)
        decoded.append(RequestInput(tensor.name, tensor.datatype, array))
    return decoded


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


# --- a model's KServe face ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInterface:
    """What a model takes and returns through KServe; shapes include the batch axis (-1)."""

    tensor_inputs: tuple[TensorSpec, ...]
    encoded_input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def describe_inputs(self) -> str:
        tensors = ", ".join(repr(t.name) for t in self.tensor_inputs)
        return f"either {self.encoded_input.name!r} (BYTES) or the tensors {tensors}"


def interface_of(spec: ModelSpec, max_batch_size: int | None = None) -> ModelInterface:
    """The model's KServe face; ``max_batch_size`` (the server's cap) applies if below the model's."""
    logits = spec.outputs[0]
    return ModelInterface(
        tensor_inputs=spec.inputs,
        encoded_input=TensorSpec(ENCODED_INPUT_NAMES[spec.task], BYTES, (-1,)),
        outputs=(*spec.outputs, TensorSpec(PROBABILITIES, "FP32", logits.shape)),
        max_batch_size=min(spec.max_batch_size, max_batch_size or spec.max_batch_size),
    )


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
    the model takes, a tensor has its rank and fixed dimensions, and no input holds more items
    than ``max_batch_size`` (a BYTES input: all its elements, whatever its shape). Decoding twenty
    million empty BYTES elements only to refuse them held the event loop for seconds."""
    tensors = {t.name: t for t in interface.tensor_inputs}
    for tensor in request.inputs:
        shape = list(tensor.shape)
        if tensor.name == interface.encoded_input.name:
            items = element_count(shape, f"input {tensor.name!r}")
        elif tensor.name in tensors:
            spec = tensors[tensor.name]
            if tensor.datatype != spec.datatype:
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
        ref = output.shared_memory
        if ref is None:
            continue
        where = f"requested output {output.name!r}"
        shared_memory.get(ref.region, where).check_span(ref.offset, ref.byte_size, where)
        spec = specs[output.name]
        dtype = NUMPY_DTYPES.get(spec.datatype)
        if output.class_count or dtype is None or any(d < 0 for d in spec.shape[1:]):
            continue  # BYTES, or a size known only once it is computed
        needed = batch_size * prod(spec.shape[1:]) * dtype.itemsize
        if needed > ref.byte_size:
            raise InvalidInput(
                f"{where}: the output has {needed} bytes, more than shared_memory_byte_size {ref.byte_size}"
            )


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


def request_timeout_us(parameters: Mapping[str, pb.InferParameter]) -> int | None:
    """The request's ``timeout`` parameter (microseconds), if given; must be a positive integer."""
    if "timeout" not in parameters:
        return None
    param = parameters["timeout"]
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"parameter 'timeout' must be an integer (microseconds), got {choice}")
    value = int(getattr(param, choice))
    if value <= 0:
        raise InvalidInput(f"parameter 'timeout' must be > 0 microseconds, got {value}")
    return value


def check_request_parameters(parameters: Mapping[str, pb.InferParameter]) -> None:
    """Rejects the parameters of features we do not have (sequences, shared memory)."""
    for key in parameters:
        if key in ("sequence_id", "sequence_start", "sequence_end"):
            raise InvalidInput(f"parameter {key!r}: sequence batching is not supported")
        if key.startswith("shared_memory"):
            raise InvalidInput(f"parameter {key!r} belongs on an input or requested output, not the request")


def parse_version(version: str) -> int | None:
    """The request's version string: empty means the server's choice; else a positive integer."""
    if not version:
        return None
    # ASCII digits only (str.isdigit() also takes "²" and "١"), and few enough for an int64.
    if not (version.isascii() and version.isdigit() and len(version) <= 18) or int(version) < 1:
        raise InvalidInput(
            f"model version {version[:40]!r} must be a positive integer (or empty for the newest)"
        )
    return int(version)


# --- responses ------------------------------------------------------------------------------------


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
        if datatype == BYTES:
            data = encode_bytes_elements(bytes(x) for x in array.reshape(-1).tolist())
        else:
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        ref = output.shared_memory
        if ref is None:
            response.raw_output_contents.append(data)
            continue
        where = f"requested output {output.name!r}"
        shared_memory.get(ref.region, where).write(ref.offset, data, ref.byte_size, where)
        tensor.parameters[SHM_REGION].string_param = ref.region
        tensor.parameters[SHM_BYTE_SIZE].int64_param = len(data)
        if ref.offset:
            tensor.parameters[SHM_OFFSET].int64_param = ref.offset
        response.raw_output_contents.append(b"")


def tensor_metadata(tensor: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape)
    )


def model_metadata(name: str, versions: Sequence[int], interface: ModelInterface) -> pb.ModelMetadataResponse:
    """Metadata shapes include the batch axis as -1; the BYTES input comes after the tensors."""
    return pb.ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[tensor_metadata(t) for t in (*interface.tensor_inputs, interface.encoded_input)],
        outputs=[tensor_metadata(t) for t in interface.outputs],
    )


@dataclass(frozen=True)
class ServingFacts:
    """What the model config reports beyond the spec: how this server runs the model."""

    provider: str
    variant: str
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    instance_count: int = 1


def model_config(spec: ModelSpec, interface: ModelInterface, facts: ServingFacts) -> mc.ModelConfig:
    """A Triton-style ModelConfig. Dims leave out the batch axis (max_batch_size > 0 implies it).

    Both input forms are marked ``optional``: a request sends one of them. The BYTES input is
    declared Triton's way for one string per batch item: dims [1] reshaped to [].
    """
    config = mc.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=interface.max_batch_size,
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=list(facts.preferred_batch_sizes),
            max_queue_delay_microseconds=facts.max_queue_delay_us,
        ),
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{spec.name}_0",
                count=facts.instance_count,
                kind=mc.ModelInstanceGroup.KIND_GPU
                if facts.provider.startswith("CUDA")
                else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
    )
    image_format = mc.ModelInput.FORMAT_NONE
    if spec.image is not None:
        image_format = mc.ModelInput.FORMAT_NCHW if spec.image.layout == "NCHW" else mc.ModelInput.FORMAT_NHWC
    for tensor in interface.tensor_inputs:
        config.input.append(
            mc.ModelInput(
                name=tensor.name,
                data_type=CONFIG_DATATYPES[tensor.datatype],
                format=image_format if len(tensor.shape) == 4 else mc.ModelInput.FORMAT_NONE,
                dims=list(tensor.shape[1:]),
                optional=True,
            )
        )
    config.input.append(
        mc.ModelInput(
            name=interface.encoded_input.name,
            data_type=mc.TYPE_STRING,
            dims=[1],
            reshape=mc.ModelTensorReshape(shape=[]),
            optional=True,
        )
    )
    for tensor in interface.outputs:
        config.output.append(
            mc.ModelOutput(
                name=tensor.name, data_type=CONFIG_DATATYPES[tensor.datatype], dims=list(tensor.shape[1:])
            )
        )
    parameters = {
        "task": spec.task,
        "provider": facts.provider,
        "variant": facts.variant,
        "labels": json.dumps(list(spec.labels)),
        "temperature": repr(spec.temperature),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def model_statistics(stats: ModelStats) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=stats.name,
        version=str(stats.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=b.batch_size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for b in stats.batch_stats
        ],
    )
