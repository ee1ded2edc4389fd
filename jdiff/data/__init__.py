"""Input pipeline: random-access sources + a stateless (seed, step) -> batch sampler.

Typical use::

  source = make_source("digits", split="train")           # or a folder, or "mnist"
  batch = batch_at(source, step, global_batch_size=128, seed=0)
  for batch in iterate_batches(source, start_step=step, global_batch_size=128,
                               seed=0, sharding=data_sharding):
    ...
"""

from jdiff.data.pipeline import batch_at, iterate_batches, make_source
from jdiff.data.prefetch import BatchIterator
from jdiff.data.sources import ArraySource, DigitsSource, ImageFolderSource, Source
from jdiff.data.tfds_source import TfdsSource

__all__ = [
    "ArraySource",
    "BatchIterator",
    "DigitsSource",
    "ImageFolderSource",
    "Source",
    "TfdsSource",
    "batch_at",
    "iterate_batches",
    "make_source",
]
