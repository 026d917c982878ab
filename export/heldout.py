"""Held-out examples of a training run, rebuilt from the split its checkpoint recorded.

The run's ``metadata.json`` keeps the training config (dataset, seed, split sizes) and a digest of
the split's indices; rebuilding with ``training.data`` gives the same test examples the run was
scored on, and the digest proves it. Validation examples serve as int8 calibration data, so the
gate never calibrates on what it then measures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from fineserve.export.contract import ImagePreprocessing
from fineserve.export.examples import Examples, ExamplesError, image_examples
from fineserve.training.checkpoint import CheckpointMetadata


def examples_from_run(
    meta: CheckpointMetadata, run_dir: Path, *, limit: int, calibration_limit: int = 64
) -> tuple[Examples, Examples]:
    """(test examples, calibration examples) of the run, at most ``limit`` test examples.

    Raises:
        ExamplesError: the dataset or the recorded config cannot be rebuilt here, or the split
            differs from the recorded one (pass ``--examples`` instead).
    """
    try:
        from fineserve.training.config import TrainConfig, build_config
        from fineserve.training.data import check_labels, image_encoder, make_splits, text_encoder
        from fineserve.training.datasets import default_cache_dir, load_dataset

        # Only the keys this version of training knows: run-control keys added later (plots,
        # progress, ...) do not change the split, and the digest below proves the split.
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = build_config({k: v for k, v in meta.config.items() if k in known})
        raw = load_dataset(
            cfg.dataset,
            data_path=cfg.data_path,
            cache=default_cache_dir(),
            text_column=cfg.text_column,
            label_column=cfg.label_column,
        )
        raw = check_labels(raw, list(meta.labels))
        if meta.task == "image-classification":
            encode = image_encoder
        else:
            encode = text_encoder(run_dir / "tokenizer.json", int(meta.preprocessing["text"]["max_length"]))
        splits = make_splits(raw, cfg, encode)
    except Exception as err:  # any failure here means: this run's data is not rebuildable here
        raise ExamplesError(
            f"cannot rebuild the held-out split of {run_dir} ({type(err).__name__}: {err}); "
            "pass --examples".splitlines()[0]
        ) from err
    recorded = meta.split.get("indices_sha256")
    if recorded is not None and recorded != splits.record.get("indices_sha256"):
        raise ExamplesError(f"{run_dir}: the rebuilt split differs from the recorded one; pass --examples")
    source = f"test split of {cfg.dataset} (seed {cfg.seed}, split {recorded or 'unrecorded'})"
    test = _convert(splits.test.inputs, splits.test.labels.numpy(), meta, source, limit)
    calibration = _convert(
        splits.val.inputs, splits.val.labels.numpy(), meta, f"val split of {cfg.dataset}", calibration_limit
    )
    return test, calibration


def _convert(inputs: dict, labels: np.ndarray, meta: CheckpointMetadata, source: str, limit: int) -> Examples:
    labels = labels[:limit].astype(np.int64)
    if meta.task == "image-classification":
        # uint8 [N, C, H, W] -> the server's own preprocessing, so the gate sees what clients send.
        pixels = inputs["pixels"][:limit].numpy()
        mode = "L" if pixels.shape[1] == 1 else "RGB"
        images = [Image.fromarray(p[0] if mode == "L" else p.transpose(1, 2, 0), mode) for p in pixels]
        prep = ImagePreprocessing(**_image_fields(meta.preprocessing["image"]))
        return image_examples(images, labels.tolist(), prep, source)
    mask = inputs["attention_mask"][:limit].numpy().astype(np.int64)
    lengths = mask.sum(axis=1)
    longest = int(lengths.max())
    ids = inputs["input_ids"][:limit].numpy().astype(np.int64)[:, :longest]
    return Examples({"input_ids": ids, "attention_mask": mask[:, :longest]}, labels, source, lengths)


def _image_fields(d: dict) -> dict:
    fields = dict(d)
    for key in ("mean", "std"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return fields
