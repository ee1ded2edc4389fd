"""TfdsSource against real, locally prepared TFDS datasets (no TensorFlow needed).

The datasets are built with tfds' own ``GeneratorBasedBuilder.download_and_prepare
(file_format="array_record")``. TFDS only needs TensorFlow to *encode numpy*
images (``tf.image.encode_png``); when the generator yields PIL images the
Image feature encodes them with Pillow, so the whole prepare -> ArrayRecord ->
``as_data_source`` path runs without TensorFlow. The builder classes are
defined under ``skip_registration()``, so ``make_source`` has to find the
datasets from the files in ``data_dir`` alone (as for a copied, prepared dataset).
"""

import time

import numpy as np
import pytest
from PIL import Image

from jdiff.data import TfdsSource, make_source

tfds = pytest.importorskip("tensorflow_datasets")


def _gray_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def _rgb_images(n):  # H=10, W=6 (portrait, like celeb_a 218x178)
    return np.random.default_rng(99).integers(0, 256, (n, 10, 6, 3), dtype=np.uint8)


SPLITS = {"train": (12, 1), "test": (5, 2)}  # split -> (num examples, seed)


def _expected_gray(split):
    n, seed = SPLITS[split]
    return _gray_images(n, seed), np.arange(n) % 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    with tfds.core.registered.skip_registration():

        class JdiffTinyGray(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(shape=(8, 8, 1)),
                            "label": tfds.features.ClassLabel(num_classes=3),
                        }
                    ),
                )

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(split) for split in SPLITS}

            def _generate_examples(self, split):
                images, labels = _expected_gray(split)
                for i, (img, lab) in enumerate(zip(images, labels)):
                    yield i, {"image": Image.fromarray(img, "L"), "label": int(lab)}

        class JdiffTinyRgb(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self, features=tfds.features.FeaturesDict({"photo": tfds.features.Image(shape=(10, 6, 3))})
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, img in enumerate(_rgb_images(4)):
                    yield i, {"photo": Image.fromarray(img, "RGB")}

    for cls in (JdiffTinyGray, JdiffTinyRgb):
        builder = cls(data_dir=root)
        builder.download_and_prepare(file_format="array_record")
        assert builder.is_prepared()
    return root


def _match_rows(got, expected):
    """Index into ``expected`` of each row of ``got`` (rows must match exactly)."""
    flat = expected.reshape(len(expected), -1)
    out = []
    for row in got.reshape(len(got), -1):
        hits = np.flatnonzero((flat == row).all(axis=1))
        assert len(hits) == 1
        out.append(hits[0])
    return np.array(out)


@pytest.mark.parametrize("split", ["train", "test"])
def test_reads_exact_images_and_labels(data_dir, split):
    src = make_source("jdiff_tiny_gray", split=split, data_dir=data_dir)
    assert isinstance(src, TfdsSource)
    images, labels = _expected_gray(split)
    assert len(src) == len(images) and src.num_classes == 3 and src.image_shape == (8, 8, 1)
    b = src.get(np.arange(len(src)))
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
    expected = (images.astype(np.float32) / np.float32(127.5) - 1)[..., None]
    which = _match_rows(b["image"], expected)
    np.testing.assert_array_equal(np.sort(which), np.arange(len(images)))  # every example exactly once
    np.testing.assert_array_equal(b["label"], labels[which])
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    np.testing.assert_array_equal(src.get(np.array([2, 0]))["image"], b["image"][[2, 0]])


def test_unlabelled_nonsquare_crop_and_resize(data_dir):
    src = TfdsSource("jdiff_tiny_rgb", data_dir=data_dir)
    assert src.num_classes is None and src.image_shape == (6, 6, 3)
    b = src.get(np.arange(4))
    np.testing.assert_array_equal(b["label"], np.zeros(4, np.int32))
    crops = _rgb_images(4)[:, 2:8].astype(np.float32) / np.float32(127.5) - 1  # centre rows 2..7
    np.testing.assert_array_equal(np.sort(_match_rows(b["image"], crops)), np.arange(4))
    small = TfdsSource("jdiff_tiny_rgb", data_dir=data_dir, image_size=3, channels=1)
    x = small.get(np.arange(4))["image"]
    assert small.image_shape == (3, 3, 1) and x.shape == (4, 3, 3, 1) and x.min() >= -1 and x.max() <= 1


def test_bad_split(data_dir):
    with pytest.raises(ValueError, match="split"):
        make_source("jdiff_tiny_gray", split="validation", data_dir=data_dir)


def test_unprepared_dataset_fails_fast(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="not prepared") as err:
        make_source("mnist", data_dir=tmp_path)
    assert "tfds build mnist" in str(err.value)
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        make_source("no_such_dataset_xyz", data_dir=tmp_path)
    assert time.monotonic() - t0 < 5
    assert not any(tmp_path.rglob("*.array_record*"))
