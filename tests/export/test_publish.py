"""Atomic publishing: whole versions or nothing, integer versions counting up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest

from fineserve.export.contract import list_models, list_versions, read_model_spec
from fineserve.export.publish import PublishError, publish, staging_folder
from tests.fixtures import publish_tiny_image_model, tiny_image_graph


def _spec(tmp_path: Path):
    # fp32 only: these tests write model.onnx by hand and publish it under this spec.
    return read_model_spec(publish_tiny_image_model(tmp_path / "source", variants=("fp32",)))


def test_publish_renames_staging_to_the_next_version(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    repository = tmp_path / "models"
    for expected in (1, 2, 3):
        with staging_folder(repository, "tiny") as staging:
            assert staging.name.startswith(".tmp-") and list_versions(repository / "tiny") == list(
                range(1, expected)
            )
            onnx.save(tiny_image_graph(), staging / "model.onnx")
            final = publish(staging, dataclasses.replace(spec, name="tiny"))
        assert final == repository / "tiny" / str(expected)
        assert read_model_spec(final).version == expected
    assert list_models(repository) == ["tiny"]
    assert sorted(p.name for p in (repository / "tiny").iterdir()) == ["1", "2", "3"]


def test_a_failure_while_building_leaves_no_folder(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    with pytest.raises(RuntimeError, match="boom"), staging_folder(repository, "tiny") as staging:
        onnx.save(tiny_image_graph(), staging / "model.onnx")
        raise RuntimeError("boom")
    assert list((repository / "tiny").iterdir()) == []


def test_publish_refuses_a_spec_naming_missing_files(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    repository = tmp_path / "models"
    with (
        pytest.raises(PublishError, match=r"missing model\.onnx"),
        staging_folder(repository, "tiny") as staging,
    ):
        publish(staging, dataclasses.replace(spec, name="tiny"))
    assert list((repository / "tiny").iterdir()) == []


def test_publish_skips_a_version_taken_meanwhile(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    repository = tmp_path / "models"
    with staging_folder(repository, "tiny") as staging:
        onnx.save(tiny_image_graph(), staging / "model.onnx")
        (repository / "tiny" / "1").mkdir()  # another publisher's folder, still filling up
        (repository / "tiny" / "1" / "partial").write_text("x")
        final = publish(staging, dataclasses.replace(spec, name="tiny"))
    assert final.name == "2" and (repository / "tiny" / "1" / "partial").exists()


def test_bad_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="must match"), staging_folder(tmp_path, "Bad Name"):
        pass


def test_a_repository_that_is_a_file_is_a_publish_error(tmp_path: Path) -> None:
    (tmp_path / "models").write_text("a file where the repository should be")
    with pytest.raises(PublishError, match="cannot create"), staging_folder(tmp_path / "models", "tiny"):
        pass
