"""Faults: broken new versions, a model folder deleted under the server, a batch that fails inside
onnxruntime, and SIGTERM under load. The server survives each, and says what happened."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from fineserve.bench.server_process import wait_serving
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as fs
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as fs_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from tests.fixtures import publish_tiny_image_model, publish_tiny_text_model, tiny_image_graph
from tests.reliability import images
from tests.reliability.graphs import publish_odd_batch_failing_model, publish_slow_image_model, work
from tests.server.kserve_harness import running_server
from tests.server.running import RunningServer

PNG = images.png(images.rgb_pixels())


def classify(channel: grpc.Channel, model: str = "tiny-image") -> fs.ClassifyResponse:
    request = fs.ClassifyRequest(model=model, images=[fs.ImageInput(encoded=PNG)])
    return fs_grpc.FineserveStub(channel).Classify(request, timeout=10)


def states(channel: grpc.Channel, model: str) -> dict[int, str]:
    listed = fs_grpc.FineserveStub(channel).ListModels(fs.ListModelsRequest(), timeout=10)
    return {v.version: v.state for m in listed.models if m.name == model for v in m.versions}


def wait_for(check: object, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


class Traffic:
    """Clients looping on one model in the background; every answer is kept."""

    def __init__(self, channel: grpc.Channel, model: str = "tiny-image", clients: int = 2) -> None:
        self.codes: list[grpc.StatusCode] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(channel, model)) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _loop(self, channel: grpc.Channel, model: str) -> None:
        while not self._stop.is_set():
            try:
                classify(channel, model)
                self.codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                self.codes.append(err.code())

    def stop(self) -> list[grpc.StatusCode]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.codes


def publish_atomically(folder: Path, write: object) -> None:
    """Writes a version under a hidden name, then renames it into place (as export.publish does)."""
    hidden = folder.parent / f".{folder.name}.partial"
    write(hidden)  # type: ignore[operator]
    hidden.rename(folder)


# --- broken new versions --------------------------------------------------------------------------


@pytest.fixture
def polled(tmp_path: Path) -> Iterator[tuple[RunningServer, grpc.Channel, Path]]:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    with (
        RunningServer(repository, repository_poll_s=0.2) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        yield server, ch, repository


def test_corrupt_or_incompatible_new_versions_are_rejected_while_the_old_one_serves(
    polled: tuple[RunningServer, grpc.Channel, Path],
) -> None:
    _, channel, repository = polled
    expected = classify(channel)
    traffic = Traffic(channel)

    def corrupt(folder: Path) -> None:
        shutil.copytree(repository / "tiny-image" / "1", folder)
        (folder / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX graph" * 40)
        meta = json.loads((folder / "model.json").read_text())
        meta["version"] = 2
        meta["variants"]["fp32"]["size_bytes"] = (folder / "model.onnx").stat().st_size
        (folder / "model.json").write_text(json.dumps(meta))

    def incompatible(folder: Path) -> None:
        # A valid graph whose model.json declares an input the graph does not have.
        shutil.copytree(repository / "tiny-image" / "1", folder)
        meta = json.loads((folder / "model.json").read_text())
        meta["version"] = 3
        meta["inputs"][0]["name"] = "pixels"
        (folder / "model.json").write_text(json.dumps(meta))

    def mislabelled(folder: Path) -> None:
        # Labels that do not match the graph's scores, behind a dynamic output shape: it used to
        # load READY and fail every request (an IndexError per answer).
        shutil.copytree(repository / "tiny-image" / "1", folder)
        meta = json.loads((folder / "model.json").read_text())
        meta["version"] = 4
        meta["labels"] = meta["labels"][:2]
        meta["outputs"][0]["shape"] = [-1, -1]
        (folder / "model.json").write_text(json.dumps(meta))

    publish_atomically(repository / "tiny-image" / "2", corrupt)
    wait_for(lambda: states(channel, "tiny-image").get(2) == "FAILED")
    publish_atomically(repository / "tiny-image" / "3", incompatible)
    wait_for(lambda: states(channel, "tiny-image").get(3) == "FAILED")
    publish_atomically(repository / "tiny-image" / "4", mislabelled)
    wait_for(lambda: states(channel, "tiny-image").get(4) == "FAILED")
    time.sleep(0.5)  # a few more polls: the failures are not retried in a loop
    codes = traffic.stop()
    assert states(channel, "tiny-image") == {1: "READY", 2: "FAILED", 3: "FAILED", 4: "FAILED"}
    assert codes and set(codes) == {grpc.StatusCode.OK}, set(codes)
    assert classify(channel) == expected
    kserve = ks_grpc.GRPCInferenceServiceStub(channel)
    reasons = {
        m.version: m.reason for m in kserve.RepositoryIndex(ks.RepositoryIndexRequest(), timeout=10).models
    }
    assert "pixels" in reasons["3"]
    assert "model.json has 2 labels but the graph's output 'logits' has shape [1, 3]" in reasons["4"]
    # Asking for a failed version by number says so.
    with pytest.raises(grpc.RpcError) as failed:
        fs_grpc.FineserveStub(channel).Classify(
            fs.ClassifyRequest(model="tiny-image", version=2, images=[fs.ImageInput(encoded=PNG)]), timeout=10
        )
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed" in (failed.value.details() or "")


def test_a_model_folder_deleted_under_the_server_is_retired_not_fatal(
    polled: tuple[RunningServer, grpc.Channel, Path],
) -> None:
    """Chosen behaviour: the loaded session keeps answering until the next poll notices the folder
    is gone; then the model is retired (requests already running finish) and new requests get
    NOT_FOUND. Other models are untouched; putting the folder back serves it again."""
    _, channel, repository = polled
    expected = classify(channel, "tiny-image")
    traffic = Traffic(channel, "tiny-image")
    kept = repository.parent / "kept-tiny-image"
    shutil.move(repository / "tiny-image", kept)

    def not_found() -> bool:
        try:
            classify(channel, "tiny-image")
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.NOT_FOUND
        return False

    wait_for(not_found)
    codes = traffic.stop()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}, set(codes)
    sentiment = fs_grpc.FineserveStub(channel).AnalyzeSentiment(
        fs.AnalyzeSentimentRequest(model="tiny-text", texts=["good"]), timeout=10
    )
    assert sentiment.results[0].label == "positive"
    shutil.move(kept, repository / "tiny-image")
    wait_for(lambda: states(channel, "tiny-image").get(1) == "READY")
    assert classify(channel, "tiny-image") == expected


# --- a batch that fails inside onnxruntime --------------------------------------------------------


def pixel_request(rows: int, seed: int) -> ks.ModelInferRequest:
    request = ks.ModelInferRequest(model_name="even-only")
    pixels = np.random.default_rng(seed).normal(size=(rows, 3, 8, 8)).astype("<f4")
    request.inputs.add(name="pixel_values", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


def logits_of(response: ks.ModelInferResponse) -> np.ndarray:
    index = [o.name for o in response.outputs].index("logits")
    shape = list(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape)


def test_an_inference_error_fails_only_its_batch_with_a_generic_internal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``even-only`` fails inside onnxruntime for an odd batch size. Three one-row requests make
    one batch of 3 (a preferred size): all three fail, with INTERNAL and a generic message. Two
    two-row requests then make a batch of 4, which is served with the right logits."""
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    publish_odd_batch_failing_model(repository)
    batching = {
        "even-only": {"max_batch_size": 4, "preferred_batch_sizes": [3, 4], "max_queue_delay_ms": 5000}
    }
    caplog.set_level(logging.ERROR)
    with (
        # No warmup: its batch of one would fail the version at load.
        RunningServer(
            repository, repository_poll_s=0, batching=batching, batch_wait="fixed", warmup=False
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        kserve = ks_grpc.GRPCInferenceServiceStub(channel)
        with ThreadPoolExecutor(3) as pool:
            batch = [pool.submit(kserve.ModelInfer, pixel_request(1, seed), timeout=20) for seed in range(3)]
            other_model = classify(channel, "tiny-image")  # meanwhile, another model serves
            failures = [f.exception() for f in batch]
        assert other_model.results[0].labels
        for failure in failures:
            assert isinstance(failure, grpc.RpcError)
            assert failure.code() == grpc.StatusCode.INTERNAL
            assert failure.details() == "model even-only/1: inference failed; see the server log"
        # The next batch, of an even size, is served, with the logits of the graph without the trap.
        requests = [pixel_request(2, seed) for seed in (10, 11)]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda r: kserve.ModelInfer(r, timeout=20), requests))
    reference = ort.InferenceSession(tiny_image_graph().SerializeToString())
    for request, answer in zip(requests, answers, strict=True):
        pixels = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(2, 3, 8, 8)
        np.testing.assert_allclose(
            logits_of(answer), reference.run(None, {"pixel_values": pixels})[0], rtol=1e-6
        )
    # The details are in the log, with the traceback; never in the reply.
    assert any(r.exc_info and "batch of 3 requests failed" in r.getMessage() for r in caplog.records)
    assert "Reshape" in caplog.text


# --- SIGTERM under load ---------------------------------------------------------------------------


def test_labels_that_do_not_match_the_scores_fail_generically_even_without_warmup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = tmp_path / "models"
    version = publish_tiny_image_model(repository)
    meta = json.loads((version / "model.json").read_text())
    meta["labels"] = meta["labels"][:2]
    meta["outputs"][0]["shape"] = [-1, -1]  # dynamic: nothing to check before a run
    (version / "model.json").write_text(json.dumps(meta))
    caplog.set_level(logging.ERROR)
    with (
        RunningServer(repository, repository_poll_s=0, warmup=False) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        with pytest.raises(grpc.RpcError) as failed:
            classify(channel)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert failed.value.details() == "model tiny-image/1: inference failed; see the server log"
    assert "model.json has 2 labels but the graph's output 'logits' has shape [1, 3]" in caplog.text


def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_slow_image_model(repository)
    pixels = work(20_000)[0]
    image = fs.ImageInput(tensor=fs.Tensor(shape=list(pixels.shape), fp32_data=pixels.tobytes()))
    request = fs.ClassifyRequest(model="slow-image", images=[image])
    results: list[tuple[float, grpc.StatusCode, str]] = []
    stop = threading.Event()

    with running_server(repository, "--shutdown-grace-s=10") as server:
        channel = grpc.insecure_channel(server.url)
        wait_serving(channel)
        stub = fs_grpc.FineserveStub(channel)

        def client() -> None:
            refused = 0
            while not stop.is_set() and refused < 3:
                try:
                    stub.Classify(request, timeout=20)
                    results.append((time.monotonic(), grpc.StatusCode.OK, ""))
                except grpc.RpcError as err:
                    results.append((time.monotonic(), err.code(), err.details() or ""))
                    refused += err.code() == grpc.StatusCode.UNAVAILABLE

        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(results) >= 20)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(timeout=30)
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(30)
        channel.close()
        log = server.log_tail(200)
    codes = {code for _, code, _ in results}
    after = [(code.name, message[:60]) for at, code, message in results if at > signalled]
    print(f"{len(results)} requests, {len(after)} answered after SIGTERM: {sorted(set(after))}")
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, {
        (c, m) for _, c, m in results if c.value[0]
    }
    assert exit_code == 0, log
    assert "server stopped" in log
    # Requests that were running or queued at the signal finished with their answers.
    assert any(code == grpc.StatusCode.OK and at > signalled for at, code, _ in results), log
    assert [c for _, c, _ in results].count(grpc.StatusCode.UNAVAILABLE) >= 1


def test_folders_that_will_never_be_served_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    for folder in ("My Model/1", "tiny-image/v2", "tiny-image/02", "tiny-image/.tmp-publishing"):
        (repository / folder).mkdir(parents=True)
    caplog.set_level(logging.WARNING, logger="fineserve.server.repository")
    with (
        RunningServer(repository, repository_poll_s=0.05) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        time.sleep(0.5)  # several polls
        assert classify(channel).results[0].labels  # the real model serves
    ignored = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring"))
    name_rule = "model names are 1-64 of a-z, 0-9, - and _, not starting with - or _"
    version_rule = "version folders are numbers in 1..2**63-1 written without leading zeros"
    # Relative to the repository and quoted: folder names are anyone's text (escaped, see
    # tests/reliability/test_lying_repository.py).
    assert ignored == [
        f"ignoring 'My Model': {name_rule}",
        f"ignoring 'tiny-image/02': {version_rule}",
        f"ignoring 'tiny-image/v2': {version_rule}",
    ]
