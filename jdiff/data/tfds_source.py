"""Random access to a *prepared* TensorFlow Datasets dataset without TensorFlow.

Reads ArrayRecord files through ``builder.as_data_source`` (what
``tfds.data_source(..., download=False)`` does). Nothing is ever downloaded
or generated here: an unprepared dataset fails fast with instructions.
"""

from __future__ import annotations

import os

import numpy as np

from jdiff._logs import quiet_absl
from jdiff.data import image_ops
from jdiff.data.sources import _as_indices, _check_channels, check_upscale
from jdiff.data.workers import check_workers, decode_into


def _prepare_hint(name: str, data_dir) -> str:
    where = f" --data_dir={os.fspath(data_dir)}" if data_dir is not None else ""
    return (
        f"Prepare it once on a machine with internet access, e.g. `pip install jdiff[tf]` then "
        f"`tfds build {name} --file_format=array_record{where}`, and copy the data directory here "
        "(data_dir argument, or the TFDS_DATA_DIR environment variable, default ~/tensorflow_datasets)."
    )


class TfdsSource:
    """Images (and ClassLabel labels) of one split of a prepared TFDS dataset.

    Args:
      name: TFDS name, optionally with config/version ("mnist", "celeb_a:2.1.0").
        Works for registered datasets and for any dataset folder in ``data_dir``.
      split: TFDS split spec ("train", "test", "train[:90%]", ...).
      data_dir: TFDS data directory (None -> TFDS default).
      image_size: output side; None -> native side when the images are square,
        the shorter side (centre crop, e.g. celeb_a 218x178 -> 178) otherwise;
        at most ``MAX_UPSCALE`` (8) times the native shorter side.
      channels: 1 or 3; None -> native channel count (1 or 3).
      workers: threads that read and decode a batch (None: one per core, at
        most 8; the result does not depend on it).

    The image feature is "image" (else the only top-level Image feature); the
    label is "label" if it is a ClassLabel (``num_classes`` from its info),
    otherwise the source is unlabelled (``num_classes=None``, labels 0).
    ``get`` decodes with Pillow and returns float32 (n, S, S, C) in [-1, 1]
    (uint8 or uint16 pixels scaled by dtype, alpha composited on black; see
    ``image_ops``).
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        workers: int | None = None,
    ):
        import tensorflow_datasets as tfds  # local: ~0.4 s import

        self.workers = check_workers(workers)
        try:
            with quiet_absl():  # tfds warns about missing folders; the error below says it better
                builder = tfds.builder(name, data_dir=data_dir)
                prepared = builder.is_prepared()
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(
                f"name {name!r} is not a known TFDS dataset and no prepared copy was found in "
                f"data_dir={data_dir!r} ({str(e).splitlines()[0]})"
            ) from None
        if not prepared:
            raise ValueError(
                f"TFDS dataset name={name!r} is not prepared in {os.fspath(builder.data_dir)!r}; "
                f"jdiff never downloads data. {_prepare_hint(name, data_dir)}"
            )
        formats = {f.value for f in builder.info.available_file_formats()}
        if "array_record" not in formats:
            raise ValueError(
                f"TFDS dataset name={name!r} is prepared as {sorted(formats)}, but random access needs "
                f"array_record. {_prepare_hint(name, data_dir)}"
            )
        splits = sorted(builder.info.splits.keys())
        try:
            self._ds = builder.as_data_source(split=split, file_format="array_record")
        except (KeyError, ValueError, AssertionError) as e:
            raise ValueError(f"split {split!r} is invalid for {name!r} (available: {splits}): {e}") from None

        features = builder.info.features
        image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        self.image_key = "image" if "image" in image_keys else (image_keys[0] if len(image_keys) == 1 else None)
        if self.image_key is None:
            raise ValueError(f"name {name!r}: cannot find the image feature among {sorted(features.keys())}")
        label = features["label"] if "label" in features.keys() else None
        self.label_key = "label" if isinstance(label, tfds.features.ClassLabel) else None
        self.num_classes = label.num_classes if self.label_key else None

        h, w, c = features[self.image_key].shape
        if channels is None:
            channels = 1 if c == 1 else 3
        self.channels = _check_channels(channels)
        if image_size is None:
            if h is None or w is None:
                raise ValueError(f"name {name!r} has variable-size images; pass image_size")
            image_size = min(h, w)
        if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if h is not None and w is not None:
            check_upscale(int(image_size), min(h, w), f"TFDS dataset {name!r}")
        self.image_size = int(image_size)
        self.image_shape = (self.image_size, self.image_size, self.channels)
        self.name, self.split, self.info = name, split, builder.info

    def __len__(self) -> int:
        return len(self._ds)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = _as_indices(indices, len(self))
        images = np.empty((len(idx),) + self.image_shape, np.float32)
        labels = np.zeros(len(idx), np.int32)

        def decode(k: int) -> np.ndarray:  # reads (tfds decodes the PNG/JPEG record) and prepares example k
            ex = self._ds[int(idx[k])]
            if self.label_key:
                labels[k] = ex[self.label_key]
            return image_ops.prepare(np.asarray(ex[self.image_key]), self.image_size, self.channels)

        decode_into(images, range(len(idx)), decode, self.workers)
        return {"image": images, "label": labels}
