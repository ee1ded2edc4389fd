"""Decoding on worker threads (`data.workers`): same batches for any worker count, the first bad file in order
raises, the work is really spread over threads, and the setting reaches the sources."""

import threading

import numpy as np
import pytest
from PIL import Image
from test_data_images import HAVE_TFDS, _png_with_corrupt_pixels

from jdiff.data import DataError, ImageFolderSource, batch_at, image_ops, make_source
from jdiff.data.workers import check_workers, decode_into, default_workers

if HAVE_TFDS:
    from test_data_tfds import data_dir  # noqa: F401 - the prepared tiny TFDS datasets


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """11 JPEG/PNG images of different sizes in two classes (every batch resizes and crops)."""
    root = tmp_path_factory.mktemp("workers")
    rng = np.random.default_rng(0)
    for i in range(11):
        (root / "ab"[i % 2]).mkdir(exist_ok=True)
        h, w = (int(v) for v in rng.integers(9, 20, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(root / "ab"[i % 2] / f"{i:02d}.{'jpg' if i % 3 else 'png'}")
    return root


def test_batches_do_not_depend_on_the_worker_count(folder):
    one = ImageFolderSource(folder, 8, workers=1)
    seq = {"image": np.stack([image_ops.prepare(image_ops.read_image(f), 8, 3) for f in one.files])}
    for workers in (1, 2, 3, 16):
        src = ImageFolderSource(folder, 8, workers=workers)
        got = src.get(np.arange(len(src)))
        np.testing.assert_array_equal(got["image"], seq["image"])  # bit for bit: each image decoded once, in place
        for step in (0, 3):
            a = batch_at(one, step, global_batch_size=6, seed=5, random_flip=True)
            b = batch_at(src, step, global_batch_size=6, seed=5, random_flip=True)
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])


def test_decoding_runs_on_several_threads(folder, monkeypatch):
    names, read = set(), image_ops.read_image

    def recording(path):
        names.add(threading.current_thread().name)
        return read(path)

    monkeypatch.setattr(image_ops, "read_image", recording)
    ImageFolderSource(folder, 8, workers=3).get(np.arange(9))
    assert names == {threading.current_thread().name, "jdiff-data-decode-1", "jdiff-data-decode-2"}
    names.clear()
    ImageFolderSource(folder, 8, workers=1).get(np.arange(9))
    assert names == {threading.current_thread().name}  # one worker: the caller's thread only


def test_first_bad_file_in_order_is_the_error(tmp_path):
    for i in range(8):
        Image.fromarray(np.full((4, 4), 30 * i, np.uint8), "L").save(tmp_path / f"{i}.png")
    src = ImageFolderSource(tmp_path, 4, workers=4)
    (tmp_path / "2.png").write_bytes(_png_with_corrupt_pixels())  # after the start-up check
    (tmp_path / "6.png").write_bytes(_png_with_corrupt_pixels())
    for _ in range(3):  # whichever thread fails first, the error names the first bad file of the batch
        with pytest.raises(DataError, match=r"2\.png") as err:
            src.get(np.arange(8))
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"6\.png"):
        src.get(np.array([7, 6, 1]))


def test_decode_into_order_and_bounds():
    out = np.zeros(7)
    decode_into(out, list(range(7)), lambda i: i * i, workers=3)
    np.testing.assert_array_equal(out, np.arange(7) ** 2)
    decode_into(np.zeros(0), [], lambda i: 0, workers=4)  # empty batch
    assert 1 <= default_workers() <= 8 and check_workers(None) == default_workers() and check_workers(5) == 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_worker_counts_refused(folder, bad):
    with pytest.raises(ValueError, match="workers must be a positive int"):
        ImageFolderSource(folder, 8, workers=bad)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        make_source("digits", workers=bad)


def test_data_workers_setting_reaches_the_source(folder):
    from jdiff.config import ConfigError, TrainConfig, apply_overrides
    from jdiff.run import build_source

    config = apply_overrides(TrainConfig(), {"data.dataset": str(folder), "data.image_size": 8, "data.workers": 3})
    assert build_source(config).workers == 3
    assert build_source(apply_overrides(config, {"data.workers": None})).workers == default_workers()
    with pytest.raises(ConfigError, match="data.workers"):
        apply_overrides(config, {"data.workers": 0})


@pytest.mark.skipif(not HAVE_TFDS, reason="tensorflow_datasets not installed")
def test_tfds_batches_do_not_depend_on_the_worker_count(data_dir):  # noqa: F811 - fixture from test_data_tfds
    one = make_source("jdiff_tiny_rgb", data_dir=data_dir, image_size=4, workers=1)
    many = make_source("jdiff_tiny_rgb", data_dir=data_dir, image_size=4, workers=3)
    assert many.workers == 3 and len(many) == 4
    idx = np.array([3, 0, 2, 1, 2, 3])
    a, b = one.get(idx), many.get(idx)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
