"""Classification post-processing shared by both transports: tempered softmax and the top classes."""

from __future__ import annotations

import numpy as np

from fineserve.server.classification import ClassScore, probabilities, top_classes


def test_probabilities_are_a_tempered_softmax() -> None:
    logits = np.array([[0.0, np.log(3.0), -1000.0]])
    np.testing.assert_allclose(probabilities(logits, 1.0), [[0.25, 0.75, 0.0]], atol=1e-6)
    # A temperature of 2 halves the logits: odds of 3 become sqrt(3).
    tempered = probabilities(logits, 2.0)
    np.testing.assert_allclose(tempered[0, 1] / tempered[0, 0], np.sqrt(3.0), rtol=1e-6)
    assert tempered.dtype == np.float32
    # Large logits do not overflow: the softmax is shifted by each row's maximum first.
    np.testing.assert_allclose(probabilities(np.array([[1e4, 1e4]]), 1.0), [[0.5, 0.5]])


def test_top_classes_are_best_first_with_ties_to_the_lower_index() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.4, 0.2, 0.4]], dtype=np.float32)
    assert top_classes(scores, 2, ["cat", "dog", "fox"]) == [
        [ClassScore(1, "dog", float(np.float32(0.7))), ClassScore(2, "fox", float(np.float32(0.2)))],
        [ClassScore(0, "cat", float(np.float32(0.4))), ClassScore(2, "fox", float(np.float32(0.4)))],
    ]
    # At most every class; a class without a label gets "".
    [row] = top_classes(scores[:1], 10, ["cat"])
    assert [(c.index, c.label) for c in row] == [(1, ""), (2, ""), (0, "cat")]
    assert top_classes(scores, 0, ["cat", "dog", "fox"]) == [[], []]
