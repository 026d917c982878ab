"""A tensor's data on the wire <-> numpy (``server/kserve/tensors.py``): BYTES elements, raw and
typed contents."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fineserve.server.kserve.tensors import (
    datatype_of,
    decode_bytes_elements,
    decode_contents,
    decode_raw,
    encode_bytes_elements,
)
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from tests.server.kserve.builders import invalid, raw


def test_bytes_elements_round_trip_with_empty_and_binary_items() -> None:
    items = [b"", b"\x00\xff\x00", "héllo".encode(), b"x" * 1000]
    encoded = encode_bytes_elements(items)
    assert encoded[:4] == struct.pack("<I", 0)
    assert decode_bytes_elements(encoded, len(items), "t") == items


def test_bytes_elements_must_fill_the_buffer_exactly() -> None:
    encoded = encode_bytes_elements([b"ab", b"cd"])
    with invalid("end after 2 elements, but the shape needs 3"):
        decode_bytes_elements(encoded, 3, "t")
    with invalid("6 bytes after the 1 elements"):
        decode_bytes_elements(encoded, 1, "t")
    with invalid("element 1 claims 2 bytes but only 1 remain"):
        decode_bytes_elements(encoded[:-1], 2, "t")
    with invalid("end after 0 elements"):
        decode_bytes_elements(b"\x01\x00", 1, "t")


@given(
    hnp.arrays(
        dtype=st.sampled_from(
            [np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_]
        ),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
    )
)
def test_raw_round_trip_is_exact(array: np.ndarray) -> None:
    datatype = datatype_of(array)
    decoded = decode_raw("x", datatype, list(array.shape), raw(array))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_raw_length_must_match_the_shape() -> None:
    data = raw(np.zeros((2, 3), np.float32))
    with invalid(r"input 'x': raw contents have 24 bytes, but shape \[2, 4\] of FP32 needs 32"):
        decode_raw("x", "FP32", [2, 4], data)
    with invalid("negative dimension"):
        decode_raw("x", "FP32", [-1, 3], data)
    with invalid("datatype 'FLOAT' is not supported"):
        decode_raw("x", "FLOAT", [2, 3], data)
    with invalid("BF16 is not supported"):
        decode_raw("x", "BF16", [2, 3], data)
    with invalid("elements, over"):
        decode_raw("x", "FP32", [1 << 20, 1 << 20], data)


def test_typed_contents_decode_by_datatype() -> None:
    contents = pb.InferTensorContents(int64_contents=[1, 2, 3, 4, 5, 6])
    out = decode_contents("ids", "INT64", [2, 3], contents)
    np.testing.assert_array_equal(out, np.arange(1, 7, dtype=np.int64).reshape(2, 3))
    assert out.dtype == np.int64
    floats = decode_contents("x", "FP32", [2], pb.InferTensorContents(fp32_contents=[0.5, -1]))
    assert floats.dtype == np.float32 and floats.tolist() == [0.5, -1.0]
    small = decode_contents("x", "INT8", [2], pb.InferTensorContents(int_contents=[-128, 127]))
    assert small.dtype == np.int8
    texts = decode_contents("t", "BYTES", [2], pb.InferTensorContents(bytes_contents=[b"a", b"bc"]))
    assert texts.tolist() == [b"a", b"bc"]


def test_typed_contents_errors_name_the_problem() -> None:
    with invalid(r"contents.int64_contents has 5 elements, but shape \[2, 3\] needs 6"):
        decode_contents("ids", "INT64", [2, 3], pb.InferTensorContents(int64_contents=[1] * 5))
    with invalid("belongs in contents.int64_contents, not fp32_contents"):
        decode_contents("ids", "INT64", [1], pb.InferTensorContents(int64_contents=[1], fp32_contents=[1]))
    with invalid("outside the range of INT8"):
        decode_contents("x", "INT8", [1], pb.InferTensorContents(int_contents=[300]))
    with invalid("FP16 has no typed contents field"):
        decode_contents("x", "FP16", [1], pb.InferTensorContents())
    with invalid("datatype 'NOPE' is not supported"):
        decode_contents("x", "NOPE", [1], pb.InferTensorContents())
