"""Closed-form checks of every schedule and every derived quantity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import schedules as S


def test_linear_endpoints_and_spacing():
    b = np.asarray(jdiff.get_schedule("linear", 1000).betas, np.float64)
    np.testing.assert_allclose(b[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-3)


def test_scaled_linear_is_square_of_linspace_of_roots():
    b = np.asarray(jdiff.get_schedule("scaled_linear", 10).betas, np.float64)
    r = np.sqrt(b)
    np.testing.assert_allclose(r[[0, -1]], [math.sqrt(0.00085), math.sqrt(0.012)], rtol=1e-6)
    np.testing.assert_allclose(np.diff(r), np.diff(r)[0], rtol=1e-4)


def test_cosine_alpha_bar_closed_form_and_clip():
    T, s = 1000, 0.008
    sch = jdiff.get_schedule("cosine", T)
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    t = np.arange(1, T + 1)
    expected = f(t) / f(0)
    b = np.asarray(sch.betas, np.float64)
    unclipped = b < 0.999 - 1e-7
    # abar_t = f(t+1)/f(0) in 0-based indexing wherever no clipping happened up to t.
    first_clip = np.argmin(unclipped) if not unclipped.all() else T
    np.testing.assert_allclose(np.asarray(sch.alphas_cumprod)[:first_clip], expected[:first_clip], rtol=1e-5)
    assert b.max() <= 0.999 + 1e-6 and np.isclose(b[-1], 0.999)


def test_sigmoid_formula():
    b = np.asarray(jdiff.get_schedule("sigmoid", 7, beta_start=0.1, beta_end=0.3).betas, np.float64)
    x = np.linspace(-6, 6, 7)
    np.testing.assert_allclose(b, 1 / (1 + np.exp(-x)) * 0.2 + 0.1, rtol=1e-6)
    assert np.isclose(b[3], 0.2)  # sigmoid(0) = 1/2


def test_derived_quantities_match_definitions():
    rng = np.random.default_rng(0)
    betas = np.sort(rng.uniform(1e-3, 0.3, size=20))
    sch = jdiff.get_schedule("custom", betas=betas)
    a = 1 - betas
    abar = np.cumprod(a)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    expect = {
        "alphas": a,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
        "log_snr": np.log(abar / (1 - abar)),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(a) / (1 - abar),
    }
    for name, value in expect.items():
        got = getattr(sch, name)
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got, np.float64), value, rtol=2e-6, atol=1e-7, err_msg=name)
    assert sch.num_timesteps == 20


def test_tiny_hand_computed_T3():
    # betas 0.1, 0.2, 0.3 -> abar 0.9, 0.72, 0.504 (by hand).
    sch = jdiff.get_schedule("custom", betas=[0.1, 0.2, 0.3])
    np.testing.assert_allclose(sch.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-6)
    # t=1: beta-tilde = 0.2 * (1 - 0.9) / (1 - 0.72) = 0.02 / 0.28.
    np.testing.assert_allclose(sch.posterior_variance, [0.0, 0.02 / 0.28, 0.3 * 0.28 / 0.496], rtol=1e-6)
    np.testing.assert_allclose(sch.posterior_mean_coef1[1], 0.2 * math.sqrt(0.9) / 0.28, rtol=1e-6)
    np.testing.assert_allclose(sch.posterior_mean_coef2[1], 0.1 * math.sqrt(0.8) / 0.28, rtol=1e-6)
    # t=0: the posterior mean is x0 itself.
    np.testing.assert_allclose([sch.posterior_mean_coef1[0], sch.posterior_mean_coef2[0]], [1.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_zero_terminal_snr(name):
    base = jdiff.get_schedule(name, 1000)
    z = jdiff.get_schedule(name, 1000, zero_terminal_snr=True)
    assert float(z.alphas_cumprod[-1]) == 0.0 and float(z.betas[-1]) == 1.0
    assert np.isneginf(float(z.log_snr[-1]))
    np.testing.assert_allclose(z.alphas_cumprod[0], base.alphas_cumprod[0], rtol=1e-6)
    # sqrt(abar) is an affine function of the original sqrt(abar) (Lin et al. 2024, Alg. 1).
    s0, s1 = np.asarray(base.sqrt_alphas_cumprod, np.float64), np.asarray(z.sqrt_alphas_cumprod, np.float64)
    slope, icpt = np.polyfit(s0, s1, 1)
    np.testing.assert_allclose(s1, slope * s0 + icpt, atol=2e-6)
    assert np.all(np.diff(np.asarray(z.alphas_cumprod)) < 0)
    assert np.all(np.isfinite(np.asarray(z.posterior_log_variance_clipped)))


def test_schedule_is_pytree_and_same_T_does_not_recompile():
    f = jax.jit(lambda s: jnp.sum(s.alphas_cumprod))
    f(jdiff.get_schedule("linear", 50))
    f(jdiff.get_schedule("cosine", 50))
    f(jdiff.get_schedule("custom", betas=np.full(50, 0.01)))
    assert f._cache_size() == 1
    assert len(jax.tree_util.tree_leaves(jdiff.get_schedule("linear", 5))) == 13


def test_fractional_time_interpolation():
    sch = jdiff.get_schedule("linear", 1000)
    t = jnp.arange(1000.0)
    np.testing.assert_allclose(S.alpha_bar_at(sch, t), sch.alphas_cumprod, rtol=1e-5, atol=1e-8)
    lam = np.asarray(S.log_snr_at(sch, jnp.array([10.0, 10.25, 10.5, 11.0])))
    np.testing.assert_allclose(lam[1], 0.75 * lam[0] + 0.25 * lam[3], rtol=1e-6)
    assert lam[0] > lam[1] > lam[2] > lam[3]
    tt = jnp.array([0.0, 3.3, 500.7, 998.9])
    np.testing.assert_allclose(S.t_from_log_snr(sch, S.log_snr_at(sch, tt)), tt, atol=2e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="quadratic"), "allowed values"),
        (dict(name="custom"), "betas"),
        (dict(name="custom", betas=[0.1, 1.5]), r"\(0, 1\)"),
        (dict(name="custom", betas=[0.0, 0.1]), r"\(0, 1\)"),
        (dict(name="custom", betas=[0.1, np.nan]), r"\(0, 1\)"),
        (dict(name="custom", betas=[[0.1]]), "1-D"),
        (dict(name="linear", num_timesteps=0), "num_timesteps"),
        (dict(name="linear", foo=1), "keyword"),
        (dict(name="linear", betas=[0.1]), "custom"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jdiff.get_schedule(**kwargs)
