"""Synthetic but valid inputs for a published model: tensors, encoded images, texts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fineserve.export.contract import ModelSpec
from fineserve.server.preprocess import Limits

# The benchmarks' own inputs stay far inside these.
_NO_LIMITS = Limits(1 << 30, 1 << 30, 1 << 20, 1 << 20)

SAMPLE_TEXTS = [
    "a gripping, beautifully acted film that earns every one of its quiet moments",
    "the plot is thin and the jokes land with a thud; i checked my watch twice",
    "not the best of the series, but warm, funny and worth seeing on a big screen",
    "an overlong, self-satisfied mess that mistakes noise for energy",
]


def tensor_batch(
    spec: ModelSpec, batch: int, seq_len: int = 64, seed: int = 0, version_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """Inputs with the graph's names, dtypes and shapes (batch axis = ``batch``).

    Images: random pixels. Texts: with ``version_dir``, the sample texts through the model's own
    tokenizer (real ids, padded to the longest, so token inputs cost what the texts cost);
    without it, ids 1000..1999 of length ``seq_len`` (needs a vocabulary of 2,000 or more).
    """
    rng = np.random.default_rng(seed)
    if spec.text is not None and version_dir is not None:
        return sample_tokens(spec, version_dir, batch)
    if spec.image is not None:
        (tensor,) = spec.inputs
        shape = [batch, *(d for d in tensor.shape[1:])]
        return {tensor.name: rng.standard_normal(shape).astype(np.float32)}
    out: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        if tensor.name == "input_ids":
            out[tensor.name] = rng.integers(1000, 2000, size=(batch, seq_len), dtype=np.int64)
        else:  # attention_mask, token_type_ids
            fill = 1 if tensor.name == "attention_mask" else 0
            out[tensor.name] = np.full((batch, seq_len), fill, dtype=np.int64)
    return out


def encoded_items(spec: ModelSpec, count: int, image_side: int = 480, seed: int = 0) -> list[bytes]:
    """JPEG photos-like images (smooth gradients + noise) for image models, UTF-8 texts for text ones."""
    if spec.image is None:
        return [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)].encode() for i in range(count)]
    from PIL import Image

    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        y, x = np.mgrid[0:image_side, 0:image_side]
        base = np.stack([x * 255 // image_side, y * 255 // image_side, (x + y + 40 * i) % 256], axis=-1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        items.append(buf.getvalue())
    return items


def sample_tokens(spec: ModelSpec, version_dir: Path, batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows of the sample texts, tokenized as the server tokenizes them."""
    from fineserve.server.preprocess import TextPreprocessor

    assert spec.text is not None
    tokenizer = TextPreprocessor(
        version_dir / spec.text.tokenizer_file, spec.text, [t.name for t in spec.inputs], _NO_LIMITS
    )
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)].encode() for i in range(batch)]
    return tokenizer(texts)
