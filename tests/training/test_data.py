"""Seeded splits and label checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from fineserve.training.data import check_labels, image_encoder, make_splits
from fineserve.training.datasets import sklearn_digits
from fineserve.training.errors import ConfigError, DatasetError
from tests.training.conftest import tiny_image_config


def test_splits_are_seeded_disjoint_and_recorded(tmp_path: Path) -> None:
    raw = sklearn_digits()
    cfg = tiny_image_config(tmp_path, train_samples=None, val_samples=None, test_samples=None)
    a, b = make_splits(raw, cfg, image_encoder), make_splits(raw, cfg, image_encoder)
    assert a.record == b.record and a.record["train"] + a.record["val"] + a.record["test"] == len(raw)
    other = make_splits(raw, tiny_image_config(tmp_path, seed=1), image_encoder)
    assert other.record["indices_sha256"] != a.record["indices_sha256"]
    # no image is in two splits (digits has a few exact duplicates, so compare by content count)
    flat = lambda e: {bytes(x.numpy()) for x in e.inputs["pixels"]}  # noqa: E731
    assert len(flat(a.train) & flat(a.test)) < 5


def test_labels_are_reordered_to_the_recipe_or_rejected() -> None:
    raw = sklearn_digits()
    order = [str(i) for i in reversed(range(10))]
    remapped = check_labels(raw, order)
    assert remapped.names == order
    assert int(remapped.labels[0]) == 9 - int(raw.labels[0])
    with pytest.raises(DatasetError, match="label mismatch"):
        check_labels(raw, ["0", "1"])


def test_train_fraction_draws_nest_and_leave_val_and_test_alone(tmp_path: Path) -> None:
    raw = sklearn_digits()
    by_index = lambda _raw, index: index  # noqa: E731  (the indices themselves, not tensors)
    splits = {
        f: make_splits(raw, tiny_image_config(tmp_path, train_samples=400, train_fraction=f), by_index)
        for f in (0.05, 0.25, 1.0)
    }
    small, medium, whole = (splits[f] for f in (0.05, 0.25, 1.0))
    assert (len(small.train), len(medium.train), len(whole.train)) == (20, 100, 400)
    assert set(small.train.tolist()) <= set(medium.train.tolist()) <= set(whole.train.tolist())
    for split in splits.values():
        assert split.val.tolist() == whole.val.tolist() and split.test.tolist() == whole.test.tolist()
    with pytest.raises(DatasetError, match="leaves 1; training needs at least 2"):
        make_splits(raw, tiny_image_config(tmp_path, train_samples=40, train_fraction=0.03), by_index)
    for bad in (1.5, 0.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="train_fraction: must"):
            tiny_image_config(tmp_path, train_fraction=bad)
