"""Partial fine-tuning on a budget: the frozen blocks' outputs are computed once, the top trains on them.

Under ``partial`` the blocks below the last ``trainable_blocks`` are a fixed function (eval mode,
no gradients: see ``finetune``), so what they compute for an example is the same every epoch.
With ``cache_frozen`` the run splits the network in two, ``Prefix`` (frozen) and ``Top`` (the
trained blocks and the head, sharing the model's parameters), computes the prefix once per
training example, and each epoch then costs only the top's forward and backward: on a CPU that
lets the top see the whole training set several times for what a few epochs on a subset cost.

- The only augmentation a cache can hold is a finite set of views: with ``hflip`` the mirrored
  image's prefix output is cached too, and each training step picks one of the two per example.
  Random crops cannot be cached (``TrainConfig.check`` refuses them together).
- Validation and test are scored with the whole model on the real inputs, so the figures are
  those of the network that export writes out, not of the cache.
- On a CPU the image prefix runs in onnxruntime (several times faster than PyTorch's eager CPU
  convolutions here), after checking it against PyTorch on the first batch; when onnxruntime is
  missing or disagrees the run says so and computes with PyTorch.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fineserve.files import write_atomically
from fineserve.training import layers
from fineserve.training.config import TrainConfig
from fineserve.training.data import Examples, ImagePipeline, Splits
from fineserve.training.errors import ConfigError
from fineserve.training.features import cache_key

PREFIX = "prefix"  # the batch key of a cached prefix output
MIRRORED = "prefix_mirrored"  # the same for the horizontally flipped image (hflip)
# How far onnxruntime's prefix output may be from PyTorch's, relative to its largest magnitude,
# before the run falls back to PyTorch: float32 reassociation gives ~1e-6 here.
ORT_TOLERANCE = 1e-4
CHUNK = 256
# Part of every cache key: raise it when what Prefix, the image pipeline or the tokenizer
# computes changes, so caches written by the older code are not read as this code's.
CACHE_VERSION = 1


def frozen_count(model: nn.Module, trainable_blocks: int) -> int:
    """How many of ``layers.blocks(model)`` are frozen below the trained top.

    Raises:
        ConfigError: nothing would be frozen, so there is nothing to cache.
    """
    total = len(layers.blocks(model))
    frozen = total - min(trainable_blocks, total)
    if frozen < 1:
        raise ConfigError(
            f"cache_frozen: trainable_blocks={trainable_blocks} trains all {total} blocks, so nothing "
            "is frozen to cache; lower trainable_blocks or drop cache_frozen"
        )
    return frozen


class ImagePrefix(nn.Module):
    """EfficientNet-Lite's stem and its first ``frozen - 1`` MBConv blocks (``extract_features``'s
    first part)."""

    def __init__(self, model: nn.Module, frozen: int) -> None:
        super().__init__()
        self.model, self.blocks = model, frozen - 1  # blocks() counts the stem as one

    def forward(self, pixels: Tensor) -> Tensor:
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(pixels)))
        for block in m._blocks[: self.blocks]:
            x = block(x)  # frozen blocks run in eval mode, where drop-connect does nothing
        return x  # type: ignore[no-any-return]


class ImageTop(nn.Module):
    """The rest of ``EfficientNet.forward`` from the cached maps on: blocks, conv head, pooling,
    dropout and the classifier, with the same drop-connect rate per block as the whole model."""

    def __init__(self, model: nn.Module, frozen: int) -> None:
        super().__init__()
        self.model, self.first = model, frozen - 1

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        m = self.model
        count = len(m._blocks)
        for index in range(self.first, count):
            rate = m._global_params.drop_connect_rate
            x = m._blocks[index](x, drop_connect_rate=rate * index / count if rate else rate)
        if self.first <= count:
            x = m._swish(m._bn1(m._conv_head(x)))
        x = m._avg_pooling(x).flatten(start_dim=1)
        return m._fc(m._dropout(x))  # type: ignore[no-any-return]


def _additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, L] 1/0 -> the [N, 1, 1, L] additive mask BERT's attention takes (0 or the dtype's min)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _hidden(output: Any) -> Tensor:
    """A BERT layer's hidden states: transformers 5 returns the tensor, 4 a tuple that starts with it."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[no-any-return]


class TextPrefix(nn.Module):
    """BERT's embeddings and its first ``frozen - 1`` encoder layers."""

    def __init__(self, model: nn.Module, frozen: int) -> None:
        super().__init__()
        self.model, self.layers = model, frozen - 1  # blocks() counts the embeddings as one

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        bert = self.model.bert
        hidden = bert.embeddings(input_ids=input_ids)
        mask = _additive_mask(attention_mask, hidden.dtype)
        for layer in bert.encoder.layer[: self.layers]:
            hidden = _hidden(layer(hidden, attention_mask=mask))
        return hidden  # type: ignore[no-any-return]


class TextTop(nn.Module):
    """The remaining encoder layers, the pooler, dropout and the classifier
    (``BertForSequenceClassification.forward`` from the cached hidden states on)."""

    def __init__(self, model: nn.Module, frozen: int) -> None:
        super().__init__()
        self.model, self.first = model, frozen - 1

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        assert attention_mask is not None, "text prefix outputs travel with their attention mask"
        m = self.model
        mask = _additive_mask(attention_mask, hidden.dtype)
        for layer in m.bert.encoder.layer[self.first :]:
            hidden = _hidden(layer(hidden, attention_mask=mask))
        pooled = m.bert.pooler(hidden)
        return m.classifier(m.dropout(pooled))  # type: ignore[no-any-return]


def split_model(model: nn.Module, trainable_blocks: int) -> tuple[nn.Module, nn.Module]:
    """``(prefix, top)`` with ``top(prefix(x)) == model(x)``; both share ``model``'s parameters."""
    frozen = frozen_count(model, trainable_blocks)
    if layers.is_text_model(model):
        return TextPrefix(model, frozen), TextTop(model, frozen)
    return ImagePrefix(model, frozen), ImageTop(model, frozen)


def cached_prefix(
    model: nn.Module,
    splits: Splits,
    pipeline: ImagePipeline,
    cfg: TrainConfig,
    *,
    cache: Path,
    device: torch.device,
    say: Callable[[str], None],
    show: bool,
) -> tuple[nn.Module, Examples]:
    """The trained top, and the training split as its inputs (``PREFIX``, plus ``MIRRORED`` with
    hflip, plus the attention mask for text), float16 on the CPU, read from or written to ``cache``.

    float16 halves the memory a whole training set's maps take (Fashion-MNIST's 54,000 at 64 px:
    190 MB a view); the top casts them back to float32, so only the stored value is rounded.
    """
    prefix, top = split_model(model, cfg.trainable_blocks)
    frozen = layers.blocks(model)[: frozen_count(model, cfg.trainable_blocks)]
    path = cache / "prefix" / f"{_cache_key(cfg, splits, frozen)}.pt"
    if path.is_file():
        inputs = torch.load(path, map_location="cpu", weights_only=True)
        say(f"cache_frozen: the frozen blocks' outputs for {len(splits.train)} examples read from {path}")
        return top, Examples(inputs, splits.train.labels)
    started = time.perf_counter()
    was_training = model.training
    # The wrapper too, not just the model: exporting it to ONNX restores the wrapper's own mode
    # afterwards, recursively, which would otherwise put the whole model in training mode.
    prefix.eval()
    train = splits.train
    if "input_ids" in train.inputs:
        inputs = {
            PREFIX: _text_outputs(prefix, train, device, show=show),
            "attention_mask": train.inputs["attention_mask"],
        }
        engine = "PyTorch"
    else:
        views = {PREFIX: False, **({MIRRORED: True} if cfg.hflip else {})}
        pixels = train.inputs["pixels"]
        run, engine = _image_engine(prefix, pipeline, pixels[:CHUNK], device, say)
        inputs = {
            key: _image_outputs(run, pipeline, pixels, mirrored, show=show, desc=f"frozen blocks ({key})")
            for key, mirrored in views.items()
        }
    model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(inputs, tmp))
    views_note = " and their mirror images" if MIRRORED in inputs else ""
    say(f"cache_frozen: the frozen blocks' outputs for {len(train)} examples{views_note} computed with "
        f"{engine} in {time.perf_counter() - started:.1f} s, kept in {path}")  # fmt: skip
    return top, Examples(inputs, train.labels)


def _cache_key(cfg: TrainConfig, splits: Splits, frozen: list[nn.Module]) -> str:
    """Everything the cached outputs depend on: the frozen weights themselves (a digest, so an
    upgraded weights package is another file), the data and split, the input size, the cut, and
    ``CACHE_VERSION`` for the code that computes them."""
    weights = hashlib.sha256()
    for index, block in enumerate(frozen):  # parameters and BatchNorm statistics
        for name, tensor in block.state_dict().items():
            weights.update(f"{index}.{name}".encode())
            weights.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return cache_key(
        cfg,
        splits,
        kind="prefix",
        version=CACHE_VERSION,
        weights=weights.hexdigest(),
        trainable_blocks=cfg.trainable_blocks,
        hflip=cfg.hflip,
    )


def choose_views(batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
    """While training, each example takes its mirrored view with probability 1/2 (hflip); the
    stored float16 becomes float32 either way."""
    out = dict(batch)
    mirrored = out.pop(MIRRORED, None)
    if train and mirrored is not None:
        flip = (torch.rand(len(mirrored)) < 0.5).view(-1, *([1] * (mirrored.dim() - 1)))
        out[PREFIX] = torch.where(flip, mirrored, out[PREFIX])
    out[PREFIX] = out[PREFIX].float()
    return out


def _chunks(n: int) -> list[Tensor]:
    return list(torch.arange(n).split(CHUNK))


def _text_outputs(prefix: nn.Module, data: Examples, device: torch.device, *, show: bool) -> Tensor:
    """The prefix's hidden states [N, max_length, hidden] (zeros past each text's end). Texts go
    through in order of length, so each batch pads to about its own texts' length."""
    mask = data.inputs["attention_mask"]
    order = torch.argsort(mask.sum(dim=1))
    out: Tensor | None = None
    for index in tqdm(list(order.split(CHUNK)), desc="frozen blocks", disable=not show, leave=False):
        batch = data.batch(index)
        with torch.no_grad():
            hidden = prefix(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
        if out is None:
            out = torch.zeros(len(data), mask.shape[1], hidden.shape[-1], dtype=torch.float16)
        out[index, : hidden.shape[1]] = hidden.half()
    assert out is not None
    return out


def _image_outputs(
    run: Callable[[Tensor], Tensor],
    pipeline: ImagePipeline,
    pixels: Tensor,
    mirrored: bool,
    *,
    show: bool,
    desc: str,
) -> Tensor:
    parts = []
    for index in tqdm(_chunks(len(pixels)), desc=desc, disable=not show, leave=False):
        source = pixels[index]
        images = pipeline(source.flip(-1) if mirrored else source, train=False)
        parts.append(run(images).half())
    return torch.cat(parts)


def _image_engine(
    prefix: nn.Module,
    pipeline: ImagePipeline,
    sample: Tensor,
    device: torch.device,
    say: Callable[[str], None],
) -> tuple[Callable[[Tensor], Tensor], str]:
    """What runs the image prefix: onnxruntime on a CPU when it agrees with PyTorch on ``sample``,
    else PyTorch."""

    def torch_run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return prefix(images.to(device)).float().cpu()

    if device.type != "cpu":
        return torch_run, "PyTorch"
    images = pipeline(sample, train=False)
    try:
        ort_run = _onnxruntime_prefix(prefix, images)
    except ImportError:
        say("cache_frozen: onnxruntime is not installed; computing the frozen blocks with PyTorch")
        return torch_run, "PyTorch"
    except Exception as err:  # any export or session failure: PyTorch computes it instead
        say(f"cache_frozen: onnxruntime could not run the frozen blocks ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); computing them with PyTorch")  # fmt: skip
        return torch_run, "PyTorch"
    expected, got = torch_run(images), ort_run(images)
    error = float((expected - got).abs().max()) / max(1.0, float(expected.abs().max()))
    if error > ORT_TOLERANCE:
        say(f"cache_frozen: onnxruntime's frozen blocks differ from PyTorch's by {error:.1e} "
            f"(> {ORT_TOLERANCE:.0e}); computing them with PyTorch")  # fmt: skip
        return torch_run, "PyTorch"
    return ort_run, f"onnxruntime (within {error:.1e} of PyTorch)"


def _onnxruntime_prefix(prefix: nn.Module, example: Tensor) -> Callable[[Tensor], Tensor]:
    """The prefix exported to ONNX (TorchScript exporter, dynamic batch) in an onnxruntime CPU
    session with as many threads as torch uses.

    Raises:
        ImportError: onnxruntime is not installed.
    """
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prefix.onnx"
        # The TorchScript exporter warns about its own deprecation and constant folding: noise here.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                prefix,
                (example[:2],),
                str(path),
                input_names=["pixels"],
                output_names=["maps"],
                dynamic_axes={"pixels": {0: "batch"}, "maps": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def ort_run(images: Tensor) -> Tensor:
        (maps,) = session.run(None, {"pixels": images.contiguous().numpy()})
        return torch.from_numpy(maps)

    return ort_run
