"""Sample-quality metrics for 8x8 digits: a small held-out classifier, its hidden features, Frechet distance.

Protocol (used by `jdiff.quality`, i.e. ``benchmarks/digits_quality.py``; the diffusion model trains on the
digits "train" split):

* The classifier (`train_digit_classifier`) is an MLP fitted on the held-out "test" split (359 digits) only,
  so it never saw the digits the diffusion model learned from. Its accuracy is measured on the whole "train"
  split (1,438 digits it never saw) - a clean held-out estimate, no cross-validation needed.
* Features are the activations of its last hidden layer (`hidden_features`, numpy from ``coefs_``).
* The Frechet reference set is the "test" split: real digits the diffusion model never saw. The real-vs-real
  floor scores N real "train" digits against it: like generated samples, they are unseen by the classifier,
  and they are exactly what a perfect generator of the training distribution would produce, so the floor
  contains the same small-sample bias (N vs 359 points in 64 dimensions) that samples get.

Everything here is pure numpy / scikit-learn (no JAX) and deterministic for a fixed ``seed``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np

from jdiff.metrics.frechet import frechet_distance

NUM_CLASSES = 10
CONFIDENCE = 0.9
CLASSIFIER_HIDDEN = (64, 64)
CLASSIFIER_ALPHA = 1e-2
MAX_ENTROPY_BITS = math.log2(NUM_CLASSES)  # ten equally frequent classes
COPY_PERCENTILE = 5.0


# ---------------------------------------------------------------------------------------------------
# The digit classifier.


def flatten_images(images: np.ndarray) -> np.ndarray:
    """(n, 8, 8, 1), (n, 8, 8) or (n, 64) images in [-1, 1] -> float64 (n, 64)."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 3:
        x = x.reshape(len(x), -1)
    if x.ndim != 2 or x.shape[1] != 64:
        raise ValueError(f"expected 8x8 grey digits (n, 8, 8, 1), (n, 8, 8) or (n, 64), got shape {np.shape(images)}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or inf")
    return x


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (n, 8, 8, 1) in [-1, 1], labels int32 (n,)) of a `jdiff.data` digits split."""
    from jdiff.data import make_source

    src = make_source("digits", split=split)
    batch = src.get(np.arange(len(src)))
    return batch["image"], batch["label"]


def train_digit_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    hidden: tuple[int, ...] = CLASSIFIER_HIDDEN,
    alpha: float = CLASSIFIER_ALPHA,
    seed: int = 0,
):
    """A ReLU MLP (`sklearn.neural_network.MLPClassifier`, Adam, L2 ``alpha``) fitted on (images, labels)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    clf = MLPClassifier(
        hidden_layer_sizes=tuple(hidden), activation="relu", alpha=alpha, max_iter=2000, random_state=seed
    )
    # One BLAS thread: the matrices are tiny, and threaded BLAS on a busy machine is ~50x slower here.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(flatten_images(images), np.asarray(labels))
    return clf


def _forward(clf, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(last hidden activations (n, h), output logits (n, classes)) of a fitted ReLU MLPClassifier."""
    if getattr(clf, "activation", "relu") != "relu":
        raise ValueError(f"only ReLU MLPs are supported, got activation={clf.activation!r}")
    h = flatten_images(images)
    for w, b in zip(clf.coefs_[:-1], clf.intercepts_[:-1]):
        h = np.maximum(h @ w + b, 0.0)
    return h, h @ clf.coefs_[-1] + clf.intercepts_[-1]


def hidden_features(clf, images: np.ndarray) -> np.ndarray:
    """Activations of the classifier's last hidden layer (post-ReLU), float64 (n, hidden[-1])."""
    return _forward(clf, images)[0]


def class_probs(clf, images: np.ndarray) -> np.ndarray:
    """Softmax class probabilities (n, 10) (same as ``clf.predict_proba``, from the numpy forward pass)."""
    logits = _forward(clf, images)[1]
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
# Per-set statistics.


def confident_share(probs: np.ndarray, threshold: float = CONFIDENCE) -> float:
    """Share of rows whose largest class probability exceeds ``threshold``."""
    return float(np.mean(np.asarray(probs).max(1) > threshold))


def class_counts(predicted: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Histogram (num_classes,) of predicted labels."""
    return np.bincount(np.asarray(predicted, np.int64), minlength=num_classes)[:num_classes]


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy in bits of the distribution given by counts (log2(10) = 3.32 for ten equal classes)."""
    c = np.asarray(counts, np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


def max_min_ratio(counts: np.ndarray) -> float:
    """Largest / smallest class count (inf when a class is missing)."""
    c = np.asarray(counts)
    return float("inf") if c.min() == 0 else float(c.max() / c.min())


def nearest_distances(images: np.ndarray, reference: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Euclidean pixel distance (over the 64 pixels in [-1, 1]) of each image to its nearest reference image."""
    a, b = flatten_images(images), flatten_images(reference)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    if exclude_self:
        d2[d2 < 1e-9] = np.inf
    return np.sqrt(np.maximum(d2.min(1), 0.0))


def near_copy_threshold(heldout: np.ndarray, train_images: np.ndarray, percentile: float = COPY_PERCENTILE) -> float:
    """Pixel distance to the nearest training digit that only ``percentile`` % of held-out real digits undercut.

    A sample closer than this to a training digit counts as a near copy; a generator that generalises like
    the real data has about ``percentile`` % near copies, one that memorises up to 100 %.
    """
    return float(np.percentile(nearest_distances(heldout, train_images), percentile))


def score_images(
    clf,
    images: np.ndarray,
    ref_feats: np.ndarray,
    *,
    labels: Optional[np.ndarray] = None,
    train_images: Optional[np.ndarray] = None,
    copy_threshold: Optional[float] = None,
    threshold: float = CONFIDENCE,
) -> dict:
    """All figures of one image set: confident share, class spread, Frechet distance to ``ref_feats``.

    Args:
      clf: the fitted classifier (`train_digit_classifier`).
      images: (n, 8, 8, 1) in [-1, 1].
      ref_feats: hidden features of the real reference digits (`hidden_features`).
      labels: optional (n,) intended classes (class-conditional samples); adds ``label_agreement``, the share
        the classifier assigns to the intended class.
      train_images: optional digits the generator trained on; adds ``nn_train_median``, the median pixel
        distance of an image to its nearest training digit (a memorisation check: copies give 0), and with
        ``copy_threshold`` (`near_copy_threshold`) ``near_copy_share``, the share closer than that.
    """
    x = flatten_images(images)
    if np.abs(x).max() > 1.5:
        raise ValueError(f"images must lie in [-1, 1]; got values in [{x.min():.3g}, {x.max():.3g}]")
    feats = hidden_features(clf, x)
    probs = class_probs(clf, x)
    pred = probs.argmax(1)
    counts = class_counts(pred)
    out = {
        "num": int(len(x)),
        "confident_share": confident_share(probs, threshold),
        "mean_max_prob": float(probs.max(1).mean()),
        "class_counts": [int(c) for c in counts],
        "class_entropy_bits": entropy_bits(counts),
        "class_max_min_ratio": max_min_ratio(counts),
        "frechet": frechet_distance(feats, ref_feats),
    }
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(x),):
            raise ValueError(f"labels must have shape ({len(x)},), got {labels.shape}")
        out["label_agreement"] = float(np.mean(pred == labels))
    if train_images is not None:
        nn = nearest_distances(x, train_images)
        out["nn_train_median"] = float(np.median(nn))
        if copy_threshold is not None:
            out["near_copy_share"] = float(np.mean(nn < copy_threshold))
    return out
