"""The linear probe's cached features: computed once per (backbone, data, split), then read back."""

from __future__ import annotations

from pathlib import Path

import torch

from fineserve.training.backbones import backbone_config, create_model
from fineserve.training.data import ImagePipeline, PrepareBatch, image_encoder, make_splits
from fineserve.training.datasets import sklearn_digits
from fineserve.training.features import cached_features
from fineserve.training.loop import Step
from tests.training.conftest import tiny_image_config


def test_features_are_cached_by_what_determines_them(tmp_path: Path) -> None:
    cfg = tiny_image_config(tmp_path)
    backbone = backbone_config(cfg.backbone)
    model = create_model(cfg.backbone, 10, pretrained=False, image_size=32)
    prepare = PrepareBatch(torch.device("cpu"), ImagePipeline(32, backbone.mean, backbone.std))
    step = Step(prepare, lambda logits, batch: logits.sum(), torch.device("cpu"))
    splits = make_splits(sklearn_digits(), cfg, image_encoder)
    cache = tmp_path / "cache"

    first = cached_features(model, splits, step, cfg, cache=cache, show=False)
    [stored] = (cache / "features").iterdir()
    assert [len(part) for part in first] == [64, 32, 32]
    assert first[0].inputs["features"].shape == (64, model._fc.in_features)
    assert torch.equal(first[0].labels, splits.train.labels)

    torch.nn.init.zeros_(model._conv_stem.weight)  # would change the features: these come from the cache
    again = cached_features(model, splits, step, cfg, cache=cache, show=False)
    assert all(
        torch.equal(a.inputs["features"], b.inputs["features"]) for a, b in zip(first, again, strict=True)
    )
    assert list((cache / "features").iterdir()) == [stored]

    other = make_splits(sklearn_digits(), tiny_image_config(tmp_path, seed=1), image_encoder)
    cached_features(model, other, step, tiny_image_config(tmp_path, seed=1), cache=cache, show=False)
    assert len(list((cache / "features").iterdir())) == 2  # another split: another entry
