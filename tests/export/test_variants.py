"""The variant makers on graphs onnxruntime then has to load and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from fineserve.export import variants
from fineserve.export.validate import open_session
from tests.fixtures import tiny_text_graph, tiny_vocab


def test_fp16_of_a_graph_that_casts_its_mask_to_float_loads_and_agrees(tmp_path: Path) -> None:
    # The tiny text graph casts its int64 attention mask to float, as exported transformers do;
    # onnxconverter-common 1.15 typed that output float16 but left the Cast at float.
    fp32, fp16 = tmp_path / "model.onnx", tmp_path / "model.fp16.onnx"
    onnx.save(tiny_text_graph(len(tiny_vocab())), fp32)
    variants.make_fp16(fp32, fp16)
    mask_cast = next(n for n in onnx.load(fp16).graph.node if list(n.input) == ["attention_mask"])
    assert mask_cast.op_type == "Cast"
    assert mask_cast.attribute[0].i == onnx.TensorProto.FLOAT16
    ids = np.array([[2, 4, 5, 3, 0], [2, 8, 9, 10, 3]], np.int64)  # [CLS] good great [SEP] [PAD]
    feed = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    [want] = open_session(fp32).run(None, feed)
    [got] = open_session(fp16).run(None, feed)  # GraphLoadError before the fix
    assert got.dtype == np.float32  # inputs and outputs stay fp32
    np.testing.assert_allclose(got, want, atol=1e-2)
