"""Seeded splits, the tensors a run trains on, and the per-batch image pipeline.

Everything is held in memory as tensors and batched by index: no DataLoader worker processes,
a batch order that is a pure function of (seed, epoch) so a resumed run sees the same batches,
and data-parallel shards that are simple slices of that order. ``PrepareBatch`` moves a batch
to the device and through the image pipeline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional

from fineserve.training.config import TrainConfig
from fineserve.training.datasets import RawData
from fineserve.training.errors import DatasetError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass
class Examples:
    """One split: named input tensors (first axis = example) and integer labels."""

    inputs: dict[str, Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        out = {k: v[index] for k, v in self.inputs.items()}
        if "attention_mask" in out:  # pad only to the longest text of this batch
            longest = max(1, int(out["attention_mask"].sum(dim=1).max()))
            out = {k: v[:, :longest] for k, v in out.items()}
        out["labels"] = self.labels[index]
        return out


@dataclass
class Splits:
    names: list[str]
    train: Examples
    val: Examples
    test: Examples
    record: dict[str, Any] = field(default_factory=dict)


def check_labels(raw: RawData, expected: list[str] | None) -> RawData:
    """Reorders the data's classes to the recipe's ``labels``; a different set is an error."""
    if expected is None:
        return raw
    if set(expected) != set(raw.names):
        missing = sorted(set(expected) - set(raw.names))
        extra = sorted(set(raw.names) - set(expected))
        raise DatasetError(
            f"label mismatch: recipe labels {expected} vs data labels {raw.names} "
            f"(missing in data: {missing}, not in recipe: {extra})"
        )
    mapping = torch.tensor([expected.index(n) for n in raw.names])
    test = check_labels(raw.test, expected) if raw.test is not None else None
    return RawData(list(expected), mapping[raw.labels], raw.images, raw.texts, test, raw.source)


def make_splits(raw: RawData, cfg: TrainConfig, encode: Any) -> Splits:
    """Seeded train/val/test index split (official test split kept where there is one), subsets
    capped by ``train_samples``/``val_samples``/``test_samples`` (then ``train_fraction`` of the
    training examples); ``encode`` turns a RawData part plus indices into ``Examples``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(raw), generator=gen)
    n_val = max(1, round(cfg.val_fraction * len(raw)))
    if raw.test is not None:
        val_idx, train_idx = order[:n_val], order[n_val:]
        test_source, test_idx = raw.test, torch.randperm(len(raw.test), generator=gen)
    else:
        n_test = max(1, round(cfg.test_fraction * len(raw)))
        test_source, test_idx = raw, order[:n_test]
        val_idx, train_idx = order[n_test : n_test + n_val], order[n_test + n_val :]
    train_idx = train_idx[: cfg.train_samples]
    if cfg.train_fraction is not None:  # a prefix of the same seeded order: draws nest
        kept = round(cfg.train_fraction * len(train_idx))
        if kept < 2:
            raise DatasetError(
                f"train_fraction {cfg.train_fraction} of {len(train_idx)} training examples leaves {kept}; "
                "training needs at least 2"
            )
        train_idx = train_idx[:kept]
    val_idx = val_idx[: cfg.val_samples]
    test_idx = test_idx[: cfg.test_samples]
    if len(train_idx) < 2 or len(val_idx) < 1 or len(test_idx) < 1:
        raise DatasetError(f"dataset {cfg.dataset!r} is too small to split ({len(raw)} examples)")
    record = {
        "seed": cfg.seed,
        "source": raw.source,
        "official_test_split": raw.test is not None,
        "train": len(train_idx),
        "val": len(val_idx),
        "test": len(test_idx),
        "indices_sha256": _digest(train_idx, val_idx, test_idx),
    }
    return Splits(
        raw.names,
        encode(raw, train_idx),
        encode(raw, val_idx),
        encode(test_source, test_idx),
        record,
    )


def _digest(*parts: Tensor) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def image_encoder(raw: RawData, index: Tensor) -> Examples:
    assert raw.images is not None
    return Examples({"pixels": raw.images[index]}, raw.labels[index])


def text_encoder(tokenizer_path: Path, max_length: int) -> Any:
    """Tokenizes with the same ``tokenizer.json`` and truncation the server will use."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    pad_id = pad_token_id(tokenizer)

    def encode(raw: RawData, index: Tensor) -> Examples:
        assert raw.texts is not None
        encoded = tokenizer.encode_batch([raw.texts[int(i)] for i in index])
        ids = torch.full((len(encoded), max_length), pad_id, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, enc in enumerate(encoded):
            ids[row, : len(enc.ids)] = torch.tensor(enc.ids)
            mask[row, : len(enc.ids)] = 1
        return Examples({"input_ids": ids, "attention_mask": mask}, raw.labels[index])

    return encode


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's own padding id (``[PAD]`` or ``<pad>``), 0 if it has neither: the id the
    server pads batches with (``server.preprocess``), so training sees the same padded inputs."""
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> Tensor:
    """This process's example order for ``epoch``: the same on every resume, disjoint per rank
    (each rank gets an equal share so data-parallel steps stay in lockstep)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    per_rank = n // world
    return order[rank * per_rank : (rank + 1) * per_rank]


@dataclass(frozen=True)
class ImagePipeline:
    """uint8 [N, C, H, W] -> normalised float [N, 3, size, size], on the batch's device.

    Matches the server's preprocessing with ``crop_fraction = 1``: grey is repeated to RGB,
    the square image is resized (bilinear, antialiased) to ``size``, scaled to [0, 1] and
    normalised. Augmentation (pad + random crop, horizontal flip) happens at source resolution.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool = False
    crop_padding: int = 0

    def __call__(self, images: Tensor, *, train: bool, size: int | None = None) -> Tensor:
        x = images.float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if train:
            x = self._augment(x)
        target = size or self.size
        if x.shape[-2:] != (target, target):
            x = functional.interpolate(
                x, size=(target, target), mode="bilinear", align_corners=False, antialias=True
            )
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _augment(self, x: Tensor) -> Tensor:
        if self.crop_padding > 0:
            pad = self.crop_padding
            padded = functional.pad(x, (pad, pad, pad, pad))
            h, w = x.shape[-2:]
            offsets = torch.randint(0, 2 * pad + 1, (len(x), 2))
            x = torch.stack(
                [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
            )
        if self.hflip:
            flip = torch.rand(len(x)) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
        return x


@dataclass(frozen=True)
class PrepareBatch:
    """A raw batch -> model inputs on the device; images go through the pipeline, and for a
    teacher that takes another size, once more at its size (``teacher_pixels``)."""

    device: torch.device
    pipeline: ImagePipeline
    teacher_size: int | None = None  # None: no teacher

    def __call__(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if "pixels" in out:
            raw_pixels = out["pixels"]
            out["pixels"] = self.pipeline(raw_pixels, train=train)
            if self.teacher_size is not None:
                out["teacher_pixels"] = (
                    out["pixels"]
                    if self.teacher_size == self.pipeline.size
                    else self.pipeline(raw_pixels, train=False, size=self.teacher_size)
                )
        return out
