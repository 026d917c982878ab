"""A low open-files limit: the server raises it, caps shared memory regions by it, and keeps serving.

Each registered system region keeps a descriptor open. Under the usual limit of 1,024, a client
registering a thousand regions used to leave none for the rest: valid PNGs failed as "not
decodable", /metrics timed out, a model load failed INTERNAL "Too many open files". The server
here runs under ``prlimit --nofile=256:512`` (soft 256, hard 512), registers regions until it is
refused, and must then still classify a PNG, answer /metrics and load a model.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import grpc
import pytest

from fineserve.bench.server_process import ServerProcess
from fineserve.server.open_files import region_capacity
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as fs
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as fs_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from tests.fixtures import MakeObject, publish_tiny_models
from tests.reliability import images

SOFT, HARD = 256, 512


def metric(text: str, name: str) -> float:
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not in /metrics"
    return float(values[0])


def test_regions_are_capped_by_the_open_files_limit_and_the_server_keeps_serving(
    tmp_path: Path, shm_objects: MakeObject
) -> None:
    assert shutil.which("prlimit"), "prlimit (util-linux) runs the server under a low limit"
    repository = publish_tiny_models(tmp_path / "models")
    key, _ = shm_objects(4096)
    cap = region_capacity(HARD)  # the soft limit is raised to the hard one first
    assert 0 < cap < HARD - 64
    flags = ["--system-shared-memory", "--repository-poll-s", "0"]
    with ServerProcess(repository, flags) as server:
        server.command = ["prlimit", f"--nofile={SOFT}:{HARD}", "--", *server.command]
        server.start(120)
        assert server.process is not None
        server.wait_for(f"open-files limit raised from {SOFT} to {HARD}")
        server.wait_for(f"system shared memory on: at most {cap} regions")
        with grpc.insecure_channel(server.target) as channel:
            kserve = ks_grpc.GRPCInferenceServiceStub(channel)
            for i in range(cap):
                request = ks.SystemSharedMemoryRegisterRequest(
                    name=f"r{i}", key=key, byte_size=8, offset=i % 512
                )
                kserve.SystemSharedMemoryRegister(request, timeout=10)
            with pytest.raises(grpc.RpcError) as full:
                kserve.SystemSharedMemoryRegister(
                    ks.SystemSharedMemoryRegisterRequest(name="one-more", key=key, byte_size=8), timeout=10
                )
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"at most {cap} shared memory regions" in (full.value.details() or "")
            open_now = len(os.listdir(f"/proc/{server.process.pid}/fd"))
            assert cap < open_now < SOFT + cap  # the regions hold their descriptors, within the reserve
            # Everything else still has descriptors: a PNG decodes, /metrics answers, a model loads.
            png = fs.ImageInput(encoded=images.png(images.rgb_pixels()))
            reply = fs_grpc.FineserveStub(channel).Classify(
                fs.ClassifyRequest(model="tiny-image", images=[png]), timeout=30
            )
            assert reply.results[0].labels
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            assert metric(text, 'fineserve_shared_memory_regions{kind="system"}') == cap
            assert metric(text, "fineserve_shared_memory_regions_limit") == cap
            assert metric(text, "process_max_fds") == HARD
            kserve.RepositoryModelUnload(ks.RepositoryModelUnloadRequest(model_name="tiny-text"), timeout=30)
            kserve.RepositoryModelLoad(ks.RepositoryModelLoadRequest(model_name="tiny-text"), timeout=60)
            assert kserve.ModelReady(ks.ModelReadyRequest(name="tiny-text"), timeout=10).ready
            # Unregistering gives the descriptors back.
            kserve.SystemSharedMemoryUnregister(ks.SystemSharedMemoryUnregisterRequest(), timeout=10)
            assert len(os.listdir(f"/proc/{server.process.pid}/fd")) <= open_now - cap
