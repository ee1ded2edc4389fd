"""Frechet distance between Gaussians fitted to feature sets (FID, Heusel et al. 2017), in float64.

`frechet_distance_from_stats` is the squared 2-Wasserstein distance of two Gaussians,
``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` (Dowson & Landau 1982), the quantity of pytorch-fid's
``calculate_frechet_distance``. pytorch-fid takes ``scipy.linalg.sqrtm`` of the non-symmetric product S1 S2,
which warns, goes complex or non-finite when the covariances are singular (fewer samples than dimensions, dead
ReLU units) and then retries with ``eps`` on the diagonal. Here the trace of the root comes from symmetric
eigendecompositions: with R = S1^(1/2), S1 S2 = R^-1 (R S2 R) R is similar to the positive semi-definite
R S2 R, so tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(R S2 R)) - the same number for regular covariances, and
finite, real and without an ``eps`` for singular ones.

`RunningStats` accumulates the mean and covariance of a stream of feature batches in float64 with Chan et al.'s
(1979) pairwise update, so statistics of 50,000 images need memory flat in N.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), covariance (d, d)) of features (n, d), float64; the covariance uses n - 1."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, d), got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or inf")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) of two covariances, from the eigenvalues of the PSD matrix S1^(1/2) S2 S1^(1/2)."""
    r = _psd_sqrt(sigma1)
    m = r @ sigma2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)).sum())


def _check_stats(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} {mu2.shape}, covariances {s1.shape} {s2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
    return mu1, 0.5 * (s1 + s1.T), mu2, 0.5 * (s2 + s2.T)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): squared 2-Wasserstein distance of two Gaussians (FID of
    Inception pool3 statistics), float64; 0 for identical statistics, singular or not (see module doc)."""
    mu1, s1, mu2, s2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)  # round-off can make the distance of identical sets a tiny negative number


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (n_a, d) and (n_b, d) (symmetric)."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


class RunningStats(NamedTuple):
    """Count, mean (d,) and centred sum of squares (d, d) of the rows seen so far, float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "RunningStats":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def update(self, feats: np.ndarray) -> "RunningStats":
        """The statistics of the rows seen so far and `feats` (n, d) (Chan, Golub & LeVeque 1979 pairwise update)."""
        f = np.asarray(feats, np.float64)
        if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be (n, {self.mean.shape[0]}), got shape {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError("features contain NaN or inf")
        nb = f.shape[0]
        if nb == 0:
            return self
        mb = f.mean(0)
        c = f - mb
        n = self.count + nb
        delta = mb - self.mean
        mean = self.mean + delta * (nb / n)
        m2 = self.m2 + c.T @ c + np.outer(delta, delta) * (self.count * nb / n)
        return RunningStats(n, mean, m2)

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance with n - 1), as `gaussian_stats` of all rows seen; ValueError below 2 rows."""
        if self.count < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.count}")
        return self.mean.copy(), self.m2 / (self.count - 1)
