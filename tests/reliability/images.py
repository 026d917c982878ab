"""Hostile and unusual images, built in memory: crafted headers, odd modes, animations."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def rgb_pixels(size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels but holds a few bytes of data:
    a decompression bomb's calling card, cheap to send."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def png_rgb16(pixels16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write these itself)."""
    height, width, _ = pixels16.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels16)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.fromarray(rgb_pixels()), "JPEG"))
    sof = data.index(b"\xff\xc0")
    # marker(2) length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def animated(format: str, frames: int = 3, size: int = 16) -> tuple[bytes, bytes]:
    """An animation of ``frames`` different frames, and its first frame as a still image."""
    images = [Image.fromarray(rgb_pixels(size, seed)) for seed in range(frames)]
    options: dict[str, object] = {"lossless": True} if format == "WEBP" else {}
    movie = encode(images[0], format, save_all=True, append_images=images[1:], **options)
    return movie, encode(images[0], format, **options)


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(rgb_pixels()).convert("CMYK"), "JPEG")


def gray16_png(pixels8: np.ndarray) -> bytes:
    """16-bit grayscale PNG whose values are exactly ``pixels8 * 257`` (full 16-bit range)."""
    return encode(Image.fromarray(pixels8.astype(np.uint16) * 257), "PNG")


def with_alpha(pixels: np.ndarray, mode: str = "RGBA") -> bytes:
    """The same colours with a varying alpha channel (``RGBA``) or as gray + alpha (``LA``)."""
    alpha = np.linspace(0, 255, pixels.shape[0] * pixels.shape[1]).astype(np.uint8).reshape(pixels.shape[:2])
    if mode == "LA":
        gray = np.asarray(Image.fromarray(pixels).convert("L"))
        return encode(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG")
    return encode(Image.fromarray(np.dstack([pixels, alpha]), "RGBA"), "PNG")
