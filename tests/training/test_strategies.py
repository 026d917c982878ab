"""Each strategy trains a few steps on a tiny subset: the loss falls, frozen weights stay put,
and the run folder is what export reads (load_checkpoint reproduces the test accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fineserve.training import layers
from fineserve.training.backbones import create_model
from fineserve.training.checkpoint import load_checkpoint
from fineserve.training.data import ImagePipeline
from fineserve.training.datasets import sklearn_digits
from fineserve.training.errors import ConfigError
from fineserve.training.run import train
from tests.training.conftest import losses, tiny_image_config, tiny_text_config


def frozen_state(model: torch.nn.Module, trainable_blocks: int) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running statistics too) of the blocks that must not change."""
    blocks = layers.blocks(model)
    frozen = blocks[: len(blocks) - trainable_blocks]
    ids = {id(t) for block in frozen for t in [*block.parameters(), *block.buffers()]}
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


@pytest.mark.parametrize(
    ("strategy", "changes", "frozen_blocks_from_top"),
    [
        ("linear-probe", {"head_lr": 2e-2, "epochs": 3}, 0),
        ("partial", {"trainable_blocks": 2}, 2),
        ("full", {"layer_decay": 0.8}, None),
        ("gradual", {"unfreeze_every": 1, "head_lr": 1e-2}, 1),
    ],
)
def test_image_strategy_loss_falls_and_frozen_weights_stay(
    tmp_path: Path, strategy: str, changes: dict, frozen_blocks_from_top: int | None
) -> None:
    # plots on for one strategy: the PNGs are part of the run folder
    cfg = tiny_image_config(tmp_path, strategy=strategy, plots=strategy == "partial", **changes)
    run = tmp_path / "run"
    metrics = train(cfg, run).metrics

    history = losses(run)
    assert history[-1] < history[0], history
    model, meta = load_checkpoint(run)
    if frozen_blocks_from_top is not None:
        pretrained = create_model("efficientnet-lite0", 10, image_size=32)
        # gradual: 2 epochs unfreeze 0 then 1 block, so only the top block may have changed
        expected = frozen_state(pretrained, frozen_blocks_from_top)
        got = model.state_dict()
        assert expected
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{strategy}: frozen {key} changed"
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert meta.split["test"] == 32 and meta.task == "image-classification"
    assert meta.preprocessing["image"]["height"] == 32 and meta.model_args == {"image_size": 32}
    assert meta.temperature > 0 and "test_ece_after" in meta.calibration
    files = {p.name for p in run.iterdir()}
    assert {"args.yaml", "best.pt", "metadata.json", "metrics.jsonl", "last.pt"} <= files
    if cfg.plots:
        assert {"learning_curves.png", "confusion_matrix.png"} <= files


def test_loaded_checkpoint_reproduces_test_accuracy(partial_run: tuple[Path, dict]) -> None:
    run, metrics = partial_run
    model, meta = load_checkpoint(run)
    raw = sklearn_digits()
    # Rebuild the test split the way the run recorded it (seeded permutation).
    order = torch.randperm(len(raw), generator=torch.Generator().manual_seed(meta.seed))
    test_idx = order[: meta.split["test"]]
    pre = meta.preprocessing["image"]
    pipeline = ImagePipeline(pre["height"], tuple(pre["mean"]), tuple(pre["std"]))
    with torch.no_grad():
        predicted = model(pipeline(raw.images[test_idx], train=False)).argmax(1)
    accuracy = float((predicted == raw.labels[test_idx]).float().mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert json.loads((run / "metadata.json").read_text())["labels"] == [str(i) for i in range(10)]


def test_text_partial_loss_falls_and_tokenizer_travels(tmp_path: Path, text_file: Path) -> None:
    cfg = tiny_text_config(tmp_path, text_file, strategy="partial", trainable_blocks=2)
    run = tmp_path / "run"
    train(cfg, run)
    history = losses(run)
    assert history[-1] < history[0], history
    model, meta = load_checkpoint(run)
    assert meta.task == "text-classification" and meta.labels == ["neg", "pos"]
    assert meta.preprocessing == {"text": {"tokenizer_file": "tokenizer.json", "max_length": 16}}
    assert meta.model_args == {"num_layers": 2}
    assert (run / "tokenizer.json").is_file()
    assert len(model.bert.encoder.layer) == 2


@pytest.mark.parametrize(
    ("changes", "blocks_after"),
    [
        ({"strategy": "full"}, None),
        # the top blocks train on cached outputs of the frozen rest: they too wait for the head
        ({"strategy": "partial", "trainable_blocks": 2, "cache_frozen": True}, 2),
    ],
)
def test_head_warmup_trains_only_the_head_first_then_the_blocks(
    tmp_path: Path, changes: dict, blocks_after: int | None
) -> None:
    """LP-FT: after the head-only epoch the optimiser has stepped only the head's parameters and
    the blocks (weights and BatchNorm statistics) are the pretrained ones; after the next epoch
    the blocks the strategy trains (all, or the top ``blocks_after``) have moved too."""
    cfg = tiny_image_config(tmp_path, epochs=2, head_warmup_epochs=1, head_lr=1e-2, **changes)
    run = tmp_path / "run"
    after_epoch: dict[int, dict] = {}

    def snapshot(record: dict) -> None:  # last.pt holds the state each epoch ended with
        after_epoch[record["epoch"]] = torch.load(run / "last.pt", weights_only=True)

    train(cfg, run, on_epoch=snapshot)

    def stepped_groups(state: dict) -> set[str]:
        """The parameter groups that have AdamW state, i.e. got a gradient at some step."""
        groups = state["optimizer"]["param_groups"]
        return {
            g["name"].split(".")[0]
            for g in groups
            if any(i in state["optimizer"]["state"] for i in g["params"])
        }

    assert sorted(after_epoch) == [1, 2]
    first, second = after_epoch[1], after_epoch[2]
    assert stepped_groups(first) == {"head"}
    num_blocks = len(layers.blocks(create_model("efficientnet-lite0", 10)))
    if blocks_after is None:
        assert len(stepped_groups(second)) > 1 + num_blocks // 2
    else:
        top = {f"block{num_blocks - 1 - depth}" for depth in range(blocks_after)}
        assert stepped_groups(second) == {"head", *top}
    blocks = frozen_state(create_model("efficientnet-lite0", 10, image_size=32), trainable_blocks=0)
    assert blocks
    for key, value in blocks.items():
        assert torch.equal(first["model"][key], value), f"head-only epoch changed {key}"
    assert any(not torch.equal(second["model"][k], value) for k, value in blocks.items())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "linear-probe", "head_warmup_epochs": 1}, "only with strategy full or partial"),
        ({"strategy": "gradual", "head_warmup_epochs": 1}, "starts head-only already"),
        ({"strategy": "full", "epochs": 2, "head_warmup_epochs": 2}, "leave none of the 2 epochs"),
    ],
)
def test_head_warmup_that_cannot_fine_tune_is_refused(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_image_config(tmp_path, **changes)
