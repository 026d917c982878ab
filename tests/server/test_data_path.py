"""The CUDA data path, as far as a machine without a GPU can run it: IO binding and fixed
per-shape buffers run here on the CPU provider (onnxruntime binds on "cpu" the way it binds on
"cuda") and must answer exactly what ``session.run`` answers; which options each setting gives a
CUDA session is checked on the options dict itself, since CPU onnxruntime cannot show them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from fineserve.bench.inputs import tensor_batch
from fineserve.export.contract import read_model_spec
from fineserve.server.batching import batch_buckets, padded_to_buckets
from fineserve.server.config import SettingsError, load_settings
from fineserve.server.runtime import (
    CPU,
    CUDA,
    DataPath,
    GraphCaptureUnavailable,
    ModelSession,
    cuda_options,
    plan_data_path,
)
from tests.fixtures import publish_tiny_image_model, publish_tiny_text_model

PLAIN = DataPath()
BOUND = DataPath(io_binding=True, device="cpu")
FIXED = DataPath(io_binding=True, device="cpu", fixed_buffers=True)
# The CUDA-graph path (capture on a shape's first runs) as far as the CPU provider runs it.
GRAPHED = DataPath(io_binding=True, device="cpu", fixed_buffers=True, cuda_graph=True)


def session(version_dir: Path, data_path: DataPath) -> ModelSession:
    spec = read_model_spec(version_dir)
    return ModelSession(version_dir / spec.variant("fp32").file, CPU, load_settings(), 1, data_path=data_path)


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_image_model(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_tiny_text_model(tmp_path_factory.mktemp("repo"))


@pytest.mark.parametrize("data_path", [BOUND, FIXED], ids=["bound", "fixed-buffers"])
def test_bound_runs_answer_what_session_run_answers(image_model: Path, data_path: DataPath) -> None:
    spec = read_model_spec(image_model)
    plain, bound = session(image_model, PLAIN), session(image_model, data_path)
    for seed, rows in enumerate([1, 2, 4, 8, 2, 1]):  # shapes seen again reuse their buffers
        feed = tensor_batch(spec, rows, seed=seed)
        want, got = plain.run(feed), bound.run(feed)
        assert got.keys() == want.keys()
        np.testing.assert_array_equal(got["logits"], want["logits"])


def test_bound_runs_of_a_text_model_answer_what_session_run_answers(text_model: Path) -> None:
    spec = read_model_spec(text_model)
    plain, bound = session(text_model, PLAIN), session(text_model, BOUND)
    for rows in (1, 3, 8):
        feed = tensor_batch(spec, rows, version_dir=text_model)
        np.testing.assert_array_equal(bound.run(feed)["logits"], plain.run(feed)["logits"])


def test_an_answer_from_fixed_buffers_is_not_overwritten_by_the_next_batch(image_model: Path) -> None:
    spec = read_model_spec(image_model)
    fixed = session(image_model, FIXED)
    first = fixed.run(tensor_batch(spec, 4, seed=1))["logits"]
    kept = first.copy()
    fixed.run(tensor_batch(spec, 4, seed=2))  # the same shape: the same buffers
    np.testing.assert_array_equal(first, kept)


def test_padded_buckets_through_fixed_buffers_answer_what_session_run_answers(image_model: Path) -> None:
    spec = read_model_spec(image_model)
    plain, fixed = session(image_model, PLAIN), session(image_model, FIXED)
    padded = padded_to_buckets(fixed.run, batch_buckets(spec.max_batch_size))
    for rows in (1, 3, 5, 7, 8):
        feed = tensor_batch(spec, rows, seed=rows)
        got = padded(feed)["logits"]
        assert got.shape[0] == rows
        np.testing.assert_allclose(got, plain.run(feed)["logits"], rtol=1e-6, atol=1e-6)
    # Only the buckets were run, each in buffers of its own.
    assert sorted(shape[0][0] for shape in fixed._fixed) == [1, 4, 8]


def test_auto_on_cpu_runs_plainly_and_on_cuda_binds_searches_and_captures() -> None:
    settings = load_settings()
    cpu, notes = plan_data_path(settings, CPU, padded=False, fixed_shapes=True)
    assert (cpu.io_binding, cpu.fixed_buffers, cpu.cuda_graph, notes) == (False, False, False, [])
    padded, _ = plan_data_path(settings, CUDA, padded=True, fixed_shapes=True)
    assert padded == DataPath(
        io_binding=True, device="cuda", fixed_buffers=True, cuda_graph=True, conv_algo_search="EXHAUSTIVE"
    )
    # Every new batch size would pay an exhaustive search, and a graph needs fixed shapes.
    unpadded, _ = plan_data_path(settings, CUDA, padded=False, fixed_shapes=True)
    assert (unpadded.io_binding, unpadded.cuda_graph, unpadded.conv_algo_search) == (True, False, "HEURISTIC")
    text, notes = plan_data_path(settings, CUDA, padded=True, fixed_shapes=False)
    assert (text.io_binding, text.fixed_buffers, text.cuda_graph, notes) == (True, False, False, [])


def test_settings_given_override_auto() -> None:
    settings = load_settings(io_binding="off", cuda_graph="off", cudnn_conv_algo_search="DEFAULT")
    path, _ = plan_data_path(settings, CUDA, padded=True, fixed_shapes=True)
    assert path == DataPath(io_binding=False, device="cuda", conv_algo_search="DEFAULT")
    assert cuda_options(settings, path) == {"cudnn_conv_algo_search": "DEFAULT"}
    on_cpu, _ = plan_data_path(load_settings(io_binding="on"), CPU, padded=False, fixed_shapes=False)
    assert on_cpu == DataPath(io_binding=True, device="cpu")


def test_cuda_graph_on_that_cannot_be_used_on_a_model_says_why() -> None:
    settings = load_settings(cuda_graph="on")
    path, notes = plan_data_path(settings, CUDA, padded=True, fixed_shapes=False)
    assert not path.cuda_graph
    assert notes == ["cuda_graph is on but not used here: the inputs or outputs vary past the batch axis"]
    # device=auto that fell back to CPU
    _, notes = plan_data_path(settings, CPU, padded=True, fixed_shapes=True)
    assert notes == ["cuda_graph is on but not used here: it runs on CUDA only; io_binding is off"]


def test_the_cuda_session_options_come_from_the_settings() -> None:
    # CPU onnxruntime cannot show a CUDA session's options: the dict handed to it is checked.
    settings = load_settings(cuda_mem_limit_bytes=1 << 30)
    path, _ = plan_data_path(settings, CUDA, padded=True, fixed_shapes=True)
    assert cuda_options(settings, path) == {
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "gpu_mem_limit": 1 << 30,
        "enable_cuda_graph": "1",
    }
    # The startup probe's one-node graph: no graph capture, no exhaustive search.
    assert cuda_options(settings) == {"cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": 1 << 30}


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"device": "cpu"}, "cuda_graph 'on' needs CUDA"),
        ({"pad_batches": "off"}, "cuda_graph 'on' needs fixed shapes"),
        ({"io_binding": "off"}, "cuda_graph 'on' needs bound buffers"),
    ],
)
def test_cuda_graph_on_without_what_it_needs_is_refused_at_startup(
    given: dict[str, str], problem: str
) -> None:
    with pytest.raises(SettingsError, match=problem):
        load_settings(cuda_graph="on", **given)


def test_io_binding_given_as_a_boolean_still_means_on_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINESERVE_IO_BINDING", "false")
    assert load_settings().io_binding == "off"
    assert load_settings(io_binding=True).io_binding == "on"
    assert load_settings(io_binding=0).io_binding == "off"  # YAML's ``io_binding: 0``


@pytest.mark.parametrize(
    ("given", "means"),
    [
        ("1", "on"),
        ("0", "off"),
        ("yes", "on"),
        ("no", "off"),
        ("Y", "on"),
        ("f", "off"),
        ("TRUE", "on"),
        ("On", "on"),
        ("OFF", "off"),
        ("auto", "auto"),
    ],
)
def test_io_binding_takes_every_spelling_its_boolean_took(
    monkeypatch: pytest.MonkeyPatch, given: str, means: str
) -> None:
    monkeypatch.setenv("FINESERVE_IO_BINDING", given)
    assert load_settings().io_binding == means


def test_fixed_buffers_take_the_declared_output_shape_where_the_graph_leaves_it_symbolic(
    tmp_path: Path,
) -> None:
    """model.json fixes the scores at 3 columns; the graph may say only "classes" (here its logits
    are reshaped to [rows, -1] by a shape computed at run time, so onnxruntime cannot infer it
    either). The buffers used to be [rows, 0], and every run on them failed."""
    version_dir = publish_tiny_image_model(tmp_path / "repo", variants=("fp32",))
    model = onnx.load(version_dir / "model.onnx")
    last = next(node for node in model.graph.node if "logits" in node.output)
    last.output[0] = "fixed_logits"
    model.graph.initializer.extend(
        numpy_helper.from_array(np.array(value, np.int64), name)
        for name, value in (("zero", [0]), ("one", [1]), ("minus_one", [-1]))
    )
    model.graph.node.extend(
        [
            helper.make_node("Shape", ["pixel_values"], ["pixel_shape"]),
            helper.make_node("Slice", ["pixel_shape", "zero", "one"], ["rows"]),
            helper.make_node("Concat", ["rows", "minus_one"], ["rows_by_any"], axis=0),
            helper.make_node("Reshape", ["fixed_logits", "rows_by_any"], ["logits"]),
        ]
    )
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    onnx.checker.check_model(model)
    onnx.save(model, version_dir / "model.onnx")
    spec = read_model_spec(version_dir)
    plain = session(version_dir, PLAIN)
    fixed = ModelSession(
        version_dir / "model.onnx", CPU, load_settings(), 1, data_path=FIXED, declared_outputs=spec.outputs
    )
    assert [o.shape for o in fixed.session.get_outputs()] == [["batch", "classes"]]  # the premise
    for rows in (1, 4, 1):
        feed = tensor_batch(spec, rows, seed=rows)
        np.testing.assert_array_equal(fixed.run(feed)["logits"], plain.run(feed)["logits"])


class CaptureFails(ModelSession):
    """A session whose CUDA graph capture fails as onnxruntime's does (``Fail``): this host has no
    GPU to capture on; everything around the capture is the real code on the CPU provider."""

    def _capture(self, buffers: object) -> None:
        raise Fail("CUDA failure 900: operation not permitted when stream is capturing")


def test_cuda_graph_auto_runs_without_graphs_when_capture_fails(
    image_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = read_model_spec(image_model)
    plain = session(image_model, PLAIN)
    graphed = CaptureFails(image_model / "model.onnx", CPU, load_settings(), 1, data_path=GRAPHED)
    feed = tensor_batch(spec, 4, seed=3)
    with caplog.at_level(logging.WARNING, logger="fineserve.server.runtime"):
        got = graphed.run(feed)["logits"]  # the first run of a shape: the capture, at warmup
    np.testing.assert_array_equal(got, plain.run(feed)["logits"])
    assert graphed.data_path == FIXED  # the session reopened without graphs, buffers kept
    assert "CUDA graphs not used, onnxruntime failed to capture one" in caplog.text
    np.testing.assert_array_equal(graphed.run(feed)["logits"], got)


def test_cuda_graph_on_fails_the_model_when_capture_fails(image_model: Path) -> None:
    settings = load_settings(cuda_graph="on")
    graphed = CaptureFails(image_model / "model.onnx", CPU, settings, 1, data_path=GRAPHED)
    with pytest.raises(GraphCaptureUnavailable, match="cuda_graph is on but onnxruntime failed to capture"):
        graphed.run(tensor_batch(read_model_spec(image_model), 1))
