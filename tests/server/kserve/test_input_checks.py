"""Decoded and declared inputs checked against the model (``server/kserve/input_checks.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from fineserve.export.contract import ModelSpec
from fineserve.server.kserve.input_checks import (
    EncodedRequest,
    TensorRequest,
    check_declared_inputs,
    check_inputs,
)
from fineserve.server.kserve.interface import interface_of
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from tests.server.kserve.builders import decoded, invalid, pixels, texts


def test_check_inputs_accepts_either_form(specs: dict[str, ModelSpec]) -> None:
    image = interface_of(specs["image"])
    tensors = check_inputs(image, "m", decoded(("pixel_values", "FP32", pixels(2))))
    assert isinstance(tensors, TensorRequest) and tensors.batch_size == 2
    encoded = check_inputs(image, "m", decoded(("images", "BYTES", texts(b"png1", b"png2"))))
    assert isinstance(encoded, EncodedRequest) and encoded.items == [b"png1", b"png2"]
    column = check_inputs(image, "m", decoded(("images", "BYTES", texts(b"a", b"b").reshape(2, 1))))
    assert isinstance(column, EncodedRequest) and column.batch_size == 2
    text = interface_of(specs["text"])
    ids = np.ones((3, 5), np.int64)
    both = check_inputs(text, "m", decoded(("attention_mask", "INT64", ids), ("input_ids", "INT64", ids)))
    assert isinstance(both, TensorRequest) and set(both.inputs) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    ("model", "tensors", "message"),
    [
        ("image", [("pixel_values", "FP32", pixels(1)), ("images", "BYTES", texts(b"x"))], "not both"),
        ("image", [("pixels", "FP32", pixels(1))], "has no input 'pixels'; it takes either 'images'"),
        ("text", [("input_ids", "INT64", np.ones((1, 4), np.int64))], "missing input 'attention_mask'"),
        (
            "image",
            [("pixel_values", "FP64", pixels(1).astype(np.float64))],
            "datatype must be FP32, got FP64",
        ),
        ("image", [("pixel_values", "FP32", pixels(1)[0])], "must have 4 dimensions"),
        ("image", [("pixel_values", "FP32", pixels(1, size=9))], "dimension 2 must be 8"),
        ("image", [("pixel_values", "FP32", pixels(0))], "the batch is empty"),
        ("image", [("pixel_values", "FP32", pixels(9))], "batch size 9 is over the model's max_batch_size 8"),
        ("image", [("images", "BYTES", texts())], "the batch is empty"),
        ("image", [("images", "BYTES", texts(*[b"x"] * 9))], "batch size 9 is over"),
        ("image", [("images", "UINT8", np.zeros(3, np.uint8))], "datatype must be BYTES, got UINT8"),
        ("text", [("texts", "BYTES", texts(b"a", b"b").reshape(1, 2))], r"must be \[N\] \(or \[N, 1\]\)"),
        (
            "text",
            [
                ("input_ids", "INT64", np.ones((2, 4), np.int64)),
                ("attention_mask", "INT64", np.ones((2, 5), np.int64)),
            ],
            r"'attention_mask' has shape \[2, 5\] but 'input_ids' has \[2, 4\]",
        ),
        (
            "text",
            [
                ("input_ids", "INT64", np.ones((2, 0), np.int64)),
                ("attention_mask", "INT64", np.ones((2, 0), np.int64)),
            ],
            "empty dimension 1",
        ),
    ],
)
def test_check_inputs_rejects(
    specs: dict[str, ModelSpec], model: str, tensors: list[tuple[str, str, np.ndarray]], message: str
) -> None:
    with invalid(message):
        check_inputs(interface_of(specs[model]), "m", decoded(*tensors))


def test_declared_inputs_are_checked_before_decoding(specs: dict[str, ModelSpec]) -> None:
    interface = interface_of(specs["image"], max_batch_size=4)

    def declared(*inputs: tuple[str, str, list[int]]) -> None:
        request = pb.ModelInferRequest(model_name="m")
        for name, datatype, shape in inputs:
            request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(b"\0\0\0\0" * 1000)  # never looked at
        check_declared_inputs(request, interface, "m")

    declared(("pixel_values", "FP32", [4, 3, 8, 8]))
    declared(("images", "BYTES", [4]), ("images", "BYTES", [4, 1]))
    # Twenty million empty BYTES elements, as [N] or hidden in a second dimension: from the shape alone.
    with invalid("input 'images': batch size 20000000 is over the model's max_batch_size 4"):
        declared(("images", "BYTES", [20_000_000]))
    with invalid("input 'images': batch size 2000000 is over the model's max_batch_size 4"):
        declared(("images", "BYTES", [1, 2_000_000]))
    with invalid(r"input 'pixel_values': shape \[1, 3, 8, 8, 1\] must have 4 dimensions \[-1, 3, 8, 8\]"):
        declared(("pixel_values", "FP32", [1, 3, 8, 8, 1]))
    with invalid(
        r"input 'pixel_values': shape \[1, 2147483648, 8, 8\] does not match .* \(dimension 1 must be 3\)"
    ):
        declared(("pixel_values", "FP32", [1, 1 << 31, 8, 8]))
    with invalid("model 'm' has no input 'extra'; it takes either 'images' \\(BYTES\\) or the tensors"):
        declared(("pixel_values", "FP32", [1, 3, 8, 8]), ("extra", "BYTES", [1, 5_000_000]))
    with invalid("input 'pixel_values': batch size 5 is over the model's max_batch_size 4"):
        declared(("pixel_values", "FP32", [5, 3, 8, 8]))
    # FP16, accepted for FP32, is checked as FP32 is: the raw contents above (not 2 bytes per
    # element of these shapes) are never looked at. FP64 is left for decoding to refuse.
    declared(("pixel_values", "FP16", [4, 3, 8, 8]))
    with invalid(r"input 'pixel_values': shape \[1, 3, 8, 8, 1\] must have 4 dimensions"):
        declared(("pixel_values", "FP16", [1, 3, 8, 8, 1]))
    with invalid("input 'pixel_values': batch size 5 is over the model's max_batch_size 4"):
        declared(("pixel_values", "FP16", [5, 3, 8, 8]))
    declared(("pixel_values", "FP64", [5, 3, 8, 8]))
