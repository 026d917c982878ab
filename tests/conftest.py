"""Shared fixtures: tiny real ONNX graphs and model repositories in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import publish_tiny_image_model, publish_tiny_text_model


@pytest.fixture
def tiny_repository(tmp_path: Path) -> Path:
    """A model repository holding ``tiny-image`` and ``tiny-text``, version 1 each."""
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    return repository
