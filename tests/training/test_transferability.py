"""LogME, LEEP and the probe on cases small enough to check by hand or by a direct formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fineserve.training.errors import ScoringError
from fineserve.training.transferability import kendall_tau, leep, logme, max_evidence, probe_accuracy


def test_leep_by_hand() -> None:
    # 4 examples, 2 source classes (columns), 2 target classes.
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    labels = np.array([0, 0, 1, 1])
    # Joint P(y, z) = 1/4 sum of the rows of each class: y=0 -> (1.5, 0.5)/4, y=1 -> (0.5, 1.5)/4.
    # P(z) = (0.5, 0.5), so P(y=0 | z) = (0.75, 0.25) and P(y=1 | z) = (0.25, 0.75).
    # Each example's likelihood of its label: 0.9*0.75 + 0.1*0.25 = 0.7, 0.6*0.75 + 0.4*0.25 = 0.55,
    # 0.2*0.25 + 0.8*0.75 = 0.65, 0.3*0.25 + 0.7*0.75 = 0.6.
    expected = (math.log(0.7) + math.log(0.55) + math.log(0.65) + math.log(0.6)) / 4
    assert leep(probs, labels) == pytest.approx(expected, abs=1e-12)


def test_leep_of_an_uninformative_head_is_the_log_prior() -> None:
    # Every z predicts y with the class frequencies: LEEP = mean log P(y_i) = (3 log 3/4 + log 1/4) / 4.
    probs = np.full((4, 3), 1 / 3)
    labels = np.array([0, 0, 0, 1])
    assert leep(probs, labels) == pytest.approx((3 * math.log(0.75) + math.log(0.25)) / 4, abs=1e-12)
    informative = np.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    assert leep(informative, labels) == pytest.approx(0.0, abs=1e-12)  # log 1: a perfect source head


def gaussian_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I/beta + F F^T / alpha): the evidence of the Bayesian linear model, written
    directly (no SVD, no posterior mean) so it checks the paper's closed form independently."""
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, log_det = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + log_det + y @ np.linalg.solve(cov, y)))


@pytest.mark.parametrize("shape", [(5, 2), (3, 5)])  # more examples than features, and fewer
def test_logme_evidence_is_the_maximised_gaussian_evidence(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=shape)
    y = np.array([1.0, 0.0, 1.0, 0.0, 0.0][: shape[0]])
    fit = max_evidence(f, y)
    assert fit.log_evidence == pytest.approx(gaussian_log_evidence(f, y, fit.alpha, fit.beta), abs=1e-9)
    # The fixed point of Algorithm 1 is a maximum of the evidence over (alpha, beta).
    for alpha, beta in ((fit.alpha * 1.05, fit.beta), (fit.alpha / 1.05, fit.beta)):
        assert gaussian_log_evidence(f, y, alpha, beta) < fit.log_evidence
    for alpha, beta in ((fit.alpha, fit.beta * 1.05), (fit.alpha, fit.beta / 1.05)):
        assert gaussian_log_evidence(f, y, alpha, beta) < fit.log_evidence


def test_logme_averages_the_per_class_evidence_over_n() -> None:
    rng = np.random.default_rng(2)
    f = rng.normal(size=(5, 2))
    labels = np.array([0, 1, 2, 0, 1])
    per_class = [max_evidence(f, (labels == k).astype(float)).log_evidence / 5 for k in range(3)]
    assert logme(f, labels) == pytest.approx(sum(per_class) / 3, abs=1e-12)


def clustered(rng: np.random.Generator, labels: np.ndarray, spread: float) -> np.ndarray:
    centres = rng.normal(size=(int(labels.max()) + 1, 8)) * 3
    return centres[labels] + rng.normal(size=(len(labels), 8)) * spread


def test_logme_prefers_features_that_separate_the_classes() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 40)
    separable = clustered(rng, labels, 0.1)
    noise = rng.normal(size=(120, 8))
    assert logme(separable, labels) > logme(noise, labels) + 0.1


def test_logme_is_invariant_to_rotating_and_scaling_the_features() -> None:
    # Evidence depends on F only through its singular values and left singular vectors (an
    # orthogonal Q leaves both alone), and scaling F by c moves the fixed point to (c^2 alpha, beta)
    # with the same evidence.
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(4), 15)
    f = clustered(rng, labels, 1.0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    score = logme(f, labels)
    assert logme(f @ q, labels) == pytest.approx(score, abs=1e-8)
    assert logme(f * 50.0, labels) == pytest.approx(score, abs=1e-8)
    shuffle = rng.permutation(len(labels))
    assert logme(f[shuffle], labels[shuffle]) == pytest.approx(score, abs=1e-8)


def test_probe_accuracy_on_separable_and_random_features() -> None:
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 50)
    assert probe_accuracy(clustered(rng, labels, 0.3), labels) == 1.0
    chance = probe_accuracy(rng.normal(size=(200, 5)), labels)
    assert 0.1 < chance < 0.45  # 4 classes: about 0.25


def test_probe_fits_more_features_than_examples() -> None:
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(2), 10)
    wide = clustered(rng, labels, 0.3) @ rng.normal(size=(8, 50))  # 20 examples, 50 features
    assert probe_accuracy(wide, labels) == 1.0


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.array([[0.0, 1.0], [np.nan, 1.0], [2.0, 0.0]]), np.array([0, 1, 1]), "NaN"),
        (np.array([[0.0, 1.0], [np.inf, 1.0], [2.0, 0.0]]), np.array([0, 1, 1]), "infinite"),
        (np.ones((3, 2)), np.array([0, 0, 0]), "1 class"),
        (np.ones((2, 2)), np.array([0, 2]), "fewer examples"),
    ],
)
def test_scores_refuse_unusable_inputs(features: np.ndarray, labels: np.ndarray, message: str) -> None:
    for score in (logme, probe_accuracy):
        with pytest.raises(ScoringError, match=message):
            score(features, labels)


def test_logme_refuses_features_that_fit_the_labels_exactly() -> None:
    # 8 examples but 2 distinct feature vectors, each always with the same label: y lies in the
    # span of F, so the evidence grows without bound as beta does.
    f = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])[[0, 1] * 4]
    labels = np.array([0, 1] * 4)
    with pytest.raises(
        ScoringError,
        match=r"no finite maximum.*rank 2 < 8 examples.*2 distinct feature vectors of 3 dimensions",
    ):
        logme(f, labels)
    with pytest.raises(ScoringError, match="all zero"):
        logme(np.zeros((4, 3)), np.array([0, 1, 0, 1]))


def test_kendall_tau_by_hand() -> None:
    # x orders a < b < c < d; y swaps the last two: 5 concordant pairs, 1 discordant, of 6
    assert kendall_tau([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([0.1, 0.5, 0.9], [1, 2, 3]) == pytest.approx(1.0)
    # tau-b with a tie in y: pairs (12,13,14,23,24,34) -> signs y: +,+,+,0,+,+ ; x all +
    # concordant 5, discordant 0, untied x 6, untied y 5: 5 / sqrt(6 * 5)
    assert kendall_tau([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(5 / math.sqrt(30))


def test_kendall_tau_matches_scipy_on_random_rankings_with_ties() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")  # scikit-learn installs it; the skip gate fails a skip
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, size=9), rng.normal(size=9)
        assert kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [([1.0], [1.0], "length >= 2"), ([1, 2], [1, 2, 3], "same length"), ([1, 1, 1], [1, 2, 3], "same value"),
     ([1, float("nan")], [1, 2], "NaN")],
)  # fmt: skip
def test_kendall_tau_refuses_what_has_no_order(x: list, y: list, message: str) -> None:
    with pytest.raises(ScoringError, match=message):
        kendall_tau(x, y)
