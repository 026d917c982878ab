"""Transferability scores: how well a frozen backbone's outputs fit a target task, without training it.

Pure numpy on float64, one function per score:

- ``logme`` (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021): for each class, a Bayesian linear model ``y = F w + noise`` with prior
  ``w ~ N(0, 1/alpha)`` and noise ``N(0, 1/beta)`` on the one-vs-rest target; alpha and beta by the
  paper's fixed-point iteration (Algorithm 1), the log evidence at that point divided by N,
  averaged over classes. Higher is better; only differences between backbones on the same data
  mean anything.
- ``leep`` (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations", ICML 2020): the source head's predicted distribution over its own classes
  ``z`` becomes a classifier of the target labels through the empirical ``P(y | z)``; LEEP is that
  classifier's average log-likelihood of the true labels (<= 0; higher is better).
- ``probe_accuracy``: the plain baseline: stratified k-fold accuracy of a ridge least-squares
  classifier on standardised features, its penalty chosen by leave-one-out on each training fold.

``kendall_tau`` checks a score against reality: how alike it orders the candidates to the
accuracies they reach once fine-tuned (what the LogME paper reports, about 0.5 on its benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fineserve.training.errors import ScoringError

# The fixed point is usually reached in a few steps (the paper); the cap stops a diverging one.
MAX_ITERATIONS = 1000
TOLERANCE = 1e-10
# y counts as inside the features' span when what is left of |y|^2 is below rounding error.
SPAN_TOLERANCE = 1e-12
# The probe's L2 penalties (times N, on standardised features), one chosen per fit by leave-one-out.
RIDGE_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def check_inputs(features: np.ndarray, labels: np.ndarray, what: str = "features") -> None:
    """Raises ``ScoringError`` for inputs no score can use: a shape mismatch, NaN or infinity,
    one class only, fewer examples than classes."""
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ScoringError(f"{what} {features.shape} and labels {labels.shape} do not match")
    bad = ~np.isfinite(features)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise ScoringError(f"{what} hold NaN or infinite values ({rows} of {len(features)} examples)")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ScoringError(f"the data hold {len(classes)} class; scores need at least 2")
    if len(labels) < int(labels.max()) + 1:
        raise ScoringError(f"fewer examples ({len(labels)}) than classes ({int(labels.max()) + 1})")


@dataclass(frozen=True)
class Evidence:
    """The maximised evidence of one target: the fitted precisions and log p(y | F, alpha, beta)."""

    alpha: float  # prior precision of the weights
    beta: float  # precision of the noise
    log_evidence: float  # not divided by N
    iterations: int


@dataclass(frozen=True)
class ThinSVD:
    """``F = U diag(s) V^T`` keeping the r singular values above rounding error: computed once
    per feature matrix and shared by every class (LogME) or penalty (the probe)."""

    u: np.ndarray  # [N, r]
    s: np.ndarray  # [r]
    vt: np.ndarray  # [r, D]

    @classmethod
    def of(cls, features: np.ndarray) -> ThinSVD:
        f = np.asarray(features, dtype=np.float64)
        u, s, vt = np.linalg.svd(f, full_matrices=False)
        keep = s > s.max(initial=0.0) * max(f.shape) * np.finfo(np.float64).eps
        if not keep.any():
            raise ScoringError("the features are all zero")
        return cls(u[:, keep], s[keep], vt[keep])


@dataclass(frozen=True)
class Spectrum:
    """One target seen through the thin SVD of F (rank r): with ``z = U^T y`` every quantity of
    the model is a sum over the r singular directions, O(r) per evaluation whether N > D or N < D."""

    n: int
    d: int
    s2: np.ndarray  # the r non-zero squared singular values
    z: np.ndarray  # y in the r left singular directions
    outside: float  # |y - U z|^2: the part of y outside F's column space, which no weights fit

    @classmethod
    def of(cls, svd: ThinSVD, target: np.ndarray) -> Spectrum:
        y = np.asarray(target, dtype=np.float64)
        z = svd.u.T @ y
        outside = float(np.sum((y - svd.u @ z) ** 2))
        if outside <= SPAN_TOLERANCE * float(y @ y):
            outside = 0.0  # y lies in the span of the features, to working precision
        return cls(len(y), svd.vt.shape[1], svd.s**2, z, outside)

    def posterior(self, alpha: float, beta: float) -> tuple[float, float, float]:
        """gamma (the effective number of parameters), |m|^2 and |y - F m|^2 at the posterior
        mean ``m = beta A^-1 F^T y``, ``A = alpha I + beta F^T F``."""
        shrink = alpha + beta * self.s2
        gamma = float((beta * self.s2 / shrink).sum())
        m_norm2 = float(((beta * np.sqrt(self.s2) * self.z / shrink) ** 2).sum())
        residual = self.outside + float(((alpha * self.z / shrink) ** 2).sum())
        return gamma, m_norm2, residual

    def log_evidence(self, alpha: float, beta: float) -> float:
        """Equation 2 of the paper: ``N/2 log beta + D/2 log alpha - N/2 log 2 pi
        - beta/2 |y - F m|^2 - alpha/2 |m|^2 - 1/2 log |A|``."""
        _, m_norm2, residual = self.posterior(alpha, beta)
        # log |A| = D log alpha + sum log(1 + beta s^2 / alpha): the D - r directions without data
        # keep the prior's precision, and D/2 log alpha cancels without forming huge logs.
        return (
            self.n / 2 * math.log(beta)
            - self.n / 2 * math.log(2 * math.pi)
            - beta / 2 * residual
            - alpha / 2 * m_norm2
            - float(np.log1p(beta * self.s2 / alpha).sum()) / 2
        )


def max_evidence(features: np.ndarray, target: np.ndarray, svd: ThinSVD | None = None) -> Evidence:
    """Algorithm 1 of the LogME paper for one target vector ``y`` ([N]) on features ``F`` ([N, D]):
    from alpha = beta = 1, ``alpha <- gamma / |m|^2``, ``beta <- (N - gamma) / |y - F m|^2``
    until the evidence stops changing.

    The maximum may lie at a boundary with a finite evidence: alpha -> infinity (the features
    explain nothing, the weights go to 0) or, with N <= D, beta -> infinity (the features
    interpolate the labels, and the evidence is that of the noise-free model). The evidence has no
    maximum when y lies in the span of rank-deficient features (fewer distinct feature vectors
    than examples, e.g. duplicates): beta and the evidence grow without bound.

    Raises:
        ScoringError: all-zero features, or an evidence without a finite maximum.
    """
    spectrum = Spectrum.of(svd or ThinSVD.of(features), target)
    if spectrum.outside == 0.0 and len(spectrum.s2) < spectrum.n:
        # Weights fit y exactly while N - r directions of y-space stay free of the features:
        # N/2 log beta - 1/2 log |A| grows like (N - r)/2 log beta, without bound.
        distinct = len(np.unique(np.asarray(features), axis=0))
        raise ScoringError(
            f"LogME has no finite maximum: the features fit the labels exactly with rank {len(spectrum.s2)} "
            f"< {spectrum.n} examples ({distinct} distinct feature vectors of {spectrum.d} dimensions; "
            "duplicate examples? use more, distinct examples)"
        )
    alpha, beta = 1.0, 1.0
    evidence = spectrum.log_evidence(alpha, beta)
    for iterations in range(1, MAX_ITERATIONS + 1):
        gamma, m_norm2, residual = spectrum.posterior(alpha, beta)
        with np.errstate(divide="ignore", over="ignore"):
            alpha = gamma / m_norm2 if m_norm2 > 0 else math.inf
            beta = (spectrum.n - gamma) / residual if residual > 0 else math.inf
        if not (0 < alpha < math.inf and 0 < beta < math.inf):
            break
        previous, evidence = evidence, spectrum.log_evidence(alpha, beta)
        if not math.isfinite(evidence):
            break
        if abs(evidence - previous) <= TOLERANCE * max(1.0, abs(evidence)):
            return Evidence(alpha, beta, evidence, iterations)
    raise ScoringError(
        f"LogME did not converge (alpha {alpha:.3g}, beta {beta:.3g} after {iterations} steps) on "
        f"{spectrum.n} examples with {spectrum.d} features"
    )


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` ([N, D]) for integer ``labels`` ([N]): the maximised log evidence of
    each class's one-vs-rest indicator, divided by N, averaged over the classes present."""
    check_inputs(features, labels)
    n = len(labels)
    svd = ThinSVD.of(features)
    scores = [
        max_evidence(features, (labels == k).astype(np.float64), svd).log_evidence / n
        for k in np.unique(labels)
    ]
    return float(np.mean(scores))


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP of a source model whose predicted distributions over its Z classes are
    ``source_probs`` ([N, Z], rows summing to 1) for target ``labels`` ([N], integers 0..K-1).

    Empirical joint ``P(y, z) = 1/N sum_i theta_z(x_i) [y_i = y]``, conditional
    ``P(y | z) = P(y, z) / P(z)``, score ``1/N sum_i log sum_z P(y_i | z) theta_z(x_i)``.
    """
    check_inputs(source_probs, labels, "source predictions")
    probs = np.asarray(source_probs, dtype=np.float64)
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ScoringError("source predictions must be probabilities (non-negative rows summing to 1)")
    n = len(labels)
    onehot = np.eye(int(labels.max()) + 1)[labels]  # [N, K]
    joint = onehot.T @ probs / n  # [K, Z]
    marginal = joint.sum(axis=0)  # [Z]
    # A source class no example gives any probability to has no conditional; it weighs 0 anyway.
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    predicted = probs @ conditional.T  # [N, K]: the expected empirical predictor
    return float(np.mean(np.log(predicted[np.arange(n), labels])))


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold index per example: each class's examples, shuffled, dealt round-robin, so every
    fold holds each class in proportion."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    start = 0
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        assignment[members] = (start + np.arange(len(members))) % folds
        start += len(members)  # the next class continues the deal where this one stopped
    return assignment


def ridge_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Weights ([D + 1, K], last row the bias) of least squares on one-hot targets with an L2
    penalty, on standardised features, in closed form. The penalty is the one of
    ``RIDGE_PENALTIES`` (times N) with the smallest leave-one-out squared error, which ridge
    regression gives without refitting: ``e_i = (y_i - yhat_i) / (1 - H_ii)``."""
    n = len(labels)
    mean, std = features.mean(axis=0), features.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant feature carries nothing: leave it at 0
    targets = np.eye(num_classes)[labels]
    target_mean = targets.mean(axis=0)
    centred = targets - target_mean
    svd = ThinSVD.of((features - mean) / std)
    projected = svd.u.T @ centred  # [r, K]
    best: tuple[float, np.ndarray] | None = None
    for penalty in RIDGE_PENALTIES:
        shrink = svd.s**2 / (svd.s**2 + penalty * n)
        fitted = svd.u @ (shrink[:, None] * projected)
        leverage = (svd.u**2) @ shrink + 1 / n  # + 1/n: the intercept fitted by centring
        with np.errstate(divide="ignore", invalid="ignore"):
            loo_error = float((((centred - fitted) / (1 - leverage)[:, None]) ** 2).sum())
        if not math.isfinite(loo_error):
            loo_error = math.inf  # an example that alone decides its own fit: no estimate
        if best is None or loo_error < best[0]:
            weights = svd.vt.T @ ((svd.s / (svd.s**2 + penalty * n))[:, None] * projected)
            best = (loo_error, weights)
    assert best is not None
    # Fold the standardisation and the centring into the weights so callers use raw features.
    scaled = best[1] / std[:, None]
    bias = target_mean - mean @ scaled
    return np.vstack([scaled, bias])


def probe_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Stratified ``folds``-fold accuracy of ``ridge_classifier`` (every example scored once, by
    the classifier fitted on the other folds)."""
    check_inputs(features, labels)
    f = np.asarray(features, dtype=np.float64)
    num_classes = int(labels.max()) + 1
    folds = max(2, min(folds, len(labels)))
    assignment = fold_assignment(labels, folds, seed)
    correct = 0
    for fold in range(folds):
        held_out = assignment == fold
        weights = ridge_classifier(f[~held_out], labels[~held_out], num_classes)
        scores = f[held_out] @ weights[:-1] + weights[-1]
        correct += int((scores.argmax(axis=1) == labels[held_out]).sum())
    return correct / len(labels)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two rankings of the same items: (concordant - discordant pairs)
    over the geometric mean of the pairs untied in x and the pairs untied in y; 1 for the same
    order, -1 for the reverse, ties counted as in Kendall (1945).

    Raises:
        ScoringError: fewer than two items, lengths differ, a value is not finite, or either
            side is all ties (tau is undefined).
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ScoringError(
            f"kendall_tau: needs two sequences of the same length >= 2, not {a.shape}, {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ScoringError("kendall_tau: the values hold NaN or infinity")
    upper = np.triu_indices(len(a), k=1)  # every pair once
    da, db = np.sign(a[:, None] - a[None, :])[upper], np.sign(b[:, None] - b[None, :])[upper]
    untied_a, untied_b = np.count_nonzero(da), np.count_nonzero(db)
    if untied_a == 0 or untied_b == 0:
        raise ScoringError("kendall_tau: one side gives every item the same value; no order to compare")
    return float((da * db).sum() / math.sqrt(untied_a * untied_b))
