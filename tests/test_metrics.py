"""jdiff.metrics: Frechet distance, the held-out digit classifier and its sample statistics; the report of
benchmarks/digits_quality.py."""

import importlib.util
import json
import math

import numpy as np
import pytest
from conftest import REPO
from threadpoolctl import threadpool_limits

from jdiff import metrics

_spec = importlib.util.spec_from_file_location("digits_quality", REPO / "benchmarks" / "digits_quality.py")
quality = importlib.util.module_from_spec(_spec)  # the benchmark script (not part of the library)
_spec.loader.exec_module(quality)


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    with threadpool_limits(limits=1):  # tiny matrices; threaded BLAS is much slower on a busy machine
        yield


@pytest.fixture(scope="module")
def digits():
    test_x, test_y = metrics.load_digits_split("test")
    train_x, train_y = metrics.load_digits_split("train")
    return test_x, test_y, train_x, train_y


@pytest.fixture(scope="module")
def clf(digits):
    test_x, test_y, _, _ = digits
    return metrics.train_digit_classifier(test_x, test_y)


@pytest.fixture(scope="module")
def ref_feats(clf, digits):
    return metrics.hidden_features(clf, digits[0])


def _real_subset(digits, n=500, seed=0):
    _, _, train_x, train_y = digits
    idx = np.random.default_rng(seed).choice(len(train_x), n, replace=False)
    return train_x[idx], train_y[idx]


def _noise(n=500, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)


# --- Frechet distance ---------------------------------------------------------------------------------


def test_frechet_from_stats_diagonal_closed_form():
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 0.25, 4.0]), np.array([0.5, 1.0, 4.0])  # standard deviations
    expected = np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2)
    got = metrics.frechet_distance_from_stats(m1, np.diag(s1**2), m2, np.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_from_stats_general_covariances_match_eigh_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T  # non-commuting
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert metrics.frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_samples_1d_and_diagonal_gaussians():
    rng = np.random.default_rng(1)
    n = 200_000
    a = rng.normal(0.0, 1.0, (n, 1))
    b = rng.normal(2.0, 3.0, (n, 1))
    assert metrics.frechet_distance(a, b) == pytest.approx(4.0 + 4.0, rel=0.02)
    m1, m2 = np.array([0.0, 1.0, 3.0]), np.array([1.0, -1.0, 3.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 2.0, 1.5])
    a = m1 + s1 * rng.normal(size=(n, 3))
    b = m2 + s2 * rng.normal(size=(n, 3))
    expected = np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2)  # 5 + 1.25
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(400, 8)) + 0.3
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-7)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a), rel=1e-6)
    assert metrics.frechet_distance(a, b) > 0.1


def test_frechet_singular_covariances():
    # A dead feature (constant column, e.g. a ReLU unit that never fires) and fewer samples than dimensions.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) + 1.0
    a[:, 3] = 0.0
    b[:, 3] = 0.0
    full = metrics.frechet_distance(a, b)
    assert np.isfinite(full)
    assert full == pytest.approx(metrics.frechet_distance(a[:, :3], b[:, :3]), abs=1e-3)
    few_a, few_b = rng.normal(size=(5, 20)), rng.normal(size=(6, 20))
    d = metrics.frechet_distance(few_a, few_b)
    assert np.isfinite(d) and d >= 0.0


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))


# --- class statistics ---------------------------------------------------------------------------------


def test_class_spread_statistics():
    uniform = metrics.class_counts(np.repeat(np.arange(10), 7))
    assert uniform.tolist() == [7] * 10
    assert metrics.entropy_bits(uniform) == pytest.approx(math.log2(10))
    assert metrics.max_min_ratio(uniform) == 1.0
    single = metrics.class_counts(np.full(20, 3))
    assert metrics.entropy_bits(single) == 0.0
    assert metrics.max_min_ratio(single) == math.inf
    assert metrics.confident_share(np.array([[0.95, 0.05], [0.6, 0.4], [0.01, 0.99]])) == pytest.approx(2 / 3)


def test_flatten_images_shapes_and_errors():
    x = np.zeros((3, 8, 8, 1), np.float32)
    assert metrics.flatten_images(x).shape == (3, 64)
    assert metrics.flatten_images(x[..., 0]).shape == (3, 64)
    with pytest.raises(ValueError):
        metrics.flatten_images(np.zeros((3, 28, 28, 1)))
    with pytest.raises(ValueError):
        metrics.flatten_images(np.full((2, 64), np.nan))


def test_nearest_distances():
    rng = np.random.default_rng(4)
    ref = rng.uniform(-1, 1, (50, 64))
    assert np.allclose(metrics.nearest_distances(ref[:10], ref), 0.0, atol=1e-6)
    far = metrics.nearest_distances(ref[:10], ref, exclude_self=True)
    assert np.all(far > 1.0)


# --- the classifier -----------------------------------------------------------------------------------


def test_classifier_accuracy_on_unseen_digits(clf, digits):
    _, _, train_x, train_y = digits  # the classifier was fitted on the "test" split only
    acc = np.mean(metrics.class_probs(clf, train_x).argmax(1) == train_y)
    assert acc > 0.9


def test_numpy_forward_matches_sklearn(clf, digits):
    x = digits[2][:50]
    np.testing.assert_allclose(
        metrics.class_probs(clf, x), clf.predict_proba(metrics.flatten_images(x)), rtol=1e-6, atol=1e-9
    )
    feats = metrics.hidden_features(clf, x)
    assert feats.shape == (50, metrics.CLASSIFIER_HIDDEN[-1]) and feats.min() >= 0.0


def test_confident_share_real_vs_noise(clf, digits):
    real, _ = _real_subset(digits)
    p_real = metrics.class_probs(clf, real)
    p_noise = metrics.class_probs(clf, _noise())
    assert metrics.confident_share(p_real) > 0.8
    assert metrics.confident_share(p_noise) < 0.1


def test_floor_far_below_noise(clf, digits, ref_feats):
    real, _ = _real_subset(digits)
    floor = metrics.frechet_distance(metrics.hidden_features(clf, real), ref_feats)
    noise = metrics.frechet_distance(metrics.hidden_features(clf, _noise()), ref_feats)
    assert floor * 20 < noise


def test_score_images(clf, digits, ref_feats):
    real, labels = _real_subset(digits)
    row = metrics.score_images(clf, real, ref_feats, labels=labels, train_images=digits[2])
    assert row["num"] == 500 and sum(row["class_counts"]) == 500
    assert row["class_entropy_bits"] > 3.2
    assert row["label_agreement"] > 0.9
    assert row["nn_train_median"] == pytest.approx(0.0, abs=1e-6)  # they are training digits
    assert "near_copy_share" not in row
    cut = metrics.near_copy_threshold(digits[0], digits[2])
    assert 0.5 < cut < 2.0
    copies = metrics.score_images(clf, real, ref_feats, train_images=digits[2], copy_threshold=cut)
    assert copies["near_copy_share"] == 1.0
    heldout = metrics.score_images(clf, digits[0], ref_feats, train_images=digits[2], copy_threshold=cut)
    assert heldout["near_copy_share"] == pytest.approx(metrics.COPY_PERCENTILE / 100, abs=0.01)
    noisy = metrics.score_images(clf, _noise(), ref_feats, train_images=digits[2])
    assert noisy["frechet"] > 20 * row["frechet"] and noisy["nn_train_median"] > 3.0
    assert "label_agreement" not in noisy and noisy["confident_share"] < 0.1
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metrics.score_images(clf, real * 8 + 8, ref_feats)  # 0..16 pixel values, not [-1, 1]


# --- the report (benchmarks/digits_quality.py) -----------------------------------------------------------


def test_benchmark_npz(tmp_path, digits, capsys):
    real, labels = _real_subset(digits, n=100, seed=1)
    np.savez(tmp_path / "s.npz", samples=real[..., 0], labels=labels)
    out = tmp_path / "r.json"
    assert quality.main(["--npz", str(tmp_path / "s.npz"), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| samples | 100 |" in table and "uniform noise" in table
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert rows["samples"]["num"] == 100 and rows["real train digits (floor)"]["num"] == 100
    assert rows["uniform noise"]["frechet"] > 10 * rows["real train digits (floor)"]["frechet"]
    assert result["classifier"]["accuracy_on_train_split"] > 0.9
    assert rows["samples"]["label_agreement"] > 0.85  # the npz's labels are the true ones
    assert rows["samples"]["near_copy_share"] == 1.0  # training digits are copies of themselves


@pytest.mark.slow
def test_benchmark_checkpoint(tiny_config, tmp_path, capsys):
    """--workdir: samples a (tiny, 4-step) training run's EMA parameters and scores them."""
    import jax

    from jdiff.training.loop import train

    config = tiny_config(workdir=tmp_path / "run")
    train(config, devices=jax.devices()[:1], progress=False, log=lambda s: None)
    out = tmp_path / "r.json"
    npz = tmp_path / "s.npz"
    argv = [
        "--workdir",
        config.run.workdir,
        "--num",
        "20",
        "--steps",
        "2",
        "--json",
        str(out),
        "--save-samples",
        str(npz),
    ]
    assert quality.main(argv) == 0
    assert "| samples | 20 |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["samples_info"]["conditioning"] == "balanced labels"
    assert 0.0 <= result["rows"]["samples"]["label_agreement"] <= 1.0
    saved = np.load(npz)
    assert saved["images"].shape == (20, 8, 8, 1) and np.abs(saved["images"]).max() <= 1.0
    assert saved["labels"].tolist() == [i % 10 for i in range(20)]
