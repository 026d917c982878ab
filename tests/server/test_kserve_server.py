"""The KServe v2 service end to end: the real server in a subprocess, driven by tritonclient.

tritonclient runs in a child process (see ``kserve_harness``): it cannot share a process with our
generated ``inference`` stubs, which the rest of the suite imports. This module imports neither.
Expected values come from running the same tiny ONNX graphs directly with onnxruntime, after
the same preprocessing done here with Pillow, numpy and ``tokenizers``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from tokenizers import Tokenizer

from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_image_model, publish_tiny_text_model
from tests.server.kserve_harness import (
    Inferred,
    ServerProcess,
    Triton,
    TritonError,
    connected,
    running_server,
)

TOLERANCE = 1e-5
IMAGE = "tiny-image"
TEXT = "tiny-text"
RNG = np.random.default_rng(7)


# --- the server, the client and the reference -----------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("kserve") / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    publish_tiny_image_model(repository, name="spare", seed=1)  # loaded and unloaded by a test
    return repository


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerProcess]:
    with running_server(repository) as running:
        yield running


@pytest.fixture(scope="module")
def triton(server: ServerProcess) -> Iterator[Triton]:
    with connected(server) as client:
        yield client


def run_graph(version_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits: np.ndarray = session.run(["logits"], feeds)[0]
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)  # temperature 1.0 in the tiny model.json files


def assert_outputs(result: Inferred, logits: np.ndarray) -> None:
    assert set(result.outputs) == {"logits", "probabilities"}
    np.testing.assert_allclose(result.outputs["logits"], logits, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(result.outputs["probabilities"], softmax(logits), atol=TOLERANCE, rtol=0)


def encoded_image(kind: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(
        0, 256, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, kind)
    return buffer.getvalue()


def image_tensor(encoded: bytes) -> np.ndarray:
    """What the tiny model.json asks for: RGB, already 8x8, /255, mean 0.5, std 0.5, NCHW."""
    rgb = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), dtype=np.float32) / 255.0
    return ((rgb - 0.5) / 0.5).transpose(2, 0, 1)[None]


def token_tensors(repository: Path, text: str) -> dict[str, np.ndarray]:
    tokenizer = Tokenizer.from_file(str(repository / "tiny-text" / "1" / "tokenizer.json"))
    tokenizer.enable_truncation(16)  # text.max_length of the tiny model
    ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def strings(*items: bytes) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def pixels(n: int, size: int = TINY_IMAGE_SIZE) -> np.ndarray:
    return RNG.normal(size=(n, 3, size, size)).astype(np.float32)


# --- health, metadata, config ---------------------------------------------------------------------


def test_live_ready_and_server_metadata(triton: Triton) -> None:
    assert triton.call("is_server_live") is True
    assert triton.call("is_server_ready") is True
    meta = triton.call("get_server_metadata", as_json=True)
    assert meta["name"] == "fineserve"
    assert meta["version"]
    assert {"classification", "model_repository", "model_configuration", "statistics"} <= set(
        meta["extensions"]
    )


def test_model_ready(triton: Triton) -> None:
    assert triton.call("is_model_ready", "tiny-image") is True
    assert triton.call("is_model_ready", "tiny-text", "1") is True
    assert triton.call("is_model_ready", "tiny-text", "7") is False
    assert triton.call("is_model_ready", "no-such-model") is False


def test_model_metadata_shows_both_input_forms(triton: Triton) -> None:
    image = triton.call("get_model_metadata", "tiny-image", as_json=True)
    assert image["name"] == "tiny-image" and image["versions"] == ["1"]
    assert image["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in image["inputs"]] == [
        ("pixel_values", "FP32", [-1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]),
        ("images", "BYTES", [-1]),
    ]
    assert [(t["name"], t["datatype"]) for t in image["outputs"]] == [
        ("logits", "FP32"),
        ("probabilities", "FP32"),
    ]
    text = triton.call("get_model_metadata", "tiny-text", "1", as_json=True)
    assert [t["name"] for t in text["inputs"]] == ["input_ids", "attention_mask", "texts"]
    assert [int(d) for d in text["outputs"][1]["shape"]] == [-1, 2]


def test_model_config(triton: Triton) -> None:
    config = triton.call("get_model_config", "tiny-image", as_json=True)["config"]
    assert config["name"] == "tiny-image"
    assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 8
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["pixel_values"]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in inputs["pixel_values"]["dims"]] == [3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]
    assert inputs["pixel_values"]["format"] == "FORMAT_NCHW"
    assert inputs["images"]["data_type"] == "TYPE_STRING"
    assert inputs["images"]["optional"] and inputs["pixel_values"]["optional"]
    assert [(o["name"], [int(d) for d in o["dims"]]) for o in config["output"]] == [
        ("logits", [3]),
        ("probabilities", [3]),
    ]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 2000  # the 2 ms default
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["parameters"]["provider"]["string_value"] == "CPUExecutionProvider"
    assert config["parameters"]["variant"]["string_value"] == "fp32"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}


# --- inference ------------------------------------------------------------------------------------


def test_infer_image_tensors(triton: Triton, repository: Path) -> None:
    batch = pixels(3)
    result = triton.infer("tiny-image", [("pixel_values", "FP32", batch)], request_id="req-1")
    assert (result.model_name, result.model_version, result.id) == ("tiny-image", "1", "req-1")
    assert_outputs(result, run_graph(repository / "tiny-image" / "1", {"pixel_values": batch}))


def test_infer_text_tensors(triton: Triton, repository: Path) -> None:
    ids = np.array([[2, 4, 12, 3, 0], [2, 8, 9, 15, 3]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    result = triton.infer("tiny-text", [("input_ids", "INT64", ids), ("attention_mask", "INT64", mask)])
    expected = run_graph(repository / "tiny-text" / "1", {"input_ids": ids, "attention_mask": mask})
    assert_outputs(result, expected)
    assert expected[0, 1] > expected[0, 0] and expected[1, 0] > expected[1, 1]  # "good" vs "awful"


def test_infer_encoded_png_and_jpeg(triton: Triton, repository: Path) -> None:
    images = [encoded_image("PNG", 1), encoded_image("JPEG", 2), encoded_image("PNG", 3)]
    result = triton.infer("tiny-image", [("images", "BYTES", strings(*images))])
    batch = np.concatenate([image_tensor(x) for x in images])
    assert_outputs(result, run_graph(repository / "tiny-image" / "1", {"pixel_values": batch}))


def test_infer_utf8_texts(triton: Triton, repository: Path) -> None:
    texts = ["Good movie, I LOVE the plot", "awful… boring plot ☹", "the"]
    result = triton.infer("tiny-text", [("texts", "BYTES", strings(*(t.encode() for t in texts)))])
    expected = np.concatenate(
        [run_graph(repository / "tiny-text" / "1", token_tensors(repository, t)) for t in texts]
    )
    assert_outputs(result, expected)
    assert result.outputs["probabilities"][0, 1] > 0.5 > result.outputs["probabilities"][1, 1]


def test_infer_texts_as_a_column(triton: Triton, repository: Path) -> None:
    column = strings(b"good", b"bad").reshape(2, 1)  # how clients written for Triton send strings
    result = triton.infer("tiny-text", [("texts", "BYTES", column)])
    assert result.outputs["logits"].shape == (2, 2)


def test_only_requested_outputs_come_back(triton: Triton) -> None:
    result = triton.infer("tiny-image", [("pixel_values", "FP32", pixels(2))], outputs=["probabilities"])
    assert set(result.outputs) == {"probabilities"}
    np.testing.assert_allclose(result.outputs["probabilities"].sum(axis=1), 1.0, atol=TOLERANCE)


def test_classification_extension_returns_top_k_labels(triton: Triton) -> None:
    batch = pixels(2)
    plain = triton.infer(IMAGE, [("pixel_values", "FP32", batch)], outputs=["probabilities"])
    top = triton.infer(IMAGE, [("pixel_values", "FP32", batch)], outputs=[("probabilities", 2), "logits"])
    assert top.outputs["probabilities"].shape == (2, 2)
    assert top.outputs["logits"].shape == (2, 3)
    for row, probabilities in zip(top.outputs["probabilities"], plain.outputs["probabilities"], strict=True):
        best = np.argsort(-probabilities)[:2]
        parsed = [item.decode().split(":") for item in row]
        assert [int(index) for _, index, _ in parsed] == best.tolist()
        assert [label for _, _, label in parsed] == [f"class_{i}" for i in best]
        np.testing.assert_allclose([float(v) for v, _, _ in parsed], probabilities[best], atol=1e-6)


def test_typed_contents_are_accepted(triton: Triton, repository: Path) -> None:
    """tritonclient always sends raw contents; other clients may send typed ``contents``."""
    ids = [2, 4, 5, 3]
    request = {
        "model_name": "tiny-text",
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "contents": {"int64_contents": ids}},
            {
                "name": "attention_mask",
                "datatype": "INT64",
                "shape": [1, 4],
                "contents": {"int64_contents": [1] * 4},
            },
        ],
        "outputs": [{"name": "logits"}],
    }
    outputs = triton.raw_infer(request)
    datatype, shape, raw = outputs["logits"]
    assert (datatype, shape) == ("FP32", [1, 2])
    expected = run_graph(
        repository / "tiny-text" / "1",
        {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, 4), np.int64)},
    )
    np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(1, 2), expected, atol=TOLERANCE)


def test_statistics_count_up(triton: Triton) -> None:
    def counts() -> tuple[int, int, int]:
        stats = triton.call("get_inference_statistics", "tiny-image", "1", as_json=True)["model_stats"]
        assert [(s["name"], s["version"]) for s in stats] == [("tiny-image", "1")]
        inference = stats[0]["inference_stats"]
        return (
            int(stats[0].get("inference_count", 0)),
            int(inference.get("success", {}).get("count", 0)),
            int(stats[0].get("execution_count", 0)),
        )

    before = counts()
    triton.infer("tiny-image", [("pixel_values", "FP32", pixels(2))])
    after = counts()
    assert after[0] == before[0] + 2  # rows
    assert after[1] == before[1] + 1  # requests
    assert after[2] >= before[2] + 1  # batches
    every = triton.call("get_inference_statistics", as_json=True)["model_stats"]
    assert {s["name"] for s in every} >= {"tiny-image", "tiny-text"}


# --- errors: each answered with its status, and the server keeps serving -------------------------

IDS = np.ones((1, 4), np.int64)


@dataclass(frozen=True)
class Case:
    model: str
    inputs: list[Any]
    code: str
    message: str
    kwargs: dict[str, Any] = field(default_factory=dict)


ONE_IMAGE = [("pixel_values", "FP32", pixels(1))]
ERRORS = {
    "unknown model": Case("nope", [("images", "BYTES", strings(b"x"))], "NOT_FOUND", "'nope' is not in"),
    "unknown version": Case(IMAGE, ONE_IMAGE, "NOT_FOUND", "no version 7", {"model_version": "7"}),
    "bad version": Case(IMAGE, ONE_IMAGE, "INVALID_ARGUMENT", "positive integer", {"model_version": "v1"}),
    "wrong dtype": Case(
        IMAGE,
        [("pixel_values", "FP64", pixels(1).astype(np.float64))],
        "INVALID_ARGUMENT",
        "must be FP32, got FP64",
    ),
    "wrong shape": Case(
        IMAGE, [("pixel_values", "FP32", pixels(1, size=9))], "INVALID_ARGUMENT", "dimension 2 must be 8"
    ),
    "missing input": Case(
        TEXT, [("input_ids", "INT64", IDS)], "INVALID_ARGUMENT", "missing input 'attention_mask'"
    ),
    "extra input": Case(
        TEXT,
        [("input_ids", "INT64", IDS), ("attention_mask", "INT64", IDS), ("token_type_ids", "INT64", IDS)],
        "INVALID_ARGUMENT",
        "no input 'token_type_ids'",
    ),
    "both forms": Case(
        TEXT,
        [("input_ids", "INT64", IDS), ("attention_mask", "INT64", IDS), ("texts", "BYTES", strings(b"good"))],
        "INVALID_ARGUMENT",
        "not both",
    ),
    "batch over max": Case(
        IMAGE, [("pixel_values", "FP32", pixels(9))], "INVALID_ARGUMENT", "max_batch_size 8"
    ),
    "empty batch": Case(
        IMAGE, [("pixel_values", "FP32", pixels(0))], "INVALID_ARGUMENT", "the batch is empty"
    ),
    "too many images": Case(
        IMAGE, [("images", "BYTES", strings(*[b"x"] * 9))], "INVALID_ARGUMENT", "max_batch_size 8"
    ),
    "corrupt image": Case(IMAGE, [("images", "BYTES", strings(b"not a PNG"))], "INVALID_ARGUMENT", "image"),
    "invalid UTF-8": Case(TEXT, [("texts", "BYTES", strings(b"\xff\xfe good"))], "INVALID_ARGUMENT", "UTF-8"),
    "unknown output": Case(
        IMAGE, ONE_IMAGE, "INVALID_ARGUMENT", "'scores' does not exist", {"outputs": ["scores"]}
    ),
    "timeout passed": Case(IMAGE, ONE_IMAGE, "DEADLINE_EXCEEDED", "deadline", {"timeout": 1}),
    "sequence": Case(IMAGE, ONE_IMAGE, "INVALID_ARGUMENT", "sequence batching", {"sequence_id": 3}),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_errors_have_their_status_and_the_server_keeps_serving(triton: Triton, case: Case) -> None:
    with pytest.raises(TritonError) as caught:
        triton.infer(case.model, case.inputs, **case.kwargs)
    assert caught.value.code == case.code, caught.value
    assert case.message in caught.value.message
    assert "Traceback" not in caught.value.message
    assert triton.infer(IMAGE, ONE_IMAGE).outputs["logits"].shape == (1, 3)


def _raw_text_request(raw_count: int, with_contents: bool) -> tuple[dict[str, Any], list[bytes]]:
    inputs: list[dict[str, Any]] = [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 2]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2]},
    ]
    if with_contents:
        inputs[0]["contents"] = {"int64_contents": [2, 3]}
    return {"model_name": TEXT, "inputs": inputs}, [struct.pack("<2q", 1, 1)] * raw_count


@pytest.mark.parametrize(
    ("raw_count", "with_contents", "message"),
    [
        (2, True, "sets both contents and raw_input_contents"),
        (1, False, "raw_input_contents has 1 entries but the request has 2 inputs"),
    ],
)
def test_malformed_raw_contents(triton: Triton, raw_count: int, with_contents: bool, message: str) -> None:
    request, raw = _raw_text_request(raw_count, with_contents)
    with pytest.raises(TritonError) as caught:
        triton.raw_infer(request, raw)
    assert (caught.value.code, message in caught.value.message) == ("INVALID_ARGUMENT", True), caught.value


def test_raw_length_must_match_the_shape(triton: Triton) -> None:
    request, _ = _raw_text_request(0, False)
    raw = [struct.pack("<2q", 1, 1), struct.pack("<3q", 1, 1, 1)]
    with pytest.raises(TritonError) as caught:
        triton.raw_infer(request, raw)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert (
        "'attention_mask': raw contents have 24 bytes, but shape [1, 2] of INT64 needs 16"
        in caught.value.message
    )


# --- streaming ------------------------------------------------------------------------------------


def test_stream_infer_answers_each_request_and_survives_errors(triton: Triton, repository: Path) -> None:
    good = encoded_image("PNG", 11)
    requests = [
        {"model": IMAGE, "inputs": [("images", "BYTES", strings(good))], "id": "first"},
        {"model": IMAGE, "inputs": [("pixel_values", "FP64", pixels(1).astype(np.float64))], "id": "broken"},
        {"model": "nope", "inputs": [("images", "BYTES", strings(good))], "id": "unknown"},
        {"model": TEXT, "inputs": [("texts", "BYTES", strings(b"great plot"))], "id": "last"},
    ]
    answers = triton.stream(requests)
    assert len(answers) == 4
    errors = sorted(str(a) for a in answers if isinstance(a, TritonError))
    assert len(errors) == 2
    assert "must be FP32, got FP64" in errors[0] and "'nope' is not in the repository" in errors[1]
    results = {a.id: a for a in answers if isinstance(a, Inferred)}
    assert set(results) == {"first", "last"}
    expected = run_graph(repository / "tiny-image" / "1", {"pixel_values": image_tensor(good)})
    assert_outputs(results["first"], expected)
    assert results["last"].outputs["probabilities"][0, 1] > 0.5


# --- repository -----------------------------------------------------------------------------------


def test_repository_index_unload_and_load(triton: Triton) -> None:
    index = triton.call("get_model_repository_index", as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("tiny-image", "1", "READY"),
        ("tiny-text", "1", "READY"),
        ("spare", "1", "READY"),
    }
    triton.call("unload_model", "spare")
    assert triton.call("is_model_ready", "spare") is False
    with pytest.raises(TritonError) as caught:
        triton.infer("spare", [("pixel_values", "FP32", pixels(1))])
    assert caught.value.code == "UNAVAILABLE"
    states = {
        m["name"]: m.get("state") for m in triton.call("get_model_repository_index", as_json=True)["models"]
    }
    assert states["spare"] != "READY" and states["tiny-image"] == "READY"
    triton.call("load_model", "spare")
    assert triton.call("is_model_ready", "spare") is True
    assert triton.infer("spare", [("pixel_values", "FP32", pixels(1))]).model_name == "spare"
    with pytest.raises(TritonError) as unknown:
        triton.call("load_model", "nope")
    assert unknown.value.code == "NOT_FOUND"
    with pytest.raises(TritonError) as configured:
        triton.call("load_model", "spare", config='{"max_batch_size": 2}')
    assert (
        configured.value.code == "INVALID_ARGUMENT"
        and "'config' is not supported" in configured.value.message
    )


def test_model_control_off_and_stream_backpressure(tmp_path: Path) -> None:
    """A second server: load/unload disabled, and a queue of 2 requests per model. A stream of
    many requests is throttled to the queue (none rejected), while plain calls would overflow it."""
    repository = tmp_path / "models"
    publish_tiny_text_model(repository)
    # A fixed wait: the first request of a batch always waits 20 ms for a second, so batches of 2
    # form however fast the model runs (adaptive waiting would depend on the stream's timing).
    flags = ("--no-allow-model-control", "--max-queue-size", "2", "--max-queue-delay-ms", "20")
    flags += ("--batch-wait", "fixed")
    with running_server(repository, *flags) as server, connected(server) as client:
        for method in ("load_model", "unload_model"):
            with pytest.raises(TritonError) as caught:
                client.call(method, "tiny-text")
            assert caught.value.code == "PERMISSION_DENIED"
            assert "allow_model_control" in caught.value.message
        assert client.call("is_model_ready", "tiny-text") is True
        requests = [
            {
                "model": TEXT,
                "inputs": [("texts", "BYTES", strings(f"good movie {i}".encode()))],
                "id": str(i),
            }
            for i in range(24)
        ]
        answers = client.stream(requests)
        assert [a for a in answers if isinstance(a, TritonError)] == []
        results = {int(a.id): a for a in answers if isinstance(a, Inferred)}
        assert sorted(results) == list(range(24))
        # Batched together, each answer is still exactly its unbatched run.
        for i, result in results.items():
            expected = run_graph(repository / TEXT / "1", token_tensors(repository, f"good movie {i}"))
            assert_outputs(result, expected)
        stats = client.call("get_inference_statistics", TEXT, as_json=True)["model_stats"][0]
        assert max(int(b["batch_size"]) for b in stats["batch_stats"]) == 2
