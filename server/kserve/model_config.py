"""What KServe says about a model: its ModelMetadata, and a Triton-style ModelConfig with how
this server runs it (provider, variant, batching, instances, version policy).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fineserve.export.contract import TensorSpec
from fineserve.server.datatypes import BYTES
from fineserve.server.kserve.interface import ModelInterface
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.pb.inference import model_config_pb2 as mc

if TYPE_CHECKING:
    from fineserve.server.config import Settings
    from fineserve.server.dataplane import ModelHandle

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
CONFIG_DATATYPES = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64,
    "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    BYTES: mc.TYPE_STRING,
    "BF16": mc.TYPE_BF16,
}


def tensor_metadata(tensor: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape)
    )


def model_metadata(name: str, versions: Sequence[int], interface: ModelInterface) -> pb.ModelMetadataResponse:
    """Metadata shapes include the batch axis as -1; the BYTES input comes after the tensors."""
    return pb.ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[tensor_metadata(t) for t in (*interface.tensor_inputs, interface.encoded_input)],
        outputs=[tensor_metadata(t) for t in interface.outputs],
    )


def model_config(handle: ModelHandle, interface: ModelInterface) -> mc.ModelConfig:
    """A Triton-style ModelConfig of a served version: its spec, and how this server runs it
    (provider, variant, its batching). Dims leave out the batch axis (max_batch_size > 0 implies it).

    Both input forms are marked ``optional``: a request sends one of them. The BYTES input is
    declared Triton's way for one string per batch item: dims [1] reshaped to [].
    """
    spec, batching = handle.spec, handle.batching
    config = mc.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=interface.max_batch_size,
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=list(batching.preferred_batch_sizes),
            # The protocol's unit; ours is seconds.
            max_queue_delay_microseconds=round(batching.max_queue_delay_s * 1_000_000),
        ),
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{spec.name}_0",
                count=batching.instances,
                kind=mc.ModelInstanceGroup.KIND_GPU
                if handle.provider.startswith("CUDA")
                else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
    )
    image_format = mc.ModelInput.FORMAT_NONE
    if spec.image is not None:
        image_format = mc.ModelInput.FORMAT_NCHW if spec.image.layout == "NCHW" else mc.ModelInput.FORMAT_NHWC
    for tensor in interface.tensor_inputs:
        config.input.append(
            mc.ModelInput(
                name=tensor.name,
                data_type=CONFIG_DATATYPES[tensor.datatype],
                format=image_format if len(tensor.shape) == 4 else mc.ModelInput.FORMAT_NONE,
                dims=list(tensor.shape[1:]),
                optional=True,
            )
        )
    config.input.append(
        mc.ModelInput(
            name=interface.encoded_input.name,
            data_type=mc.TYPE_STRING,
            dims=[1],
            reshape=mc.ModelTensorReshape(shape=[]),
            optional=True,
        )
    )
    for tensor in interface.outputs:
        config.output.append(
            mc.ModelOutput(
                name=tensor.name, data_type=CONFIG_DATATYPES[tensor.datatype], dims=list(tensor.shape[1:])
            )
        )
    parameters = {
        "task": spec.task,
        "provider": handle.provider,
        "variant": handle.variant,
        "labels": json.dumps(list(spec.labels)),
        "temperature": repr(spec.temperature),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def version_policy(settings: Settings, name: str) -> mc.ModelVersionPolicy:
    """The version policy in force for model ``name``, as the ModelConfig reports it."""
    policy = settings.version_policy
    if policy == "all":
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if policy == "specific":
        versions = settings.specific_versions.get(name, [])
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=versions))
    latest = mc.ModelVersionPolicy.Latest(num_versions=settings.latest_versions)
    return mc.ModelVersionPolicy(latest=latest)
