"""Text batches in training are padded with the tokenizer's own pad id, as the server pads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from fineserve.export.contract import TextPreprocessing
from fineserve.server.preprocess import Limits, TextPreprocessor
from fineserve.training.data import text_encoder
from fineserve.training.datasets import RawData

TEXTS = ["good movie", "the good the bad the"]
LIMITS = Limits(max_image_pixels=1, max_request_bytes=1_000, max_items_per_request=8, max_text_chars=100)


def write_tokenizer(path: Path, pad_token: str | None) -> Path:
    """A word-level tokenizer; its pad token (if any) sits last, so its id is not 0."""
    words = ["[UNK]", "good", "bad", "movie", "the"] + ([pad_token] if pad_token else [])
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize(("pad_token", "pad_id"), [("[PAD]", 5), ("<pad>", 5), (None, 0)])
def test_training_pads_with_the_tokenizers_pad_id_like_the_server(
    tmp_path: Path, pad_token: str | None, pad_id: int
) -> None:
    path = write_tokenizer(tmp_path / "tokenizer.json", pad_token)
    encode = text_encoder(path, max_length=8)
    examples = encode(RawData(["neg", "pos"], torch.tensor([0, 1]), texts=TEXTS), torch.arange(2))
    batch = examples.batch(torch.arange(2))
    assert batch["input_ids"].tolist() == [[1, 3, pad_id, pad_id, pad_id], [4, 1, 4, 2, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    served = TextPreprocessor(path, TextPreprocessing(max_length=8), ["input_ids", "attention_mask"], LIMITS)
    tensors = served([text.encode() for text in TEXTS])
    assert batch["input_ids"].tolist() == tensors["input_ids"].tolist()
    assert batch["attention_mask"].tolist() == tensors["attention_mask"].tolist()
