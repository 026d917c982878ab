"""A bounded soak: mixed traffic on both services for half a minute, resident memory sampled from /proc.

Memory after warm-up must stay flat: the median of the last samples within 5% of the median of
the first samples after warm-up. Every request must succeed.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from fineserve.bench.server_process import rss_bytes, wait_serving
from fineserve.server.kserve.tensors import encode_bytes_elements
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as fs
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as fs_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from tests.fixtures import publish_tiny_image_model, publish_tiny_text_model
from tests.reliability import images
from tests.server.kserve_harness import running_server

SOAK_S = 30.0
WARM_UP_S = 6.0
SAMPLE_S = 1.0


def mixed_requests(channel: grpc.Channel) -> list[Callable[[], object]]:
    """One of each kind of call a busy server sees, with varying images and texts."""
    fineserve = fs_grpc.FineserveStub(channel)
    kserve = ks_grpc.GRPCInferenceServiceStub(channel)
    pngs = [images.png(images.rgb_pixels(32, seed)) for seed in range(4)]
    texts = ["a good movie", "awful boring plot", "the movie", "love love love it"]
    tensor = ks.ModelInferRequest(model_name="tiny-image")
    tensor.inputs.add(name="pixel_values", datatype="FP32", shape=[2, 3, 8, 8])
    tensor.raw_input_contents.append(
        np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype("<f4").tobytes()
    )
    encoded_texts = ks.ModelInferRequest(model_name="tiny-text")
    encoded_texts.inputs.add(name="texts", datatype="BYTES", shape=[len(texts)])
    encoded_texts.raw_input_contents.append(encode_bytes_elements(t.encode() for t in texts))
    image_request = fs.ClassifyRequest(model="tiny-image", images=[fs.ImageInput(encoded=p) for p in pngs])
    return [
        lambda: fineserve.Classify(image_request, timeout=10),
        lambda: fineserve.AnalyzeSentiment(
            fs.AnalyzeSentimentRequest(model="tiny-text", texts=texts), timeout=10
        ),
        lambda: kserve.ModelInfer(tensor, timeout=10),
        lambda: kserve.ModelInfer(encoded_texts, timeout=10),
        lambda: fineserve.ListModels(fs.ListModelsRequest(), timeout=10),
    ]


@pytest.mark.slow
def test_a_soak_of_mixed_traffic_shows_no_memory_growth(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    with (
        running_server(repository, "--preprocess-threads=1") as server,
        grpc.insecure_channel(server.url) as ch,
    ):
        wait_serving(ch)
        calls = mixed_requests(ch)
        stop = threading.Event()
        counts = {"ok": 0}
        failures: list[str] = []

        def client(offset: int) -> None:
            i = offset
            while not stop.is_set():
                try:
                    calls[i % len(calls)]()
                    counts["ok"] += 1
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < SOAK_S:
            samples.append((elapsed, rss_bytes(server.process.pid)))
            time.sleep(SAMPLE_S)
        stop.set()
        for thread in threads:
            thread.join(30)
    after_warm_up = [rss for at, rss in samples if at >= WARM_UP_S]
    early, late = statistics.median(after_warm_up[:5]), statistics.median(after_warm_up[-5:])
    growth = late / early - 1
    print(
        f"soak: {counts['ok']} requests in {SOAK_S:.0f} s; RSS {early / 2**20:.1f} MiB after warm-up, "
        f"{late / 2**20:.1f} MiB at the end ({growth:+.1%})"
    )
    assert not failures, failures[:5]
    assert counts["ok"] > 100
    assert growth < 0.05, f"RSS grew {growth:.1%} during the soak"
