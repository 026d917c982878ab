"""Bring your own model: an ONNX classifier made elsewhere (tf2onnx, skl2onnx, another
framework's exporter) plus labels and preprocessing -> a checked repository entry.

The graph's tensors are renamed to the repository's client-facing names (``pixel_values`` or
``input_ids``/``attention_mask``, ``logits``); outputs other than the logits are dropped. Given
held-out examples and the original framework's logits for them (``reference``), the fp32 graph
passes the same gate as our own exports; without a reference only the interface and shapes are
checked and the graph's own fp32 outputs become the reference for its fp16/int8 variants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fineserve.export import validate
from fineserve.export.contract import (
    MAX_LENGTH_RANGE,
    TEMPERATURE_RANGE,
    ImagePreprocessing,
    TensorSpec,
    TextPreprocessing,
    check_image_preprocessing,
    check_labels,
    finite_in,
    read_model_spec,
)
from fineserve.export.errors import UnsupportedModelError, WrapError
from fineserve.export.examples import Examples, load_tokenizer
from fineserve.export.onnx import IMAGE_INPUT, OUTPUT, TEXT_INPUTS
from fineserve.export.pipeline import FILES, ExportSettings, Published, build_spec, gate_variants
from fineserve.export.publish import publish, staging_folder

_FLOAT = onnx.TensorProto.FLOAT
_INTS = {onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32"}


FP32_ONLY = ExportSettings(variants=("fp32",))


@dataclass(frozen=True)
class GraphInterface:
    inputs: tuple[TensorSpec, ...]  # with client-facing names
    outputs: tuple[TensorSpec, ...]
    renames: dict[str, str]  # original -> client-facing
    layout: str = "NCHW"


def read_graph(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise WrapError(f"ONNX file {path} does not exist") from None
    except Exception as err:  # onnx raises DecodeError, ValidationError, ...
        raise WrapError(f"{path}: not a valid ONNX model ({type(err).__name__})") from None
    return model


def describe_interface(
    model: onnx.ModelProto, task: str, num_labels: int, output: str | None
) -> GraphInterface:
    """Finds the image input (float, rank 4) or the text inputs (integer ids, optional mask) and
    the logits output (float, rank 2, ``num_labels`` wide).

    Raises:
        UnsupportedModelError: unknown task. WrapError: the graph does not fit the task.
    """
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    renames: dict[str, str] = {}
    layout = "NCHW"
    if task == "image-classification":
        if len(graph_inputs) != 1 or graph_inputs[0].type.tensor_type.elem_type != _FLOAT:
            raise WrapError(
                f"an image classifier needs one float input, the graph has {_names(graph_inputs)}"
            )
        shape = _shape(graph_inputs[0])
        if len(shape) != 4 or 3 not in (shape[1], shape[3]):
            raise WrapError(
                f"image input {graph_inputs[0].name!r} has shape {shape}; expected [N,3,H,W] or [N,H,W,3]"
            )
        layout = "NCHW" if shape[1] == 3 else "NHWC"
        renames[graph_inputs[0].name] = IMAGE_INPUT
        inputs: tuple[TensorSpec, ...] = (TensorSpec(IMAGE_INPUT, "FP32", tuple(shape)),)
    elif task == "text-classification":
        kinds = [i.type.tensor_type.elem_type for i in graph_inputs]
        if not 1 <= len(graph_inputs) <= 2 or any(k not in _INTS for k in kinds):
            raise WrapError(
                f"a text classifier needs integer input_ids (+ attention_mask), got {_names(graph_inputs)}"
            )
        ordered = sorted(graph_inputs, key=lambda i: "mask" in i.name.lower())
        specs = []
        for node, client_name in zip(ordered, TEXT_INPUTS, strict=False):
            renames[node.name] = client_name
            shape = _shape(node)
            if len(shape) != 2:
                raise WrapError(f"text input {node.name!r} has shape {shape}; expected [batch, sequence]")
            specs.append(TensorSpec(client_name, _INTS[node.type.tensor_type.elem_type], (-1, -1)))
        inputs = tuple(specs)
    else:
        raise UnsupportedModelError(f"unsupported task {task!r}: expected image- or text-classification")
    candidates = [o for o in model.graph.output if output in (None, o.name)]
    logits = next(
        (o for o in candidates if o.type.tensor_type.elem_type == _FLOAT and len(_shape(o)) == 2), None
    )
    if logits is None:
        want = f"output {output!r}" if output else "a float [batch, classes] output"
        raise WrapError(f"the graph has no {want}; outputs: {_names(list(model.graph.output))}")
    classes = _shape(logits)[1]
    if classes not in (-1, num_labels):
        raise WrapError(f"output {logits.name!r} has {classes} classes but {num_labels} labels were given")
    renames[logits.name] = OUTPUT
    return GraphInterface(inputs, (TensorSpec(OUTPUT, "FP32", (-1, num_labels)),), renames, layout)


def rename_and_prune(model: onnx.ModelProto, interface: GraphInterface) -> onnx.ModelProto:
    """Client-facing tensor names everywhere in the graph; only the logits output kept."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    renames = dict(interface.renames)
    used = {n for node in _all_nodes(graph) for n in (*node.input, *node.output)}
    used |= {i.name for i in graph.initializer}
    for target in list(renames.values()):
        if target in used and target not in renames:  # an inner tensor already has the name
            renames[target] = f"{target}.inner"
    keep = [o for o in graph.output if o.name in interface.renames]
    del graph.output[:]
    graph.output.extend(keep)
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        value.name = renames.get(value.name, value.name)
    for node in _all_nodes(graph):
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    onnx.checker.check_model(model)
    return model


def wrap_onnx(
    onnx_path: Path,
    repository: Path,
    name: str,
    *,
    task: str,
    labels: tuple[str, ...],
    image: ImagePreprocessing | None = None,
    text: TextPreprocessing | None = None,
    tokenizer_path: Path | None = None,
    examples: Examples | None = None,
    reference: np.ndarray | None = None,
    output: str | None = None,
    settings: ExportSettings = FP32_ONLY,
    tolerance: float = validate.FP32_TOLERANCE,
    temperature: float = 1.0,
    log: Any = print,
) -> Published:
    """Checks and publishes a foreign ONNX classifier as the next version of ``name``.

    ``temperature`` divides the logits before the softmax (1.0: the graph's scores as they are).

    Raises:
        WrapError, UnsupportedModelError, ValidationError, PublishError, TokenizerError (a text
        model's tokenizer that cannot be loaded), ModelSpecError (labels, preprocessing or
        temperature out of contract, refused before any work); all ``export.errors``.
    """
    started = time.perf_counter()
    labels = check_labels(list(labels), "labels")
    finite_in(temperature, "temperature", *TEMPERATURE_RANGE)
    if image is not None:
        check_image_preprocessing(image, "image")
    model = read_graph(onnx_path)
    interface = describe_interface(model, task, len(labels), output)
    if task == "image-classification":
        if image is None:
            raise WrapError("an image classifier needs its preprocessing (--image-size, --mean, --std, ...)")
        image = replace(image, layout=interface.layout)
        fixed = _fixed_image_size(interface.inputs[0], interface.layout)
        if fixed and fixed != (image.height, image.width):
            raise WrapError(
                f"the graph takes {fixed[0]}x{fixed[1]} images but {image.height}x{image.width} was given"
            )
        h, w = image.height, image.width
        dims = (-1, 3, h, w) if interface.layout == "NCHW" else (-1, h, w, 3)
        interface = replace(interface, inputs=(TensorSpec(IMAGE_INPUT, "FP32", dims),))
    else:
        _check_text(text, tokenizer_path)
    if examples is None and set(settings.variants) - {"fp32"}:
        raise WrapError("fp16/int8 variants are checked on examples: pass --examples")
    if reference is not None and (examples is None or reference.shape != (len(examples), len(labels))):
        got = None if examples is None else (len(examples), len(labels))
        raise WrapError(
            f"reference logits have shape {list(reference.shape)}, expected {got} (one row per example)"
        )
    with staging_folder(repository, name) as tmp:
        fp32 = tmp / FILES["fp32"]
        onnx.save(rename_and_prune(model, interface), str(fp32))
        session = validate.open_session(fp32)
        validate.check_interface(session, interface.inputs, interface.outputs)
        if examples is None:
            examples = _synthetic_examples(interface, text)
        examples = _cast_to_graph(examples, interface)
        own = validate.run_batched(session, examples, 1, len(labels))
        del session
        checked_against = "reference logits" if reference is not None else "none (graph's own fp32 outputs)"
        gate = gate_variants(
            fp32,
            reference if reference is not None else own,
            examples,
            interface.inputs,
            interface.outputs,
            settings=replace(settings, fp32_tolerance=tolerance),
            calibration=None,
            task=task,
            log=log,
        )
        if tokenizer_path is not None and task == "text-classification":
            (tmp / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
        spec = build_spec(
            name,
            task=task,
            labels=labels,
            inputs=interface.inputs,
            outputs=interface.outputs,
            gate=gate,
            settings=settings,
            temperature=temperature,
            image=image,
            text=text if task == "text-classification" else None,
            source={
                "wrapped": str(onnx_path),
                "original_names": interface.renames,
                "reference": checked_against,
                "rejected_variants": gate.rejected,
                "examples": examples.source,
            },
        )
        version_dir = publish(tmp, spec)
    published = read_model_spec(version_dir)
    seconds = time.perf_counter() - started
    log(f"{name}: published version {published.version} at {version_dir} in {seconds:.1f} s")
    return Published(version_dir, published, seconds)


def _check_text(text: TextPreprocessing | None, tokenizer_path: Path | None) -> None:
    """A text model's tokenizer must load as the server loads it, and ``max_length`` must be one
    the contract (and the synthetic examples) can use."""
    if tokenizer_path is None or not tokenizer_path.is_file():
        raise WrapError(f"a text classifier needs its tokenizer.json (--tokenizer), got {tokenizer_path}")
    load_tokenizer(tokenizer_path)
    low, high = MAX_LENGTH_RANGE
    if text is None or not low <= text.max_length <= high:
        got = None if text is None else text.max_length
        raise WrapError(f"a text classifier needs a max_length in {low}..{high} (--max-length), got {got}")


def _synthetic_examples(interface: GraphInterface, text: TextPreprocessing | None) -> Examples:
    """Without examples the shape checks still run, on fixed pseudo-random inputs."""
    rng = np.random.default_rng(0)
    if interface.inputs[0].name == IMAGE_INPUT:
        shape = (9, *interface.inputs[0].shape[1:])
        pixels = rng.normal(size=shape).astype(np.float32)
        return Examples({IMAGE_INPUT: pixels}, np.full(9, -1), "synthetic inputs (no examples given)")
    length = min(16, text.max_length if text else 16)
    ids = rng.integers(0, 100, size=(9, length))
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return Examples(
        {k: v for k, v in features.items() if k in {t.name for t in interface.inputs}},
        np.full(9, -1),
        "synthetic inputs (no examples given)",
        np.full(9, length),
    )


def _cast_to_graph(examples: Examples, interface: GraphInterface) -> Examples:
    dtypes = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}
    wanted = {t.name: dtypes[t.datatype] for t in interface.inputs}
    missing = set(wanted) - set(examples.features)
    if missing:
        raise WrapError(f"examples lack the graph inputs {sorted(missing)}")
    features = {k: examples.features[k].astype(v) for k, v in wanted.items()}
    pixels = features.get(IMAGE_INPUT)
    if pixels is not None and interface.layout == "NHWC" and pixels.shape[1] == 3 and pixels.shape[3] != 3:
        # Examples are read before the graph's layout is known, in the default NCHW.
        features[IMAGE_INPUT] = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
    return Examples(features, examples.labels, examples.source, examples.lengths)


def _fixed_image_size(spec: TensorSpec, layout: str) -> tuple[int, int] | None:
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    return (h, w) if h > 0 and w > 0 else None


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def _names(values: list[Any]) -> list[str]:
    return [v.name for v in values]


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attr.g))
            nodes.extend(n for g in attr.graphs for n in _all_nodes(g))
    return nodes
