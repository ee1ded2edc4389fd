"""Kernel Inception Distance, Inception Score and improved precision / recall of Inception features, float64."""

from __future__ import annotations

from typing import Optional

import numpy as np

KID_SUBSETS = 100  # torch-fidelity's defaults (kid_subsets, kid_subset_size, kid_degree, kid_coef0, rng_seed)
KID_SUBSET_SIZE = 1000
KID_SEED = 2020
IS_SPLITS = 10
PR_K = 3


def _features(a, name: str, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(a, np.float64)
    if f.ndim != 2 or f.shape[0] < min_rows:
        raise ValueError(f"{name} must be (n >= {min_rows}, d), got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} contain NaN or inf")
    return f


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None, coef0=1.0):
    """Unbiased estimate of MMD^2 between the distributions of rows of x and y (m rows each) with the kernel
    k(a, b) = (gamma a.b + coef0)^degree, gamma = 1/d by default (Binkowski et al. 2018, eq. 3; Gretton et al.
    2012): mean of k over pairs i != j within x and within y, minus twice the mean of k over all of x x y."""
    m = x.shape[0]
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kxx, kyy, kxy = ((a @ b.T * g + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(
    feats_a,
    feats_b,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    degree: int = 3,
    gamma: Optional[float] = None,
    coef0: float = 1.0,
    seed: int = KID_SEED,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): (mean, std) of `polynomial_mmd2` over ``subsets`` random subsets of
    ``subset_size`` rows of each set drawn without replacement, as torch-fidelity's ``kid_features_to_metric``
    (same defaults; subset indices from ``numpy.random.RandomState(seed).choice``, a then b per subset, so a
    given seed draws torch-fidelity's subsets)."""
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b differ in width: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if not 2 <= subset_size <= min(len(a), len(b)):
        raise ValueError(
            f"subset_size must be in [2, min(len(feats_a), len(feats_b)) = {min(len(a), len(b))}], got {subset_size}"
        )
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), subset_size, replace=False)]
        y = b[rng.choice(len(b), subset_size, replace=False)]
        mmds[i] = polynomial_mmd2(x, y, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())


def inception_score(logits, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) on each of ``splits`` consecutive
    chunks of the images (no shuffling), p(y) the chunk's mean prediction; (mean, std) over chunks, as the
    reference ``inception_score.py``. ``logits``: (N, 1008) Inception logits (`Inception.features_and_logits`,
    without the classifier bias as in the reference code)."""
    z = _features(logits, "logits")
    if not 1 <= splits <= len(z):
        raise ValueError(f"splits must be in [1, {len(z)}] (the number of images), got {splits}")
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    n, scores = len(z), []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_q = np.log(p[lo:hi].mean(0))
        kl = (p[lo:hi] * (log_p[lo:hi] - log_q)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def knn_radii(feats: np.ndarray, k: int = PR_K, rows: int = 512) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row (the k-NN hypersphere radius), in row blocks."""
    out = np.empty(len(feats))
    for lo in range(0, len(feats), rows):
        d = _sq_distances(feats[lo : lo + rows], feats)
        out[lo : lo + rows] = np.partition(d, k, axis=1)[:, k]  # index 0 is the row itself (distance 0)
    return out


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, rows: int = 512) -> float:
    """Share of ``points`` inside at least one ball (centre, squared radius)."""
    inside = 0
    for lo in range(0, len(points), rows):
        inside += int((_sq_distances(points[lo : lo + rows], centres) <= radii[None, :]).any(1).sum())
    return inside / len(points)


def precision_recall(real, fake, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, k = 3): the real manifold is the union of balls
    around each real feature reaching its k-th nearest real neighbour; precision is the share of fake features
    inside it, recall the share of real features inside the fake manifold built likewise. Distances in
    float64, row blocks (memory linear in the set sizes)."""
    r, f = _features(real, "real", k + 1), _features(fake, "fake", k + 1)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake differ in width: {r.shape[1]} vs {f.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    precision = _coverage(f, r, knn_radii(r, k))
    recall = _coverage(r, f, knn_radii(f, k))
    return precision, recall
