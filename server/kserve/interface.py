"""How a model looks through KServe: under its own name it takes EITHER its graph's ready tensors
(e.g. ``pixel_values``, or ``input_ids`` + ``attention_mask``) OR one BYTES input (``images``:
encoded JPEG/PNG/WebP files; ``texts``: UTF-8 texts) that the server preprocesses. It returns its
graph outputs (``logits``) and ``probabilities`` (softmax of logits / calibrated temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

from fineserve.export.contract import ModelSpec, TensorSpec
from fineserve.server.datatypes import BYTES

PROBABILITIES = "probabilities"
# The BYTES input per task: one element per encoded image or per text.
ENCODED_INPUT_NAMES = {"image-classification": "images", "text-classification": "texts"}


@dataclass(frozen=True)
class ModelInterface:
    """What a model takes and returns through KServe; shapes include the batch axis (-1)."""

    tensor_inputs: tuple[TensorSpec, ...]
    encoded_input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def describe_inputs(self) -> str:
        tensors = ", ".join(repr(t.name) for t in self.tensor_inputs)
        return f"either {self.encoded_input.name!r} (BYTES) or the tensors {tensors}"


def interface_of(spec: ModelSpec, max_batch_size: int | None = None) -> ModelInterface:
    """The model's KServe face; ``max_batch_size`` (the server's cap) applies if below the model's."""
    logits = spec.outputs[0]
    return ModelInterface(
        tensor_inputs=spec.inputs,
        encoded_input=TensorSpec(ENCODED_INPUT_NAMES[spec.task], BYTES, (-1,)),
        outputs=(*spec.outputs, TensorSpec(PROBABILITIES, "FP32", logits.shape)),
        max_batch_size=min(spec.max_batch_size, max_batch_size or spec.max_batch_size),
    )
