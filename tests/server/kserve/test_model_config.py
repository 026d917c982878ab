"""ModelMetadata and ModelConfig (``server/kserve/model_config.py``)."""

from __future__ import annotations

import json

from fineserve.export.contract import ModelSpec
from fineserve.server.batching import Batching
from fineserve.server.config import load_settings
from fineserve.server.dataplane import ModelHandle
from fineserve.server.kserve.interface import interface_of
from fineserve.server.kserve.model_config import model_config, model_metadata, version_policy
from fineserve.server.pb.inference import model_config_pb2 as mc
from tests.fixtures import TINY_IMAGE_SIZE


def test_model_metadata(specs: dict[str, ModelSpec]) -> None:
    meta = model_metadata("tiny-text", [1, 3], interface_of(specs["text"]))
    assert meta.name == "tiny-text" and list(meta.versions) == ["1", "3"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
        ("texts", "BYTES", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 2]),
        ("probabilities", "FP32", [-1, 2]),
    ]


def handle_of(spec: ModelSpec, provider: str, variant: str, batching: Batching) -> ModelHandle:
    return ModelHandle(spec.name, spec.version, spec, provider, variant, (spec.version,), batching)


def test_model_config(specs: dict[str, ModelSpec]) -> None:
    spec = specs["image"]
    batching = Batching(
        max_batch_size=4, max_queue_delay_s=0.002, max_queue_size=8, preferred_batch_sizes=(2, 4)
    )
    handle = handle_of(spec, "CPUExecutionProvider", "fp32", batching)
    config = model_config(handle, interface_of(spec, max_batch_size=4))
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "tiny-image",
        "onnxruntime_onnx",
        "onnxruntime",
        4,
    )
    pixel, images = config.input
    assert (pixel.name, pixel.data_type, list(pixel.dims), pixel.format, pixel.optional) == (
        "pixel_values",
        mc.TYPE_FP32,
        [3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE],
        mc.ModelInput.FORMAT_NCHW,
        True,
    )
    assert (images.name, images.data_type, list(images.dims), images.optional) == (
        "images",
        mc.TYPE_STRING,
        [1],
        True,
    )
    assert images.HasField("reshape") and list(images.reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [3]), ("probabilities", [3])]
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000  # seconds in, µs out
    assert (config.instance_group[0].kind, config.instance_group[0].count) == (
        mc.ModelInstanceGroup.KIND_CPU,
        1,
    )
    two = Batching(max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=8, instances=2)
    gpu = model_config(handle_of(spec, "CUDAExecutionProvider", "fp16", two), interface_of(spec))
    assert (gpu.instance_group[0].kind, gpu.instance_group[0].count) == (mc.ModelInstanceGroup.KIND_GPU, 2)
    assert gpu.dynamic_batching.max_queue_delay_microseconds == 0
    assert gpu.parameters["variant"].string_value == "fp16"
    assert json.loads(config.parameters["labels"].string_value) == list(spec.labels)
    assert config.parameters["task"].string_value == "image-classification"


def test_version_policy_as_the_settings_say() -> None:
    latest = version_policy(load_settings(latest_versions=2), "tiny-image")
    assert latest.WhichOneof("policy_choice") == "latest" and latest.latest.num_versions == 2
    assert version_policy(load_settings(version_policy="all"), "tiny-image").HasField("all")
    specific = load_settings(version_policy="specific", specific_versions={"tiny-image": [1, 3]})
    assert list(version_policy(specific, "tiny-image").specific.versions) == [1, 3]
    assert list(version_policy(specific, "other").specific.versions) == []
