"""FID Inception network vs pytorch-fid (random weights), resize vs torch, weights errors, the statistics."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jdiff import metrics
from jdiff.metrics import frechet, scores, stats_io

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import inception_recipe as recipe  # noqa: E402

REFERENCE = FIXTURES / "inception" / "reference.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ref_shapes(ref):
    return dict(zip(ref["keys"].tolist(), map(tuple, json.loads(str(ref["shapes"])))))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, ref_shapes):
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file(recipe.random_state_dict(ref_shapes), str(path))
    return path


@pytest.fixture(scope="module")
def inception(weights_file):
    import jax

    return metrics.load_inception(str(weights_file), devices=jax.devices()[:2])  # 2 devices: sharded rows


# --- the network ------------------------------------------------------------------------------------


def test_state_dict_keys_and_shapes_are_pytorch_fids(ref_shapes):
    from jdiff.metrics.inception_weights import expected_shapes

    assert expected_shapes() == ref_shapes  # 472 tensors, 23.9 M values


def test_features_and_logits_match_pytorch_fid(inception, ref):
    for index, (name, shape) in enumerate(recipe.IMAGE_SETS):  # upsampled 32x32 and downsampled 320x304
        feats, logits = inception.features_and_logits(recipe.images(shape, index))
        want, want_logits = ref[f"feats_{name}"], ref[f"logits_{name}"]
        assert feats.shape == (shape[0], 2048) and logits.shape == (shape[0], 1008)
        scale = np.abs(want).max()
        assert np.abs(feats - want).max() < 2e-5 * scale, name
        # the images differ by far more than the tolerance: the comparison can tell images apart
        assert np.abs(want[0] - want[1]).max() > 1e3 * np.abs(feats - want).max()
        assert np.abs(logits - want_logits).max() < 2e-5 * np.abs(want_logits).max(), name
    # odd batch on 2 devices (padded, then cut) and __call__ = features
    x = recipe.images(recipe.IMAGE_SETS[0][1], 0)
    one = inception(x[:1])
    atol = 2e-5 * np.abs(ref["feats_up"]).max()
    assert one.shape == (1, 2048) and np.allclose(one, ref["feats_up"][:1], rtol=0, atol=atol)


@pytest.mark.parametrize("index", range(len(recipe.RESIZES)))
def test_resize_matches_torch_interpolate(ref, index):
    import jax
    import jax.numpy as jnp

    from jdiff.metrics.inception import resize_bilinear

    name, in_hw, out_hw = recipe.RESIZES[index]
    x = recipe.resize_input(in_hw, index)
    got = np.asarray(resize_bilinear(jnp.asarray(x), out_hw))
    np.testing.assert_allclose(got, ref[f"resize_{name}"], rtol=0, atol=1e-6)
    if name == "down":  # jax.image.resize antialiases when downsampling: not pytorch-fid's resize
        other = np.asarray(jax.image.resize(jnp.asarray(x), (1, *out_hw, 2), "bilinear"))
        assert np.abs(other - ref[f"resize_{name}"]).max() > 1e-2


def test_pools_exclude_padding_and_max_pool_pads_with_minus_inf():
    import jax.numpy as jnp

    from jdiff.metrics.inception import avg_pool_exclude_pad, max_pool

    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1)
    got = np.asarray(avg_pool_exclude_pad(jnp.asarray(x)))[0, :, :, 0]
    want = np.array(
        [[np.mean(x[0, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, 0]) for j in range(4)] for i in range(3)]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    neg = -1.0 - x  # all negative: zero padding would win a max
    got = np.asarray(max_pool(jnp.asarray(neg), 3, 1, 1))[0, :, :, 0]
    want = np.array(
        [[np.max(neg[0, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, 0]) for j in range(4)] for i in range(3)]
    )
    np.testing.assert_array_equal(got, want)


# --- weights and inputs: one-line errors ----------------------------------------------------------------


def test_weights_errors_name_the_tensor(tmp_path, ref_shapes):
    from safetensors.numpy import save_file

    from jdiff.metrics.inception_weights import InceptionWeightsError, params_from_state_dict, read_inception_params

    sd = {k: np.zeros(s, np.float32) for k, s in ref_shapes.items()}
    sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored
    params_from_state_dict(sd)
    cases = {
        "missing tensor 'Mixed_6b.branch7x7_2.conv.weight'": lambda d: d.pop("Mixed_6b.branch7x7_2.conv.weight"),
        "tensor 'fc.weight' has shape (1000, 2048), expected (1008, 2048)": lambda d: d.update(
            {"fc.weight": np.zeros((1000, 2048), np.float32)}
        ),
        "unexpected tensor 'AuxLogits.fc.weight'": lambda d: d.update({"AuxLogits.fc.weight": np.zeros(3)}),
        "tensor 'fc.bias' contains NaN": lambda d: d.update({"fc.bias": np.full(1008, np.nan, np.float32)}),
    }
    for message, edit in cases.items():
        bad = dict(sd)
        edit(bad)
        with pytest.raises(InceptionWeightsError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            params_from_state_dict(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(InceptionWeightsError, match="never unpickles"):
        read_inception_params(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(InceptionWeightsError, match="not found"):
        read_inception_params(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InceptionWeightsError, match="corrupted"):
        read_inception_params(tmp_path / "junk.safetensors")
    small = tmp_path / "small.safetensors"
    save_file({"fc.weight": np.zeros((1008, 2048), np.float32)}, str(small))
    with pytest.raises(InceptionWeightsError, match=r"missing tensor 'Conv2d_1a_3x3.bn.bias'.*and 470 more"):
        read_inception_params(small)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 8, 8)), "must be \\(N, H, W, 3\\)"),
        (np.zeros((2, 8, 8, 1)), "must be \\(N, H, W, 3\\)"),
        (np.zeros((0, 8, 8, 3)), "N >= 1"),
        (np.full((2, 8, 8, 3), 1.5), "must lie in \\[0, 1\\]"),
        (np.full((2, 8, 8, 3), -0.5), "must lie in \\[0, 1\\]"),
        (np.zeros((2, 8, 8, 3), np.uint8), "uint8"),
        (np.full((2, 8, 8, 3), np.nan), "NaN"),
    ],
)
def test_bad_images_one_line(images, message):
    with pytest.raises(ValueError, match=message):
        metrics.check_images(images)


# --- Frechet distance ---------------------------------------------------------------------------------


def test_frechet_equals_pytorch_fid(ref):
    got = metrics.frechet_distance_from_stats(ref["fd_mu1"], ref["fd_sigma1"], ref["fd_mu2"], ref["fd_sigma2"])
    assert got == pytest.approx(float(ref["fd_value"]), rel=1e-9)


def test_frechet_of_two_gaussians_closed_form_and_identical_singular_sets():
    # N(m1, s1^2 I) vs N(m2, s2^2 I) in d dims: ||m1 - m2||^2 + d (s1 - s2)^2 (a full covariance rotated alike)
    rng = np.random.default_rng(0)
    d = 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = q @ np.diag(np.full(d, 4.0)) @ q.T, q @ np.diag(np.full(d, 0.25)) @ q.T
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    want = np.sum((m1 - m2) ** 2) + d * (2.0 - 0.5) ** 2
    assert metrics.frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(want, rel=1e-10)
    # fewer samples than dimensions: singular covariances, where sqrtm(S1 S2) warns / goes complex
    feats = rng.standard_normal((20, 256)) * 3.0
    mu, sigma = metrics.gaussian_stats(feats)
    assert np.linalg.matrix_rank(sigma) == 19
    assert metrics.frechet_distance_from_stats(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)


def test_running_stats_equal_gaussian_stats():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((103, 6)) @ rng.standard_normal((6, 6)) + 1e4  # large mean: cancellation-prone
    state = metrics.RunningStats.empty(6)
    for lo in range(0, 103, 17):
        state = state.update(feats[lo : lo + 17])
    mu, sigma = state.finalize()
    want_mu, want_sigma = metrics.gaussian_stats(feats)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-14)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.RunningStats.empty(6).update(feats[:1]).finalize()


# --- KID, Inception Score, precision / recall ----------------------------------------------------------------


def test_polynomial_mmd2_equals_pairwise_definition():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1.0) ** 3
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert scores.polynomial_mmd2(x, y) == pytest.approx(within - 2 * cross, rel=1e-12)


def test_kid_is_unbiased():
    rng = np.random.default_rng(3)
    # linear kernel (degree 1, coef0 0, gamma 1): E[unbiased MMD^2] = ||mu_x - mu_y||^2 exactly
    shift = np.array([0.3, 0.0, -0.4])  # ||shift||^2 = 0.25
    a, b = rng.standard_normal((4000, 3)), rng.standard_normal((4000, 3)) + shift
    mean, std = metrics.kernel_inception_distance(a, b, subsets=200, subset_size=50, degree=1, gamma=1.0, coef0=0.0)
    assert mean == pytest.approx(0.25, abs=4 * std / np.sqrt(200))
    # one distribution, cubic kernel: mean ~ 0 (a biased V-statistic would be clearly positive)
    a, b = rng.standard_normal((3000, 16)), rng.standard_normal((3000, 16))
    mean, std = metrics.kernel_inception_distance(a, b, subsets=100, subset_size=100)
    assert abs(mean) < 4 * std / np.sqrt(100)
    with pytest.raises(ValueError, match="subset_size"):
        metrics.kernel_inception_distance(a[:10], b, subset_size=100)


def test_inception_score_closed_forms():
    k, n = 8, 400
    confident = np.full((n, 1008), -30.0)
    confident[np.arange(n), np.arange(n) % k] = 30.0  # one-hot over k equally used classes: IS = k
    mean, std = metrics.inception_score(confident)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    same = np.tile(np.random.default_rng(4).standard_normal(1008), (n, 1))  # one prediction for all: IS = 1
    assert metrics.inception_score(same)[0] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(same[:5])


def test_precision_recall_hand_computed():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])  # distance to the 3rd nearest other: 3, 2, 2, 3, 9
    fake = np.array([[-2.5], [4.5], [5.5], [13.0], [30.0]])  # likewise: 15.5, 8.5, 8, 15.5, 25.5
    # precision: -2.5 (2.5 from 0 <= 3), 4.5 and 5.5 (1.5, 2.5 from 3 <= 3), 13 (3 from 10 <= 9) in; 30 out.
    # recall: every real point lies within 15.5 of -2.5.
    assert metrics.precision_recall(real, fake) == (pytest.approx(4 / 5), 1.0)
    assert metrics.precision_recall(fake, real) == (1.0, pytest.approx(4 / 5))
    same = np.random.default_rng(5).standard_normal((30, 4))
    assert metrics.precision_recall(same, same) == (1.0, 1.0)
    assert metrics.precision_recall(same, same + 100.0) == (0.0, 0.0)


# --- .npz statistics -----------------------------------------------------------------------------------


def test_stats_round_trip_and_adm_reference_batch(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = metrics.gaussian_stats(rng.standard_normal((50, 5)))
    path = metrics.save_stats(str(tmp_path / "stats.npz"), mu, sigma)
    with np.load(path) as f:  # pytorch-fid's layout
        assert sorted(f.files) == ["mu", "sigma"]
    got_mu, got_sigma = metrics.load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    images = rng.integers(0, 256, (7, 4, 6, 3), dtype=np.uint8)
    adm = tmp_path / "VIRTUAL_ref.npz"  # ADM's layout: np.savez(arr_0=images, mu=, sigma=, mu_s=, sigma_s=)
    np.savez(adm, images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    np.testing.assert_array_equal(metrics.load_stats(str(adm))[0], mu)
    streamed = list(metrics.iter_npz_images(str(adm), 3))
    assert [len(b) for b in streamed] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(streamed), images / np.float32(255.0))
    np.savez(tmp_path / "nomu.npz", sigma=sigma)
    with pytest.raises(ValueError, match="has no mu array"):
        metrics.load_stats(str(tmp_path / "nomu.npz"))
    with pytest.raises(ValueError, match="not found"):
        metrics.load_stats(str(tmp_path / "absent.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        stats_io.load_stats(str(tmp_path / "text.npz"))
    assert frechet.frechet_distance_from_stats(*metrics.load_stats(path), mu, sigma) < 1e-12


def test_kid_is_and_precision_recall_equal_torch_fidelity(ref):
    a, b = ref["score_a"], ref["score_b"]  # torch-fidelity: KID 10 subsets of 50 (rng_seed 2020), IS unshuffled
    mean, std = metrics.kernel_inception_distance(a, b, subsets=10, subset_size=50)
    assert (mean, std) == (
        pytest.approx(float(ref["kid_mean"]), rel=1e-5),
        pytest.approx(float(ref["kid_std"]), rel=1e-4),
    )
    mean, std = metrics.inception_score(ref["score_logits"])
    assert (mean, std) == (
        pytest.approx(float(ref["isc_mean"]), rel=1e-9),
        pytest.approx(float(ref["isc_std"]), rel=1e-7),
    )
    precision, recall = metrics.precision_recall(a, b)  # real a, generated b
    assert (precision, recall) == (pytest.approx(float(ref["prc_precision"])), pytest.approx(float(ref["prc_recall"])))
