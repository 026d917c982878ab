"""The default-model flow (make models): what is present is left alone; ImageNet labels are clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from fineserve.export.contract import list_versions
from fineserve.export.defaults import (
    DEFAULT_MODELS,
    UnknownDefaultError,
    build_defaults,
    imagenet_labels,
    train,
    train_runs,
)
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


def _run_folder(run_dir: Path, **metadata: object) -> Path:
    import json

    run_dir.mkdir(parents=True)
    (run_dir / "best.pt").write_bytes(b"weights")
    meta = {"backbone": "efficientnet-lite0", "task": "image-classification", "labels": ["a", "b"]}
    (run_dir / "metadata.json").write_text(json.dumps({**meta, "preprocessing": {}, **metadata}))
    return run_dir


def test_an_unfinished_run_is_trained_again_not_reused(tmp_path: Path) -> None:
    from fineserve.training.checkpoint import read_metadata, run_finished

    # best.pt and metadata.json of the first improved epoch, then Ctrl-C.
    run = _run_folder(tmp_path / "fashion", finished=False)
    lines: list[str] = []
    assert train(_tiny_recipe(tmp_path / "tiny.yaml"), run, log=lines.append) > 0
    assert any("holds an unfinished run; training again" in line for line in lines)
    assert run_finished(read_metadata(run))


@pytest.mark.parametrize(
    "metadata",
    [{"finished": True}, {"metrics": {"test_accuracy": 0.9}}],
    ids=["finished", "legacy-with-test-metrics"],
)
def test_a_finished_run_is_reused(tmp_path: Path, metadata: dict[str, object]) -> None:
    run = _run_folder(tmp_path / "fashion", **metadata)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    # The real recipe: were it trained, this would take minutes and rewrite the folder.
    assert train("fashion", run, log=lambda _: None) == 0.0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


def _tiny_recipe(path: Path, **changes: object) -> str:
    import yaml

    from tests.training.conftest import TINY_IMAGE

    values = {**TINY_IMAGE, "epochs": 1, "log_every": 1, "data_cache": str(path.parent / "cache"), **changes}
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_missing_runs_train_side_by_side_each_line_named(tmp_path: Path) -> None:
    from fineserve.training.checkpoint import read_metadata, run_finished

    first, second = _tiny_recipe(tmp_path / "one.yaml"), _tiny_recipe(tmp_path / "two.yaml", seed=1)
    lines: list[str] = []
    trained = train_runs([(first, tmp_path / "a"), (second, tmp_path / "b")], parallel=2, log=lines.append)
    assert not trained.failed and set(trained.seconds) == {first, second}
    assert all(s > 0 for s in trained.seconds.values())
    assert all(run_finished(read_metadata(tmp_path / run)) for run in ("a", "b"))
    for recipe in (first, second):  # the periodic lines of each run, under its name
        assert any(line.startswith(f"[{Path(recipe).stem}] epoch 1/1 step") for line in lines), lines
    again = train_runs([(first, tmp_path / "a")], parallel=2, log=lines.append)
    assert again.seconds == {first: 0.0} and not again.failed


def test_a_failed_training_is_named_and_the_others_finish(tmp_path: Path) -> None:
    from fineserve.export.errors import TrainingFailedError
    from fineserve.training.checkpoint import read_metadata, run_finished

    good, broken = _tiny_recipe(tmp_path / "good.yaml"), _tiny_recipe(tmp_path / "bad.yaml", lr=-1)
    lines: list[str] = []
    trained = train_runs([(broken, tmp_path / "x"), (good, tmp_path / "g")], parallel=2, log=lines.append)
    assert trained.failed == {broken: 2} and set(trained.seconds) == {good}
    assert run_finished(read_metadata(tmp_path / "g"))
    assert any(line.startswith(f"[{Path(broken).stem}] error: lr") for line in lines), lines
    with pytest.raises(TrainingFailedError, match=r"bad\.yaml"):
        trained.raise_failures()


def test_each_default_is_published_as_its_training_ends_and_a_failure_spares_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_defaults end to end on tiny recipes: two train side by side, each is exported as it
    ends (the quicker one is published while the other still trains), the failed one is named."""
    import fineserve.export.defaults
    from fineserve.export.defaults import DefaultModel
    from fineserve.export.errors import TrainingFailedError

    quick = _tiny_recipe(tmp_path / "quick.yaml", train_samples=32)
    slow = _tiny_recipe(tmp_path / "slow.yaml", epochs=25, log_every=0)
    broken = _tiny_recipe(tmp_path / "broken.yaml", lr=-1)
    models = (
        DefaultModel("slow", slow, ("fp32",), "tiny, 25 epochs", train_s=2),
        DefaultModel("quick", quick, ("fp32",), "tiny, 1 epoch", train_s=1),
        DefaultModel("broken", broken, ("fp32",), "refused recipe", train_s=0),
    )
    monkeypatch.setattr(fineserve.export.defaults, "DEFAULT_MODELS", models)
    repository, lines = tmp_path / "models", []
    with pytest.raises(TrainingFailedError, match=r"broken\.yaml"):
        build_defaults(repository, runs_dir=tmp_path / "runs", parallel=2, log=lines.append, max_examples=16)
    assert list_versions(repository / "quick") == [1] and list_versions(repository / "slow") == [1]
    assert not (repository / "broken").exists()
    published = lines.index(next(line for line in lines if line.startswith("quick: published version 1")))
    assert any(line.startswith(f"[{Path(slow).stem}] test accuracy") for line in lines[published:]), (
        lines
    )  # still training
    again: list[str] = []
    monkeypatch.setattr(fineserve.export.defaults, "DEFAULT_MODELS", models[:2])
    results = build_defaults(repository, runs_dir=tmp_path / "runs", parallel=2, log=again.append)
    assert [(r.name, r.status) for r in results] == [("slow", "present"), ("quick", "present")]
