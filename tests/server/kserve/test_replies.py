"""The infer reply (``server/kserve/replies.py``): outputs raw and little-endian, or in their region."""

from __future__ import annotations

import numpy as np

from fineserve.server.kserve.outputs import RequestedOutput
from fineserve.server.kserve.regions import SharedMemoryRef
from fineserve.server.kserve.replies import encode_outputs
from fineserve.server.kserve.tensors import decode_bytes_elements
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.shared_memory import SharedMemoryRegistry
from tests.fixtures import MakeObject
from tests.server.kserve.builders import raw, texts


def test_encode_outputs_raw_little_endian_in_requested_order() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    probabilities = np.full((2, 3), 1 / 3, np.float32)
    response = pb.ModelInferResponse()
    wanted = [RequestedOutput("probabilities"), RequestedOutput("logits")]
    encode_outputs({"logits": logits, "probabilities": probabilities}, wanted, response)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("probabilities", "FP32", [2, 3]),
        ("logits", "FP32", [2, 3]),
    ]
    assert not response.outputs[0].HasField("contents")
    assert response.raw_output_contents[1] == logits.astype("<f4").tobytes()
    labels = pb.ModelInferResponse()
    encode_outputs({"labels": texts(b"cat", b"")}, [RequestedOutput("labels")], labels)
    assert labels.outputs[0].datatype == "BYTES"
    assert decode_bytes_elements(labels.raw_output_contents[0], 2, "x") == [b"cat", b""]


def test_output_written_to_shared_memory_keeps_an_empty_raw_entry(
    shm_objects: MakeObject, registry: SharedMemoryRegistry
) -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    probabilities = np.full((2, 3), 1 / 3, np.float32)
    key, memory = shm_objects(128)
    memory[:128] = b"\xaa" * 128
    registry.register("out", key, 8, 100)  # bytes 8..108 of the object
    wanted = [
        RequestedOutput("logits", shared_memory=SharedMemoryRef("out", 40, 4)),
        RequestedOutput("probabilities"),
    ]
    response = pb.ModelInferResponse()
    encode_outputs({"logits": logits, "probabilities": probabilities}, wanted, response, registry)
    assert [(o.name, list(o.shape)) for o in response.outputs] == [
        ("logits", [2, 3]),
        ("probabilities", [2, 3]),
    ]
    params = response.outputs[0].parameters
    assert (params["shared_memory_region"].string_param, params["shared_memory_byte_size"].int64_param) == (
        "out",
        24,  # the bytes written, not the 40 set aside
    )
    assert params["shared_memory_offset"].int64_param == 4
    assert not response.outputs[1].parameters
    assert list(response.raw_output_contents) == [b"", raw(probabilities)]
    written = bytes(memory[12:36])  # region offset 8 + output offset 4
    np.testing.assert_array_equal(np.frombuffer(written, "<f4").reshape(2, 3), logits)
    assert bytes(memory[:12]) == b"\xaa" * 12 and bytes(memory[36:128]) == b"\xaa" * 92
    # At offset 0 the offset parameter is left out, as tritonclient does.
    at_start = pb.ModelInferResponse()
    first = [RequestedOutput("logits", shared_memory=SharedMemoryRef("out", 24))]
    encode_outputs({"logits": logits * 2}, first, at_start, registry)
    assert set(at_start.outputs[0].parameters) == {"shared_memory_region", "shared_memory_byte_size"}
    np.testing.assert_array_equal(np.frombuffer(bytes(memory[8:32]), "<f4").reshape(2, 3), logits * 2)
