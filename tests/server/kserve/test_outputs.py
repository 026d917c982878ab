"""Requested outputs (``server/kserve/outputs.py``): which ones, top-k classifications, and their
regions checked before the run."""

from __future__ import annotations

import numpy as np

from fineserve.export.contract import ModelSpec
from fineserve.server.kserve.interface import interface_of
from fineserve.server.kserve.outputs import (
    RequestedOutput,
    check_output_regions,
    classify,
    requested_outputs,
    select_outputs,
)
from fineserve.server.kserve.regions import SharedMemoryRef
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.shared_memory import SharedMemoryRegistry
from tests.fixtures import MakeObject
from tests.server.kserve.builders import invalid


def test_requested_outputs(specs: dict[str, ModelSpec]) -> None:
    interface = interface_of(specs["image"])
    request = pb.ModelInferRequest()
    everything = requested_outputs(request, interface)
    assert everything == [RequestedOutput("logits"), RequestedOutput("probabilities")]
    request.outputs.add(name="probabilities")
    assert requested_outputs(request, interface) == [RequestedOutput("probabilities")]
    request.outputs.add(name="probabilities")
    with invalid("'probabilities' is requested more than once"):
        requested_outputs(request, interface)
    unknown = pb.ModelInferRequest()
    unknown.outputs.add(name="scores")
    with invalid("requested output 'scores' does not exist"):
        requested_outputs(unknown, interface)
    classified = pb.ModelInferRequest()
    classified.outputs.add(name="logits").parameters["classification"].int64_param = 2
    assert requested_outputs(classified, interface) == [RequestedOutput("logits", 2)]
    classified.outputs[0].parameters["classification"].int64_param = 0
    with invalid("'classification' must be >= 1, got 0"):
        requested_outputs(classified, interface)
    classified.outputs[0].parameters["classification"].string_param = "2"
    with invalid("'classification' must be an integer"):
        requested_outputs(classified, interface)
    shared = pb.ModelInferRequest()
    placed = shared.outputs.add(name="logits")
    placed.parameters["shared_memory_region"].string_param = "r"
    placed.parameters["shared_memory_byte_size"].int64_param = 24
    placed.parameters["shared_memory_offset"].uint64_param = 8
    shared.outputs.add(name="probabilities")
    assert requested_outputs(shared, interface) == [
        RequestedOutput("logits", 0, SharedMemoryRef("r", 24, 8)),
        RequestedOutput("probabilities"),
    ]
    del placed.parameters["shared_memory_byte_size"]
    with invalid("requested output 'logits': shared memory needs both 'shared_memory_region' and"):
        requested_outputs(shared, interface)


def test_classification_is_top_k_best_first() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    top2 = classify(scores, 2, ["cat", "dog", "fox"])
    assert top2.tolist() == [
        [b"0.700000:1:dog", b"0.200000:2:fox"],
        [b"0.500000:0:cat", b"0.250000:1:dog"],  # a tie keeps the lower index first
    ]
    assert classify(scores, 10, ["cat", "dog", "fox"]).shape == (2, 3)
    wanted = [RequestedOutput("probabilities", 1), RequestedOutput("logits")]
    selected = select_outputs({"probabilities": scores, "logits": scores * 2}, wanted, ["a", "b", "c"])
    assert selected["probabilities"].tolist() == [[b"0.700000:1:b"], [b"0.500000:0:a"]]
    np.testing.assert_array_equal(selected["logits"], scores * 2)


def test_output_regions_are_checked_before_the_model_runs(
    specs: dict[str, ModelSpec], shm_objects: MakeObject, registry: SharedMemoryRegistry
) -> None:
    key, _ = shm_objects(64)
    registry.register("out", key, 0, 32)
    interface = interface_of(specs["image"])  # logits [-1, 3] FP32: 12 bytes an item

    def check(*wanted: RequestedOutput, batch_size: int = 2) -> None:
        check_output_regions(wanted, interface, batch_size, registry)

    def placed(name: str, ref: SharedMemoryRef, class_count: int = 0) -> RequestedOutput:
        return RequestedOutput(name, class_count, shared_memory=ref)

    check(placed("logits", SharedMemoryRef("out", 24)), RequestedOutput("probabilities"))
    check(placed("probabilities", SharedMemoryRef("out", 24, 8)))
    with invalid("requested output 'logits': the output has 36 bytes, more than shared_memory_byte_size 24"):
        check(placed("logits", SharedMemoryRef("out", 24)), batch_size=3)
    with invalid("requested output 'logits': shared memory region 'gone' is not registered"):
        check(placed("logits", SharedMemoryRef("gone", 24)))
    with invalid(r"offset 16 \+ byte size 24 is outside shared memory region 'out' \(32 bytes\)"):
        check(placed("logits", SharedMemoryRef("out", 24, 16)))
    # Top-k classes are BYTES of a length known only once computed: only the region is checked.
    check(placed("probabilities", SharedMemoryRef("out", 4), class_count=2))
