"""The linear probe's inputs: the frozen backbone's features for each split, computed once.

The backbone does not train under ``linear-probe``, so what it computes for an example is the same
every epoch: the features are cached on disk, keyed by everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fineserve.training import layers
from fineserve.training.checkpoint import write_atomically
from fineserve.training.config import TrainConfig
from fineserve.training.data import Examples, Splits
from fineserve.training.loop import Step


def cached_features(
    model: nn.Module, splits: Splits, step: Step, cfg: TrainConfig, *, cache: Path, show: bool
) -> tuple[Examples, Examples, Examples]:
    """Head inputs of the frozen backbone for each split, cached on disk by what determines them."""
    path = cache / "features" / f"{cache_key(cfg, splits)}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        parts = [stored[name] for name in ("train", "val", "test")]
    else:
        parts = [
            frozen_features(model, data, step, cfg.eval_batch_size, show=show, desc=f"features {name}")
            for name, data in (("train", splits.train), ("val", splits.val), ("test", splits.test))
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        features = dict(zip(("train", "val", "test"), parts, strict=True))
        write_atomically(path, lambda tmp: torch.save(features, tmp))
    return tuple(  # type: ignore[return-value]
        Examples({"features": feats}, data.labels)
        for feats, data in zip(parts, (splits.train, splits.val, splits.test), strict=True)
    )


def cache_key(cfg: TrainConfig, splits: Splits, **extra: Any) -> str:
    """A file name for what a frozen network computes on ``splits``: the recipe keys and the split
    that change it, and the caller's own ``extra`` (JSON-able) on top."""
    source = {
        "backbone": cfg.backbone,
        "pretrained": cfg.pretrained,
        "dataset": cfg.dataset,
        "data_path": cfg.data_path,
        "split": splits.record,
        "image_size": cfg.image_size,
        "max_length": cfg.max_length,
        "num_layers": cfg.num_layers,
        "labels": splits.names,
        **extra,
    }
    return hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()[:20]


def frozen_features(
    model: nn.Module, data: Examples, step: Step, batch_size: int, *, show: bool, desc: str
) -> torch.Tensor:
    """What the head sees for each example of ``data`` (float32 [N, D] on the CPU), with the
    model in eval mode and no gradients; a tqdm bar named ``desc`` when ``show``."""
    model.eval()
    outputs = []
    chunks = list(torch.arange(len(data)).split(batch_size))
    for index in tqdm(chunks, desc=desc, disable=not show, leave=False):
        with torch.no_grad(), step.autocast():
            prepared = step.prepare(data.batch(index), False)
            outputs.append(layers.features(model, prepared).float().cpu())
    return torch.cat(outputs)
