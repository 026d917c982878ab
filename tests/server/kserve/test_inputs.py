"""A request's inputs decoded as a whole (``server/kserve/inputs.py``): raw contents are
all-or-nothing over the inputs not in shared memory."""

from __future__ import annotations

import numpy as np

from fineserve.export.contract import ModelSpec
from fineserve.server.kserve.input_checks import TensorRequest, check_inputs
from fineserve.server.kserve.inputs import decode_inputs
from fineserve.server.kserve.interface import interface_of
from fineserve.server.kserve.regions import SharedMemoryRef
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.shared_memory import SharedMemoryRegistry
from tests.fixtures import MakeObject
from tests.server.kserve.builders import invalid, placed_input, raw, request_with


def test_decode_inputs_checks_the_request_as_a_whole() -> None:
    ids = raw(np.ones((1, 2), np.int64))
    two = request_with(("a", "INT64", [1, 2], ids), ("b", "INT64", [1, 2], ids))
    assert [i.name for i in decode_inputs(two)] == ["a", "b"]
    with invalid("the request has no inputs"):
        decode_inputs(pb.ModelInferRequest(model_name="m"))
    with invalid("input 'a' appears more than once"):
        decode_inputs(request_with(("a", "INT64", [1, 2], ids), ("a", "INT64", [1, 2], ids)))
    missing_raw = request_with(("a", "INT64", [1, 2], ids))
    missing_raw.inputs.add(name="b", datatype="INT64", shape=[1, 2])
    with invalid("raw_input_contents has 1 entries but the request has 2 inputs"):
        decode_inputs(missing_raw)
    both = request_with(("a", "INT64", [1, 2], ids))
    both.inputs[0].contents.int64_contents.extend([1, 1])
    with invalid("input 'a': sets both contents and raw_input_contents"):
        decode_inputs(both)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="a", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([7, 8])
    assert decode_inputs(typed)[0].array.tolist() == [[7, 8]]


def test_one_input_in_shared_memory_and_one_raw(
    specs: dict[str, ModelSpec],
    shm_objects: MakeObject,
    registry: SharedMemoryRegistry,
) -> None:
    ids = np.array([[2, 4, 12, 3]], np.int64)
    mask = np.array([[1, 1, 1, 0]], np.int64)
    key, memory = shm_objects(ids.nbytes)
    memory[: ids.nbytes] = raw(ids)
    registry.register("ids", key, 0, ids.nbytes)
    request = pb.ModelInferRequest(model_name="tiny-text")
    placed_input(request, "input_ids", "INT64", [1, 4], SharedMemoryRef("ids", ids.nbytes))
    request.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 4])
    request.raw_input_contents.append(raw(mask))  # one raw entry: for the one input not in shm
    decoded_inputs = decode_inputs(request, registry)
    form = check_inputs(interface_of(specs["text"]), "tiny-text", decoded_inputs)
    assert isinstance(form, TensorRequest) and form.batch_size == 1
    np.testing.assert_array_equal(form.inputs["input_ids"], ids)
    np.testing.assert_array_equal(form.inputs["attention_mask"], mask)
    # A raw entry for the input in shared memory too: the count no longer matches.
    request.raw_input_contents.insert(0, raw(ids))
    with invalid("raw_input_contents has 2 entries but the request has 1 inputs not in shared memory"):
        decode_inputs(request, registry)
    del request.raw_input_contents[:]
    request.inputs[0].contents.int64_contents.extend(ids.ravel().tolist())
    with invalid("input 'input_ids': sets both contents and a shared memory region"):
        decode_inputs(request, registry)
