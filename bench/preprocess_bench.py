"""Preprocessing throughput with the server's own code: JPEG decode + resize, tokenisation.

Images run on a one-thread pool, so the figure is images/s per core; the server decodes on
``preprocess_threads`` (one per core by default). Texts go through the ``tokenizers`` library as
the server calls it (its own thread pool), one request of ``items`` texts at a time.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fineserve.bench.inputs import encoded_items
from fineserve.export.contract import ModelSpec
from fineserve.server.preprocess import ImagePreprocessor, Limits, TextPreprocessor

# The server's defaults: nothing the benchmark inputs come near.
LIMITS = Limits(
    max_image_pixels=25_000_000, max_request_bytes=1 << 25, max_items_per_request=256, max_text_chars=10_000
)


def _time_calls(call: Callable[[Sequence[bytes]], Any], items: Sequence[bytes], seconds: float) -> float:
    call(items)  # warm up
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        call(items)
        done += len(items)
    return done / elapsed


def measure_preprocessing(
    spec: ModelSpec, version_dir: Path, items: int, seconds: float, image_side: int
) -> dict[str, Any]:
    """Items/s of the model's preprocessing for requests of ``items`` items (and of one item)."""
    payload = encoded_items(spec, max(items, 1), image_side)
    if spec.image is not None:
        with concurrent.futures.ThreadPoolExecutor(1) as one_core:
            images = ImagePreprocessor(spec.inputs[0].name, spec.image, LIMITS, one_core)
            per_request = _time_calls(images, payload, seconds)
            single = _time_calls(images, payload[:1], seconds)
        what = f"JPEG {image_side}x{image_side} decode + resize to {spec.image.width}x{spec.image.height}"
        return {"what": what, "unit": "images/s per core", "items_per_s": per_request, "single_per_s": single}
    assert spec.text is not None
    texts = TextPreprocessor(
        version_dir / spec.text.tokenizer_file, spec.text, [t.name for t in spec.inputs], LIMITS
    )
    per_request = _time_calls(texts, payload, seconds)
    single = _time_calls(texts, payload[:1], seconds)
    return {"what": "tokenisation", "unit": "texts/s", "items_per_s": per_request, "single_per_s": single}
