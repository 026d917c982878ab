"""Readiness and liveness: one broken model must not take the server (every replica) out of service."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fineserve.server.app import LIVENESS_SERVICE
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as pb
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as pb_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as kpb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.fixtures import TINY_IMAGE_SIZE, publish_tiny_image_model
from tests.server.running import RunningServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(channel: grpc.Channel, service: str) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    status: int = reply.status
    return status


def test_a_model_whose_only_version_is_corrupt_leaves_the_server_serving(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository, name="good")
    broken = publish_tiny_image_model(repository, name="broken", seed=1)
    (broken / "model.onnx").write_bytes(b"not a graph")
    with RunningServer(repository) as server, grpc.insecure_channel(server.target) as channel:
        for service in ("", "fineserve.v1.Fineserve", "inference.GRPCInferenceService", LIVENESS_SERVICE):
            assert health(channel, service) == SERVING, service
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert kserve.ServerReady(kpb.ServerReadyRequest()).ready

        image = np.zeros((3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), "<f4")
        tensor = pb.Tensor(shape=list(image.shape), fp32_data=image.tobytes())
        request = pb.ClassifyRequest(model="good", images=[pb.ImageInput(tensor=tensor)], top_k=1)
        assert pb_grpc.FineserveStub(channel).Classify(request, timeout=10).model == "good"

        listed = pb_grpc.FineserveStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
        assert {(m.name, v.version, v.state) for m in listed for v in m.versions} == {
            ("good", 1, "READY"),
            ("broken", 1, "FAILED"),
        }
        index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10).models
        assert {(m.name, m.state) for m in index} == {("good", "READY"), ("broken", "FAILED")}
        assert not kserve.ModelReady(kpb.ModelReadyRequest(name="broken")).ready
        request.model = "broken"
        try:
            pb_grpc.FineserveStub(channel).Classify(request, timeout=10)
            raise AssertionError("a failed model answered")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        page = urllib.request.urlopen(f"http://localhost:{server.server.metrics_port}/metrics", timeout=5)
        assert 'fineserve_model_load_failures_total{model="broken"} 1.0' in page.read().decode()


def test_liveness_does_not_follow_readiness(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    with RunningServer(repository) as server, grpc.insecure_channel(server.target) as channel:
        # Readiness is NOT_SERVING (as while models load at startup); liveness is unaffected.
        server.call(server.server._set_health(serving=False))
        assert health(channel, "") == NOT_SERVING
        assert health(channel, LIVENESS_SERVICE) == SERVING
        server.call(server.server._set_health(serving=True))
        assert health(channel, "") == SERVING


def _wait_for_health(channel: grpc.Channel, wanted: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while health(channel, "") != wanted:
        assert time.monotonic() < deadline, (
            f"health did not turn {health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)}"
        )
        time.sleep(0.05)


def _server_ready(channel: grpc.Channel) -> bool:
    return bool(kpb_grpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest()).ready)


def test_a_server_none_of_whose_models_loaded_is_never_serving_until_one_does(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    broken = publish_tiny_image_model(repository, name="broken")
    (broken / "model.onnx").write_bytes(b"not a graph")
    with (
        RunningServer(repository, repository_poll_s=0.1) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        assert health(channel, "") == NOT_SERVING and not _server_ready(channel)
        assert health(channel, LIVENESS_SERVICE) == SERVING  # alive: the orchestrator must not restart it
        publish_tiny_image_model(repository, name="broken", version=2)  # a good version arrives
        _wait_for_health(channel, SERVING)
        assert _server_ready(channel)


def test_unloading_every_model_on_purpose_keeps_the_server_serving(tmp_path: Path) -> None:
    """Nothing is left to wait for; and an unready pod would leave the Service's endpoints, so the
    operator could not load a model back through it."""
    repository = tmp_path / "models"
    publish_tiny_image_model(repository, name="only")
    with (
        RunningServer(repository, repository_poll_s=0) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="only"), timeout=10)
        assert health(channel, "") == SERVING and _server_ready(channel)
        kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="only"), timeout=30)
        assert health(channel, "") == SERVING


def test_a_repository_that_went_away_is_not_ready(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    with (
        RunningServer(repository, repository_poll_s=0.1) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        assert health(channel, "") == SERVING
        repository.rename(tmp_path / "elsewhere")  # the volume is gone
        _wait_for_health(channel, NOT_SERVING)
        (tmp_path / "elsewhere").rename(repository)
        _wait_for_health(channel, SERVING)


def test_strict_readiness_waits_only_for_what_the_version_policy_selects(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository, name="chosen")
    publish_tiny_image_model(repository, name="ignored", seed=1)
    settings = {"readiness": "all", "version_policy": "specific", "specific_versions": {"chosen": [1]}}
    with RunningServer(repository, **settings) as server, grpc.insecure_channel(server.target) as channel:
        assert health(channel, "") == SERVING


def test_strict_readiness_waits_for_every_model(tmp_path: Path) -> None:
    """readiness=all (Triton's strict readiness): one broken model keeps the server NOT_SERVING;
    the default, any, serves the healthy one (the test at the top of this file)."""
    repository = tmp_path / "models"
    publish_tiny_image_model(repository, name="good")
    broken = publish_tiny_image_model(repository, name="broken", seed=1)
    (broken / "model.onnx").write_bytes(b"not a graph")
    with (
        RunningServer(repository, readiness="all", repository_poll_s=0.1) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        assert health(channel, "") == NOT_SERVING and not _server_ready(channel)
        publish_tiny_image_model(repository, name="broken", version=2)
        _wait_for_health(channel, SERVING)


def test_an_empty_repository_is_serving(tmp_path: Path) -> None:
    """Nothing to wait for (models may come through the repository API or a later publish)."""
    (tmp_path / "models").mkdir()
    with RunningServer(tmp_path / "models") as server, grpc.insecure_channel(server.target) as channel:
        assert health(channel, "") == SERVING and _server_ready(channel)
