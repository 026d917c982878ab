"""Tensors in shared memory regions (``server/kserve/regions.py``): the parameters that place them,
reading inputs out, writing outputs in, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fineserve.server.errors import LimitExceeded, PermissionDenied
from fineserve.server.kserve.inputs import decode_inputs
from fineserve.server.kserve.outputs import RequestedOutput
from fineserve.server.kserve.regions import SharedMemoryRef, shared_memory_ref
from fineserve.server.kserve.replies import encode_outputs
from fineserve.server.kserve.tensors import encode_bytes_elements
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.shared_memory import SharedMemoryRegistry
from tests.fixtures import TINY_IMAGE_SIZE, MakeObject
from tests.server.kserve.builders import invalid, placed_input, shm_parameters


def test_shared_memory_ref_parses_and_refuses() -> None:
    assert shared_memory_ref(shm_parameters(), "x") is None
    assert shared_memory_ref(shm_parameters(classification=2), "x") is None
    ref = shared_memory_ref(shm_parameters(shared_memory_region="r", shared_memory_byte_size=16), "x")
    assert ref == SharedMemoryRef("r", 16, 0)
    full = shm_parameters(shared_memory_region="r", shared_memory_byte_size=16, shared_memory_offset=4)
    assert shared_memory_ref(full, "x") == SharedMemoryRef("r", 16, 4)
    refused: dict[str, dict[str, str | int]] = {
        "needs both 'shared_memory_region' and 'shared_memory_byte_size'": {"shared_memory_region": "r"},
        "x: shared memory needs both": {"shared_memory_byte_size": 16},
        "'shared_memory_region' must be a string": {"shared_memory_region": 3, "shared_memory_byte_size": 16},
        "'shared_memory_byte_size' must be an integer, got string_param": {
            "shared_memory_region": "r",
            "shared_memory_byte_size": "16",
        },
        "'shared_memory_byte_size' must be >= 0, got -1": {
            "shared_memory_region": "r",
            "shared_memory_byte_size": -1,
        },
        "'shared_memory_offset' must be >= 0, got -8": {
            "shared_memory_region": "r",
            "shared_memory_byte_size": 16,
            "shared_memory_offset": -8,
        },
        "x: parameter 'shared_memory_key' is not supported": {
            "shared_memory_region": "r",
            "shared_memory_byte_size": 16,
            "shared_memory_key": "/k",
        },
    }
    for message, values in refused.items():
        with invalid(message):
            shared_memory_ref(shm_parameters(**values), "x")


def test_input_in_shared_memory_is_copied_out_of_its_region(
    shm_objects: MakeObject, registry: SharedMemoryRegistry
) -> None:
    batch = np.random.default_rng(3).normal(size=(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype("<f4")
    data = batch.tobytes()
    key, memory = shm_objects(64 + len(data) + 64)
    # The region starts 16 bytes into the object; the tensor 32 bytes into the region.
    memory[48 : 48 + len(data)] = data
    registry.register("pixels", key, 16, len(data) + 64)
    request = pb.ModelInferRequest(model_name="m")
    placed_input(request, "pixel_values", "FP32", list(batch.shape), SharedMemoryRef("pixels", len(data), 32))
    (decoded_input,) = decode_inputs(request, registry)
    assert decoded_input.datatype == "FP32" and decoded_input.array.dtype == np.float32
    np.testing.assert_array_equal(decoded_input.array, batch)
    assert not decoded_input.array.flags.writeable
    # Copied: what the client writes next (or a truncation) cannot reach the model run.
    memory[48:52] = np.array([42.5], "<f4").tobytes()
    assert decoded_input.array[0, 0, 0, 0] == batch[0, 0, 0, 0]


def test_unaligned_and_bytes_inputs_in_shared_memory(
    shm_objects: MakeObject, registry: SharedMemoryRegistry
) -> None:
    ids = np.array([[2, 4, 3], [2, 8, 3]], "<i8")
    encoded = encode_bytes_elements([b"good movie", "héllo".encode(), b""])
    key, memory = shm_objects(256)
    memory[3 : 3 + ids.nbytes] = ids.tobytes()  # offset 3: not a multiple of 8
    memory[100 : 100 + len(encoded)] = encoded
    registry.register("all", key, 0, 256)
    request = pb.ModelInferRequest(model_name="m")
    placed_input(request, "input_ids", "INT64", [2, 3], SharedMemoryRef("all", ids.nbytes, 3))
    placed_input(request, "texts", "BYTES", [3], SharedMemoryRef("all", len(encoded), 100))
    unaligned, texts_input = decode_inputs(request, registry)
    np.testing.assert_array_equal(unaligned.array, ids)
    assert unaligned.array.flags.aligned  # copied: onnxruntime wants aligned buffers
    assert texts_input.array.tolist() == [b"good movie", "héllo".encode(), b""]


def test_shared_memory_input_errors(shm_objects: MakeObject, registry: SharedMemoryRegistry) -> None:
    key, _ = shm_objects(4096)
    registry.register("r", key, 1024, 64)  # bytes 1024..1088 of the object

    def decode(ref: SharedMemoryRef, shape: list[int]) -> None:
        request = pb.ModelInferRequest(model_name="m")
        placed_input(request, "x", "FP32", shape, ref)
        decode_inputs(request, registry)

    decode(SharedMemoryRef("r", 64), [16])  # the whole region
    # Sizes are checked against the shape before anything is read.
    with invalid(r"input 'x': shared_memory_byte_size is 60, but shape \[16\] of FP32 needs 64"):
        decode(SharedMemoryRef("r", 60), [16])
    with invalid(r"input 'x': shared_memory_byte_size is 64, but shape \[2, 4\] of FP32 needs 32"):
        decode(SharedMemoryRef("r", 64), [2, 4])
    with invalid(r"input 'x': shape \[-1\] has a negative dimension"):
        decode(SharedMemoryRef("r", 64), [-1])
    # Past the region's end, though well inside the object.
    with invalid(r"input 'x': offset 8 \+ byte size 64 is outside shared memory region 'r' \(64 bytes\)"):
        decode(SharedMemoryRef("r", 64, 8), [16])
    with invalid("offset 4096 .* is outside shared memory region 'r'"):
        decode(SharedMemoryRef("r", 4, 4096), [1])
    with invalid("input 'x': shared memory region 'nope' is not registered"):
        decode(SharedMemoryRef("nope", 64), [16])
    registry.unregister("r")
    with invalid("input 'x': shared memory region 'r' is not registered"):
        decode(SharedMemoryRef("r", 64), [16])


def test_an_input_in_shared_memory_reads_no_more_than_a_message_could_carry(
    shm_objects: MakeObject,
) -> None:
    key, _ = shm_objects(4096)
    registry = SharedMemoryRegistry(enabled=True, max_read_bytes=1024)
    try:
        registry.register("r", key, 0, 4096)
        for name, datatype, shape in (("texts", "BYTES", [1]), ("x", "FP32", [512])):
            request = pb.ModelInferRequest(model_name="m")
            placed_input(request, name, datatype, shape, SharedMemoryRef("r", 2048))
            with pytest.raises(LimitExceeded, match="shared_memory_byte_size 2048 is over 1024 bytes"):
                decode_inputs(request, registry)
    finally:
        registry.close()


def test_shared_memory_output_errors(shm_objects: MakeObject, registry: SharedMemoryRegistry) -> None:
    logits = np.zeros((2, 3), np.float32)
    key, memory = shm_objects(64)
    memory[:64] = b"\x11" * 64
    registry.register("out", key, 0, 32)

    def encode(ref: SharedMemoryRef) -> None:
        encode_outputs(
            {"logits": logits},
            [RequestedOutput("logits", shared_memory=ref)],
            pb.ModelInferResponse(),
            registry,
        )

    with invalid("requested output 'logits': the output has 24 bytes, more than shared_memory_byte_size 16"):
        encode(SharedMemoryRef("out", 16))
    with invalid(r"offset 16 \+ byte size 24 is outside shared memory region 'out' \(32 bytes\)"):
        encode(SharedMemoryRef("out", 24, 16))
    with invalid("requested output 'logits': shared memory region 'gone' is not registered"):
        encode(SharedMemoryRef("gone", 24))
    assert bytes(memory[:64]) == b"\x11" * 64  # nothing written by a refused output


def test_shared_memory_is_refused_when_disabled(
    shm_objects: MakeObject,
) -> None:
    key, _ = shm_objects(64)
    disabled = SharedMemoryRegistry(enabled=False)
    with pytest.raises(PermissionDenied, match="system shared memory is disabled") as caught:
        disabled.register("r", key, 0, 64)
    assert caught.value.status == "PERMISSION_DENIED"
    for refused in (
        lambda: disabled.status(""),
        lambda: disabled.unregister(""),
        lambda: disabled.get("r", "x"),
    ):
        with pytest.raises(PermissionDenied):
            refused()
    request = pb.ModelInferRequest(model_name="m")
    placed_input(request, "x", "FP32", [16], SharedMemoryRef("r", 64))
    wanted = [RequestedOutput("logits", shared_memory=SharedMemoryRef("r", 64))]
    logits = {"logits": np.zeros(16, np.float32)}
    # Without a registry (the default) as with a disabled one.
    with pytest.raises(PermissionDenied):
        decode_inputs(request)
    with pytest.raises(PermissionDenied):
        encode_outputs(logits, wanted, pb.ModelInferResponse())
    with pytest.raises(PermissionDenied):
        decode_inputs(request, disabled)
    with pytest.raises(PermissionDenied):
        encode_outputs(logits, wanted, pb.ModelInferResponse(), disabled)
