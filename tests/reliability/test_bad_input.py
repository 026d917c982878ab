"""Hostile and malformed requests over both gRPC services, against a real server process.

Every case gets its documented status and a message naming the problem (docs/reliability.md).
Afterwards the server still answers good requests exactly as before, and its resident memory
(measured from /proc) grew by less than 10%. Clients are our generated stubs, in this process.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fineserve.bench.server_process import ServerProcess, rss_bytes, wait_serving
from fineserve.server.kserve.tensors import encode_bytes_elements
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as fs
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as fs_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_image_model, publish_tiny_text_model
from tests.reliability import images
from tests.server.kserve_harness import running_server

MAX_RECEIVE = 4 * 1024 * 1024
MAX_REQUEST = 2 * 1024 * 1024
MAX_ITEMS = 16
MAX_BATCH = 8  # the tiny models' max_batch_size
SIDE = TINY_IMAGE_SIZE
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class Clients:
    fineserve: fs_grpc.FineserveStub
    kserve: ks_grpc.GRPCInferenceServiceStub
    channel: grpc.Channel
    server: ServerProcess
    # Before any bad input: the good answers and the resident memory after them.
    reference: tuple[Any, ...] = ()
    baseline_rss: int = 0

    def raw(self, method: str, body: bytes) -> bytes:
        call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call(body, timeout=10)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    repository: Path = tmp_path_factory.mktemp("bad-input") / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    flags = [
        f"--max-receive-message-bytes={MAX_RECEIVE}",
        f"--max-request-bytes={MAX_REQUEST}",
        f"--max-items-per-request={MAX_ITEMS}",
        "--preprocess-threads=1",
        "--intra-op-threads=1",
    ]
    with running_server(repository, *flags) as server, grpc.insecure_channel(server.url) as channel:
        wait_serving(channel)
        clients = Clients(
            fs_grpc.FineserveStub(channel), ks_grpc.GRPCInferenceServiceStub(channel), channel, server
        )
        warm_up_at_the_limits(clients)
        clients.reference = reference(clients)
        clients.baseline_rss = rss_bytes(server.process.pid)
        yield clients


# --- request builders -----------------------------------------------------------------------------

GOOD_PIXELS = images.rgb_pixels()
GOOD_PNG = images.png(GOOD_PIXELS)


def tensor(shape: list[int], values: np.ndarray | None = None, data: bytes | None = None) -> fs.ImageInput:
    if data is None:
        count = int(np.prod(shape)) if shape and min(shape) > 0 else 0
        array = values if values is not None else np.zeros(count, dtype=np.float32)
        data = array.astype("<f4").tobytes()
    return fs.ImageInput(tensor=fs.Tensor(shape=shape, fp32_data=data))


def good_tensor() -> fs.ImageInput:
    return tensor([3, SIDE, SIDE])


def classify(*inputs: fs.ImageInput, model: str = "tiny-image", **fields: Any) -> Callable[[Clients], Any]:
    return lambda c: c.fineserve.Classify(
        fs.ClassifyRequest(model=model, images=inputs, **fields), timeout=10
    )


def encoded(*items: bytes, **fields: Any) -> Callable[[Clients], Any]:
    return classify(*[fs.ImageInput(encoded=item) for item in items], **fields)


def sentiment(*texts: str, model: str = "tiny-text", **fields: Any) -> Callable[[Clients], Any]:
    return lambda c: c.fineserve.AnalyzeSentiment(
        fs.AnalyzeSentimentRequest(model=model, texts=texts, **fields), timeout=10
    )


# (name, datatype, shape, raw bytes or None for typed contents, typed contents)
KInput = tuple[str, str, list[int], bytes | None, ks.InferTensorContents | None]


def kinfer(
    *inputs: KInput,
    model: str = "tiny-image",
    version: str = "",
    outputs: list[ks.ModelInferRequest.InferRequestedOutputTensor] | None = None,
    parameters: dict[str, ks.InferParameter] | None = None,
) -> Callable[[Clients], Any]:
    request = ks.ModelInferRequest(model_name=model, model_version=version, outputs=outputs or [])
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(value)
    for name, datatype, shape, raw, contents in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if contents is not None:
            tensor.contents.CopyFrom(contents)
        if raw is not None:
            request.raw_input_contents.append(raw)
    return lambda c: c.kserve.ModelInfer(request, timeout=10)


def pixels(shape: list[int], dtype: str = "<f4", fill: float = 0.0) -> KInput:
    datatype = {"<f4": "FP32", "<f8": "FP64", "<f2": "FP16"}[dtype]
    return ("pixel_values", datatype, shape, np.full(shape, fill, dtype=dtype).tobytes(), None)


def good_pixels() -> KInput:
    return pixels([1, 3, SIDE, SIDE])


def token_input(name: str, shape: list[int], dtype: str = "<i8", datatype: str = "INT64") -> KInput:
    return (name, datatype, shape, np.full(shape, 5, dtype=dtype).tobytes(), None)


def token_ids(bad: int) -> KInput:
    """Four token ids, the third one ``bad``."""
    return ("input_ids", "INT64", [1, 4], np.array([[2, 5, bad, 3]], "<i8").tobytes(), None)


def byte_items(name: str, *items: bytes) -> KInput:
    return (name, "BYTES", [len(items)], encode_bytes_elements(items), None)


def classification(count: ks.InferParameter) -> list[ks.ModelInferRequest.InferRequestedOutputTensor]:
    output = ks.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")
    output.parameters["classification"].CopyFrom(count)
    return [output]


def unary(method: str, request: Any) -> Callable[[Clients], Any]:
    return lambda c: getattr(c.kserve, method)(request, timeout=10)


def raw_call(method: str, body: bytes) -> Callable[[Clients], Any]:
    return lambda c: c.raw(method, body)


def sentiment_bytes(text: bytes) -> bytes:
    """An AnalyzeSentimentRequest on the wire whose text is arbitrary bytes (no client library
    lets a string field hold invalid UTF-8)."""
    model = b"tiny-text"
    return b"\x0a" + bytes([len(model)]) + model + b"\x1a" + bytes([len(text)]) + text


# --- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Clients], Any]
    code: grpc.StatusCode
    message: str = ""  # a regex the status message must contain


FINESERVE = "/fineserve.v1.Fineserve/"
KSERVE = "/inference.GRPCInferenceService/"
NAN = np.full(3 * SIDE * SIDE, np.nan, dtype=np.float32)
INF = np.full(3 * SIDE * SIDE, np.inf, dtype=np.float32)
ANIMATED_WEBP, STILL_WEBP = images.animated("WEBP")
ANIMATED_PNG, STILL_PNG = images.animated("PNG")
ANIMATED_GIF, _ = images.animated("GIF")
ONE_MB_TEXT = "good " * (1 << 18)
UNDECODABLE = "not a decodable JPEG, PNG or WebP image"

CASES = [
    # fineserve.v1 Classify: models and versions
    Case("classify unknown model", encoded(GOOD_PNG, model="no-such"), NOT_FOUND, "not in the repository"),
    Case("classify path-like model name", encoded(GOOD_PNG, model="../etc"), NOT_FOUND, "no model is named"),
    Case("classify unknown version", encoded(GOOD_PNG, version=99), NOT_FOUND, "has no version 99"),
    Case("classify negative version", encoded(GOOD_PNG, version=-1), NOT_FOUND, "has no version -1"),
    Case("classify on a text model", encoded(GOOD_PNG, model="tiny-text"), INVALID, "Classify needs"),
    Case("classify negative top_k", encoded(GOOD_PNG, top_k=-1), INVALID, "top_k must be >= 0"),
    # fineserve.v1 Classify: tensors
    Case("classify no images", classify(), INVALID, "no images"),
    Case("classify image without source", classify(fs.ImageInput()), INVALID, "encoded bytes or a tensor"),
    Case(
        "classify mixed sources", classify(good_tensor(), fs.ImageInput(encoded=GOOD_PNG)), INVALID, "mixed"
    ),
    Case("tensor wrong shape", classify(tensor([3, 4, 4])), INVALID, r"shape \[1, 3, 4, 4\]"),
    Case("tensor extra axis", classify(tensor([1, 3, SIDE, SIDE])), INVALID, "shape"),
    Case("tensor negative dim", classify(tensor([3, -SIDE, SIDE], data=b"")), INVALID, "positive sizes"),
    Case("tensor empty shape", classify(tensor([], data=b"")), INVALID, "positive sizes"),
    Case(
        "tensor huge shape",
        classify(tensor([3, 100_000, 100_000], data=b"\0" * 16)),
        INVALID,
        "needs 120000000000 bytes",
    ),
    Case("tensor bytes short", classify(tensor([3, SIDE, SIDE], data=b"\0" * 10)), INVALID, "got 10"),
    Case(
        "tensors of different shapes",
        classify(good_tensor(), tensor([3, SIDE, SIDE + 1])),
        INVALID,
        "differ in shape",
    ),
    Case("tensor NaN", classify(tensor([3, SIDE, SIDE], NAN)), INVALID, "NaN or infinite"),
    Case("tensor Inf", classify(tensor([3, SIDE, SIDE], INF)), INVALID, "NaN or infinite"),
    Case(
        "tensors over max_items_per_request",
        classify(*[good_tensor()] * (MAX_ITEMS + 1)),
        INVALID,
        "max_items_per_request",
    ),
    # fineserve.v1 Classify: encoded images
    Case("zero-byte image", encoded(b""), INVALID, UNDECODABLE),
    Case("corrupt image bytes", encoded(bytes(range(256)) * 4), INVALID, UNDECODABLE),
    Case("truncated PNG", encoded(GOOD_PNG[: len(GOOD_PNG) // 2]), INVALID, UNDECODABLE),
    Case(
        "truncated JPEG",
        encoded(images.encode(images.Image.fromarray(GOOD_PIXELS), "JPEG")[:200]),
        INVALID,
        UNDECODABLE,
    ),
    Case(
        "PNG declaring 100k x 100k",
        encoded(images.png_declaring(100_000, 100_000)),
        INVALID,
        "max_image_pixels",
    ),
    Case("PNG declaring 6000 x 6000", encoded(images.png_declaring(6000, 6000)), INVALID, "max_image_pixels"),
    Case(
        "JPEG declaring 60k x 60k",
        encoded(images.jpeg_declaring(60_000, 60_000)),
        INVALID,
        "max_image_pixels",
    ),
    Case("animated GIF", encoded(ANIMATED_GIF), INVALID, UNDECODABLE),
    Case(
        "BMP image", encoded(images.encode(images.Image.fromarray(GOOD_PIXELS), "BMP")), INVALID, UNDECODABLE
    ),
    Case(
        "TIFF image",
        encoded(images.encode(images.Image.fromarray(GOOD_PIXELS), "TIFF")),
        INVALID,
        UNDECODABLE,
    ),
    Case("SVG text", encoded(b"<svg xmlns='http://www.w3.org/2000/svg'/>"), INVALID, UNDECODABLE),
    Case("second item bad", encoded(GOOD_PNG, b"junk"), INVALID, f"item 1: {UNDECODABLE}"),
    Case(
        "images over max_items_per_request", encoded(*[GOOD_PNG] * (MAX_ITEMS + 1)), INVALID, "max_items_per"
    ),
    Case(
        "images over max_request_bytes",
        encoded(*[b"\0" * (MAX_REQUEST // 3 + 1)] * 3),
        INVALID,
        "max_request_bytes",
    ),
    Case("classify oversized message", encoded(b"\0" * (MAX_RECEIVE + 1)), EXHAUSTED, "larger than max"),
    # accepted (documented): converted to RGB; animations use their first frame
    Case("animated WebP", encoded(ANIMATED_WEBP), OK),
    Case("animated PNG", encoded(ANIMATED_PNG), OK),
    Case("CMYK JPEG", encoded(images.cmyk_jpeg()), OK),
    Case("16-bit gray PNG", encoded(images.gray16_png(GOOD_PIXELS[..., 0])), OK),
    Case("16-bit RGB PNG", encoded(images.png_rgb16(GOOD_PIXELS.astype(np.uint16) * 257)), OK),
    Case("RGBA PNG", encoded(images.with_alpha(GOOD_PIXELS)), OK),
    Case("gray+alpha PNG", encoded(images.with_alpha(GOOD_PIXELS, "LA")), OK),
    Case("1x1 image", encoded(images.png(GOOD_PIXELS[:1, :1])), OK),
    Case("1 x 20000 image", encoded(images.png(np.zeros((20_000, 1, 3), np.uint8))), OK),
    # fineserve.v1 AnalyzeSentiment
    Case("sentiment unknown model", sentiment("good", model="nope"), NOT_FOUND, "not in the repository"),
    Case("sentiment unknown version", sentiment("good", version=3), NOT_FOUND, "has no version 3"),
    Case("sentiment on an image model", sentiment("good", model="tiny-image"), INVALID, "needs a text-class"),
    Case("sentiment no texts", sentiment(), INVALID, "no items"),
    Case("sentiment 1 MB text", sentiment(ONE_MB_TEXT), INVALID, "max_text_chars"),
    Case(
        "sentiment too many texts", sentiment(*["good"] * (MAX_ITEMS + 1)), INVALID, "max_items_per_request"
    ),
    Case(
        "sentiment non-UTF-8 text",
        raw_call(FINESERVE + "AnalyzeSentiment", sentiment_bytes(b"\xff\xfe bad")),
        INVALID,
        "not a valid message",
    ),
    Case(
        "sentiment corrupt protobuf",
        raw_call(FINESERVE + "AnalyzeSentiment", b"\xff" * 12),
        INVALID,
        "not a valid",
    ),
    Case("sentiment empty text", sentiment(""), OK),  # accepted: [CLS] [SEP] only
    Case("sentiment control characters", sentiment("\x00\x07\u202e good"), OK),
    # KServe v2 ModelInfer: models, versions, parameters, outputs
    Case("kserve unknown model", kinfer(good_pixels(), model="nope"), NOT_FOUND, "not in the repository"),
    Case("kserve version not a number", kinfer(good_pixels(), version="abc"), INVALID, "positive integer"),
    Case("kserve version 0", kinfer(good_pixels(), version="0"), INVALID, "positive integer"),
    Case("kserve unknown version", kinfer(good_pixels(), version="7"), NOT_FOUND, "has no version 7"),
    Case("kserve no inputs", kinfer(), INVALID, "has no inputs"),
    Case(
        "kserve unknown output",
        kinfer(good_pixels(), outputs=[ks.ModelInferRequest.InferRequestedOutputTensor(name="x")]),
        INVALID,
        "'x' does not exist",
    ),
    Case(
        "kserve classification not an integer",
        kinfer(good_pixels(), outputs=classification(ks.InferParameter(string_param="3"))),
        INVALID,
        "must be an integer",
    ),
    Case(
        "kserve classification zero",
        kinfer(good_pixels(), outputs=classification(ks.InferParameter(int64_param=0))),
        INVALID,
        "must be >= 1",
    ),
    Case(
        "kserve sequence parameter",
        kinfer(good_pixels(), parameters={"sequence_id": ks.InferParameter(int64_param=1)}),
        INVALID,
        "sequence batching is not supported",
    ),
    Case(
        "kserve negative timeout",
        kinfer(good_pixels(), parameters={"timeout": ks.InferParameter(int64_param=-5)}),
        INVALID,
        "must be > 0",
    ),
    # KServe v2 ModelInfer: inputs
    Case(
        "kserve wrong input name",
        kinfer(("foo", "FP32", [1], b"\0" * 4, None)),
        INVALID,
        "has no input 'foo'",
    ),
    Case(
        "kserve extra input",
        kinfer(good_pixels(), ("extra", "FP32", [1], b"\0" * 4, None)),
        INVALID,
        "has no input 'extra'",
    ),
    Case(
        "kserve missing input",
        kinfer(token_input("input_ids", [1, 4]), model="tiny-text"),
        INVALID,
        "missing input 'attention_mask'",
    ),
    Case("kserve duplicate input", kinfer(good_pixels(), good_pixels()), INVALID, "appears more than once"),
    Case(
        "kserve encoded and tensors together",
        kinfer(good_pixels(), byte_items("images", GOOD_PNG)),
        INVALID,
        "not both",
    ),
    Case(
        "kserve wrong dtype FP64",
        kinfer(pixels([1, 3, SIDE, SIDE], "<f8")),
        INVALID,
        "must be FP32, got FP64",
    ),
    Case(
        "kserve wrong dtype INT32 tokens",
        kinfer(
            token_input("input_ids", [1, 4], "<i4", "INT32"),
            token_input("attention_mask", [1, 4]),
            model="tiny-text",
        ),
        INVALID,
        "must be INT64, got INT32",
    ),
    Case(
        "kserve unknown dtype",
        kinfer(("pixel_values", "FP128", [1], b"", None)),
        INVALID,
        "'FP128' is not supp",
    ),
    Case(
        "kserve BF16", kinfer(("pixel_values", "BF16", [1], b"\0\0", None)), INVALID, "BF16 is not supported"
    ),
    Case(
        "kserve negative shape",
        kinfer(("pixel_values", "FP32", [-1, 3, SIDE, SIDE], b"", None)),
        INVALID,
        "negat",
    ),
    Case(
        "kserve huge shape",
        # Text: the token axis is dynamic, so only the element cap refuses it.
        kinfer(("input_ids", "INT64", [1, 1 << 40], b"", None), model="tiny-text"),
        INVALID,
        "elements, over",
    ),
    Case("kserve wrong rank", kinfer(pixels([1, 3, SIDE])), INVALID, "must have 4 dimensions"),
    Case("kserve mismatched dim", kinfer(pixels([1, 3, SIDE, SIDE + 1])), INVALID, "dimension 3 must be 8"),
    Case(
        "kserve token shapes differ",
        kinfer(token_input("input_ids", [1, 4]), token_input("attention_mask", [1, 5]), model="tiny-text"),
        INVALID,
        "they must match",
    ),
    Case(
        "kserve token batch sizes differ",
        kinfer(token_input("input_ids", [2, 4]), token_input("attention_mask", [1, 4]), model="tiny-text"),
        INVALID,
        "they must match",
    ),
    Case(
        "kserve token id beyond the vocabulary",
        kinfer(token_ids(99), token_input("attention_mask", [1, 4]), model="tiny-text"),
        INVALID,
        r"token ids must be in 0\.\.15",
    ),
    Case(
        "kserve negative token id",
        kinfer(token_ids(-1), token_input("attention_mask", [1, 4]), model="tiny-text"),
        INVALID,
        "token ids must be in",
    ),
    Case(
        "kserve raw too short",
        kinfer(("pixel_values", "FP32", [1, 3, SIDE, SIDE], b"\0" * 100, None)),
        INVALID,
        "raw contents have 100 bytes",
    ),
    Case(
        "kserve raw count differs from inputs",
        lambda c: c.kserve.ModelInfer(_two_raw_one_input(), timeout=10),
        INVALID,
        "raw_input_contents has 2 entries",
    ),
    Case(
        "kserve raw and typed together",
        kinfer(
            (
                "pixel_values",
                "FP32",
                [1, 3, SIDE, SIDE],
                np.zeros(3 * SIDE * SIDE, "<f4").tobytes(),
                ks.InferTensorContents(fp32_contents=[0.0] * (3 * SIDE * SIDE)),
            )
        ),
        INVALID,
        "sets both contents and raw_input_contents",
    ),
    Case(
        "kserve typed contents wrong count",
        kinfer(
            ("pixel_values", "FP32", [1, 3, SIDE, SIDE], None, ks.InferTensorContents(fp32_contents=[1.0]))
        ),
        INVALID,
        "has 1 elements",
    ),
    Case(
        "kserve typed contents wrong field",
        kinfer(
            (
                "pixel_values",
                "FP32",
                [1, 3, SIDE, SIDE],
                None,
                ks.InferTensorContents(int64_contents=[1] * (3 * SIDE * SIDE)),
            )
        ),
        INVALID,
        "belongs in contents.fp32_contents",
    ),
    Case("kserve empty batch", kinfer(pixels([0, 3, SIDE, SIDE])), INVALID, "the batch is empty"),
    Case(
        "kserve batch above maximum",
        kinfer(pixels([MAX_BATCH + 1, 3, SIDE, SIDE])),
        INVALID,
        "max_batch_size 8",
    ),
    Case("kserve NaN pixels", kinfer(pixels([1, 3, SIDE, SIDE], fill=np.nan)), INVALID, "NaN or infinite"),
    Case(
        "kserve Inf typed contents",
        kinfer(
            (
                "pixel_values",
                "FP32",
                [1, 3, SIDE, SIDE],
                None,
                ks.InferTensorContents(fp32_contents=[float("-inf")] * (3 * SIDE * SIDE)),
            )
        ),
        INVALID,
        "NaN or infinite",
    ),
    # KServe v2 ModelInfer: BYTES inputs
    Case(
        "kserve empty BYTES batch", kinfer(("images", "BYTES", [0], b"", None)), INVALID, "the batch is empty"
    ),
    Case(
        "kserve BYTES element overruns",
        kinfer(("images", "BYTES", [1], b"\x64\0\0\0abc", None)),
        INVALID,
        "claims 100 bytes",
    ),
    Case(
        "kserve BYTES trailing bytes",
        kinfer(("images", "BYTES", [1], encode_bytes_elements([GOOD_PNG]) + b"xx", None)),
        INVALID,
        "bytes after",
    ),
    Case(
        "kserve BYTES wrong shape",
        kinfer(("images", "BYTES", [2, 2], encode_bytes_elements([GOOD_PNG] * 4), None)),
        INVALID,
        r"must be \[N\]",
    ),
    Case("kserve images as UINT8", kinfer(("images", "UINT8", [1], b"\0", None)), INVALID, "must be BYTES"),
    Case("kserve zero-byte image", kinfer(byte_items("images", b"")), INVALID, UNDECODABLE),
    Case(
        "kserve PNG declaring 100k x 100k",
        kinfer(byte_items("images", images.png_declaring(100_000, 100_000))),
        INVALID,
        "max_image_pixels",
    ),
    Case(
        # Finite, so past the NaN check, but the model overflows: refused, not answered with NaN.
        "kserve finite pixels of 3e38",
        kinfer(pixels([1, 3, SIDE, SIDE], fill=3e38)),
        INVALID,
        "output 'logits' for this request is NaN or infinite",
    ),
    Case(
        # Only 5 Mpx, but resized to 8 x 40,000,000 before the crop (GBs for a larger model).
        "kserve PNG of 1 x 5,000,000",
        kinfer(byte_items("images", images.png_declaring(1, 5_000_000))),
        INVALID,
        "aspect ratio is too extreme",
    ),
    Case(
        # Refused from the shape alone: decoding 20 million elements first held the loop for seconds.
        "kserve 20 million BYTES elements",
        kinfer(("images", "BYTES", [20_000_000], b"\0" * 4000, None)),
        INVALID,
        "batch size 20000000 is over the model's max_batch_size",
    ),
    Case(
        # Past the model's positions it failed inside the graph, with every request of its batch.
        "kserve token ids past max_length",
        kinfer(token_input("input_ids", [1, 17]), token_input("attention_mask", [1, 17]), model="tiny-text"),
        INVALID,
        r"17 tokens per text, more than the model's max_length \(16",
    ),
    Case(
        "kserve non-UTF-8 text",
        kinfer(byte_items("texts", b"\xc3\x28"), model="tiny-text"),
        INVALID,
        "not valid UTF-8",
    ),
    Case(
        "kserve 1 MB text",
        kinfer(byte_items("texts", ONE_MB_TEXT.encode()), model="tiny-text"),
        INVALID,
        "max_text_chars",
    ),
    Case(
        "kserve texts above maximum batch",
        kinfer(byte_items("texts", *[b"good"] * (MAX_BATCH + 1)), model="tiny-text"),
        INVALID,
        "max_batch_size 8",
    ),
    Case(
        "kserve oversized message",
        kinfer(byte_items("images", b"\0" * (MAX_RECEIVE + 1))),
        EXHAUSTED,
        "larger than max",
    ),
    Case(
        "kserve corrupt protobuf",
        raw_call(KSERVE + "ModelInfer", b"\x0a\xff\xff\xff"),
        INVALID,
        "not a valid",
    ),
    # KServe v2: the other RPCs
    Case(
        "kserve metadata unknown model",
        unary("ModelMetadata", ks.ModelMetadataRequest(name="x")),
        NOT_FOUND,
        "x",
    ),
    Case(
        "kserve config bad version",
        unary("ModelConfig", ks.ModelConfigRequest(name="tiny-image", version="v1")),
        INVALID,
        "positive integer",
    ),
    Case(
        # str.isdigit() takes it; int() does not (was INTERNAL).
        "kserve superscript version",
        unary("ModelConfig", ks.ModelConfigRequest(name="tiny-image", version="\u00b2")),
        INVALID,
        "positive integer",
    ),
    Case(
        "kserve 5000-digit version",
        unary("ModelMetadata", ks.ModelMetadataRequest(name="tiny-image", version="9" * 5000)),
        INVALID,
        "positive integer",
    ),
    Case(
        "kserve statistics version without name",
        unary("ModelStatistics", ks.ModelStatisticsRequest(version="1")),
        INVALID,
        "needs a model name",
    ),
    Case(
        "kserve load other repository",
        unary(
            "RepositoryModelLoad", ks.RepositoryModelLoadRequest(repository_name="r", model_name="tiny-image")
        ),
        INVALID,
        "serves one repository",
    ),
    Case(
        "kserve load unknown model",
        unary("RepositoryModelLoad", ks.RepositoryModelLoadRequest(model_name="nope")),
        NOT_FOUND,
        "not in the repository",
    ),
    Case(
        # The repository is .../models: this path names the same model and used to load a copy.
        "kserve load a path out of the repository",
        unary("RepositoryModelLoad", ks.RepositoryModelLoadRequest(model_name="../models/tiny-image")),
        NOT_FOUND,
        "not in the repository",
    ),
    Case(
        "kserve load a 300-character name",
        unary("RepositoryModelLoad", ks.RepositoryModelLoadRequest(model_name="a" * 300)),
        NOT_FOUND,
        "not in the repository",
    ),
    Case(
        "kserve load with parameters",
        lambda c: c.kserve.RepositoryModelLoad(_load_with_parameter(), timeout=10),
        INVALID,
        "parameter 'config' is not supported",
    ),
    Case("kserve undeclared RPC", raw_call(KSERVE + "NoSuchRpc", b""), grpc.StatusCode.UNIMPLEMENTED, ""),
]


def _two_raw_one_input() -> ks.ModelInferRequest:
    request = ks.ModelInferRequest(model_name="tiny-image")
    request.inputs.add(name="pixel_values", datatype="FP32", shape=[1, 3, SIDE, SIDE])
    request.raw_input_contents.extend([b"", b""])
    return request


def _load_with_parameter() -> ks.RepositoryModelLoadRequest:
    request = ks.RepositoryModelLoadRequest(model_name="tiny-image")
    request.parameters["config"].string_param = "{}"
    return request


def outcome(case: Case, clients: Clients) -> tuple[grpc.StatusCode, str]:
    try:
        case.send(clients)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return OK, ""


def test_there_are_at_least_60_distinct_cases() -> None:
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names)
    assert len([c for c in CASES if c.code != OK]) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_gets_its_status_and_a_message_naming_the_problem(case: Case, clients: Clients) -> None:
    code, message = outcome(case, clients)
    assert code == case.code, f"{case.name}: {code.name} {message!r}"
    if case.code != OK:
        assert re.search(case.message, message), f"{case.name}: {message!r} lacks {case.message!r}"
        assert "Traceback" not in message and "onnxruntime" not in message.lower()


def test_a_malformed_message_in_a_kserve_stream_is_answered_in_band_and_the_stream_goes_on(
    clients: Clients,
) -> None:
    def good(request_id: str) -> bytes:
        name, datatype, shape, raw, _ = good_pixels()
        request = ks.ModelInferRequest(model_name="tiny-image", id=request_id, raw_input_contents=[raw])
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        return request.SerializeToString()

    stream = clients.channel.stream_stream(
        KSERVE + "ModelStreamInfer",
        request_serializer=None,
        response_deserializer=ks.ModelStreamInferResponse.FromString,
    )
    answers = list(stream(iter([good("a"), b"\xff" * 12, good("b")]), timeout=10))
    assert len(answers) == 3
    by_id = {a.infer_response.id: a for a in answers if a.infer_response.id}
    assert sorted(by_id) == ["a", "b"]
    assert all(not a.error_message for a in by_id.values())
    [bad] = [a for a in answers if not a.infer_response.id]
    assert bad.error_message.startswith(f"the request to {KSERVE}ModelStreamInfer is not a valid message")


def test_a_malformed_message_in_another_request_stream_ends_it_with_invalid_argument(
    clients: Clients,
) -> None:
    # Server reflection also reads a request stream; it has no in-band errors.
    stream = clients.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=None,
        response_deserializer=None,
    )
    with pytest.raises(grpc.RpcError) as failed:
        list(stream(iter([b"\xff" * 12]), timeout=10))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ServerReflectionInfo is not a valid message" in failed.value.details()


def test_a_malformed_request_to_a_response_stream_is_invalid_argument(clients: Clients) -> None:
    # Health Watch: one request, a stream of answers. gRPC's own answer was UNKNOWN, naming a
    # Python exception class.
    watch = clients.channel.unary_stream(
        "/grpc.health.v1.Health/Watch", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as failed:
        list(watch(b"\xff" * 12, timeout=10))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Watch is not a valid message" in failed.value.details()
    # A good Watch still streams the status.
    good = clients.channel.unary_stream(
        "/grpc.health.v1.Health/Watch", request_serializer=None, response_deserializer=None
    )(b"", timeout=10)
    assert next(iter(good))  # SERVING, as bytes
    good.cancel()


def scores(clients: Clients, item: bytes) -> list[float]:
    response = clients.fineserve.Classify(
        fs.ClassifyRequest(model="tiny-image", images=[fs.ImageInput(encoded=item)], top_k=3), timeout=10
    )
    return sorted((s.index, s.score) for s in response.results[0].labels)  # type: ignore[return-value]


def test_accepted_image_variants_mean_what_they_should(clients: Clients) -> None:
    """Animations are their first frame; 16-bit images are scaled to 8 bits; alpha is dropped."""
    assert scores(clients, ANIMATED_WEBP) == scores(clients, STILL_WEBP)
    assert scores(clients, ANIMATED_PNG) == scores(clients, STILL_PNG)
    assert scores(clients, images.gray16_png(GOOD_PIXELS[..., 0])) == scores(
        clients, images.png(np.repeat(GOOD_PIXELS[..., :1], 3, axis=2))
    )
    assert scores(clients, images.png_rgb16(GOOD_PIXELS.astype(np.uint16) * 257)) == scores(clients, GOOD_PNG)
    assert scores(clients, images.with_alpha(GOOD_PIXELS)) == scores(clients, GOOD_PNG)


def warm_up_at_the_limits(clients: Clients) -> None:
    """Good requests as large as the limits allow: the working set any busy server reaches. Memory
    is measured after these, so what the bad requests add is what is compared."""
    big = images.png(images.rgb_pixels(560))  # ~0.95 MB of incompressible pixels
    clients.fineserve.Classify(
        fs.ClassifyRequest(model="tiny-image", images=[fs.ImageInput(encoded=big)] * 2), timeout=30
    )
    clients.fineserve.Classify(
        fs.ClassifyRequest(
            model="tiny-image", images=[fs.ImageInput(encoded=images.png(np.zeros((20_000, 1, 3), np.uint8)))]
        ),
        timeout=30,
    )
    long_texts = ["good " * 1900] * MAX_ITEMS
    clients.fineserve.AnalyzeSentiment(
        fs.AnalyzeSentimentRequest(model="tiny-text", texts=long_texts), timeout=30
    )
    kinfer(byte_items("texts", *[t.encode() for t in long_texts[:MAX_BATCH]]), model="tiny-text")(clients)
    kinfer(byte_items("images", big, big))(clients)


def reference(clients: Clients) -> tuple[Any, ...]:
    """Good requests of every kind and their full answers."""
    image = clients.fineserve.Classify(
        fs.ClassifyRequest(model="tiny-image", images=[fs.ImageInput(encoded=GOOD_PNG)] * 3), timeout=10
    )
    text = clients.fineserve.AnalyzeSentiment(
        fs.AnalyzeSentimentRequest(model="tiny-text", texts=["a good movie", "awful plot"]), timeout=10
    )
    kserve = kinfer(pixels([2, 3, SIDE, SIDE], fill=0.25))(clients)
    assert [r.label for r in text.results] == ["positive", "negative"]
    return image, text, kserve


def test_server_still_serves_correctly_and_memory_stays_flat(clients: Clients) -> None:
    """Good answers are unchanged after every case; repeating all cases three more times grows
    resident memory by less than 10%, and by less than 20% over the memory before the first bad
    request (the one-time part: Pillow's format plugins, the allocator keeping the high-water
    mark of the largest buffers, such as the 4 MiB oversized messages, for reuse)."""
    for case in CASES:
        assert outcome(case, clients)[0] == case.code, case.name
    warm = rss_bytes(clients.server.process.pid)
    rounds = 3
    for _ in range(rounds):
        for case in CASES:
            assert outcome(case, clients)[0] == case.code, case.name
    now = rss_bytes(clients.server.process.pid)
    assert reference(clients) == clients.reference
    repeated, total = now / warm - 1, now / clients.baseline_rss - 1
    print(
        f"RSS: {clients.baseline_rss / 2**20:.0f} MiB before, {warm / 2**20:.0f} after a round of "
        f"{len(CASES)} cases, {now / 2**20:.0f} after {rounds} more ({repeated:+.1%})"
    )
    assert repeated < 0.10, f"server RSS grew {repeated:.1%} over {rounds} more rounds of bad requests"
    assert total < 0.20, f"server RSS grew {total:.1%} since before the first bad request"
    assert clients.server.process.poll() is None
