"""Turning client items into model inputs, as the version's model.json says: images and texts.

Images: the size is read from the header and checked against ``max_image_pixels`` before any
pixel is decoded (decompression bombs); large JPEGs are decoded at a reduced scale (libjpeg's
DCT scaling via ``Image.draft``) when the target is much smaller; resize, crop, normalise and
layout are whole-array numpy operations; items are decoded in parallel on a thread pool
(Pillow releases the GIL while decoding and resizing).
Texts: the ``tokenizers`` library reads tokenizer.json; no torch or transformers here.
"""

from __future__ import annotations

import concurrent.futures
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from fineserve.export.contract import ImagePreprocessing, ModelSpec, TextPreprocessing
from fineserve.server.errors import InvalidInput, LimitExceeded

Tensors = dict[str, np.ndarray]

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; each breach raises ``LimitExceeded`` naming the setting."""

    max_image_pixels: int
    max_request_bytes: int
    max_items_per_request: int
    max_text_chars: int


def check_items(items: Sequence[bytes], limits: Limits) -> None:
    """The limits every encoded request obeys, checked before any decoding."""
    if not items:
        raise InvalidInput("the request has no items")
    if len(items) > limits.max_items_per_request:
        raise LimitExceeded(
            f"{len(items)} items exceed max_items_per_request ({limits.max_items_per_request})"
        )
    total = sum(len(item) for item in items)
    if total > limits.max_request_bytes:
        raise LimitExceeded(f"{total} bytes of items exceed max_request_bytes ({limits.max_request_bytes})")


class ImagePreprocessor:
    """Encoded images -> the model's float32 input batch (``[N, C, H, W]`` or ``[N, H, W, C]``)."""

    def __init__(
        self, input_name: str, config: ImagePreprocessing, limits: Limits, pool: concurrent.futures.Executor
    ) -> None:
        self.input_name = input_name
        self.config = config
        self.limits = limits
        self._pool = pool
        self._mean = np.asarray(config.mean, dtype=np.float32) * 255.0
        # (x / 255 - mean) / std == (x - 255 mean) * (1 / (255 std)): one subtract, one multiply.
        self._scale = 1.0 / (np.asarray(config.std, dtype=np.float32) * 255.0)
        self._short_side = round(max(config.height, config.width) / config.crop_fraction)

    def __call__(self, items: Sequence[bytes]) -> Tensors:
        """Blocking: call from a worker thread. Raises ``InvalidInput``/``LimitExceeded``."""
        arrays = list(self._pool.map(self._one, range(len(items)), items))
        return {self.input_name: np.stack(arrays)}

    def _one(self, index: int, data: bytes) -> np.ndarray:
        array = np.asarray(self._decode(index, data), dtype=np.float32)
        if self.config.channel_order == "BGR":
            # Flip first: mean and std are given in channel_order's order (the contract, and what the
            # export gate validated), so normalising RGB and flipping after would shift every channel.
            array = array[..., ::-1]
        array = (array - self._mean) * self._scale
        if self.config.layout == "NCHW":
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array)

    def _decode(self, index: int, data: bytes) -> Image.Image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidInput(f"item {index}: the image is empty ({width}x{height})")
            if width * height > self.limits.max_image_pixels:
                raise LimitExceeded(
                    f"item {index}: {width}x{height} = {width * height} pixels exceed max_image_pixels "
                    f"({self.limits.max_image_pixels})"
                )
            resized = self._resized_size(width, height)
            if resized[0] * resized[1] > self.limits.max_image_pixels:
                # Only a freak aspect ratio gets here: a 467-byte 1x200000 PNG would be resized to
                # 64x12,800,000 pixels (GBs) before the crop. Refused before its pixels are decoded.
                raise LimitExceeded(
                    f"item {index}: {width}x{height} would be resized to {resized[0]}x{resized[1]} pixels "
                    f"before the centre crop, over max_image_pixels ({self.limits.max_image_pixels}); "
                    "its aspect ratio is too extreme"
                )
            if image.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale when the result is still >= the resize target.
                image.draft("RGB", (self._short_side, self._short_side))
            return self._resize_crop(_to_rgb(image))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise LimitExceeded(
                f"item {index}: image exceeds max_image_pixels ({self.limits.max_image_pixels})"
            ) from None
        except InvalidInput:  # LimitExceeded too
            raise
        except (OSError, ValueError, SyntaxError) as err:
            # Unidentified or truncated images; Pillow's message stays in the log, not the reply.
            raise InvalidInput(f"item {index}: not a decodable JPEG, PNG or WebP image") from err

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        resample = _RESAMPLE[self.config.interpolation]
        if width == height and self.config.crop_fraction == 1.0:
            # The contract's one exception: a square image goes straight to the target size (squashed to
            # a non-square target, not cropped), as the export gate built the inputs it validated.
            return image.resize((self.config.width, self.config.height), resample)
        size = self._resized_size(width, height)
        image = image.resize(size, resample)
        left = (size[0] - self.config.width) // 2
        top = (size[1] - self.config.height) // 2
        return image.crop((left, top, left + self.config.width, top + self.config.height))

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The size an image is resized to (short side to the target's) before the centre crop."""
        scale = self._short_side / min(width, height)
        return max(self.config.width, round(width * scale)), max(self.config.height, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any accepted mode. 16-bit grayscale is scaled to 8 bits first: Pillow's own conversion
    clips it at 255, which would turn most of a 16-bit image white. Alpha is dropped, not composited."""
    if image.mode.startswith("I"):
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((wide // 257).clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


class TextPreprocessor:
    """UTF-8 texts -> ``input_ids`` and ``attention_mask`` (int64, padded to the longest text)."""

    def __init__(
        self, tokenizer_path: Path, config: TextPreprocessing, input_names: Sequence[str], limits: Limits
    ):
        self.limits = limits
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.max_length = config.max_length
        self.tokenizer.enable_truncation(max_length=config.max_length)
        self.pad_id = _pad_id(self.tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokenizer.enable_padding(pad_id=self.pad_id)
        self.input_names = tuple(input_names)

    def __call__(self, items: Sequence[bytes]) -> Tensors:
        """Blocking (tokenizers runs its own threads). Raises ``InvalidInput``/``LimitExceeded``."""
        texts = []
        for index, item in enumerate(items):
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"item {index}: not valid UTF-8 text") from None
            if len(text) > self.limits.max_text_chars:
                limit = self.limits.max_text_chars
                raise LimitExceeded(f"item {index}: {len(text)} characters exceed max_text_chars ({limit})")
            texts.append(text)
        encodings = self.tokenizer.encode_batch(texts)
        tensors = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        return {name: tensors[name] for name in self.input_names}

    def check_token_ids(self, tensors: Tensors) -> None:
        """Token ids sent as ready tensors must be this tokenizer's, at most ``max_length`` a text:
        any other id, or a sequence past the model's positions, would fail inside the graph (an
        embedding lookup out of range) and take its whole batch down with it, and a long one would
        pad every other request of its batch to its length."""
        ids = tensors.get("input_ids")
        if ids is not None and ids.ndim == 2 and ids.shape[1] > self.max_length:
            raise InvalidInput(
                f"input 'input_ids': {ids.shape[1]} tokens per text, more than the model's max_length "
                f"({self.max_length}, what its tokenizer truncates texts to)"
            )
        if ids is not None and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise InvalidInput(
                f"input 'input_ids': token ids must be in 0..{self.vocab_size - 1} (the model's vocabulary)"
            )

    @property
    def pad_values(self) -> dict[str, int | float]:
        return {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0}


def _pad_id(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def text_inputs_supported(spec: ModelSpec) -> bool:
    """Whether every graph input of a text model is one the tokenizer produces."""
    return all(t.name in ("input_ids", "attention_mask", "token_type_ids") for t in spec.inputs)
