"""``fineserve bench labels`` and ``fineserve bench transfer`` end to end at their smoke size: real
datasets, real training runs side by side, the files they write. Not a measurement: the figures
at this size are noise; the tests check that each reaches its runs and reports what they did."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fineserve.bench.__main__ import main as bench_main
from fineserve.bench.labels import SIZES, epochs_for
from fineserve.bench.transfer import reusable


@pytest.fixture(autouse=True)
def own_data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINESERVE_DATA_CACHE", str(tmp_path / "cache"))  # the runs' subprocesses too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_epochs_grow_as_labels_shrink_up_to_the_cap() -> None:
    assert epochs_for(4000, 32, 3, 60, 40) == 3  # 125 steps per epoch already
    assert epochs_for(400, 32, 3, 60, 40) == 5  # 13 per epoch -> ceil(60 / 13)
    assert epochs_for(40, 32, 3, 60, 40) == 30  # 2 per epoch
    assert epochs_for(10, 32, 3, 60, 40) == 40  # 1 per epoch, capped


def test_label_efficiency_smoke_trains_every_method_and_fraction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "labels"
    smoke = ["labels", "--size", "smoke", "--out", str(out), "--parallel", "2"]
    assert bench_main(smoke) == 0  # the grid: finetune, probe and random

    result = json.loads((out / "labels.json").read_text())
    size = SIZES["smoke"]
    grid = {(t, m, f) for t in ("fashion", "sentiment") for m in ("finetune", "probe", "random")
            for f in size.fractions}  # fmt: skip
    assert {(p["task"], p["method"], p["fraction"]) for p in result["points"]} == grid
    assert result["runs"] == result["finished"] == len(grid) * len(size.seeds)
    for p in result["points"]:
        accuracy = p["test_accuracy"]
        assert 0 <= accuracy["min"] <= accuracy["mean"] <= accuracy["max"] <= 1 and accuracy["n"] == 1
        assert p["labelled"] == round(p["fraction"] * 200)  # of the pool of 200
    assert set(result["gaps_points"]) == {"pretraining"}
    assert (out / "labels.png").stat().st_size > 10_000
    assert "| fashion | random |" in (out / "labels.md").read_text()

    # more methods into the same folder: only the new runs train, the finished ones are reused
    capsys.readouterr()
    assert bench_main([*smoke, "--methods", "finetune,probe,random,lpft"]) == 0
    trained = [line for line in capsys.readouterr().out.splitlines() if ": training (" in line]
    assert sorted(line.split(":")[0] for line in trained) == ["fashion-lpft-0.1-s0", "sentiment-lpft-0.1-s0"]
    again = json.loads((out / "labels.json").read_text())
    assert [p for p in again["points"] if p["method"] != "lpft"] == result["points"]
    assert again["wall_time_s"] < result["wall_time_s"]
    # each run trained on the share of labels its name says, with the recipe written for it
    run = out / "runs" / "fashion-lpft-0.1-s0"
    split = json.loads((run / "metadata.json").read_text())["split"]
    assert split["train"] == 20 and split["test"] == 40
    recipe = (out / "recipes" / "fashion-lpft-0.1-s0.yaml").read_text()
    assert "head_warmup_epochs: 1" in recipe and "train_fraction: 0.1" in recipe
    assert set(again["gaps_points"]) == {"pretraining", "head_warmup"}
    assert all(math.isfinite(v) for gaps in again["gaps_points"].values() for v in gaps.values())
    # another size into the same folder is refused before anything trains, not mixed in
    capsys.readouterr()
    assert bench_main(["labels", "--size", "cpu", "--tasks", "fashion", "--out", str(out)]) == 2
    err = capsys.readouterr().err  # the first key (by name) that differs; image_size does too
    assert "fashion-finetune-0.1-s0 was trained with eval_every_epochs=1, not 3; use another --out" in err


def test_a_ranking_is_reused_only_for_every_candidate_and_the_same_sample_count() -> None:
    row = {"logme": 0.1, "leep": None, "probe_accuracy": 0.5, "seconds": 1.0, "examples": 2000}
    kept = {"a": row, "b": row}
    assert reusable(kept, ("a", "b"), 2000)
    assert not reusable(kept, ("a", "b", "c"), 2000)  # a candidate never scored
    assert not reusable(kept, ("a",), 1400)  # scored on another size's sample
    assert not reusable({"a": {k: v for k, v in row.items() if k != "examples"}}, ("a",), 2000)


def test_transfer_smoke_ranks_fine_tunes_and_correlates(tmp_path: Path) -> None:
    out = tmp_path / "transfer"
    args = ["transfer", "--size", "smoke", "--datasets", "fashion-mnist,rotten-tomatoes", "--out", str(out)]
    assert bench_main([*args, "--parallel", "2"]) == 0

    record = json.loads((out / "transfer.json").read_text())
    assert set(record["results"]) == {"fashion-mnist", "rotten-tomatoes"}
    for dataset, result in record["results"].items():
        rows = result["candidates"]
        assert len(rows) == 3
        for spec, row in rows.items():
            assert 0 <= row["test_accuracy"] <= 1 and row["finetune_seconds"] > 0
            assert math.isfinite(row["logme"]) and 0 <= row["probe_accuracy"] <= 1
            assert (row["leep"] is None) == ("+random" in spec or dataset == "rotten-tomatoes")
        leep_candidates = 2 if dataset == "fashion-mnist" else 0  # the pretrained images only
        assert {score: tau["candidates"] for score, tau in result["tau"].items()} == {
            "logme": 3, "leep": leep_candidates, "probe_accuracy": 3
        }  # fmt: skip
        for tau in result["tau"].values():
            assert tau["tau"] is None or -1 <= tau["tau"] <= 1
    # each candidate was fine-tuned as named: a random-init Lite0 at 32 px
    meta = json.loads(
        (out / "runs" / "fashion-mnist-efficientnet-lite0-random-32" / "metadata.json").read_text()
    )
    assert meta["config"]["pretrained"] is False and meta["model_args"] == {"image_size": 32}
    assert "Kendall's tau" in (out / "transfer.md").read_text()


def test_unknown_task_or_dataset_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert bench_main(["labels", "--tasks", "cifar", "--out", str(tmp_path)]) == 2
    assert bench_main(["transfer", "--datasets", "imagenet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
