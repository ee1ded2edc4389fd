"""Sources (digits, image folders) and the stateless (seed, step) sampler."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from jdiff.data import ArraySource, DigitsSource, ImageFolderSource, batch_at, make_source
from jdiff.data.sampler import indices_at
from jdiff.data.sources import digits_split_indices

# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_labels():
    from sklearn.datasets import load_digits

    return load_digits().target


def test_digits_splits_disjoint_cover_and_fixed(digits_labels):
    train = digits_split_indices(digits_labels, "train")
    test = digits_split_indices(digits_labels, "test")
    assert len(digits_split_indices(digits_labels, "all")) == 1797
    assert (len(train), len(test)) == (1438, 359)
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    # Stratified ~20% per class.
    for c in range(10):
        frac = np.mean(digits_labels[test] == c) / np.mean(digits_labels == c)
        assert 0.95 < frac < 1.05
    # The held-out set is part of the benchmark definition: it must never change.
    np.testing.assert_array_equal(test, digits_split_indices(digits_labels, "test"))
    assert hashlib.sha256(test.astype(np.int64).tobytes()).hexdigest()[:16] == DIGITS_TEST_HASH


DIGITS_TEST_HASH = "a0eba01317299b87"  # sha256 prefix of the int64 test indices


def test_digits_source_values():
    full = DigitsSource("all")
    assert len(full) == 1797 and full.num_classes == 10 and full.image_shape == (8, 8, 1)
    b = full.get(np.arange(len(full)))
    assert b["image"].dtype == np.float32 and b["image"].shape == (1797, 8, 8, 1)
    assert b["image"].min() == -1.0 and b["image"].max() == 1.0
    assert b["label"].dtype == np.int32 and set(b["label"].tolist()) == set(range(10))
    # The splits are exactly the corresponding rows of "all".
    test = DigitsSource("test")
    idx = digits_split_indices(b["label"], "test")
    np.testing.assert_array_equal(test.get(np.arange(len(test)))["image"], b["image"][idx])
    np.testing.assert_array_equal(test.get(np.arange(len(test)))["label"], b["label"][idx])


def test_digits_resize_channels_and_bad_split():
    s = make_source("digits", split="test", image_size=16, channels=3)
    x = s.get(np.arange(5))["image"]
    assert s.image_shape == (16, 16, 3) and x.shape == (5, 16, 16, 3)
    assert x.min() >= -1.0 and x.max() <= 1.0
    with pytest.raises(ValueError, match="split"):
        DigitsSource("validation")
    with pytest.raises(ValueError, match="channels"):
        DigitsSource(channels=2)


# ----------------------------------------------------------------------------- sampler


def _indexed_source(n):
    """Image channel 0 = example index, channel 1 = column number (shows flips)."""
    img = np.zeros((n, 2, 3, 2), np.float32)
    img[..., 0] = np.arange(n)[:, None, None]
    img[..., 1] = np.arange(3)
    return ArraySource(img, np.arange(n) % 7)


def _ids(batch):
    return batch["image"][:, 0, 0, 0].astype(int)


def test_batch_at_deterministic_and_steps_differ():
    src = _indexed_source(100)
    a = batch_at(src, 3, global_batch_size=16, seed=1)
    b = batch_at(src, 3, global_batch_size=16, seed=1)
    for k in ("image", "label"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image"].dtype == np.float32 and a["label"].dtype == np.int32
    assert a["image"].shape == (16, 2, 3, 2) and a["label"].shape == (16,)
    np.testing.assert_array_equal(a["label"], _ids(a) % 7)
    assert not np.array_equal(_ids(a), _ids(batch_at(src, 4, global_batch_size=16, seed=1)))
    assert not np.array_equal(_ids(a), _ids(batch_at(src, 3, global_batch_size=16, seed=2)))


@pytest.mark.parametrize("n,bs", [(10, 4), (37, 8), (5, 16)])
def test_each_example_once_per_epoch(n, bs):
    src = _indexed_source(n)
    epochs = 3
    steps = -(-epochs * n // bs)
    stream = np.concatenate([_ids(batch_at(src, s, global_batch_size=bs, seed=7)) for s in range(steps)])
    orders = [stream[e * n : (e + 1) * n] for e in range(epochs)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    np.testing.assert_array_equal(stream, indices_at(n, np.arange(steps * bs), seed=7))  # the documented stream


def test_resume_equivalence():
    src = _indexed_source(23)
    kw = dict(global_batch_size=6, seed=3, random_flip=True)
    one_go = [batch_at(src, s, **kw) for s in range(10)]
    resumed = [batch_at(src, s, **kw) for s in range(5)] + [batch_at(src, s, **kw) for s in range(5, 10)]
    for a, b in zip(one_go, resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_host_slices_concatenate_to_global_batch():
    src = _indexed_source(50)
    for step in (0, 7, 8):
        full = batch_at(src, step, global_batch_size=12, seed=0, random_flip=True)
        parts = [
            batch_at(src, step, global_batch_size=12, seed=0, process_index=p, process_count=2, random_flip=True)
            for p in range(2)
        ]
        for k in ("image", "label"):
            assert parts[0][k].shape[0] == 6
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    with pytest.raises(ValueError, match="divisible"):
        batch_at(src, 0, global_batch_size=12, seed=0, process_index=0, process_count=5)
    with pytest.raises(ValueError, match="process_index"):
        batch_at(src, 0, global_batch_size=12, seed=0, process_index=2, process_count=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(global_batch_size=0, seed=0), "global_batch_size"),
        (dict(global_batch_size=4, seed=-1), "seed"),
        (dict(global_batch_size=4, seed=0, step=-1), "step"),
    ],
)
def test_batch_at_validation(kwargs, match):
    step = kwargs.pop("step", 0)
    with pytest.raises(ValueError, match=match):
        batch_at(_indexed_source(4), step, **kwargs)


def test_random_flip_deterministic_and_about_half():
    src = _indexed_source(300)
    plain = batch_at(src, 2, global_batch_size=256, seed=5)
    flipped = batch_at(src, 2, global_batch_size=256, seed=5, random_flip=True)
    again = batch_at(src, 2, global_batch_size=256, seed=5, random_flip=True)
    np.testing.assert_array_equal(flipped["image"], again["image"])
    np.testing.assert_array_equal(_ids(flipped), _ids(plain))  # same examples, flips only
    is_flipped = flipped["image"][:, 0, 0, 1] == 2
    assert 0.4 < is_flipped.mean() < 0.6
    np.testing.assert_array_equal(flipped["image"][is_flipped], plain["image"][is_flipped][:, :, ::-1])
    np.testing.assert_array_equal(flipped["image"][~is_flipped], plain["image"][~is_flipped])
    other = batch_at(src, 3, global_batch_size=256, seed=5, random_flip=True)
    assert not np.array_equal(other["image"][:, 0, 0, 1] == 2, is_flipped)
    assert plain["image"][:, 0, 0, 1].max() == 0  # no flips unless asked


# ----------------------------------------------------------------------------- image folders


def _save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    _save(root / "cat" / "a.png", rng.integers(0, 256, (10, 8, 3)), "RGB")
    _save(root / "cat" / "sub" / "b.jpg", rng.integers(0, 256, (6, 9, 3)), "RGB")
    _save(root / "dog" / "c.PNG", rng.integers(0, 256, (5, 5)), "L")
    _save(root / "bird" / "d.jpeg", np.full((7, 4, 3), 200), "RGB")
    _save(root / ".cache" / "hidden.png", np.zeros((4, 4)), "L")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_labels_shapes_range(folder):
    src = ImageFolderSource(folder, 4, 3)
    assert len(src) == 4 and src.class_names == ("bird", "cat", "dog") and src.num_classes == 3
    b = src.get(np.arange(4))
    assert b["image"].shape == (4, 4, 4, 3) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    names = [f.relative_to(folder).as_posix() for f in src.files]
    assert names == ["bird/d.jpeg", "cat/a.png", "cat/sub/b.jpg", "dog/c.PNG"]
    np.testing.assert_array_equal(b["label"], [0, 1, 1, 2])
    assert b["label"].dtype == np.int32
    # A constant JPEG stays (about) constant through decode + resize + crop.
    np.testing.assert_allclose(b["image"][0], 200 / 127.5 - 1, atol=0.03)
    grey = make_source(str(folder), image_size=3, channels=1)
    assert grey.image_shape == (3, 3, 1) and grey.get(np.array([3, 0]))["image"].shape == (2, 3, 3, 1)


def test_image_folder_center_crop_exact(tmp_path):
    cols = np.array([0, 50, 100, 150, 200, 250])
    _save(tmp_path / "wide.png", np.tile(cols, (4, 1)), "L")  # H=4, W=6
    src = make_source(str(tmp_path / "wide.png"), image_size=4, channels=1)
    assert len(src) == 1 and src.num_classes is None
    x = src.get(np.array([0]))["image"][0, :, :, 0]
    np.testing.assert_allclose(x, np.tile(cols[1:5] / 127.5 - 1, (4, 1)), rtol=0, atol=1e-6)
    _save(tmp_path / "tall" / "t.png", np.tile(cols[:, None], (1, 4)), "L")  # H=6, W=4
    y = ImageFolderSource(tmp_path / "tall", 4, 1).get(np.array([0]))["image"][0, :, :, 0]
    np.testing.assert_allclose(y, np.tile(cols[1:5, None] / 127.5 - 1, (1, 4)), rtol=0, atol=1e-6)


def test_image_folder_resize_then_crop(tmp_path):
    img = np.zeros((8, 12, 3))
    img[:, 6:] = 255  # left half black, right half white; 8x12 -> 4x6 -> crop columns 1..4
    _save(tmp_path / "half.png", img, "RGB")
    x = ImageFolderSource(tmp_path / "half.png", 4, 3).get(np.array([0]))["image"][0]
    np.testing.assert_allclose(x[:, 0], -1.0, atol=0.02)
    np.testing.assert_allclose(x[:, 3], 1.0, atol=0.02)
    assert np.all(np.diff(x[0, :, 0]) >= 0)  # monotone edge, columns in original order
    np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_image_folder_errors(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSource(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="image_size"):
        make_source(str(folder))
    with pytest.raises(ValueError, match="split"):
        make_source(str(folder), image_size=4, split="test")
    _save(folder / "loose.png", np.zeros((4, 4)), "L")
    with pytest.raises(ValueError, match="mixes"):
        ImageFolderSource(folder, 4)
    with pytest.raises(ValueError, match="name"):
        make_source("./no/such/dir")
