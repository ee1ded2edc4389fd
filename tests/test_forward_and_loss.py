"""The forward process, its posterior, parameterization conversions and the training loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff.forward import convert_prediction, to_x0_eps

X_IMAGE = jnp.asarray([[1, -1, -1, 1], [-1, 1, 1, -1], [-1, 1, 1, -1], [1, -1, -1, 1]], jnp.float32)[
    None, :, :, None
]  # a 4x4 "X", NHWC (1, 4, 4, 1)
T3 = jdiff.get_schedule("custom", betas=[0.1, 0.2, 0.3])  # abar = 0.9, 0.72, 0.504


def test_q_sample_hand_computed_X():
    x_t = jdiff.q_sample(T3, X_IMAGE, jnp.array([2]), jnp.ones_like(X_IMAGE))
    expected = math.sqrt(0.504) * np.asarray(X_IMAGE) + math.sqrt(0.496)
    np.testing.assert_allclose(x_t, expected, rtol=1e-6)
    # values by hand: +1 pixels -> 0.70993 + 0.70427, -1 pixels -> -0.70993 + 0.70427
    np.testing.assert_allclose(x_t[0, 0, 0, 0], 1.41420, atol=1e-4)
    np.testing.assert_allclose(x_t[0, 0, 1, 0], -0.00566, atol=1e-4)


def test_q_sample_statistics():
    sch = jdiff.get_schedule("cosine", 100)
    x0 = jnp.full((20000, 1), 0.7)
    t = jnp.full((20000,), 40)
    x_t = jdiff.q_sample(sch, x0, t, jax.random.normal(jax.random.key(0), x0.shape))
    abar = float(sch.alphas_cumprod[40])
    assert abs(float(x_t.mean()) - math.sqrt(abar) * 0.7) < 4 * math.sqrt((1 - abar) / 20000)
    assert abs(float(x_t.var()) - (1 - abar)) < 0.03 * (1 - abar)


def test_posterior_hand_computed_X():
    x_t = 0.5 * X_IMAGE
    mean, var, logvar = jdiff.q_posterior(T3, X_IMAGE, x_t, jnp.array([1]))
    c1, c2 = 0.2 * math.sqrt(0.9) / 0.28, 0.1 * math.sqrt(0.8) / 0.28
    np.testing.assert_allclose(mean, (c1 + 0.5 * c2) * np.asarray(X_IMAGE), rtol=1e-6)
    np.testing.assert_allclose(var.squeeze(), 0.02 / 0.28, rtol=1e-6)
    np.testing.assert_allclose(logvar.squeeze(), math.log(0.02 / 0.28), rtol=1e-6)


def test_posterior_is_the_gaussian_conditional():
    """Bayes: (x_{t-1}, x_t) | x0 is jointly Gaussian; the posterior is its conditional."""
    sch = jdiff.get_schedule("linear", 1000)
    betas = jdiff.schedules.linear_betas(1000)  # float64 reference, independent of the stored float32
    for t in [1, 10, 500, 999]:
        abar_prev = float(np.prod(1 - betas[:t]))
        a_t = 1 - float(betas[t])
        x0, xt = 0.3, -1.2
        # x_{t-1} = sqrt(abar_prev) x0 + sqrt(1-abar_prev) e1;  x_t = sqrt(a_t) x_{t-1} + sqrt(1-a_t) e2.
        m1, v1 = math.sqrt(abar_prev) * x0, 1 - abar_prev
        m2, v2 = math.sqrt(a_t) * m1, a_t * v1 + (1 - a_t)
        c12 = math.sqrt(a_t) * v1
        mean_ref, var_ref = m1 + c12 / v2 * (xt - m2), v1 - c12**2 / v2
        mean, var, _ = jdiff.q_posterior(sch, jnp.array([x0]), jnp.array([xt]), jnp.array([t]))
        np.testing.assert_allclose(float(mean[0]), mean_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(var[0]), var_ref, rtol=1e-4)


def test_prediction_conversions_round_trip_and_definitions():
    k1, k2 = jax.random.split(jax.random.key(1))
    x0 = jax.random.normal(k1, (8, 3))
    eps = jax.random.normal(k2, (8, 3))
    alpha, sigma = 0.6, 0.8
    x = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0  # Salimans & Ho 2022
    preds = {"eps": eps, "x0": x0, "v": v}
    for src, out in preds.items():
        got_x0, got_eps = to_x0_eps(src, out, x, alpha, sigma)
        np.testing.assert_allclose(got_x0, x0, atol=1e-5)
        np.testing.assert_allclose(got_eps, eps, atol=1e-5)
        for dst, ref in preds.items():
            np.testing.assert_allclose(convert_prediction(out, x, alpha, sigma, source=src, target=dst), ref, atol=1e-5)
    with pytest.raises(ValueError, match="allowed values"):
        to_x0_eps("score", eps, x, alpha, sigma)


# ---------------------------------------------------------------------------------------------------- loss


def _oracle(sch, x0_true, prediction):
    """For single-point data the exact predictor of every parameterisation is known from x_t."""

    def model_fn(x_t, t):
        ti = t.astype(jnp.int32)
        a = sch.sqrt_alphas_cumprod[ti].reshape(-1, 1, 1, 1)
        s = sch.sqrt_one_minus_alphas_cumprod[ti].reshape(-1, 1, 1, 1)
        eps = (x_t - a * x0_true) / s
        return {"eps": eps, "x0": jnp.broadcast_to(x0_true, x_t.shape), "v": a * eps - s * x0_true}[prediction]

    return model_fn


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["simple", "min_snr"])
def test_loss_is_zero_for_the_exact_predictor(prediction, weighting):
    sch = jdiff.get_schedule("linear", 1000)
    x0 = jnp.broadcast_to(X_IMAGE, (16, 4, 4, 1))
    loss, m = jdiff.diffusion_loss(
        _oracle(sch, X_IMAGE, prediction), sch, x0, jax.random.key(0), prediction=prediction, weighting=weighting
    )
    assert float(loss) < 1e-6 and float(m["mse"]) < 1e-6


def test_loss_of_zero_model_is_target_second_moment():
    sch = jdiff.get_schedule("linear", 1000)
    x0 = jnp.zeros((4096, 2, 2, 1))
    loss, _ = jdiff.diffusion_loss(lambda x, t: jnp.zeros_like(x), sch, x0, jax.random.key(3))
    assert abs(float(loss) - 1.0) < 0.05  # E[eps^2] = 1


def test_min_snr_weights_closed_form():
    snr = jnp.array([0.5, 5.0, 20.0])
    g = 5.0
    np.testing.assert_allclose(jdiff.snr_weight(snr, prediction="x0", weighting="min_snr"), [0.5, 5, 5])
    np.testing.assert_allclose(jdiff.snr_weight(snr, prediction="eps", weighting="min_snr"), [1, 1, 0.25])
    np.testing.assert_allclose(
        jdiff.snr_weight(snr, prediction="v", weighting="min_snr"), [0.5 / 1.5, 5 / 6, 5 / 21], rtol=1e-6
    )
    np.testing.assert_allclose(jdiff.snr_weight(jnp.array([0.0]), prediction="eps", weighting="min_snr"), [1.0])
    np.testing.assert_allclose(jdiff.snr_weight(snr, prediction="v", weighting="simple"), [1, 1, 1])
    assert g == 5.0


def test_min_snr_loss_is_the_same_x0_space_loss_for_every_prediction():
    """Min-SNR weights make eps, x0 and v losses equal to min(SNR, gamma) ||x0_hat - x0||^2."""
    sch = jdiff.get_schedule("linear", 1000)
    x0 = jnp.broadcast_to(X_IMAGE, (32, 4, 4, 1))
    delta = 0.1 * jnp.arange(16.0).reshape(1, 4, 4, 1) / 16

    def model_for(prediction):
        def f(x_t, t):
            ti = t.astype(jnp.int32)
            a = sch.sqrt_alphas_cumprod[ti].reshape(-1, 1, 1, 1)
            s = sch.sqrt_one_minus_alphas_cumprod[ti].reshape(-1, 1, 1, 1)
            x0_hat = jnp.broadcast_to(X_IMAGE + delta, x_t.shape)
            return convert_prediction(x0_hat, x_t, a, s, source="x0", target=prediction)

        return f

    losses = [
        float(jdiff.diffusion_loss(model_for(o), sch, x0, jax.random.key(7), prediction=o, weighting="min_snr")[0])
        for o in ("eps", "x0", "v")
    ]
    np.testing.assert_allclose(losses, losses[1], rtol=2e-3)
    assert losses[1] > 0


def test_per_example_weights_mask_out_examples():
    sch = jdiff.get_schedule("linear", 100)
    x0 = jnp.broadcast_to(X_IMAGE, (4, 4, 4, 1))
    exact = _oracle(sch, X_IMAGE, "x0")
    bad = lambda x, t: exact(x, t) + jnp.array([0.0, 0.0, 100.0, 100.0]).reshape(4, 1, 1, 1)
    masked, _ = jdiff.diffusion_loss(
        bad, sch, x0, jax.random.key(0), prediction="x0", weights=jnp.array([1.0, 1.0, 0.0, 0.0])
    )
    full, _ = jdiff.diffusion_loss(bad, sch, x0, jax.random.key(0), prediction="x0")
    assert float(masked) < 1e-8 and abs(float(full) - 5000.0) < 1e-2


def test_loss_is_differentiable_and_uses_first_half_of_learned_variance_output():
    sch = jdiff.get_schedule("linear", 100)
    x0 = jax.random.normal(jax.random.key(0), (8, 4, 4, 2))

    def loss(w):
        f = lambda x, t: jnp.concatenate([w * x, jnp.full_like(x, 1e3)], -1)
        return jdiff.diffusion_loss(f, sch, x0, jax.random.key(1))[0]

    g = jax.grad(loss)(0.5)
    assert np.isfinite(float(g)) and float(loss(0.5)) < 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prediction="score"), "allowed values"),
        (dict(weighting="p2"), "allowed values"),
        (dict(weights=jnp.ones(3)), "weights"),
    ],
)
def test_loss_bad_input(kwargs, match):
    sch = jdiff.get_schedule("linear", 10)
    with pytest.raises(ValueError, match=match):
        jdiff.diffusion_loss(lambda x, t: x, sch, jnp.zeros((4, 2)), jax.random.key(0), **kwargs)


def test_shape_mismatches_are_value_errors():
    x0 = jnp.zeros((4, 2, 2, 1))
    with pytest.raises(ValueError, match="noise must have shape"):
        jdiff.q_sample(T3, x0, jnp.zeros(4, jnp.int32), jnp.zeros((4, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"t must have shape \(4,\)"):
        jdiff.q_sample(T3, x0, jnp.zeros(3, jnp.int32), x0)
    with pytest.raises(ValueError, match="x0 must have shape"):
        jdiff.q_posterior(T3, x0[:2], x0, jnp.zeros(4, jnp.int32))
