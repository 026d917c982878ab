"""Held-out examples for the validation gate, as the model inputs the server would build.

Images go through the contract's preprocessing (``ImagePreprocessing``) exactly as documented
there, and texts through the model's own ``tokenizer.json``, so what the gate checks is what a
client gets. Sources: in-memory images/texts (built by ``export.defaults`` from the datasets),
a folder of images in ``<label>/<file>`` subfolders, or a text file of ``label<TAB>text`` lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fineserve.export.contract import ImagePreprocessing, TextPreprocessing
from fineserve.export.errors import ExamplesError, TokenizerError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
UNLABELLED = -1
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def load_tokenizer(path: Path) -> Any:
    """The ``tokenizers.Tokenizer`` in ``path``, loaded as the server loads it
    (``server/preprocess.py``), so a file it cannot load is never published.

    Raises:
        TokenizerError: missing, empty, not JSON or not a tokenizer; the message names the file.
    """
    from tokenizers import Tokenizer

    if not path.is_file():
        raise TokenizerError(f"tokenizer {path} does not exist")
    if path.stat().st_size == 0:
        raise TokenizerError(f"tokenizer {path} is empty; expected a tokenizers JSON (tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for every parse error
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise TokenizerError(f"tokenizer {path} is not a readable tokenizers JSON ({reason})") from None


@dataclass(frozen=True)
class Examples:
    """Model inputs for ``n`` examples, batch first.

    ``labels`` holds class ids, ``UNLABELLED`` (-1) where the true class is unknown.
    ``lengths``: text only, the token count of each example (inputs are right-padded to the
    longest), so the gate can also run every example unpadded.
    """

    features: dict[str, np.ndarray]
    labels: np.ndarray
    source: str
    lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
        """The features of a subset; text trimmed to the subset's longest example."""
        batch = {k: v[index] for k, v in self.features.items()}
        if self.lengths is not None:
            longest = int(self.lengths[index].max())
            batch = {k: v[:, :longest] for k, v in batch.items()}
        return batch


def preprocess_image(image: Image.Image, prep: ImagePreprocessing) -> np.ndarray:
    """One decoded image -> float32 array in ``prep.layout`` (no batch axis)."""
    image = image.convert("RGB")
    width, height = image.size
    # Resize the shorter side so that the centre crop covers crop_fraction of it.
    target = round(max(prep.height, prep.width) / prep.crop_fraction)
    scale = target / min(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if width == height and prep.crop_fraction == 1.0:
        new_size = (prep.width, prep.height)
    image = image.resize(new_size, _RESAMPLE[prep.interpolation])
    left = (image.width - prep.width) // 2
    top = (image.height - prep.height) // 2
    image = image.crop((left, top, left + prep.width, top + prep.height))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if prep.channel_order == "BGR":
        pixels = pixels[..., ::-1]
    pixels = (pixels - np.array(prep.mean, np.float32)) / np.array(prep.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if prep.layout == "NCHW" else pixels)


def image_examples(
    images: Sequence[Image.Image], labels: Sequence[int], prep: ImagePreprocessing, source: str
) -> Examples:
    if not images:
        raise ExamplesError(f"{source}: no images")
    pixels = np.stack([preprocess_image(img, prep) for img in images]).astype(np.float32)
    return Examples({"pixel_values": pixels}, np.asarray(labels, dtype=np.int64), source)


def text_examples(
    texts: Sequence[str], labels: Sequence[int], tokenizer_path: Path, prep: TextPreprocessing, source: str
) -> Examples:
    """Tokenizes with the model's ``tokenizers`` JSON, truncated to ``prep.max_length``."""
    if not texts:
        raise ExamplesError(f"{source}: no texts")
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(prep.max_length)
    encodings = tokenizer.encode_batch(list(texts))
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    ids = np.zeros((len(texts), int(lengths.max())), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = 1
    return Examples(
        {"input_ids": ids, "attention_mask": mask}, np.asarray(labels, dtype=np.int64), source, lengths
    )


def read_examples(
    path: Path,
    task: str,
    labels: Sequence[str],
    *,
    image: ImagePreprocessing | None = None,
    text: TextPreprocessing | None = None,
    tokenizer_path: Path | None = None,
    limit: int | None = None,
) -> Examples:
    """Reads ``--examples``: a folder ``<label>/<image>`` (or loose images, unlabelled) for image
    models, a ``label<TAB>text`` file (or plain lines, unlabelled) for text models.

    Raises:
        ExamplesError: missing path, nothing readable, or a label the model does not have.
    """
    if not path.exists():
        raise ExamplesError(f"examples {path} do not exist")
    index = {name: i for i, name in enumerate(labels)}

    def label_id(name: str | None) -> int:
        if name is None:
            return UNLABELLED
        if name not in index:
            raise ExamplesError(f"examples {path}: label {name!r} is not one of the model's labels")
        return index[name]

    if task == "image-classification":
        if image is None or not path.is_dir():
            raise ExamplesError(f"examples {path}: image models need a folder of images")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        pictures, ids = [], []
        for file in files:
            try:
                with Image.open(file) as img:
                    pictures.append(img.convert("RGB"))
            except OSError as err:
                raise ExamplesError(f"examples {file}: not a readable image ({err})") from None
            ids.append(label_id(file.parent.name if file.parent != path else None))
        return image_examples(pictures, ids, image, f"folder {path}")
    if text is None or tokenizer_path is None or not path.is_file():
        raise ExamplesError(f"examples {path}: text models need a text file (label<TAB>text per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ExamplesError(f"examples {path}: not UTF-8 text") from None
    texts, ids = [], []
    for line in lines[:limit]:
        if not line.strip():
            continue
        name, sep, rest = line.partition("\t")
        texts.append(rest if sep else line)
        ids.append(label_id(name if sep else None))
    return text_examples(texts, ids, tokenizer_path, text, f"file {path}")
