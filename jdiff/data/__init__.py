"""Input pipeline: random-access sources + a stateless (seed, step) -> batch sampler.

Typical use::

  source = make_source("digits", split="train")           # or a folder, or "mnist"
  batch = batch_at(source, step, global_batch_size=128, seed=0)
  for batch in iterate_batches(source, start_step=step, global_batch_size=128,
                               seed=0, sharding=data_sharding):
    ...

Errors: invalid arguments or unusable data found when a source is built are
``ValueError``s (unreadable image files are skipped with a warning, or refused
with ``on_bad_image="error"``). An image that fails to decode later, during
``get``/iteration (corrupt pixel data, file changed or removed on disk), raises
``DataError`` (a ``ValueError`` subclass, one line naming the file); it reaches
the consumer of ``iterate_batches`` unchanged, so a training loop can catch it,
save a checkpoint and stop.
"""

from jdiff.data.captions import CaptionedSource
from jdiff.data.image_ops import DataError
from jdiff.data.latent_cache import LatentCacheSource
from jdiff.data.pipeline import batch_at, iterate_batches, make_source
from jdiff.data.prefetch import BatchIterator
from jdiff.data.sources import ArraySource, DigitsSource, ImageFolderSource, Source
from jdiff.data.tfds_source import TfdsSource

__all__ = [
    "ArraySource",
    "BatchIterator",
    "CaptionedSource",
    "DataError",
    "DigitsSource",
    "ImageFolderSource",
    "LatentCacheSource",
    "Source",
    "TfdsSource",
    "batch_at",
    "iterate_batches",
    "make_source",
]
