"""Fixtures of the tests of ``server/kserve/``: the tiny models' specs, a shared memory registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fineserve.export.contract import ModelSpec, read_model_spec
from fineserve.server.shared_memory import SharedMemoryRegistry
from tests.fixtures import publish_tiny_image_model, publish_tiny_text_model


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    repository = tmp_path_factory.mktemp("kserve") / "models"
    return {
        "image": read_model_spec(publish_tiny_image_model(repository)),
        "text": read_model_spec(publish_tiny_text_model(repository)),
    }


@pytest.fixture
def registry() -> Iterator[SharedMemoryRegistry]:
    regions = SharedMemoryRegistry(enabled=True)
    yield regions
    regions.close()
