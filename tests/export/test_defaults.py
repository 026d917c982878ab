"""The default-model flow (make models): what is present is left alone; ImageNet labels are clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.contract import list_versions
from export.defaults import DEFAULT_MODELS, UnknownDefaultError, build_defaults, imagenet_labels
from tests.fixtures import publish_tiny_image_model


def test_models_already_published_are_left_alone(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    publish_tiny_image_model(repository, name="fashion")
    results = build_defaults(repository, only=["fashion"], runs_dir=tmp_path / "runs", log=lambda _: None)
    assert [(r.name, r.status) for r in results] == [("fashion", "present")]
    assert list_versions(repository / "fashion") == [1] and not (tmp_path / "runs").exists()


def test_unknown_default_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownDefaultError, match="cifar"):
        build_defaults(tmp_path, only=["cifar"])


def test_defaults_cover_the_four_models() -> None:
    assert [m.name for m in DEFAULT_MODELS] == ["fashion", "digits", "sentiment", "imagenet"]


def test_imagenet_labels_are_unique_client_names() -> None:
    labels = imagenet_labels()
    assert len(labels) == len(set(labels)) == 1000
    assert labels[285] == "Egyptian cat" and labels[967] == "espresso" and labels[281] == "tabby"
    assert labels[134] == "crane (134)" and labels[517] == "crane (517)"
