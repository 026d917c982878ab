"""A repository entry that lies: numbers out of contract, folder names no reply can carry, labels
and folder names made to forge text, graphs whose scores are NaN or flat. Each fails only itself,
with a reason that shows no server path or library text; the rest of the server keeps answering,
and no reply is OK with scores that are not scores."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fineserve.export.contract import ModelSpec, TensorSpec, Variant
from fineserve.server.dataplane import InferResult, ModelHandle
from fineserve.server.errors import ModelFault
from fineserve.server.logs import TextFormatter
from fineserve.server.pb.fineserve.v1 import fineserve_pb2 as fs
from fineserve.server.pb.fineserve.v1 import fineserve_pb2_grpc as fs_grpc
from fineserve.server.pb.inference import grpc_service_pb2 as ks
from fineserve.server.pb.inference import grpc_service_pb2_grpc as ks_grpc
from tests.fixtures import (
    OPSET,
    copy_version,
    publish_8x8_image_graph,
    publish_tiny_image_model,
    publish_tiny_text_model,
    tiny_text_graph,
    tiny_vocab,
)
from tests.reliability import images
from tests.server.running import RunningServer

PNG = images.png(images.rgb_pixels())


def _lie(repository: Path, name: str, edit: str) -> None:
    """A copy of tiny-image named ``name`` whose model.json text has ``edit`` applied (a
    ``"field": value`` pair replacing the original's), as a hand-edited file would read."""
    version_dir = publish_tiny_image_model(repository, name=name)
    text = (version_dir / "model.json").read_text()
    key = edit.split(":", maxsplit=1)[0]
    start = text.index(key)
    end = text.index("\n", start)
    comma = "," if text[end - 1] == "," else ""
    (version_dir / "model.json").write_text(text[:start] + edit + comma + text[end:])


def _index(channel: grpc.Channel) -> dict[tuple[str, str], tuple[str, str]]:
    reply = ks_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(ks.RepositoryIndexRequest(), timeout=10)
    return {(m.name, m.version): (m.state, m.reason) for m in reply.models}


def _listed(channel: grpc.Channel) -> dict[str, dict[int, str]]:
    reply = fs_grpc.FineserveStub(channel).ListModels(fs.ListModelsRequest(), timeout=10)
    return {m.name: {v.version: v.state for v in m.versions} for m in reply.models}


def _classify(channel: grpc.Channel, model: str) -> fs.ClassifyResponse:
    request = fs.ClassifyRequest(model=model, images=[fs.ImageInput(encoded=PNG)])
    return fs_grpc.FineserveStub(channel).Classify(request, timeout=10)


@pytest.fixture
def lying_repository(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    # Each used to load, or to be listed, and then fail every ListModels (int32/int64 overflow),
    # or to answer every request with equal or NaN scores, or to refuse ordinary images.
    _lie(repository, "wide", '"max_batch_size": 2147483648')
    _lie(repository, "hot", '"temperature": Infinity')
    _lie(repository, "cold", '"temperature": 1e-310')
    _lie(repository, "crop", '"crop_fraction": 0.01')
    version_dir = publish_tiny_image_model(repository, name="nan-mean")
    meta = json.loads((version_dir / "model.json").read_text())
    meta["image"]["mean"] = [0.5, float("nan"), 0.5]
    (version_dir / "model.json").write_text(json.dumps(meta))  # writes NaN, as Python's json does
    (repository / "tiny-image" / str(2**63)).mkdir()  # an empty folder no int64 can number
    return repository


def test_one_lying_entry_fails_only_itself(lying_repository: Path) -> None:
    with (
        RunningServer(lying_repository, repository_poll_s=0) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        listed = _listed(ch)  # used to be INTERNAL for everyone
        assert listed["tiny-image"] == {1: "READY"} and listed["tiny-text"] == {1: "READY"}
        index = _index(ch)
        reasons = {name: reason for (name, _), (state, reason) in index.items() if state == "FAILED"}
        assert set(reasons) == {"wide", "hot", "cold", "crop", "nan-mean"}, index
        assert listed["wide"] == {1: "FAILED"}
        assert reasons["wide"] == (
            "wide/1/model.json: max_batch_size: must be an integer in 1..65536, got 2147483648"
        )
        assert (
            reasons["hot"] == "hot/1/model.json: Infinity is not a JSON number (every number must be finite)"
        )
        assert reasons["cold"] == (
            "cold/1/model.json: temperature: must be a finite number in [0.01, 100.0], got 1e-310"
        )
        assert "crop_fraction: must be a finite number in [0.25, 1.0], got 0.01" in reasons["crop"]
        assert reasons["nan-mean"].startswith("nan-mean/1/model.json: NaN is not a JSON number")
        assert ("tiny-image", str(2**63)) not in index
        assert _classify(ch, "tiny-image").results[0].labels


def _scaled_image_graph(scale: float) -> onnx.ModelProto:
    """pixel_values -> per-channel mean -> linear -> times ``scale``: NaN scores for a NaN scale,
    logits too close together for any softmax to tell apart for a tiny one."""
    weight = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32) * 4
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixel_values", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "weight"], ["scores"]),
            helper.make_node("Mul", ["scores", "scale"], ["logits"]),
        ],
        "scaled_image",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.array([scale], dtype=np.float32), "scale"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return model


def _publish_scaled(repository: Path, name: str, scale: float) -> None:
    publish_8x8_image_graph(repository, name, _scaled_image_graph(scale))


def test_warmup_runs_an_ordinary_image_through_preprocessing_and_softmax(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    _publish_scaled(repository, "nan-graph", float("nan"))
    _publish_scaled(repository, "flat-graph", 1e-9)
    with RunningServer(repository, repository_poll_s=0) as server, grpc.insecure_channel(server.target) as ch:
        index = _index(ch)
        assert index[("tiny-image", "1")] == ("READY", "")
        assert index[("nan-graph", "1")] == (
            "FAILED",
            "the graph's scores for an ordinary image are NaN or infinite",
        )
        assert index[("flat-graph", "1")] == (
            "FAILED",
            "every score for an ordinary image is equal (temperature 1) although the graph's logits "
            "differ: the softmax erases the model's ranking",
        )


def test_nan_scores_for_a_decoded_image_are_the_models_fault_not_ok(tmp_path: Path) -> None:
    """Without warmup a NaN graph loads READY; its answers to an image the server decoded itself
    used to blame the client (INVALID_ARGUMENT)."""
    repository = tmp_path / "models"
    _publish_scaled(repository, "nan-graph", float("nan"))
    with (
        RunningServer(repository, repository_poll_s=0, warmup=False) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        with pytest.raises(grpc.RpcError) as failed:
            _classify(ch, "nan-graph")
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert failed.value.details() == (
            "model 'nan-graph' version 1 produced NaN or infinite scores for this request; "
            "the model is at fault, not the request (see the server log)"
        )
        request = ks.ModelInferRequest(model_name="nan-graph")
        item = request.inputs.add(name="images", datatype="BYTES", shape=[1])
        item.contents.bytes_contents.append(PNG)
        with pytest.raises(grpc.RpcError) as failed:
            ks_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "the model is at fault" in (failed.value.details() or "")


def test_scores_are_never_returned_non_finite() -> None:
    """The last gate before a reply: probabilities that are not finite raise, whatever let them
    through (a spec built in code is not checked against the contract)."""
    spec = ModelSpec(
        name="m",
        version=1,
        task="image-classification",
        labels=("a", "b"),
        inputs=(TensorSpec("pixel_values", "FP32", (-1, 3, 8, 8)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 2)),),
        variants={"fp32": Variant("model.onnx", "fp32")},
        temperature=1e-310,
    )
    from fineserve.server.batching import Batching

    handle = ModelHandle("m", 1, spec, "CPUExecutionProvider", "fp32", (1,), Batching(1, 0.0, 1))
    result = InferResult(handle, {"logits": np.array([[1.0, 2.0]], dtype=np.float32)})
    with (
        np.errstate(over="ignore", invalid="ignore"),
        pytest.raises(ModelFault, match="the model is at fault"),
    ):
        result.probabilities()


def test_failure_reasons_show_no_server_paths_or_library_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    garbage = publish_tiny_image_model(repository, name="garbage")
    (garbage / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX graph" * 40)
    missing = publish_tiny_image_model(repository, name="missing")
    (missing / "model.onnx").unlink()
    tokenizer = publish_tiny_text_model(repository, name="bad-tokenizer")
    (tokenizer / "tokenizer.json").write_text('{"model": "none of this is a tokenizer"}')
    with (
        caplog.at_level(logging.ERROR, logger="fineserve.server"),
        RunningServer(repository, repository_poll_s=0) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        index = _index(ch)
        with pytest.raises(grpc.RpcError) as failed:
            fs_grpc.FineserveStub(ch).Classify(
                fs.ClassifyRequest(model="garbage", images=[fs.ImageInput(encoded=PNG)]), timeout=10
            )
    assert index[("garbage", "1")] == (
        "FAILED",
        "model.onnx could not be loaded by onnxruntime (see the server log)",
    )
    assert index[("missing", "1")] == (
        "FAILED",
        "missing/1/model.json: names 'model.onnx', which is not in missing/1",
    )
    assert index[("bad-tokenizer", "1")] == (
        "FAILED",
        "tokenizer.json could not be loaded by tokenizers (see the server log)",
    )
    details = failed.value.details() or ""
    for shown in [reason for _, reason in index.values()] + [details]:
        assert str(tmp_path) not in shown and "ONNXRuntimeError" not in shown, shown
    # The whole error, library text and path included, is in the server log under the same names.
    logged = "\n".join(TextFormatter().format(r) for r in caplog.records)
    assert "model garbage version 1 failed to load" in logged
    assert "ONNXRuntimeError" in logged and str(garbage / "model.onnx") in logged


@pytest.fixture
def forged_names(tmp_path: Path) -> Iterator[Path]:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    (repository / "evil\n2024-01-01 ERROR forged line \x1b[31m").mkdir()
    shutil.copytree(repository / "tiny-image" / "1", repository / "tiny-image" / "2\nFORGED \x1b[2J")
    yield repository


def test_folder_names_reach_the_log_escaped(forged_names: Path, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="fineserve.server"),
        RunningServer(forged_names, repository_poll_s=0),
    ):
        pass
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    lines = [formatter.format(r) for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(lines) == 2, lines
    for line in lines:
        assert "\n" not in line and "\x1b" not in line, line
    assert any("'evil\\n2024-01-01 ERROR forged line \\x1b[31m'" in line for line in lines), lines
    assert any("'tiny-image/2\\nFORGED \\x1b[2J'" in line for line in lines), lines
    assert all(str(forged_names) not in line for line in lines), lines


def _publish_nan_when_padded(repository: Path, name: str) -> None:
    """tiny-text whose logits gain 0 * sum(log(attention_mask)) per row: 0 for a text without
    padding, NaN for a row with one padded position (mask 0), as a graph that divides by the
    mask or takes its log would give."""
    version_dir = publish_tiny_text_model(repository, name=name, variants=("fp32",))
    model = tiny_text_graph(len(tiny_vocab()))
    model.graph.node[-1].output[0] = "raw_logits"
    model.graph.initializer.append(numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"))
    model.graph.node.extend(
        [
            helper.make_node("Log", ["mask_f"], ["log_mask"]),
            helper.make_node("ReduceSum", ["log_mask", "seq_axis"], ["log_sum"], keepdims=1),
            helper.make_node("Mul", ["log_sum", "zero"], ["nan_if_padded"]),
            helper.make_node("Add", ["raw_logits", "nan_if_padded"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, version_dir / "model.onnx")


@pytest.mark.parametrize(
    ("pad_batches", "state"),
    [
        ("on", ("FAILED", "the graph's scores for an ordinary text are NaN or infinite")),
        ("off", ("READY", "")),
    ],
)
def test_warmup_checks_a_text_padded_as_serving_pads_it(
    tmp_path: Path, pad_batches: str, state: tuple[str, str]
) -> None:
    """With padded batches the warmup sentence (11 tokens) runs padded to the length bucket (16),
    attention mask 0 on the added positions, as every request would: a graph whose scores are NaN
    only when padded used to load READY and answer no request."""
    repository = tmp_path / "models"
    _publish_nan_when_padded(repository, "pad-nan")
    settings = {"pad_batches": pad_batches, "device": "cpu", "repository_poll_s": 0}
    with RunningServer(repository, **settings) as server, grpc.insecure_channel(server.target) as ch:
        assert _index(ch)[("pad-nan", "1")] == state


def test_a_version_past_18_digits_is_served_and_asked_for_by_number(tmp_path: Path) -> None:
    """Every version the contract takes (up to 2**63-1) can be asked for over KServe; a number no
    repository can hold is the request's fault."""
    repository = tmp_path / "models"
    big = 10**18  # 19 digits: refused by the KServe parser before, though published and READY
    copy_version(publish_tiny_image_model(repository, variants=("fp32",)), big)
    with RunningServer(repository, repository_poll_s=0) as server, grpc.insecure_channel(server.target) as ch:
        stub = ks_grpc.GRPCInferenceServiceStub(ch)
        request = ks.ModelInferRequest(model_name="tiny-image", model_version=str(big))
        item = request.inputs.add(name="images", datatype="BYTES", shape=[1])
        item.contents.bytes_contents.append(PNG)
        reply = stub.ModelInfer(request, timeout=10)
        assert (reply.model_name, reply.model_version) == ("tiny-image", str(big))
        ready = stub.ModelReady(ks.ModelReadyRequest(name="tiny-image", version=str(big)), timeout=10)
        assert ready.ready
        request.model_version = str(2**63)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith(
            "model version '9223372036854775808' must be a positive integer up to 9223372036854775807"
        )
