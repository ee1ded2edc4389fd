"""Sample-quality metrics.

* Digits (`jdiff.metrics.digits`): a small held-out classifier for 8x8 digits, its hidden features and sample
  statistics (used by `jdiff.quality`).
* Frechet distance (`jdiff.metrics.frechet`): `frechet_distance_from_stats` (mu1, sigma1, mu2, sigma2),
  `frechet_distance` of two feature sets, streamed `RunningStats`.
* FID Inception (`jdiff.metrics.inception`, `.inception_weights`, `.features`): pytorch-fid's FID Inception-v3
  in Flax from user-supplied .safetensors weights, `load_inception(path)(images) -> (N, 2048)` features,
  sharded over all devices.
* KID, Inception Score, precision / recall (`jdiff.metrics.scores`) and .npz statistics (`.stats_io`).
"""

from jdiff.metrics.digits import (
    CLASSIFIER_ALPHA,
    CLASSIFIER_HIDDEN,
    CONFIDENCE,
    COPY_PERCENTILE,
    MAX_ENTROPY_BITS,
    NUM_CLASSES,
    class_counts,
    class_probs,
    confident_share,
    entropy_bits,
    flatten_images,
    hidden_features,
    load_digits_split,
    max_min_ratio,
    near_copy_threshold,
    nearest_distances,
    score_images,
    train_digit_classifier,
)
from jdiff.metrics.frechet import (
    RunningStats,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    trace_sqrt_product,
)
from jdiff.metrics.scores import inception_score, kernel_inception_distance, polynomial_mmd2, precision_recall
from jdiff.metrics.stats_io import iter_npz_images, load_reference_images, load_stats, save_stats

__all__ = [
    "CLASSIFIER_ALPHA",
    "CLASSIFIER_HIDDEN",
    "CONFIDENCE",
    "COPY_PERCENTILE",
    "MAX_ENTROPY_BITS",
    "NUM_CLASSES",
    "RunningStats",
    "class_counts",
    "class_probs",
    "confident_share",
    "entropy_bits",
    "flatten_images",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "hidden_features",
    "inception_score",
    "iter_npz_images",
    "kernel_inception_distance",
    "load_digits_split",
    "load_reference_images",
    "load_stats",
    "max_min_ratio",
    "near_copy_threshold",
    "nearest_distances",
    "polynomial_mmd2",
    "precision_recall",
    "save_stats",
    "score_images",
    "trace_sqrt_product",
    "train_digit_classifier",
    "Inception",
    "check_images",
    "inception_from_variables",
    "load_inception",
    "stream_stats",
    "to_unit_range",
    "InceptionWeightsError",
    "expected_shapes",
    "params_from_state_dict",
    "read_inception_params",
]


def __getattr__(name):  # the Inception network imports jax and flax: only when asked for
    import importlib

    for mod in map(importlib.import_module, ("jdiff.metrics.features", "jdiff.metrics.inception_weights")):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module 'jdiff.metrics' has no attribute {name!r}")
