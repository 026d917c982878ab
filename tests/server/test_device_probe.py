"""Startup truth: CUDA counts only once a one-node graph ran on it. On this CPU machine the
provider is made to fail on purpose: onnxruntime is told to offer CUDA (as onnxruntime-gpu does
on any host), and the probe then really runs, and really fails, as on a GPU host whose GPU or
CUDA libraries do not work."""

from __future__ import annotations

import logging
import re
import urllib.request
from pathlib import Path

import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from fineserve.server import device_probe
from fineserve.server.__main__ import main
from fineserve.server.config import load_settings
from fineserve.server.runtime import CPU, CUDA, ProviderChoice, ProviderUnavailable, choose_provider
from tests.server.running import RunningServer

# What onnxruntime's CPU build says when asked for CUDA: the failure these tests cause on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")


def make_probe_graph() -> onnx.ModelProto:
    """y = x + x over float[2], opset 13: what device_probe.PROBE_GRAPH holds."""
    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        "fineserve-device-probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7, producer_name="fineserve"
    )


# On a host where CUDA works the probe passes: the failures cannot be caused there.
CUDA_WORKS_HERE = CUDA in onnxruntime.get_available_providers()
needs_cuda_to_fail = pytest.mark.skipif(CUDA_WORKS_HERE, reason="CUDA works on this host")


@pytest.fixture
def cuda_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime says it has CUDA, as onnxruntime-gpu says on any host."""
    if CUDA_WORKS_HERE:
        pytest.skip("CUDA works on this host: it cannot be made to fail")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])


def test_the_probe_graph_is_the_one_onnx_builds_and_it_checks() -> None:
    built = make_probe_graph()
    onnx.checker.check_model(built)
    assert built.SerializeToString() == device_probe.PROBE_GRAPH


def test_the_probe_runs_on_the_cpu_provider() -> None:
    assert device_probe.probe(CPU) is None


@needs_cuda_to_fail
def test_a_provider_onnxruntime_cannot_use_fails_the_probe_with_its_reason() -> None:
    reason = device_probe.probe(CUDA)
    assert reason is not None
    assert reason.startswith(f"onnxruntime fell back to {CPU}: {CUDA}'s libraries or device are not usable")


def test_device_cuda_refuses_when_cuda_is_offered_but_does_not_work(cuda_offered: None) -> None:
    with pytest.raises(
        ProviderUnavailable, match=r"^device=cuda but CUDA does not work here: onnxruntime fell"
    ):
        choose_provider(load_settings(device="cuda"))


def test_device_auto_falls_back_to_cpu_loudly(cuda_offered: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="fineserve.server.runtime")
    choice = choose_provider(load_settings(device="auto"))
    assert choice.provider == CPU and "fell back" in choice.fallback_reason
    [record] = caplog.records
    assert record.getMessage().startswith("device=auto: CUDA does not work here, serving on CPU: ")


@needs_cuda_to_fail
def test_device_cpu_never_probes_and_auto_without_cuda_is_no_fallback(
    cuda_offered: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert choose_provider(load_settings(device="cpu")) == ProviderChoice(CPU)  # CUDA offered, not probed
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    monkeypatch.setattr(device_probe, "probe", lambda *_: pytest.fail("probed without CUDA offered"))
    assert choose_provider(load_settings(device="auto")) == ProviderChoice(CPU)


def _fallback_gauge(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        found = re.search(r"^fineserve_device_fallback (\S+)$", page.read().decode(), re.M)
    assert found, "fineserve_device_fallback is not exported"
    return float(found.group(1))


def test_the_fallback_is_a_metric_and_the_models_serve_on_cpu(
    tiny_repository: Path, cuda_offered: None
) -> None:
    with RunningServer(tiny_repository, metrics_port=0, metrics_host="127.0.0.1") as server:
        assert _fallback_gauge(server.server.metrics_port) == 1.0
        states = {(e.name, e.state, e.provider) for e in server.server.dataplane.index()}
        assert states == {("tiny-image", "READY", CPU), ("tiny-text", "READY", CPU)}


@needs_cuda_to_fail
def test_no_fallback_reads_zero(tiny_repository: Path) -> None:
    with RunningServer(tiny_repository, metrics_port=0, metrics_host="127.0.0.1") as server:
        assert _fallback_gauge(server.server.metrics_port) == 0.0


def test_serve_with_device_cuda_exits_with_one_line_naming_what_failed(
    tiny_repository: Path, cuda_offered: None, restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--model-repository", str(tiny_repository), "--grpc-port", "0", "--metrics-port", "-1",
                 "--device", "cuda"])  # fmt: skip
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "fineserve serve: error: device=cuda but CUDA does not work here: onnxruntime fell"
    )
