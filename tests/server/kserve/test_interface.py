"""A model's KServe face (``server/kserve/interface.py``)."""

from __future__ import annotations

from fineserve.export.contract import ModelSpec
from fineserve.server.kserve.interface import interface_of


def test_interface_has_both_input_forms_and_probabilities(specs: dict[str, ModelSpec]) -> None:
    image = interface_of(specs["image"])
    assert [t.name for t in image.tensor_inputs] == ["pixel_values"]
    assert (image.encoded_input.name, image.encoded_input.datatype) == ("images", "BYTES")
    assert image.output_names == ("logits", "probabilities")
    assert image.max_batch_size == 8
    assert interface_of(specs["image"], max_batch_size=4).max_batch_size == 4
    assert interface_of(specs["image"], max_batch_size=64).max_batch_size == 8
    text = interface_of(specs["text"])
    assert text.encoded_input.name == "texts"
    assert [t.name for t in text.tensor_inputs] == ["input_ids", "attention_mask"]
