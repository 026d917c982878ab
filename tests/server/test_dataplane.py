"""The core without a transport: resolution, validation before queueing, statistics, logging."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from fineserve.server.app import build_dataplane, configure_logging
from fineserve.server.batching import Batching
from fineserve.server.classification import probabilities
from fineserve.server.config import load_settings
from fineserve.server.dataplane import DataPlane
from fineserve.server.errors import InvalidInput, LimitExceeded, ModelNotFound, Overloaded
from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_image_model, tiny_image_graph


def run_with_dataplane(
    repository: Path, scenario: Callable[[DataPlane], Awaitable[None]], **settings: object
) -> None:
    async def main() -> None:
        dataplane = build_dataplane(
            load_settings(model_repository=repository, repository_poll_s=0, **settings)
        )
        await dataplane.start()
        try:
            await scenario(dataplane)
        finally:
            await dataplane.close()

    asyncio.run(main())


def images(rows: int) -> dict[str, np.ndarray]:
    return {"pixel_values": np.zeros((rows, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.float32)}


def test_inputs_are_checked_against_the_model_before_queueing(tiny_repository: Path) -> None:
    async def scenario(dataplane: DataPlane) -> None:
        cases = [
            ({"pixel_values": np.zeros((1, 3, 8, 8), np.float64)}, "datatype must be FP32, got FP64"),
            (
                {"pixel_values": np.zeros((1, 3, 8, 9), np.float32)},
                r"shape \[1, 3, 8, 9\] does not match \[-1, 3, 8, 8\] \(dimension 3 must be 8\)",
            ),
            ({"pixel_values": np.zeros((3, 8, 8), np.float32)}, r"shape \[3, 8, 8\] must have 4 dimensions"),
            (
                {"pixels": np.zeros((1, 3, 8, 8), np.float32)},
                r"missing \['pixel_values'\], unknown \['pixels'\]",
            ),
        ]
        for inputs, words in cases:
            with pytest.raises(InvalidInput, match=words):
                await dataplane.infer("tiny-image", None, inputs, deadline=None)
        text = {"input_ids": np.zeros((2, 5), np.int64), "attention_mask": np.zeros((2, 4), np.int64)}
        with pytest.raises(InvalidInput, match="has shape \\[2, 4\\] but 'input_ids' has \\[2, 5\\]"):
            await dataplane.infer("tiny-text", None, text, deadline=None)
        with pytest.raises(LimitExceeded, match="max_items_per_request"):
            await dataplane.infer("tiny-image", None, images(300), deadline=None)
        with pytest.raises(ModelNotFound):
            dataplane.resolve("tiny-image", 2)
        for name in ("../models/tiny-image", "", "Tiny-Image"):
            with pytest.raises(ModelNotFound, match="no model is named"):
                dataplane.resolve(name, None)
        [stats] = dataplane.statistics("tiny-image", 1)
        assert stats.execution_count == 0  # nothing invalid reached the batcher
        assert stats.fail.count == 5  # four invalid inputs and one over the limit

    run_with_dataplane(tiny_repository, scenario)


def test_each_version_gets_one_batching_from_the_settings_and_its_model(tiny_repository: Path) -> None:
    async def scenario(dataplane: DataPlane) -> None:
        handle = dataplane.resolve("tiny-image", None)
        # The settings allow 64 rows and prefer 4 and 16; the model takes at most 8.
        assert handle.batching == Batching(
            max_batch_size=8,
            max_queue_delay_s=0.005,
            max_queue_size=3,
            preferred_batch_sizes=(4,),
            instances=1,
            inline_run_s=300e-6,  # the model's own inline_run_us, on CPU
        )
        served = dataplane.repository.served["tiny-image"][1]
        assert served.batching is handle.batching is served.batcher.batching

    run_with_dataplane(
        tiny_repository,
        scenario,
        max_batch_size=64,
        max_queue_delay_ms=5,
        max_queue_size=3,
        preferred_batch_sizes=[4, 16],
        instances=1,
        batching={"tiny-image": {"inline_run_us": 300}},
    )


def test_statistics_count_requests_rows_and_batches(tiny_repository: Path) -> None:
    async def scenario(dataplane: DataPlane) -> None:
        # 20 rows with a model batch size of 8: chunks of 8, 8 and 4 in one request.
        result = await dataplane.infer("tiny-image", None, images(20), deadline=None)
        assert result.outputs["logits"].shape == (20, 3)
        await asyncio.gather(
            *(dataplane.infer("tiny-image", None, images(1), deadline=None) for _ in range(4))
        )
        [stats] = dataplane.statistics("tiny-image", None)
        assert stats.success.count == 5 and stats.fail.count == 0
        assert stats.inference_count == 24
        assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
        assert {b.batch_size for b in stats.batch_stats} <= set(range(1, 9))
        assert stats.compute_input.ns > 0 and stats.compute_infer.ns > 0 and stats.queue.count == 5
        assert stats.last_inference_ms > 0
        assert [s.name for s in dataplane.statistics(None, None)] == ["tiny-image", "tiny-text"]

    run_with_dataplane(tiny_repository, scenario)


def test_a_result_calibrates_its_logits_with_the_model_temperature(tiny_repository: Path) -> None:
    async def scenario(dataplane: DataPlane) -> None:
        result = await dataplane.infer("tiny-image", None, images(2), deadline=None)
        expected = probabilities(result.outputs["logits"], result.handle.spec.temperature)
        np.testing.assert_array_equal(result.probabilities(), expected)
        assert result.probabilities().shape == (2, 3)

    run_with_dataplane(tiny_repository, scenario)


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(load_settings(log_json=True))
    try:
        logging.getLogger("fineserve.server.test").warning("hello %s", "there")
        record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (record["level"], record["logger"], record["message"]) == (
            "WARNING",
            "fineserve.server.test",
            "hello there",
        )
    finally:
        logging.getLogger().handlers.clear()


def test_a_version_that_loads_after_failing_is_no_longer_reported_failed(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository, version=1)
    broken = publish_tiny_image_model(repository, version=2)
    (broken / "model.onnx").write_bytes(b"not a graph")

    async def scenario(dataplane: DataPlane) -> None:
        def states() -> dict[int, str]:
            return {e.version: e.state for e in dataplane.index()}

        assert states() == {1: "READY", 2: "FAILED"}
        onnx.save(tiny_image_graph(), broken / "model.onnx")  # fixed in place
        await dataplane.repository.sync()
        assert states() == {1: "UNAVAILABLE", 2: "READY"}
        publish_tiny_image_model(repository, version=3)
        await dataplane.repository.sync()
        # Version 2 is retired by policy now: its failure was long fixed, so it is not FAILED.
        assert states() == {1: "UNAVAILABLE", 2: "UNAVAILABLE", 3: "READY"}

    run_with_dataplane(repository, scenario)


def test_when_one_chunk_of_a_split_request_fails_the_others_stop(tiny_repository: Path) -> None:
    async def scenario(dataplane: DataPlane) -> None:
        # 20 rows in chunks of 8, 8 and 4; a queue of 2 turns the third chunk away.
        with pytest.raises(Overloaded):
            await dataplane.infer("tiny-image", None, images(20), deadline=None)
        batcher = dataplane.repository.served["tiny-image"][1].batcher
        assert batcher.queue_depth == 0  # the other chunks left the queue with the error
        await asyncio.sleep(0.3)
        [stats] = dataplane.statistics("tiny-image", None)
        # (Chunks a batching thread took before the error reached them may have run: it forms
        # batches without waiting for the event loop.)
        assert stats.fail.count == 1
        result = await dataplane.infer("tiny-image", None, images(2), deadline=None)
        assert result.outputs["logits"].shape == (2, 3)

    run_with_dataplane(tiny_repository, scenario, max_queue_size=2)
