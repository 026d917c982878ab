"""KServe v2 converters, without a server: numpy <-> protobuf, and every check on a request."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fineserve.export.contract import ModelSpec, read_model_spec
from fineserve.server import kserve_codec as codec
from fineserve.server.errors import InvalidInput, LimitExceeded, PermissionDenied
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.pb.inference import model_config_pb2 as mc
from fineserve.server.shared_memory import SharedMemoryRegistry
from tests.fixtures import TINY_IMAGE_SIZE, MakeObject, publish_tiny_image_model, publish_tiny_text_model


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    repository = tmp_path_factory.mktemp("codec") / "models"
    return {
        "image": read_model_spec(publish_tiny_image_model(repository)),
        "text": read_model_spec(publish_tiny_text_model(repository)),
    }


def request_with(*tensors: tuple[str, str, list[int], bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def raw(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def invalid(match: str) -> pytest.RaisesContext[InvalidInput]:
    return pytest.raises(InvalidInput, match=match)


# --- BYTES ----------------------------------------------------------------------------------------


def test_bytes_elements_round_trip_with_empty_and_binary_items() -> None:
    items = [b"", b"\x00\xff\x00", "héllo".encode(), b"x" * 1000]
    encoded = codec.encode_bytes_elements(items)
    assert encoded[:4] == struct.pack("<I", 0)
    assert codec.decode_bytes_elements(encoded, len(items), "t") == items


def test_bytes_elements_must_fill_the_buffer_exactly() -> None:
    encoded = codec.encode_bytes_elements([b"ab", b"cd"])
    with invalid("end after 2 elements, but the shape needs 3"):
        codec.decode_bytes_elements(encoded, 3, "t")
    with invalid("6 bytes after the 1 elements"):
        codec.decode_bytes_elements(encoded, 1, "t")
    with invalid("element 1 claims 2 bytes but only 1 remain"):
        codec.decode_bytes_elements(encoded[:-1], 2, "t")
    with invalid("end after 0 elements"):
        codec.decode_bytes_elements(b"\x01\x00", 1, "t")


# --- raw and typed contents -----------------------------------------------------------------------


@given(
    hnp.arrays(
        dtype=st.sampled_from(
            [np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_]
        ),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
    )
)
def test_raw_round_trip_is_exact(array: np.ndarray) -> None:
    datatype = codec.datatype_of(array)
    decoded = codec.decode_raw("x", datatype, list(array.shape), raw(array))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_raw_length_must_match_the_shape() -> None:
    data = raw(np.zeros((2, 3), np.float32))
    with invalid(r"input 'x': raw contents have 24 bytes, but shape \[2, 4\] of FP32 needs 32"):
        codec.decode_raw("x", "FP32", [2, 4], data)
    with invalid("negative dimension"):
        codec.decode_raw("x", "FP32", [-1, 3], data)
    with invalid("datatype 'FLOAT' is not supported"):
        codec.decode_raw("x", "FLOAT", [2, 3], data)
    with invalid("BF16 is not supported"):
        codec.decode_raw("x", "BF16", [2, 3], data)
    with invalid("elements, over"):
        codec.decode_raw("x", "FP32", [1 << 20, 1 << 20], data)


def test_typed_contents_decode_by_datatype() -> None:
    contents = pb.InferTensorContents(int64_contents=[1, 2, 3, 4, 5, 6])
    out = codec.decode_contents("ids", "INT64", [2, 3], contents)
    np.testing.assert_array_equal(out, np.arange(1, 7, dtype=np.int64).reshape(2, 3))
    assert out.dtype == np.int64
    floats = codec.decode_contents("x", "FP32", [2], pb.InferTensorContents(fp32_contents=[0.5, -1]))
    assert floats.dtype == np.float32 and floats.tolist() == [0.5, -1.0]
    small = codec.decode_contents("x", "INT8", [2], pb.InferTensorContents(int_contents=[-128, 127]))
    assert small.dtype == np.int8
    texts = codec.decode_contents("t", "BYTES", [2], pb.InferTensorContents(bytes_contents=[b"a", b"bc"]))
    assert texts.tolist() == [b"a", b"bc"]


def test_typed_contents_errors_name_the_problem() -> None:
    with invalid(r"contents.int64_contents has 5 elements, but shape \[2, 3\] needs 6"):
        codec.decode_contents("ids", "INT64", [2, 3], pb.InferTensorContents(int64_contents=[1] * 5))
    with invalid("belongs in contents.int64_contents, not fp32_contents"):
        codec.decode_contents(
            "ids", "INT64", [1], pb.InferTensorContents(int64_contents=[1], fp32_contents=[1])
        )
    with invalid("outside the range of INT8"):
        codec.decode_contents("x", "INT8", [1], pb.InferTensorContents(int_contents=[300]))
    with invalid("FP16 has no typed contents field"):
        codec.decode_contents("x", "FP16", [1], pb.InferTensorContents())
    with invalid("datatype 'NOPE' is not supported"):
        codec.decode_contents("x", "NOPE", [1], pb.InferTensorContents())


def test_decode_inputs_checks_the_request_as_a_whole() -> None:
    ids = raw(np.ones((1, 2), np.int64))
    two = request_with(("a", "INT64", [1, 2], ids), ("b", "INT64", [1, 2], ids))
    assert [i.name for i in codec.decode_inputs(two)] == ["a", "b"]
    with invalid("the request has no inputs"):
        codec.decode_inputs(pb.ModelInferRequest(model_name="m"))
    with invalid("input 'a' appears more than once"):
        codec.decode_inputs(request_with(("a", "INT64", [1, 2], ids), ("a", "INT64", [1, 2], ids)))
    missing_raw = request_with(("a", "INT64", [1, 2], ids))
    missing_raw.inputs.add(name="b", datatype="INT64", shape=[1, 2])
    with invalid("raw_input_contents has 1 entries but the request has 2 inputs"):
        codec.decode_inputs(missing_raw)
    both = request_with(("a", "INT64", [1, 2], ids))
    both.inputs[0].contents.int64_contents.extend([1, 1])
    with invalid("input 'a': sets both contents and raw_input_contents"):
        codec.decode_inputs(both)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="a", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([7, 8])
    assert codec.decode_inputs(typed)[0].array.tolist() == [[7, 8]]


# --- a model's interface and the checks against it ------------------------------------------------


def decoded(*tensors: tuple[str, str, np.ndarray]) -> list[codec.RequestInput]:
    return [codec.RequestInput(name, datatype, array) for name, datatype, array in tensors]


def pixels(n: int, size: int = TINY_IMAGE_SIZE) -> np.ndarray:
    return np.zeros((n, 3, size, size), np.float32)


def texts(*items: bytes) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def test_interface_has_both_input_forms_and_probabilities(specs: dict[str, ModelSpec]) -> None:
    image = codec.interface_of(specs["image"])
    assert [t.name for t in image.tensor_inputs] == ["pixel_values"]
    assert (image.encoded_input.name, image.encoded_input.datatype) == ("images", "BYTES")
    assert image.output_names == ("logits", "probabilities")
    assert image.max_batch_size == 8
    assert codec.interface_of(specs["image"], max_batch_size=4).max_batch_size == 4
    assert codec.interface_of(specs["image"], max_batch_size=64).max_batch_size == 8
    text = codec.interface_of(specs["text"])
    assert text.encoded_input.name == "texts"
    assert [t.name for t in text.tensor_inputs] == ["input_ids", "attention_mask"]


def test_check_inputs_accepts_either_form(specs: dict[str, ModelSpec]) -> None:
    image = codec.interface_of(specs["image"])
    tensors = codec.check_inputs(image, "m", decoded(("pixel_values", "FP32", pixels(2))))
    assert isinstance(tensors, codec.TensorRequest) and tensors.batch_size == 2
    encoded = codec.check_inputs(image, "m", decoded(("images", "BYTES", texts(b"png1", b"png2"))))
    assert isinstance(encoded, codec.EncodedRequest) and encoded.items == [b"png1", b"png2"]
    column = codec.check_inputs(image, "m", decoded(("images", "BYTES", texts(b"a", b"b").reshape(2, 1))))
    assert isinstance(column, codec.EncodedRequest) and column.batch_size == 2
    text = codec.interface_of(specs["text"])
    ids = np.ones((3, 5), np.int64)
    both = codec.check_inputs(
        text, "m", decoded(("attention_mask", "INT64", ids), ("input_ids", "INT64", ids))
    )
    assert isinstance(both, codec.TensorRequest) and set(both.inputs) == {"input_ids", "attention_mask"}


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
        codec.check_inputs(codec.interface_of(specs[model]), "m", decoded(*tensors))


def test_requested_outputs(specs: dict[str, ModelSpec]) -> None:
    interface = codec.interface_of(specs["image"])
    request = pb.ModelInferRequest()
    everything = codec.requested_outputs(request, interface)
    assert everything == [codec.RequestedOutput("logits"), codec.RequestedOutput("probabilities")]
    request.outputs.add(name="probabilities")
    assert codec.requested_outputs(request, interface) == [codec.RequestedOutput("probabilities")]
    request.outputs.add(name="probabilities")
    with invalid("'probabilities' is requested more than once"):
        codec.requested_outputs(request, interface)
    unknown = pb.ModelInferRequest()
    unknown.outputs.add(name="scores")
    with invalid("requested output 'scores' does not exist"):
        codec.requested_outputs(unknown, interface)
    classified = pb.ModelInferRequest()
    classified.outputs.add(name="logits").parameters["classification"].int64_param = 2
    assert codec.requested_outputs(classified, interface) == [codec.RequestedOutput("logits", 2)]
    classified.outputs[0].parameters["classification"].int64_param = 0
    with invalid("'classification' must be >= 1, got 0"):
        codec.requested_outputs(classified, interface)
    classified.outputs[0].parameters["classification"].string_param = "2"
    with invalid("'classification' must be an integer"):
        codec.requested_outputs(classified, interface)
    shared = pb.ModelInferRequest()
    placed = shared.outputs.add(name="logits")
    placed.parameters["shared_memory_region"].string_param = "r"
    placed.parameters["shared_memory_byte_size"].int64_param = 24
    placed.parameters["shared_memory_offset"].uint64_param = 8
    shared.outputs.add(name="probabilities")
    assert codec.requested_outputs(shared, interface) == [
        codec.RequestedOutput("logits", 0, codec.SharedMemoryRef("r", 24, 8)),
        codec.RequestedOutput("probabilities"),
    ]
    del placed.parameters["shared_memory_byte_size"]
    with invalid("requested output 'logits': shared memory needs both 'shared_memory_region' and"):
        codec.requested_outputs(shared, interface)


def shm_parameters(**values: str | int) -> dict[str, pb.InferParameter]:
    """Parameters as a tensor carries them: strings as string_param, ints as int64_param."""
    parameters = {}
    for key, value in values.items():
        param = pb.InferParameter()
        if isinstance(value, str):
            param.string_param = value
        else:
            param.int64_param = value
        parameters[key] = param
    return parameters


def test_shared_memory_ref_parses_and_refuses() -> None:
    assert codec.shared_memory_ref(shm_parameters(), "x") is None
    assert codec.shared_memory_ref(shm_parameters(classification=2), "x") is None
    ref = codec.shared_memory_ref(shm_parameters(shared_memory_region="r", shared_memory_byte_size=16), "x")
    assert ref == codec.SharedMemoryRef("r", 16, 0)
    full = shm_parameters(shared_memory_region="r", shared_memory_byte_size=16, shared_memory_offset=4)
    assert codec.shared_memory_ref(full, "x") == codec.SharedMemoryRef("r", 16, 4)
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
            codec.shared_memory_ref(shm_parameters(**values), "x")


def test_classification_is_top_k_best_first() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    top2 = codec.classify(scores, 2, ["cat", "dog", "fox"])
    assert top2.tolist() == [
        [b"0.700000:1:dog", b"0.200000:2:fox"],
        [b"0.500000:0:cat", b"0.250000:1:dog"],  # a tie keeps the lower index first
    ]
    assert codec.classify(scores, 10, ["cat", "dog", "fox"]).shape == (2, 3)
    wanted = [codec.RequestedOutput("probabilities", 1), codec.RequestedOutput("logits")]
    selected = codec.select_outputs({"probabilities": scores, "logits": scores * 2}, wanted, ["a", "b", "c"])
    assert selected["probabilities"].tolist() == [[b"0.700000:1:b"], [b"0.500000:0:a"]]
    np.testing.assert_array_equal(selected["logits"], scores * 2)


def test_request_parameters_and_version() -> None:
    request = pb.ModelInferRequest()
    assert codec.request_timeout_us(request.parameters) is None
    request.parameters["timeout"].int64_param = 1500
    assert codec.request_timeout_us(request.parameters) == 1500
    request.parameters["timeout"].string_param = "1s"
    with invalid("'timeout' must be an integer"):
        codec.request_timeout_us(request.parameters)
    request.parameters["timeout"].int64_param = -5
    with invalid("must be > 0 microseconds"):
        codec.request_timeout_us(request.parameters)
    request.parameters["priority"].uint64_param = 1
    codec.check_request_parameters(request.parameters)
    request.parameters["sequence_id"].int64_param = 3
    with invalid("sequence batching is not supported"):
        codec.check_request_parameters(request.parameters)
    assert codec.parse_version("") is None
    assert codec.parse_version("12") == 12
    # "²" passes str.isdigit() and breaks int(); "１" (full width) and "٣" would pass as 1 and 3.
    for bad in ("0", "-1", "v1", "1.0", "\u00b2", "\uff11", "\u0663", "9" * 19, "9" * 5000):
        with invalid("must be a positive integer"):
            codec.parse_version(bad)


# --- responses ------------------------------------------------------------------------------------


def test_encode_outputs_raw_little_endian_in_requested_order() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    probabilities = np.full((2, 3), 1 / 3, np.float32)
    response = pb.ModelInferResponse()
    wanted = [codec.RequestedOutput("probabilities"), codec.RequestedOutput("logits")]
    codec.encode_outputs({"logits": logits, "probabilities": probabilities}, wanted, response)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("probabilities", "FP32", [2, 3]),
        ("logits", "FP32", [2, 3]),
    ]
    assert not response.outputs[0].HasField("contents")
    assert response.raw_output_contents[1] == logits.astype("<f4").tobytes()
    labels = pb.ModelInferResponse()
    codec.encode_outputs({"labels": texts(b"cat", b"")}, [codec.RequestedOutput("labels")], labels)
    assert labels.outputs[0].datatype == "BYTES"
    assert codec.decode_bytes_elements(labels.raw_output_contents[0], 2, "x") == [b"cat", b""]


def test_model_metadata(specs: dict[str, ModelSpec]) -> None:
    meta = codec.model_metadata("tiny-text", [1, 3], codec.interface_of(specs["text"]))
    assert meta.name == "tiny-text" and list(meta.versions) == ["1", "3"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
        ("texts", "BYTES", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 2]),
        ("probabilities", "FP32", [-1, 2]),
    ]


def test_model_config(specs: dict[str, ModelSpec]) -> None:
    spec = specs["image"]
    facts = codec.ServingFacts("CPUExecutionProvider", "fp32", (2, 4), 2000)
    config = codec.model_config(spec, codec.interface_of(spec, max_batch_size=4), facts)
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "tiny-image",
        "onnxruntime_onnx",
        "onnxruntime",
        4,
    )
    pixel, images = config.input
    assert (pixel.name, pixel.data_type, list(pixel.dims), pixel.format, pixel.optional) == (
        "pixel_values",
        mc.TYPE_FP32,
        [3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE],
        mc.ModelInput.FORMAT_NCHW,
        True,
    )
    assert (images.name, images.data_type, list(images.dims), images.optional) == (
        "images",
        mc.TYPE_STRING,
        [1],
        True,
    )
    assert images.HasField("reshape") and list(images.reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [3]), ("probabilities", [3])]
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    gpu = codec.model_config(
        spec, codec.interface_of(spec), codec.ServingFacts("CUDAExecutionProvider", "fp16")
    )
    assert gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert gpu.parameters["variant"].string_value == "fp16"
    assert json.loads(config.parameters["labels"].string_value) == list(spec.labels)
    assert config.parameters["task"].string_value == "image-classification"


def test_model_statistics_conversion() -> None:
    from fineserve.server.model import BatchStats, Duration, ModelStats

    stats = ModelStats(
        name="m",
        version=2,
        last_inference_ms=123,
        inference_count=5,
        execution_count=2,
        success=Duration(3, 300),
        fail=Duration(1, 10),
        queue=Duration(3, 30),
        compute_input=Duration(3, 1),
        compute_infer=Duration(3, 2),
        compute_output=Duration(3, 3),
        batch_stats=(BatchStats(4, Duration(1, 4), Duration(1, 5), Duration(1, 6)),),
    )
    out = codec.model_statistics(stats)
    assert (out.name, out.version, out.last_inference, out.inference_count, out.execution_count) == (
        "m",
        "2",
        123,
        5,
        2,
    )
    assert (out.inference_stats.success.count, out.inference_stats.success.ns) == (3, 300)
    assert out.inference_stats.fail.count == 1 and out.inference_stats.compute_output.ns == 3
    assert out.batch_stats[0].batch_size == 4 and out.batch_stats[0].compute_infer.ns == 5


# --- system shared memory: tensors read from and written to registered regions -------------------


# Makes a shared-memory object of a size: its key and its bytes.


@pytest.fixture
def registry() -> Iterator[SharedMemoryRegistry]:
    regions = SharedMemoryRegistry(enabled=True)
    yield regions
    regions.close()


def placed_input(
    request: pb.ModelInferRequest, name: str, datatype: str, shape: list[int], ref: codec.SharedMemoryRef
) -> None:
    """Adds an input that lies in shared memory (what tritonclient's set_shared_memory sends)."""
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    tensor.parameters[codec.SHM_REGION].string_param = ref.region
    tensor.parameters[codec.SHM_BYTE_SIZE].int64_param = ref.byte_size
    if ref.offset:
        tensor.parameters[codec.SHM_OFFSET].int64_param = ref.offset


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
    placed_input(
        request, "pixel_values", "FP32", list(batch.shape), codec.SharedMemoryRef("pixels", len(data), 32)
    )
    (decoded_input,) = codec.decode_inputs(request, registry)
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
    encoded = codec.encode_bytes_elements([b"good movie", "héllo".encode(), b""])
    key, memory = shm_objects(256)
    memory[3 : 3 + ids.nbytes] = ids.tobytes()  # offset 3: not a multiple of 8
    memory[100 : 100 + len(encoded)] = encoded
    registry.register("all", key, 0, 256)
    request = pb.ModelInferRequest(model_name="m")
    placed_input(request, "input_ids", "INT64", [2, 3], codec.SharedMemoryRef("all", ids.nbytes, 3))
    placed_input(request, "texts", "BYTES", [3], codec.SharedMemoryRef("all", len(encoded), 100))
    unaligned, texts_input = codec.decode_inputs(request, registry)
    np.testing.assert_array_equal(unaligned.array, ids)
    assert unaligned.array.flags.aligned  # copied: onnxruntime wants aligned buffers
    assert texts_input.array.tolist() == [b"good movie", "héllo".encode(), b""]


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
    placed_input(request, "input_ids", "INT64", [1, 4], codec.SharedMemoryRef("ids", ids.nbytes))
    request.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 4])
    request.raw_input_contents.append(raw(mask))  # one raw entry: for the one input not in shm
    decoded_inputs = codec.decode_inputs(request, registry)
    form = codec.check_inputs(codec.interface_of(specs["text"]), "tiny-text", decoded_inputs)
    assert isinstance(form, codec.TensorRequest) and form.batch_size == 1
    np.testing.assert_array_equal(form.inputs["input_ids"], ids)
    np.testing.assert_array_equal(form.inputs["attention_mask"], mask)
    # A raw entry for the input in shared memory too: the count no longer matches.
    request.raw_input_contents.insert(0, raw(ids))
    with invalid("raw_input_contents has 2 entries but the request has 1 inputs not in shared memory"):
        codec.decode_inputs(request, registry)
    del request.raw_input_contents[:]
    request.inputs[0].contents.int64_contents.extend(ids.ravel().tolist())
    with invalid("input 'input_ids': sets both contents and a shared memory region"):
        codec.decode_inputs(request, registry)


def test_shared_memory_input_errors(shm_objects: MakeObject, registry: SharedMemoryRegistry) -> None:
    key, _ = shm_objects(4096)
    registry.register("r", key, 1024, 64)  # bytes 1024..1088 of the object

    def decode(ref: codec.SharedMemoryRef, shape: list[int]) -> None:
        request = pb.ModelInferRequest(model_name="m")
        placed_input(request, "x", "FP32", shape, ref)
        codec.decode_inputs(request, registry)

    decode(codec.SharedMemoryRef("r", 64), [16])  # the whole region
    # Sizes are checked against the shape before anything is read.
    with invalid(r"input 'x': shared_memory_byte_size is 60, but shape \[16\] of FP32 needs 64"):
        decode(codec.SharedMemoryRef("r", 60), [16])
    with invalid(r"input 'x': shared_memory_byte_size is 64, but shape \[2, 4\] of FP32 needs 32"):
        decode(codec.SharedMemoryRef("r", 64), [2, 4])
    with invalid(r"input 'x': shape \[-1\] has a negative dimension"):
        decode(codec.SharedMemoryRef("r", 64), [-1])
    # Past the region's end, though well inside the object.
    with invalid(r"input 'x': offset 8 \+ byte size 64 is outside shared memory region 'r' \(64 bytes\)"):
        decode(codec.SharedMemoryRef("r", 64, 8), [16])
    with invalid("offset 4096 .* is outside shared memory region 'r'"):
        decode(codec.SharedMemoryRef("r", 4, 4096), [1])
    with invalid("input 'x': shared memory region 'nope' is not registered"):
        decode(codec.SharedMemoryRef("nope", 64), [16])
    registry.unregister("r")
    with invalid("input 'x': shared memory region 'r' is not registered"):
        decode(codec.SharedMemoryRef("r", 64), [16])


def test_an_input_in_shared_memory_reads_no_more_than_a_message_could_carry(
    shm_objects: MakeObject,
) -> None:
    key, _ = shm_objects(4096)
    registry = SharedMemoryRegistry(enabled=True, max_read_bytes=1024)
    try:
        registry.register("r", key, 0, 4096)
        for name, datatype, shape in (("texts", "BYTES", [1]), ("x", "FP32", [512])):
            request = pb.ModelInferRequest(model_name="m")
            placed_input(request, name, datatype, shape, codec.SharedMemoryRef("r", 2048))
            with pytest.raises(LimitExceeded, match="shared_memory_byte_size 2048 is over 1024 bytes"):
                codec.decode_inputs(request, registry)
    finally:
        registry.close()


def test_declared_inputs_are_checked_before_decoding(specs: dict[str, ModelSpec]) -> None:
    interface = codec.interface_of(specs["image"], max_batch_size=4)

    def declared(*inputs: tuple[str, str, list[int]]) -> None:
        request = pb.ModelInferRequest(model_name="m")
        for name, datatype, shape in inputs:
            request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(b"\0\0\0\0" * 1000)  # never looked at
        codec.check_declared_inputs(request, interface, "m")

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


def test_output_written_to_shared_memory_keeps_an_empty_raw_entry(
    shm_objects: MakeObject, registry: SharedMemoryRegistry
) -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    probabilities = np.full((2, 3), 1 / 3, np.float32)
    key, memory = shm_objects(128)
    memory[:128] = b"\xaa" * 128
    registry.register("out", key, 8, 100)  # bytes 8..108 of the object
    wanted = [
        codec.RequestedOutput("logits", shared_memory=codec.SharedMemoryRef("out", 40, 4)),
        codec.RequestedOutput("probabilities"),
    ]
    response = pb.ModelInferResponse()
    codec.encode_outputs({"logits": logits, "probabilities": probabilities}, wanted, response, registry)
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
    first = [codec.RequestedOutput("logits", shared_memory=codec.SharedMemoryRef("out", 24))]
    codec.encode_outputs({"logits": logits * 2}, first, at_start, registry)
    assert set(at_start.outputs[0].parameters) == {"shared_memory_region", "shared_memory_byte_size"}
    np.testing.assert_array_equal(np.frombuffer(bytes(memory[8:32]), "<f4").reshape(2, 3), logits * 2)


def test_shared_memory_output_errors(shm_objects: MakeObject, registry: SharedMemoryRegistry) -> None:
    logits = np.zeros((2, 3), np.float32)
    key, memory = shm_objects(64)
    memory[:64] = b"\x11" * 64
    registry.register("out", key, 0, 32)

    def encode(ref: codec.SharedMemoryRef) -> None:
        codec.encode_outputs(
            {"logits": logits},
            [codec.RequestedOutput("logits", shared_memory=ref)],
            pb.ModelInferResponse(),
            registry,
        )

    with invalid("requested output 'logits': the output has 24 bytes, more than shared_memory_byte_size 16"):
        encode(codec.SharedMemoryRef("out", 16))
    with invalid(r"offset 16 \+ byte size 24 is outside shared memory region 'out' \(32 bytes\)"):
        encode(codec.SharedMemoryRef("out", 24, 16))
    with invalid("requested output 'logits': shared memory region 'gone' is not registered"):
        encode(codec.SharedMemoryRef("gone", 24))
    assert bytes(memory[:64]) == b"\x11" * 64  # nothing written by a refused output


def test_output_regions_are_checked_before_the_model_runs(
    specs: dict[str, ModelSpec], shm_objects: MakeObject, registry: SharedMemoryRegistry
) -> None:
    key, _ = shm_objects(64)
    registry.register("out", key, 0, 32)
    interface = codec.interface_of(specs["image"])  # logits [-1, 3] FP32: 12 bytes an item

    def check(*wanted: codec.RequestedOutput, batch_size: int = 2) -> None:
        codec.check_output_regions(wanted, interface, batch_size, registry)

    def placed(name: str, ref: codec.SharedMemoryRef, class_count: int = 0) -> codec.RequestedOutput:
        return codec.RequestedOutput(name, class_count, shared_memory=ref)

    check(placed("logits", codec.SharedMemoryRef("out", 24)), codec.RequestedOutput("probabilities"))
    check(placed("probabilities", codec.SharedMemoryRef("out", 24, 8)))
    with invalid("requested output 'logits': the output has 36 bytes, more than shared_memory_byte_size 24"):
        check(placed("logits", codec.SharedMemoryRef("out", 24)), batch_size=3)
    with invalid("requested output 'logits': shared memory region 'gone' is not registered"):
        check(placed("logits", codec.SharedMemoryRef("gone", 24)))
    with invalid(r"offset 16 \+ byte size 24 is outside shared memory region 'out' \(32 bytes\)"):
        check(placed("logits", codec.SharedMemoryRef("out", 24, 16)))
    # Top-k classes are BYTES of a length known only once computed: only the region is checked.
    check(placed("probabilities", codec.SharedMemoryRef("out", 4), class_count=2))


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
    placed_input(request, "x", "FP32", [16], codec.SharedMemoryRef("r", 64))
    wanted = [codec.RequestedOutput("logits", shared_memory=codec.SharedMemoryRef("r", 64))]
    logits = {"logits": np.zeros(16, np.float32)}
    # Without a registry (the default) as with a disabled one.
    with pytest.raises(PermissionDenied):
        codec.decode_inputs(request)
    with pytest.raises(PermissionDenied):
        codec.encode_outputs(logits, wanted, pb.ModelInferResponse())
    with pytest.raises(PermissionDenied):
        codec.decode_inputs(request, disabled)
    with pytest.raises(PermissionDenied):
        codec.encode_outputs(logits, wanted, pb.ModelInferResponse(), disabled)
