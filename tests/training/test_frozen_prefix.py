"""``cache_frozen``: the split network computes what the whole one does, the cache is reused, and
a run on it trains the top alone, scores the whole model and leaves a folder export takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fineserve.training import finetune, layers
from fineserve.training.backbones import backbone_config, create_model, tokenizer_file
from fineserve.training.checkpoint import load_checkpoint
from fineserve.training.config import build_config
from fineserve.training.data import ImagePipeline, image_encoder, make_splits, text_encoder
from fineserve.training.datasets import load_dataset, sklearn_digits
from fineserve.training.errors import ConfigError
from fineserve.training.frozen_prefix import MIRRORED, PREFIX, cached_prefix, choose_views, split_model
from fineserve.training.run import train
from tests.training.conftest import TINY_IMAGE, losses, tiny_image_config, tiny_text_config
from tests.training.test_strategies import frozen_state


@pytest.mark.parametrize("trainable_blocks", [1, 4, 17])
def test_image_top_of_prefix_is_the_whole_model(trainable_blocks: int) -> None:
    model = create_model("efficientnet-lite0", 10, image_size=32).eval()
    prefix, top = split_model(model, trainable_blocks)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(top(prefix(pixels)), model(pixels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trainable_blocks", [1, 3, 7])
def test_text_top_of_prefix_is_the_whole_model(trainable_blocks: int) -> None:
    model = create_model("minilm-l6", 2).eval()
    prefix, top = split_model(model, trainable_blocks)
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded text: the mask must reach every layer, on both sides of the cut
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(top(prefix(ids, mask), mask), whole, rtol=1e-5, atol=1e-5)


def test_image_top_trains_like_the_whole_model() -> None:
    """In training mode too: the same drop-connect per block, BatchNorm on batch statistics in the
    top and running statistics below it (seeded: both draw the same random masks)."""
    model = create_model("efficientnet-lite0", 10, image_size=32)
    finetune.set_trainable_blocks(model, 4)
    finetune.train_mode(model)
    prefix, top = split_model(model, 4)
    pixels = torch.randn(6, 3, 32, 32)
    torch.manual_seed(3)
    whole = model(pixels)
    torch.manual_seed(3)
    with torch.no_grad():
        maps = prefix(pixels)
    torch.testing.assert_close(top(maps), whole, rtol=1e-5, atol=1e-5)


def test_the_frozen_blocks_fall_back_to_pytorch_when_onnxruntime_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fineserve.training import frozen_prefix

    def broken_export(prefix: torch.nn.Module, example: torch.Tensor) -> None:
        raise RuntimeError("exporter refused the graph")

    monkeypatch.setattr(frozen_prefix, "_onnxruntime_prefix", broken_export)
    cfg = tiny_image_config(tmp_path, strategy="partial", trainable_blocks=3, cache_frozen=True)
    backbone = backbone_config(cfg.backbone)
    pipeline = ImagePipeline(32, backbone.mean, backbone.std)
    splits = make_splits(sklearn_digits(), cfg, image_encoder)
    model = create_model(cfg.backbone, 10, image_size=32).eval()
    said: list[str] = []
    _, train = cached_prefix(
        model,
        splits,
        pipeline,
        cfg,
        cache=tmp_path / "cache",
        device=torch.device("cpu"),
        say=said.append,
        show=False,
    )
    assert "could not run the frozen blocks (RuntimeError: exporter refused the graph)" in said[0], said
    assert "computed with PyTorch" in said[-1]
    prefix, _ = split_model(model, 3)
    with torch.no_grad():
        expected = prefix(pipeline(splits.train.inputs["pixels"], train=False))
    torch.testing.assert_close(train.inputs[PREFIX].float(), expected, rtol=2e-3, atol=2e-3)


def test_nothing_frozen_is_refused() -> None:
    model = create_model("minilm-l6", 2)
    with pytest.raises(ConfigError, match="nothing is frozen"):
        split_model(model, len(layers.blocks(model)))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "full"}, "only with strategy partial"),
        ({"strategy": "gradual"}, "only with strategy partial"),
        ({"crop_padding": 2}, "random crops cannot be cached"),
        ({"teacher": "runs/t"}, "distillation needs the raw inputs"),
    ],
)
def test_what_a_cache_cannot_hold_is_refused(changes: dict, message: str) -> None:
    values = {**TINY_IMAGE, "strategy": "partial", "cache_frozen": True, **changes}
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_image_cache_holds_both_views_computed_once(tmp_path: Path) -> None:
    cfg = tiny_image_config(tmp_path, strategy="partial", trainable_blocks=3, cache_frozen=True, hflip=True)
    backbone = backbone_config(cfg.backbone)
    pipeline = ImagePipeline(32, backbone.mean, backbone.std)
    splits = make_splits(sklearn_digits(), cfg, image_encoder)
    model = create_model(cfg.backbone, 10, image_size=32).eval()
    said: list[str] = []
    args = {"cache": tmp_path / "cache", "device": torch.device("cpu"), "say": said.append, "show": False}

    _, train = cached_prefix(model, splits, pipeline, cfg, **args)
    assert "onnxruntime (within" in said[-1], said  # the CPU path, checked against PyTorch
    prefix, _ = split_model(model, 3)
    pixels = splits.train.inputs["pixels"]
    with torch.no_grad():
        expected = prefix(pipeline(pixels, train=False))
        mirrored = prefix(pipeline(pixels.flip(-1), train=False))
    # float16 storage: each value within its rounding of what PyTorch computes
    torch.testing.assert_close(train.inputs[PREFIX].float(), expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(train.inputs[MIRRORED].float(), mirrored, rtol=2e-3, atol=2e-3)
    assert not torch.allclose(expected, mirrored)
    assert torch.equal(train.labels, splits.train.labels)

    _, again = cached_prefix(model, splits, pipeline, cfg, **args)
    assert torch.equal(again.inputs[PREFIX], train.inputs[PREFIX])
    assert "read from" in said[-1]
    torch.nn.init.zeros_(model._fc.weight)
    cached_prefix(model, splits, pipeline, cfg, **args)  # trained weights are not part of the key
    assert "read from" in said[-1]
    with torch.no_grad():
        model._conv_stem.weight.mul_(0.5)  # frozen weights are: another file
    cached_prefix(model, splits, pipeline, cfg, **args)
    assert "computed with" in said[-1]
    cached_prefix(
        model,
        splits,
        pipeline,
        tiny_image_config(tmp_path, **{**cfg.to_dict(), "trainable_blocks": 2}),
        **args,
    )
    assert len(list((tmp_path / "cache" / "prefix").iterdir())) == 3  # another cut: another entry


def test_training_views_are_chosen_per_example() -> None:
    plain, mirrored = torch.zeros(400, 2, dtype=torch.float16), torch.ones(400, 2, dtype=torch.float16)
    torch.manual_seed(0)
    chosen = choose_views({PREFIX: plain, MIRRORED: mirrored}, True)[PREFIX]
    assert chosen.dtype == torch.float32 and MIRRORED not in choose_views(
        {PREFIX: plain, MIRRORED: mirrored}, True
    )
    share = float(chosen[:, 0].mean())
    assert 0.4 < share < 0.6 and torch.equal(chosen[:, 0], chosen[:, 1])  # a whole example flips
    assert torch.equal(choose_views({PREFIX: plain, MIRRORED: mirrored}, False)[PREFIX], plain.float())


def test_image_run_trains_the_top_on_the_cache_and_scores_the_whole_model(tmp_path: Path) -> None:
    cfg = tiny_image_config(
        tmp_path,
        strategy="partial",
        trainable_blocks=3,
        cache_frozen=True,
        hflip=True,
        head_lr=1e-2,
        epochs=3,
    )
    run = tmp_path / "run"
    metrics = train(cfg, run).metrics
    history = losses(run)
    assert history[-1] < history[0], history
    model, _ = load_checkpoint(run)
    expected = frozen_state(create_model("efficientnet-lite0", 10, image_size=32), 3)
    assert expected and all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    # test_accuracy is the whole model's on the real test images (what export writes out)
    splits = make_splits(sklearn_digits(), cfg, image_encoder)
    backbone = backbone_config(cfg.backbone)
    with torch.no_grad():
        logits = model.eval()(
            ImagePipeline(32, backbone.mean, backbone.std)(splits.test.inputs["pixels"], train=False)
        )
    accuracy = float((logits.argmax(1) == splits.test.labels).float().mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert len(list((tmp_path / "cache" / "prefix").iterdir())) == 1


def test_text_run_on_the_cache(tmp_path: Path, text_file: Path) -> None:
    cfg = tiny_text_config(
        tmp_path, text_file, strategy="partial", trainable_blocks=2, cache_frozen=True, group_by_length=True
    )
    metrics = train(cfg, tmp_path / "run").metrics
    history = losses(tmp_path / "run")
    assert history[-1] < history[0], history
    # test_accuracy is the whole model's on the real test texts
    model, _ = load_checkpoint(tmp_path / "run")
    raw = load_dataset(
        "text-file",
        data_path=str(text_file),
        cache=tmp_path / "cache",
        text_column="text",
        label_column="label",
    )
    test = make_splits(raw, cfg, text_encoder(tokenizer_file(cfg.backbone), cfg.max_length or 16)).test
    with torch.no_grad():
        logits = model.eval()(**{k: test.inputs[k] for k in ("input_ids", "attention_mask")}).logits
    accuracy = float((logits.argmax(1) == test.labels).float().mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    [stored] = (tmp_path / "cache" / "prefix").iterdir()
    cached = torch.load(stored, weights_only=True)
    assert cached[PREFIX].dtype == torch.float16 and cached[PREFIX].shape[-1] == 384
    assert set(cached) == {PREFIX, "attention_mask"}
