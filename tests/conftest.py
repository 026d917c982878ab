"""Shared fixtures: tiny real ONNX graphs and model repositories in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import (
    MakeObject,
    publish_tiny_image_model,
    publish_tiny_text_model,
    shared_memory_objects,
)


@pytest.fixture
def tiny_repository(tmp_path: Path) -> Path:
    """A model repository holding ``tiny-image`` and ``tiny-text``, version 1 each."""
    repository = tmp_path / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    return repository


@pytest.fixture
def shm_objects() -> Iterator[MakeObject]:
    """Makes real POSIX shared-memory objects (key, bytes); unlinked after the test."""
    with shared_memory_objects() as make:
        yield make
