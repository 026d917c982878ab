"""Where each backbone family keeps its head and its blocks, and how it is called.

Strategies and learning-rate groups work on "blocks": the backbone cut into an ordered list,
input side first, so "the last N blocks" and "layer-wise decay" mean the same for EfficientNet
(stem, MBConv blocks, conv head) and BERT (embeddings, encoder layers, pooler).
"""

from __future__ import annotations

from torch import Tensor, nn


def is_text_model(model: nn.Module) -> bool:
    return hasattr(model, "bert")


def head(model: nn.Module) -> nn.Module:
    """The task head that ``create_model`` made fresh."""
    out = model.classifier if is_text_model(model) else model._fc
    assert isinstance(out, nn.Module)
    return out


def blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone in order from the input to the head (the head itself excluded)."""
    if is_text_model(model):
        bert = model.bert
        return [bert.embeddings, *bert.encoder.layer, bert.pooler]
    return [
        nn.ModuleList([model._conv_stem, model._bn0]),
        *model._blocks,
        nn.ModuleList([model._conv_head, model._bn1]),
    ]


def logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    if "features" in batch:  # linear probe: the trained module is the head alone
        return model(batch["features"])  # type: ignore[no-any-return]
    if "prefix" in batch:  # cache_frozen: the trained module is the top (frozen_prefix.ImageTop/TextTop)
        return model(batch["prefix"], batch.get("attention_mask"))  # type: ignore[no-any-return]
    if "input_ids" in batch:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # type: ignore[no-any-return]
    return model(batch["pixels"])  # type: ignore[no-any-return]


def features(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """What the head sees: the head's input for ``batch`` (call in eval mode)."""
    if "input_ids" in batch:
        out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.pooler_output  # type: ignore[no-any-return]
    x = model.extract_features(batch["pixels"])
    return model._avg_pooling(x).flatten(start_dim=1)  # type: ignore[no-any-return]
