"""FP16 tensors from clients for a model whose input is FP32 (half the bytes on the wire), over a
real server driven by tritonclient; the server runs the IO-binding data path with padded batches
on the CPU provider, so its answers are also checked against the graph run directly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_image_model
from tests.server.kserve_harness import Triton, TritonError, connected, running_server

MODEL = "tiny-image"
# The fp16 rounding of the pixels moves the logits of the tiny graph by about this much at most.
FP16_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("fp16") / "models"
    publish_tiny_image_model(repository)
    return repository


@pytest.fixture(scope="module")
def triton(repository: Path) -> Iterator[Triton]:
    flags = ["--io-binding", "on", "--pad-batches", "on", "--device", "cpu"]
    with running_server(repository, *flags) as server, connected(server) as client:
        yield client


def graph_logits(repository: Path, pixels: np.ndarray) -> np.ndarray:
    path = repository / MODEL / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits: np.ndarray = session.run(["logits"], {"pixel_values": pixels.astype(np.float32)})[0]
    return logits


def pixels(rows: int, seed: int) -> np.ndarray:
    shape = (rows, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("rows", [1, 3])  # 3 rows run padded to the bucket of 4
def test_fp16_pixels_give_the_fp32_answer_within_fp16_tolerance(
    triton: Triton, repository: Path, rows: int
) -> None:
    full = pixels(rows, seed=rows)
    half = full.astype(np.float16)
    from_fp32 = triton.infer(MODEL, [("pixel_values", "FP32", full)]).outputs["logits"]
    from_fp16 = triton.infer(MODEL, [("pixel_values", "FP16", half)]).outputs["logits"]
    # The server casts the half-precision pixels once and runs them as the graph would.
    np.testing.assert_allclose(from_fp16, graph_logits(repository, half), atol=1e-5, rtol=0)
    np.testing.assert_allclose(from_fp32, graph_logits(repository, full), atol=1e-5, rtol=0)
    np.testing.assert_allclose(from_fp16, from_fp32, atol=FP16_TOLERANCE, rtol=0)
    assert (from_fp16.argmax(axis=1) == from_fp32.argmax(axis=1)).all()


@pytest.mark.parametrize(
    ("datatype", "dtype"), [("FP64", np.float64), ("INT32", np.int32), ("UINT8", np.uint8)]
)
def test_other_datatypes_are_still_refused(triton: Triton, datatype: str, dtype: type) -> None:
    with pytest.raises(TritonError) as refused:
        triton.infer(MODEL, [("pixel_values", datatype, pixels(1, seed=0).astype(dtype))])
    assert refused.value.code == "INVALID_ARGUMENT"
    assert f"must be FP32, got {datatype} (FP16 is accepted too)" in refused.value.message


def test_fp16_that_overflowed_is_refused_as_non_finite(triton: Triton) -> None:
    big = np.full((1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.inf, np.float16)  # 70000 in fp16
    with pytest.raises(TritonError) as refused:
        triton.infer(MODEL, [("pixel_values", "FP16", big)])
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "NaN or infinite" in refused.value.message
