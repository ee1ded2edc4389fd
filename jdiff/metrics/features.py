"""Inception features of images, sharded over every device of every process, and streamed statistics.

``fn = load_inception("inception.safetensors")`` returns an `Inception`; ``fn(images)`` maps (N, H, W, 3) float
images in [0, 1] to the (N, 2048) pool3 features of pytorch-fid's ``InceptionV3([3])`` on the same images
(resized to 299 x 299 as pytorch-fid does; `jdiff.metrics.inception`). ``fn.features_and_logits(images)`` also
returns the 1008 classifier logits for the Inception Score.

Each call splits the batch over a one-axis mesh of all devices (``devices``; default every device of every
process). In a multi-process run every process passes its own images (the same number in each) and gets the
features of all processes' images, process-major. The network is compiled once per per-device batch size
(the batch is padded to a multiple of the device count), the resize once per input size.

`stream_stats` folds a stream of image batches into float64 mean and covariance (`RunningStats`), keeping
features only if asked, so FID-50k needs memory flat in N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdiff.metrics.frechet import RunningStats
from jdiff.metrics.inception import FEATURES, FIDInceptionV3, preprocess
from jdiff.metrics.inception_weights import read_inception_params


def check_images(images: Any, name: str = "images") -> np.ndarray:
    """``images`` as float32 numpy (N >= 1, H, W, 3) in [0, 1]; ValueError naming ``name`` otherwise."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] < 1 or min(x.shape[1:3]) < 1:
        raise ValueError(f"{name} must be (N, H, W, 3) RGB images with N >= 1, got shape {x.shape}")
    if x.dtype == np.uint8:
        raise ValueError(f"{name} are uint8; pass float images in [0, 1] (divide by 255)")
    x = x.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} contain NaN or inf")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x


@jax.jit
def _network(variables, x):
    """(pool3 features, logits) of preprocessed images; one program per input shape and sharding, shared by
    every `Inception` (the variables are an argument)."""
    model = FIDInceptionV3()
    feats = model.apply(variables, x)
    return feats, model.apply(variables, feats, method=FIDInceptionV3.logits)


_preprocess = jax.jit(preprocess)


def _gather(a: jax.Array) -> np.ndarray:
    """A batch-sharded global array as numpy on every process (all-gathered across processes)."""
    if jax.process_count() == 1:
        return np.asarray(a)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


@dataclass(frozen=True, eq=False)
class Inception:
    """The FID Inception network with its weights replicated on ``devices`` (see module doc)."""

    variables: Any
    devices: tuple
    _rows: NamedSharding = field(repr=False)

    def __call__(self, images) -> np.ndarray:
        """(N, H, W, 3) images in [0, 1] -> (N, 2048) float32 pool3 features."""
        return self.features_and_logits(images)[0]

    def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(pool3 features (N, 2048), logits (N, 1008), the classifier without its bias) as float32 numpy."""
        x = check_images(images)
        n = len(x)
        local = sum(d.process_index == jax.process_index() for d in self.devices)
        pad = -n % local
        if pad:  # repeat the last image: every device gets the same number of rows
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
        batch = jax.make_array_from_process_local_data(self._rows, x)
        feats, logits = _network(self.variables, _preprocess(batch))
        procs = jax.process_count()
        return tuple(_gather(a).reshape(procs, n + pad, -1)[:, :n].reshape(procs * n, -1) for a in (feats, logits))


def inception_from_variables(variables, devices: Optional[Sequence[Any]] = None) -> Inception:
    """An `Inception` of given Flax variables ({"params": ...}), replicated on ``devices`` (default: all)."""
    devs = tuple(jax.devices() if devices is None else devices)
    mesh = Mesh(np.asarray(devs, dtype=object), ("data",))
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    return Inception(variables, devs, NamedSharding(mesh, P("data")))


def load_inception(path: str, devices: Optional[Sequence[Any]] = None) -> Inception:
    """The FID Inception network from a .safetensors file with pytorch-fid's state-dict keys
    (`jdiff.metrics.inception_weights`); InceptionWeightsError (one line) for a missing or wrong file."""
    return inception_from_variables(read_inception_params(path), devices)


def stream_stats(
    inception: Inception, batches: Iterable[np.ndarray], *, keep: bool = False, logits: bool = False
) -> tuple[RunningStats, Optional[np.ndarray], Optional[np.ndarray]]:
    """(statistics of the pool3 features of every image in ``batches``, the features if ``keep``, the logits if
    ``logits``); each batch is (n, H, W, 3) in [0, 1]. Memory is flat in the number of images unless kept."""
    stats, feats, logs = RunningStats.empty(FEATURES), [], []
    for batch in batches:
        f, lg = inception.features_and_logits(batch)
        stats = stats.update(f)
        if keep:
            feats.append(f)
        if logits:
            logs.append(lg)
    cat = lambda xs, on: (np.concatenate(xs) if xs else np.zeros((0, 0), np.float32)) if on else None
    return stats, cat(feats, keep), cat(logs, logits)


def to_unit_range(samples: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] -> [0, 1] as the 8-bit images sample.py writes: clipped, rounded to 1/255."""
    x = np.asarray(samples, np.float32)
    return np.round(np.clip((x + 1.0) * 127.5, 0.0, 255.0)) / 255.0
