"""Shared fixtures: tiny real ONNX graphs and model repositories in tmp_path; logging restored."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import (
    MakeObject,
    publish_tiny_models,
    shared_memory_objects,
)


@pytest.fixture
def tiny_repository(tmp_path: Path) -> Path:
    """A model repository holding ``tiny-image`` and ``tiny-text``, version 1 each."""
    return publish_tiny_models(tmp_path / "models")


@pytest.fixture
def shm_objects() -> Iterator[MakeObject]:
    """Makes real POSIX shared-memory objects (key, bytes); unlinked after the test."""
    with shared_memory_objects() as make:
        yield make


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """For a test that runs the server's logging setup (``configure_logging``, the serve command
    in-process): the root handlers and the levels are put back afterwards, so later tests do not
    log into a stream that is gone."""
    root, ours = logging.getLogger(), logging.getLogger("fineserve.server")
    saved = (root.handlers[:], root.level, ours.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])
