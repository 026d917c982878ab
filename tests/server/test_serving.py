"""Serving behaviour end to end: batching across clients, overload, deadlines, version switches."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fineserve.server.errors import ModelNotFound, PermissionDenied
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_image_model
from tests.server.running import RunningServer


def tensor_request(image: np.ndarray, version: int = 0) -> pb.ClassifyRequest:
    tensor = pb.Tensor(shape=list(image.shape), fp32_data=np.ascontiguousarray(image, "<f4").tobytes())
    return pb.ClassifyRequest(
        model="tiny-image", version=version, images=[pb.ImageInput(tensor=tensor)], top_k=3
    )


def scores(reply: pb.ClassifyResponse) -> list[tuple[int, float]]:
    return scores_of(reply.results[0])


def scores_of(result: pb.Classification) -> list[tuple[int, float]]:
    return [(s.index, s.score) for s in result.labels]


def publish_atomically(version_dir: Path, new_version: int) -> Path:
    """Copies a version under a hidden name, then renames it into place: readers never see half."""
    staging = version_dir.parent / f".tmp-{new_version}"
    shutil.copytree(version_dir, staging)
    meta = json.loads((staging / "model.json").read_text())
    meta["version"] = new_version
    (staging / "model.json").write_text(json.dumps(meta))
    final = version_dir.parent / str(new_version)
    os.rename(staging, final)
    return final


def padding_of(server: RunningServer, model: str, what: str) -> float:
    """fineserve_batch_padding_<what>_total of ``model``, from the server's /metrics page."""
    assert server.server.metrics_port is not None
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as page:
        families = text_string_to_metric_families(page.read().decode())
        return sum(
            sample.value
            for family in families
            for sample in family.samples
            if sample.name == f"fineserve_batch_padding_{what}_total" and sample.labels["model"] == model
        )


@pytest.mark.parametrize("pad_batches", ["off", "on"])
def test_concurrent_clients_are_batched_and_get_unbatched_results(
    tiny_repository: Path, pad_batches: str
) -> None:
    images = (
        np.random.default_rng(0).normal(size=(24, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype(np.float32)
    )
    with (
        RunningServer(tiny_repository, max_queue_delay_ms=0, pad_batches="off") as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        stub = pb_grpc.FineserveStub(ch)
        alone = [scores(stub.Classify(tensor_request(image))) for image in images]
    with (
        # A fixed delay makes sure the tiny, instant model really sees merged batches.
        RunningServer(
            tiny_repository, max_queue_delay_ms=50, batch_wait="fixed", pad_batches=pad_batches
        ) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        stub = pb_grpc.FineserveStub(ch)
        with ThreadPoolExecutor(len(images)) as clients:
            together = list(clients.map(lambda image: scores(stub.Classify(tensor_request(image))), images))
        [stats] = server.server.dataplane.statistics("tiny-image", 1)
        # One request of 3 images runs as a batch of 3: padded to the warmed size 4 when on.
        before = padding_of(server, "tiny-image", "rows")
        three = pb.ClassifyRequest(model="tiny-image", top_k=3)
        three.images.extend(tensor_request(image).images[0] for image in images[:3])
        assert [scores_of(r) for r in stub.Classify(three).results] == alone[:3]
        added = padding_of(server, "tiny-image", "rows") - before
    assert together == alone  # identical labels and identical float scores
    assert max(b.batch_size for b in stats.batch_stats) > 1
    assert stats.inference_count == len(images)
    assert stats.execution_count < len(images)
    assert added == (1 if pad_batches == "on" else 0)


def test_a_full_queue_answers_resource_exhausted_at_once(tiny_repository: Path) -> None:
    image = np.zeros((3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.float32)
    # Through a per-model override: the other model keeps the server-wide queue.
    # A fixed delay holds the requests in the queue (adaptive would run a lone request at once).
    settings = {
        "batching": {"tiny-image": {"max_queue_size": 2, "max_queue_delay_ms": 1500}},
        "batch_wait": "fixed",
    }
    with RunningServer(tiny_repository, **settings) as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.FineserveStub(ch)
        waiting = [stub.Classify.future(tensor_request(image)) for _ in range(2)]
        time.sleep(0.3)  # both are now waiting for the batch to fill
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(tensor_request(image))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in caught.value.details()
        assert time.monotonic() - started < 0.5
        assert all(len(f.result(timeout=10).results) == 1 for f in waiting)


def test_expired_and_cancelled_requests_are_dropped_unrun(tiny_repository: Path) -> None:
    image = np.zeros((3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.float32)
    with (
        RunningServer(tiny_repository, max_queue_delay_ms=600, batch_wait="fixed") as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        stub = pb_grpc.FineserveStub(ch)
        kept = stub.Classify.future(tensor_request(image))
        cancelled = stub.Classify.future(tensor_request(image))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(tensor_request(image), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        cancelled.cancel()
        assert len(kept.result(timeout=10).results) == 1
        [stats] = server.server.dataplane.statistics("tiny-image", None)
        assert stats.inference_count == 1  # only the request nobody gave up on ran
        assert stats.fail.count == 2
        # The server itself answers DEADLINE_EXCEEDED when a deadline is already spent on arrival.
        deadline_passed = time.monotonic() - 1
        code = server.call(_status_of_infer(server, deadline_passed))
        assert code == "DEADLINE_EXCEEDED"


async def _status_of_infer(server: RunningServer, deadline: float) -> str:
    from fineserve.server.errors import status_of

    image = np.zeros((1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.float32)
    try:
        await server.server.dataplane.infer("tiny-image", None, {"pixel_values": image}, deadline=deadline)
    except Exception as err:
        return status_of(err)[0]
    return "OK"


def test_new_version_published_while_a_client_loops_fails_no_request(tiny_repository: Path) -> None:
    image = np.ones((3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.float32)
    versions_seen: list[int] = []
    failures: list[str] = []
    stop = threading.Event()
    with (
        RunningServer(tiny_repository, repository_poll_s=0.1) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        stub = pb_grpc.FineserveStub(ch)

        def loop() -> None:
            while not stop.is_set():
                try:
                    versions_seen.append(stub.Classify(tensor_request(image), timeout=5).version)
                except grpc.RpcError as err:
                    failures.append(f"{err.code()}: {err.details()}")

        with ThreadPoolExecutor(3) as clients:
            for _ in range(3):
                clients.submit(loop)
            time.sleep(0.3)
            publish_atomically(tiny_repository / "tiny-image" / "1", 2)
            deadline = time.monotonic() + 10
            while (not versions_seen or versions_seen[-1] != 2) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            stop.set()
        index = {(e.name, e.version): e.state for e in server.server.dataplane.index()}
    assert failures == []
    assert versions_seen[0] == 1 and versions_seen[-1] == 2
    assert index[("tiny-image", 2)] == "READY" and index[("tiny-image", 1)] == "UNAVAILABLE"


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving(tiny_repository: Path) -> None:
    with (
        RunningServer(tiny_repository, repository_poll_s=0.1) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        stub = pb_grpc.FineserveStub(ch)
        broken = publish_atomically(tiny_repository / "tiny-image" / "1", 2)
        (broken / "model.onnx").write_bytes(b"not a graph")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = {e.version: e for e in server.server.dataplane.index() if e.name == "tiny-image"}
            if states[2].state == "FAILED":
                break
            time.sleep(0.05)
        assert states[2].state == "FAILED" and states[2].reason
        assert states[1].state == "READY"
        reply = stub.Classify(tensor_request(np.zeros((3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), np.float32)))
        assert reply.version == 1
        assert server.server.dataplane.ready()


def test_load_and_unload(tiny_repository: Path) -> None:
    with RunningServer(tiny_repository, repository_poll_s=0) as server:
        dataplane = server.server.dataplane
        server.call(dataplane.unload("tiny-text"))
        assert not dataplane.model_ready("tiny-text", None)
        assert dataplane.ready()  # an unloaded model is not expected to be ready
        server.call(dataplane.load("tiny-text"))
        assert dataplane.model_ready("tiny-text", 1)
        with pytest.raises(ModelNotFound):
            server.call(dataplane.load("nope"))
    with (
        RunningServer(tiny_repository, allow_model_control=False) as server,
        pytest.raises(PermissionDenied, match="allow_model_control"),
    ):
        server.call(server.server.dataplane.unload("tiny-text"))


def test_version_policy_all_serves_every_version(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for version in (1, 2, 3):
        publish_tiny_image_model(root, version=version, seed=version)
    with RunningServer(root, version_policy="all") as server:
        assert server.server.dataplane.resolve("tiny-image", None).versions == (1, 2, 3)
    with RunningServer(root, version_policy="specific", specific_versions={"tiny-image": [2]}) as server:
        handle = server.server.dataplane.resolve("tiny-image", None)
        assert (handle.version, handle.versions) == (2, (2,))


def test_a_failed_version_is_retried_once_its_files_change(tiny_repository: Path) -> None:
    with RunningServer(tiny_repository, repository_poll_s=0.1) as server:
        dataplane = server.server.dataplane
        staging = tiny_repository / "tiny-image" / ".tmp-2"
        shutil.copytree(tiny_repository / "tiny-image" / "1", staging)
        good = (staging / "model.json").read_text().replace('"version": 1', '"version": 2')
        assert good != (staging / "model.json").read_text()
        (staging / "model.json").write_text("{ half written")
        version_dir = staging.rename(tiny_repository / "tiny-image" / "2")

        def state_of_2() -> str:
            return {e.version: e.state for e in dataplane.index() if e.name == "tiny-image"}[2]

        deadline = time.monotonic() + 10
        while state_of_2() in ("LOADING", "UNAVAILABLE") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state_of_2() == "FAILED"
        (version_dir / "model.json").write_text(good)  # same folder, file rewritten
        while state_of_2() != "READY" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dataplane.resolve("tiny-image", None).version == 2


# Token counts with [CLS] and [SEP]: 3, 6 and 11, padded to the buckets 4, 8 and 16 (max_length).
TEXTS = ["good", "good great movie the", "good great fine love bad awful boring hate movie"]


def test_text_batches_are_padded_to_length_buckets_and_score_the_same(
    tiny_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def sentiments(server: RunningServer) -> list[list[float]]:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.FineserveStub(ch)
            replies = [
                stub.AnalyzeSentiment(pb.AnalyzeSentimentRequest(model="tiny-text", texts=[t])) for t in TEXTS
            ]
        return [[s.score for s in reply.results[0].scores] for reply in replies]

    with RunningServer(tiny_repository, pad_batches="off") as server:
        unpadded = sentiments(server)
        assert padding_of(server, "tiny-text", "tokens") == 0
    caplog.set_level(logging.INFO, logger="fineserve.server")
    with RunningServer(tiny_repository, pad_batches="on", sequence_buckets=[4, 8]) as server:
        padded = sentiments(server)
        assert padding_of(server, "tiny-text", "tokens") == (4 - 3) + (8 - 6) + (16 - 11)
        assert padding_of(server, "tiny-text", "rows") == 0  # a lone text is a batch of 1, a warmed size
    # Padded positions carry attention mask 0: the scores do not move (float32 rounding aside).
    np.testing.assert_allclose(padded, unpadded, rtol=0, atol=1e-6)
    assert "model tiny-text version 1 warmed up (batch sizes 1,2,4,8 x lengths 4,8,16)" in caplog.text
