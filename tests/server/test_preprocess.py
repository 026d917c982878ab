"""Preprocessing: images as model.json says (checked against a plain numpy reference), limits, texts."""

from __future__ import annotations

import concurrent.futures
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fineserve.export.contract import ImagePreprocessing, TextPreprocessing
from fineserve.export.examples import preprocess_image
from fineserve.server.errors import InvalidInput, LimitExceeded
from fineserve.server.preprocess import ImagePreprocessor, Limits, TextPreprocessor, check_items
from tests.fixtures import write_tiny_tokenizer

LIMITS = Limits(
    max_image_pixels=5_000_000, max_request_bytes=1_000_000, max_items_per_request=8, max_text_chars=50
)
CONFIG = ImagePreprocessing(height=32, width=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        yield executor


def encode(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def reference(pixels: np.ndarray, config: ImagePreprocessing) -> np.ndarray:
    """The contract written out plainly: resize shorter side, center crop, scale, channel order,
    normalise (mean and std are in channel_order's order), CHW."""
    image = Image.fromarray(pixels).convert("RGB")
    short = round(max(config.height, config.width) / config.crop_fraction)
    w, h = image.size
    scale = short / min(w, h)
    size = (max(config.width, round(w * scale)), max(config.height, round(h * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - config.width) // 2, (size[1] - config.height) // 2
    array = np.asarray(image.crop((left, top, left + config.width, top + config.height)), np.float64) / 255
    if config.channel_order == "BGR":
        array = array[..., ::-1]
    array = (array - np.array(config.mean)) / np.array(config.std)
    return array.transpose(2, 0, 1)


def test_png_and_webp_match_the_reference(pool: concurrent.futures.Executor) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    preprocess = ImagePreprocessor("x", CONFIG, LIMITS, pool)
    batch = preprocess([encode(pixels, "PNG"), encode(pixels, "WEBP", lossless=True)])["x"]
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], reference(pixels, CONFIG), atol=1e-5)
    np.testing.assert_allclose(batch[1], reference(pixels, CONFIG), atol=1e-5)


def test_center_crop_fraction_and_nhwc_bgr_layout(pool: concurrent.futures.Executor) -> None:
    config = ImagePreprocessing(
        height=16,
        width=16,
        mean=(0.2, 0.5, 0.8),
        std=(0.25, 0.5, 1.0),
        crop_fraction=0.5,
        channel_order="BGR",
        layout="NHWC",
    )
    pixels = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    [got] = ImagePreprocessor("x", config, LIMITS, pool)([encode(pixels, "PNG")])["x"]
    want = reference(pixels, config).transpose(1, 2, 0)
    assert got.shape == (16, 16, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


# Mean and std far from symmetric, so that applying them in the wrong channel order shows.
@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(
    "geometry",  # (image width, image height), (target height, target width), crop_fraction
    [((64, 48), (32, 32), 0.875), ((30, 50), (24, 32), 1.0), ((40, 40), (16, 32), 1.0)],
    ids=["landscape-crop", "portrait-wide-target", "square-wide-target"],
)
def test_the_server_builds_what_the_export_gate_validated(
    pool: concurrent.futures.Executor,
    channel_order: str,
    layout: str,
    geometry: tuple[tuple[int, int], tuple[int, int], float],
) -> None:
    """The export gate checks a graph on ``export.examples.preprocess_image``'s inputs; the server must
    feed it the same ones, or the gate validated something clients never get. Both resize with the
    same Pillow call on the same decoded pixels, so only float rounding may differ."""
    (width, height), (target_height, target_width), crop_fraction = geometry
    config = ImagePreprocessing(
        height=target_height,
        width=target_width,
        mean=(0.1, 0.45, 0.9),
        std=(0.2, 0.5, 0.9),
        crop_fraction=crop_fraction,
        channel_order=channel_order,
        layout=layout,
    )
    pixels = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = encode(pixels, "PNG")
    [got] = ImagePreprocessor("x", config, LIMITS, pool)([data])["x"]
    want = preprocess_image(Image.open(io.BytesIO(data)), config)
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_large_jpeg_is_decoded_at_reduced_size_and_stays_close(pool: concurrent.futures.Executor) -> None:
    # A smooth 1024x768 image: reduced-size (DCT-scaled) decoding should barely change the result.
    y, x = np.mgrid[0:768, 0:1024]
    pixels = np.stack([x / 4 % 256, y / 3 % 256, (x + y) / 7 % 256], axis=-1).astype(np.uint8)
    data = encode(pixels, "JPEG", quality=95)
    decoded = Image.open(io.BytesIO(data))
    decoded.draft("RGB", (32, 32))
    assert decoded.size[0] < 1024  # libjpeg really scales this one down
    [got] = ImagePreprocessor("x", CONFIG, LIMITS, pool)([data])["x"]
    want = reference(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), CONFIG)
    assert np.abs(got - want).mean() < 0.1


def test_grey_images_become_three_channels(pool: concurrent.futures.Executor) -> None:
    grey = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    [got] = ImagePreprocessor("x", CONFIG, LIMITS, pool)([encode(grey, "PNG")])["x"]
    assert got.shape == (3, 32, 32)


def png_claiming(width: int, height: int) -> bytes:
    """A few-byte PNG that claims huge dimensions: it must be refused from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(10))) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding(pool: concurrent.futures.Executor) -> None:
    preprocess = ImagePreprocessor("x", CONFIG, LIMITS, pool)
    with pytest.raises(LimitExceeded, match=r"item 0: 3000x2000 = 6000000 pixels exceed max_image_pixels"):
        preprocess([png_claiming(3000, 2000)])
    # Past Pillow's own bomb guard: still our limit, named.
    with pytest.raises(LimitExceeded, match=r"item 0: image exceeds max_image_pixels \(5000000\)"):
        preprocess([png_claiming(100_000, 100_000)])


def test_corrupt_and_unsupported_images_name_the_item(pool: concurrent.futures.Executor) -> None:
    preprocess = ImagePreprocessor("x", CONFIG, LIMITS, pool)
    good = encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    for bad in (b"", b"garbage", good[: len(good) // 2], encode(np.zeros((8, 8, 3), np.uint8), "BMP")):
        with pytest.raises(InvalidInput, match="item 1: not a decodable JPEG, PNG or WebP image"):
            preprocess([good, bad])


def test_request_limits() -> None:
    with pytest.raises(LimitExceeded, match=r"9 items exceed max_items_per_request \(8\)"):
        check_items([b"x"] * 9, LIMITS)
    with pytest.raises(LimitExceeded, match=r"exceed max_request_bytes \(1000000\)"):
        check_items([bytes(600_000), bytes(600_000)], LIMITS)
    with pytest.raises(InvalidInput, match="no items"):
        check_items([], LIMITS)


def test_tokenizer_pads_truncates_and_checks_text(tmp_path: Path) -> None:
    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer.json")
    preprocess = TextPreprocessor(
        tokenizer, TextPreprocessing(max_length=5), ["input_ids", "attention_mask"], LIMITS
    )
    tensors = preprocess([b"good movie", b"the the the the the the the"])
    assert tensors["input_ids"].dtype == np.int64
    assert tensors["input_ids"].shape == (2, 5)  # truncated to max_length, padded to the longest
    assert tensors["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert tensors["input_ids"][0, -1] == preprocess.pad_id == 0
    with pytest.raises(LimitExceeded, match=r"item 0: 51 characters exceed max_text_chars \(50\)"):
        preprocess([b"a" * 51])
    with pytest.raises(InvalidInput, match="item 1: not valid UTF-8"):
        preprocess([b"good", b"\xff\xfe"])
