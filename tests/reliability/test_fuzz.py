"""Property-based fuzzing of request decoding (``server/kserve/``) and preprocessing (``preprocess``).

The one property: whatever arrives, the code either succeeds or raises a ``ServingError`` (which
the transport turns into its documented status); never any other exception. Bounded for CI:
few examples per property, a deadline per example, no example database.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineserve.export.contract import ImagePreprocessing, TensorSpec, TextPreprocessing
from fineserve.server.datatypes import BYTES, NUMPY_DTYPES
from fineserve.server.errors import ServingError
from fineserve.server.kserve.input_checks import TensorRequest, check_inputs
from fineserve.server.kserve.inputs import decode_inputs
from fineserve.server.kserve.interface import ModelInterface
from fineserve.server.kserve.outputs import requested_outputs
from fineserve.server.kserve.parameters import check_request_parameters, parse_version, request_timeout_us
from fineserve.server.kserve.tensors import ALL_CONTENTS_FIELDS, decode_bytes_elements, encode_bytes_elements
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.preprocess import ImagePreprocessor, Limits, TextPreprocessor, check_items
from tests.fixtures import write_tiny_tokenizer
from tests.reliability import images

BOUNDED = settings(
    max_examples=100,
    deadline=5000,  # ms per example: generous, the CI cores are shared
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
LIMITS = Limits(
    max_image_pixels=1_000_000, max_request_bytes=1 << 20, max_items_per_request=8, max_text_chars=500
)
INTERFACE = ModelInterface(
    tensor_inputs=(
        TensorSpec("input_ids", "INT64", (-1, -1)),
        TensorSpec("attention_mask", "INT64", (-1, -1)),
    ),
    encoded_input=TensorSpec("texts", BYTES, (-1,)),
    outputs=(TensorSpec("logits", "FP32", (-1, 2)), TensorSpec("probabilities", "FP32", (-1, 2))),
    max_batch_size=8,
)
NAMES = st.sampled_from(["input_ids", "attention_mask", "texts", "images", "x", ""])
DATATYPES = st.sampled_from([*NUMPY_DTYPES, BYTES, "BF16", "FP128", "", "int64"])
SHAPES = st.lists(st.integers(-3, 6) | st.sampled_from([0, 1 << 31, 1 << 62]), max_size=5)


@st.composite
def contents(draw: st.DrawFn) -> pb.InferTensorContents:
    """Typed contents with one or more fields filled, of any length and range."""
    message = pb.InferTensorContents()
    for field in draw(st.lists(st.sampled_from(ALL_CONTENTS_FIELDS), max_size=2, unique=True)):
        if field == "bytes_contents":
            values: list[object] = draw(st.lists(st.binary(max_size=8), max_size=6))
        elif field == "bool_contents":
            values = draw(st.lists(st.booleans(), max_size=6))
        elif field.startswith(("fp32", "fp64")):
            values = draw(st.lists(st.floats(width=32), max_size=6))
        elif field.startswith("uint"):
            values = draw(st.lists(st.integers(0, 2**32 - 1), max_size=6))
        else:
            values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6))
        getattr(message, field).extend(values)
    return message


@st.composite
def nearly_valid_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid request (token tensors or texts) with at most one thing changed: most of these get
    past the early checks and into the decoding of contents and shapes."""
    request = pb.ModelInferRequest(model_name="m")
    batch, length = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    if draw(st.booleans()):
        for name in ("input_ids", "attention_mask"):
            request.inputs.add(name=name, datatype="INT64", shape=[batch, length])
            request.raw_input_contents.append(np.ones((batch, length), "<i8").tobytes())
    else:
        request.inputs.add(name="texts", datatype=BYTES, shape=[batch])
        request.raw_input_contents.append(encode_bytes_elements([b"good"] * batch))
    index = draw(st.integers(0, len(request.inputs) - 1))
    tensor = request.inputs[index]
    change = draw(st.sampled_from(["none", "datatype", "shape", "raw", "contents", "drop", "extra"]))
    if change == "datatype":
        tensor.datatype = draw(DATATYPES)
    elif change == "shape":
        tensor.shape[draw(st.integers(0, len(tensor.shape) - 1))] = draw(SHAPES.filter(bool))[0]
    elif change == "raw":
        request.raw_input_contents[index] = draw(st.binary(max_size=80))
    elif change == "contents":
        tensor.contents.CopyFrom(draw(contents()))
    elif change == "drop":
        del request.raw_input_contents[-1]
    elif change == "extra":
        request.inputs.add(name=draw(NAMES), datatype=draw(DATATYPES), shape=draw(SHAPES))
    return request


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name="m", model_version=draw(st.sampled_from(["", "1", "0", "x", "-2"]))
    )
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(NAMES), datatype=draw(DATATYPES), shape=draw(SHAPES))
        if not use_raw or draw(st.booleans()):
            tensor.contents.CopyFrom(draw(contents()))
    if use_raw:
        count = draw(st.integers(0, len(request.inputs) + 1))
        request.raw_input_contents.extend(
            draw(st.lists(st.binary(max_size=64), min_size=count, max_size=count))
        )
    for name in draw(st.lists(st.sampled_from(["logits", "probabilities", "nope"]), max_size=2)):
        output = request.outputs.add(name=name)
        if draw(st.booleans()):
            output.parameters["classification"].int64_param = draw(st.integers(-2, 5))
    if draw(st.booleans()):
        request.parameters["timeout"].int64_param = draw(st.integers(-5, 5))
    return request


def decode_whole_request(request: pb.ModelInferRequest) -> None:
    """What the KServe servicer does with a request before it reaches the core; every step runs
    (a ServingError in one does not hide the later ones from the fuzzer)."""
    for step in (
        lambda: check_request_parameters(request.parameters),
        lambda: request_timeout_us(request.parameters),
        lambda: parse_version(request.model_version),
        lambda: requested_outputs(request, INTERFACE),
    ):
        with contextlib.suppress(ServingError):
            step()
    form = check_inputs(INTERFACE, "m", decode_inputs(request))
    if isinstance(form, TensorRequest):
        assert 1 <= form.batch_size <= INTERFACE.max_batch_size
        assert {a.shape for a in form.inputs.values()} == {next(iter(form.inputs.values())).shape}
    else:
        assert 1 <= len(form.items) <= INTERFACE.max_batch_size


@BOUNDED
@given(infer_requests() | nearly_valid_requests())
def test_structured_requests_decode_or_raise_a_serving_error(request: pb.ModelInferRequest) -> None:
    with contextlib.suppress(ServingError):
        decode_whole_request(request)


@BOUNDED
@given(st.binary(max_size=300))
def test_arbitrary_bytes_that_parse_decode_or_raise_a_serving_error(data: bytes) -> None:
    try:
        request = pb.ModelInferRequest.FromString(data)
    except Exception:
        return  # not protobuf: the server answers INVALID_ARGUMENT before any of our code runs
    with contextlib.suppress(ServingError):
        decode_whole_request(request)


@BOUNDED
@given(st.binary(max_size=200), st.integers(0, 6))
def test_bytes_elements_decode_or_raise_a_serving_error(raw: bytes, count: int) -> None:
    try:
        items = decode_bytes_elements(raw, count, "input 'texts'")
    except ServingError:
        return
    assert len(items) == count
    assert encode_bytes_elements(items) == raw


# --- preprocessing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_preprocessor() -> Iterator[ImagePreprocessor]:
    config = ImagePreprocessing(height=8, width=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield ImagePreprocessor("pixel_values", config, LIMITS, pool)


@pytest.fixture(scope="module")
def text_preprocessor(tmp_path_factory: pytest.TempPathFactory) -> TextPreprocessor:
    path: Path = write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
    return TextPreprocessor(path, TextPreprocessing(max_length=16), ["input_ids", "attention_mask"], LIMITS)


SEEDS = [
    images.png(images.rgb_pixels(12)),
    images.encode(images.Image.fromarray(images.rgb_pixels(12)), "JPEG"),
    images.encode(images.Image.fromarray(images.rgb_pixels(12)), "WEBP"),
    images.animated("WEBP", size=8)[0],
    images.gray16_png(images.rgb_pixels(8)[..., 0]),
    images.with_alpha(images.rgb_pixels(8)),
    images.png_declaring(5000, 5000),
]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with some bytes overwritten, some cut off, or junk appended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[: cut if draw(st.booleans()) else len(data)]) + draw(st.binary(max_size=16))


def preprocess_or_serving_error(
    preprocessor: ImagePreprocessor | TextPreprocessor, items: list[bytes]
) -> None:
    try:
        check_items(items, LIMITS)
        tensors = preprocessor(items)
    except ServingError:
        return
    for array in tensors.values():
        assert len(array) == len(items)
        assert np.isfinite(array).all()


@BOUNDED
@given(st.lists(mutated_images() | st.binary(max_size=64), min_size=1, max_size=3))
def test_mutated_images_preprocess_or_raise_a_serving_error(
    image_preprocessor: ImagePreprocessor, items: list[bytes]
) -> None:
    preprocess_or_serving_error(image_preprocessor, items)


@BOUNDED
@given(st.lists(st.binary(max_size=80) | st.text(max_size=80).map(str.encode), max_size=10))
def test_texts_preprocess_or_raise_a_serving_error(
    text_preprocessor: TextPreprocessor, items: list[bytes]
) -> None:
    preprocess_or_serving_error(text_preprocessor, items)
