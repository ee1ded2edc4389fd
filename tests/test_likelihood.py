"""Likelihood math: the Gaussian KL, the discretised decoder, the per-step VLB terms, vlb_bpd and ode_bpd
against closed forms for Gaussian data N(mu, S) with its exact noise predictor, and importance sampling of t."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import jdiff
from jdiff.analytic import gaussian_eps_fn
from jdiff.forward import convert_prediction
from jdiff.likelihood import ode_likelihood, vlb_bpd, vlb_terms
from jdiff.losses import discretized_gaussian_log_likelihood, importance_probs, normal_kl, update_loss_history, vlb_term

D = 4
MU = np.array([0.3, -0.2, 0.1, 0.0])
S = 0.5  # data std (isotropic case)


def lambda_schedule(T, lam_max=9.0, lam_min=-14.0):
    """A schedule whose log-SNR falls linearly from lam_max to lam_min in T steps (fixed end points for every T,
    so a larger T refines the same diffusion)."""
    lam = np.linspace(lam_max, lam_min, T)
    abar = 1.0 / (1.0 + np.exp(-lam))
    return jdiff.get_schedule("custom", betas=1.0 - abar / np.append(1.0, abar[:-1]))


def gaussian_model(schedule, decoder_only_exact=False):
    """[eps* | v] for x0 ~ N(MU, S^2 I): eps* from jdiff.analytic and v chosen so that the learned variance
    (Nichol & Dhariwal eq. 15) is the true reverse variance Var(x_{t-1} | x_t) = beta-tilde_t + coef1_t^2
    Var(x0 | x_t), so p(x_{t-1} | x_t) = q(x_{t-1} | x_t) exactly. decoder_only_exact: v = -1 (beta-tilde) for
    t > 0 and the exact variance only for the decoder at t = 0."""
    eps_fn = gaussian_eps_fn(schedule, MU, S**2 * np.eye(D))

    def model_fn(x, t):
        ti = t.astype(jnp.int32)
        abar = schedule.alphas_cumprod[ti]
        var_x0 = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
        true_var = schedule.posterior_variance[ti] + schedule.posterior_mean_coef1[ti] ** 2 * var_x0
        lo, hi = schedule.posterior_log_variance_clipped[ti], jnp.log(schedule.betas[ti])
        v = 2 * (jnp.log(true_var) - lo) / (hi - lo) - 1
        if decoder_only_exact:
            v = jnp.where(ti == 0, v, -1.0)
        return jnp.concatenate([eps_fn(x, t), jnp.broadcast_to(v[:, None], x.shape)], axis=-1)

    return model_fn


def gaussian_nll_bits(x, mean, cov):
    """-log2 N(x; mean, cov) / D per row, float64."""
    return -stats.multivariate_normal(mean, cov).logpdf(np.asarray(x, np.float64)) / (x.shape[1] * math.log(2))


def test_normal_kl_equals_the_integral():
    m1, v1, m2, v2 = 0.3, 0.2, -0.4, 0.7
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    direct = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -10, 10)[0]
    got = normal_kl(mean1=m1, logvar1=math.log(v1), mean2=m2, logvar2=math.log(v2))
    np.testing.assert_allclose(float(got), direct, rtol=1e-6)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_decoder_sums_to_one_over_all_bins(levels):
    grid = np.linspace(-1.0, 1.0, levels)
    params = np.array([(0.0, 0.1), (0.93, 0.02), (-1.4, 0.5), (0.2, 3.0), (0.51, 1e-3)])
    with jax.enable_x64(True):
        f = jax.jit(jax.vmap(lambda m, s: discretized_gaussian_log_likelihood(
            jnp.asarray(grid), mean=m, logvar=2 * jnp.log(s), levels=levels)))  # fmt: skip
        p = np.exp(np.asarray(f(jnp.asarray(params[:, 0]), jnp.asarray(params[:, 1]))))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    # each bin against scipy: (x - h, x + h), the edge bins open, each difference taken in its small tail
    h = 1.0 / (levels - 1)
    lo, hi = np.append(-np.inf, grid[1:] - h), np.append(grid[:-1] + h, np.inf)
    for (mean, std), row in zip(params, p):
        n = stats.norm(mean, std)
        ref = np.where(lo > mean, n.sf(lo) - n.sf(hi), n.cdf(hi) - n.cdf(lo))
        np.testing.assert_allclose(row, ref, rtol=1e-6, atol=1e-300)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["posterior", "beta", "learned"])
def test_per_step_kl_equals_the_gaussian_kl_formula(prediction, variance):
    """L_t (t > 0) against the KL of two Gaussians written out from DDPM eqs. 6-7 in float64 numpy."""
    sch = jdiff.get_schedule("linear", 100)
    rng = np.random.default_rng(0)
    b, shape = 6, (6, 2, 2, 3)
    x0, x_t = rng.uniform(-1, 1, shape), rng.normal(size=shape)
    t = np.array([1, 5, 17, 50, 98, 99])
    out = rng.normal(size=shape[:-1] + (6 if variance == "learned" else 3,))
    got = vlb_term(sch, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t),
                   jnp.asarray(out, jnp.float32), prediction=prediction, variance=variance)  # fmt: skip
    beta = np.asarray(sch.betas, np.float64)
    abar = np.cumprod(1 - beta)
    ref = []
    for i in range(b):
        tt, a, ap = t[i], abar[t[i]], abar[t[i] - 1]
        c1, c2 = beta[tt] * np.sqrt(ap) / (1 - a), (1 - ap) * np.sqrt(1 - beta[tt]) / (1 - a)
        var_q = beta[tt] * (1 - ap) / (1 - a)
        pred = out[i, ..., :3]
        alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
        x0_hat = {"eps": (x_t[i] - sigma * pred) / alpha, "x0": pred, "v": alpha * x_t[i] - sigma * pred}[prediction]
        var_p = {"posterior": var_q, "beta": beta[tt]}.get(variance)
        if variance == "learned":
            f = (out[i, ..., 3:] + 1) / 2
            var_p = np.exp(f * np.log(beta[tt]) + (1 - f) * np.log(var_q))
        mq, mp = c1 * x0[i] + c2 * x_t[i], c1 * x0_hat + c2 * x_t[i]
        kl = 0.5 * np.log(var_p / var_q) + (var_q + (mq - mp) ** 2) / (2 * var_p) - 0.5
        ref.append(np.mean(kl) / math.log(2))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4)


def test_decoder_term_is_the_discretized_likelihood():
    sch = jdiff.get_schedule("linear", 100)
    rng = np.random.default_rng(1)
    x0 = rng.integers(0, 17, (3, 2, 2, 1)) / 8.0 - 1.0
    eps = rng.normal(size=x0.shape)
    pred = eps + 3.0 * rng.normal(size=x0.shape)  # x0-hat off by a few stds of the decoder, within ~1 bin
    t = np.zeros((3,), np.int32)
    a0, s0 = float(sch.sqrt_alphas_cumprod[0]), float(sch.sqrt_one_minus_alphas_cumprod[0])
    x1 = a0 * x0 + s0 * eps
    with jax.enable_x64(True):  # eps model, posterior variance: the decoder's is beta-tilde_1
        got = vlb_term(sch, jnp.asarray(x0), jnp.asarray(x1), jnp.asarray(t), jnp.asarray(pred), levels=17)
    mean = (x1 - s0 * pred) / a0  # coef1_0 = 1, coef2_0 = 0: the mean is x0-hat
    n = stats.norm(mean, math.sqrt(float(sch.posterior_variance[1])))
    lo, hi = np.where(x0 < -0.99, -np.inf, x0 - 1 / 16), np.where(x0 > 0.99, np.inf, x0 + 1 / 16)
    p = np.where(lo > mean, n.sf(lo) - n.sf(hi), n.cdf(hi) - n.cdf(lo))
    ref = -np.log(p).reshape(3, -1).mean(1) / math.log(2)
    assert ref.max() > 0.5  # not all bins hold almost all the mass
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def _x0(n, seed=0):
    return jnp.asarray(MU + S * np.random.default_rng(seed).normal(size=(n, D)))


def test_vlb_with_the_true_reverse_process_equals_the_nll():
    """With p(x_{t-1} | x_t) = q(x_{t-1} | x_t) (exact mean and variance), E[vlb] = -log2 q(x0) / D for any T:
    the bound is tight, so a wrong KL, decoder, prior or sign shows (within 4 standard errors of the Monte-Carlo
    mean over 20,000 examples, about 0.025 bits/dim; the fixed-variance gap at this T is 15.7)."""
    with jax.enable_x64(True):
        sch = lambda_schedule(10)
        x0 = _x0(20000)
        vlb = jax.jit(lambda x, k: vlb_bpd(gaussian_model(sch), sch, x, k, levels=None, t_chunk=10))
        diff = np.asarray(vlb(x0, jax.random.key(1))) - gaussian_nll_bits(x0, MU, S**2 * np.eye(D))
    se = diff.std() / math.sqrt(len(diff))
    assert se < 0.01 and abs(diff.mean()) < 4 * se, (diff.mean(), se)


def test_vlb_bounds_the_nll_and_approaches_it_as_T_grows():
    """Fixed posterior variance beta-tilde (exact decoder): the bound is above the NLL and the gap shrinks as the
    same diffusion (log-SNR 9 -> -14) is cut into more steps (about 15.7, 0.60, 0.056 bits/dim for T = 10, 100,
    1000: each step's gap is O(dlambda^2))."""
    with jax.enable_x64(True):
        x0 = _x0(1000, seed=3)
        nll = gaussian_nll_bits(x0, MU, S**2 * np.eye(D)).mean()
        gaps = []
        for T in (10, 100, 1000):
            sch = lambda_schedule(T)
            f = jax.jit(lambda x, k: vlb_bpd(gaussian_model(sch, decoder_only_exact=True), sch, x, k, levels=None))
            gaps.append(float(jnp.mean(f(x0, jax.random.key(2)))) - nll)
    assert gaps[0] > 10 * gaps[1] > 0 and gaps[1] > 5 * gaps[2] > 0, gaps
    assert 0.02 < gaps[2] < 0.1, gaps


def test_vlb_terms_agree_across_predictions_and_chunks():
    """The same Gaussian model as an eps, x0 or v predictor gives the same terms; the chunking of t does not
    change them (T = 10 not a multiple of the chunk)."""
    sch = lambda_schedule(10)
    eps_fn = gaussian_eps_fn(sch, MU, S**2 * np.eye(D))

    def as_(prediction):
        def fn(x, t):
            a = sch.sqrt_alphas_cumprod[t.astype(jnp.int32)][:, None]
            s = sch.sqrt_one_minus_alphas_cumprod[t.astype(jnp.int32)][:, None]
            return convert_prediction(eps_fn(x, t), x, a, s, source="eps", target=prediction)

        return fn

    x0 = jnp.asarray(_x0(8), jnp.float32)
    ref, prior = vlb_terms(as_("eps"), sch, x0, jax.random.key(0), levels=None, t_chunk=10)
    assert ref.shape == (8, 10) and prior.shape == (8,)
    for prediction, chunk in [("x0", 3), ("v", 4), ("eps", 1)]:
        got, _ = vlb_terms(
            as_(prediction), sch, x0, jax.random.key(0), prediction=prediction, levels=None, t_chunk=chunk
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-3, atol=2e-5)


def _ode_model_nll_bits(x, mean, cov, lam0, lam1):
    """-log2 p(x) / D of the probability-flow ODE model of N(mean, cov) data with an N(0, I) prior at log-SNR lam1,
    in closed form: the flow keeps C_t^(-1/2) (x_t - alpha_t mean) (C_t = alpha_t^2 cov + sigma_t^2 I), so
    z = alpha_1 mean + C_1^(1/2) C_0^(-1/2) (x - alpha_0 mean) and log p(x) = log N(z; 0, I) + log det(dz/dx)."""
    w, u = np.linalg.eigh(cov)
    sig = lambda lam: 1 / (1 + np.exp(-lam))
    (a0, c0), (a1, c1) = [(np.sqrt(sig(lam)), sig(lam) * w + sig(-lam)) for lam in (lam0, lam1)]
    z = a1 * mean + ((np.asarray(x) - a0 * mean) @ u * np.sqrt(c1 / c0)) @ u.T
    logp = stats.multivariate_normal(np.zeros(len(mean)), np.eye(len(mean))).logpdf(z) + 0.5 * np.sum(np.log(c1 / c0))
    return -logp / (len(mean) * math.log(2))


def test_ode_bpd_equals_the_closed_form_nll():
    """Probability-flow ODE with the exact noise predictor of N(mu, S) (a full covariance), float64, rtol = atol
    = 1e-8: the exact-trace NLL equals the closed form of the ODE model within 2e-6 bits/dim, which is the NLL of
    the t = 0 marginal N(alpha_0 mu, alpha_0^2 S + sigma_0^2 I) up to the prior's mismatch (< 1e-3 here); the
    Hutchinson estimates (Rademacher, Gaussian) are unbiased: their mean error over 1,024 examples is within 4
    standard errors of 0."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(D, D))
    cov = 0.2 * a @ a.T / D + 0.05 * np.eye(D)
    with jax.enable_x64(True):
        sch = lambda_schedule(1000)
        eps_fn = gaussian_eps_fn(sch, MU, cov)
        x0 = jnp.asarray(rng.multivariate_normal(MU, cov, size=1024))
        lam0, lam1 = float(jdiff.log_snr_at(sch, 0.0)), float(jdiff.log_snr_at(sch, 999.0))
        ref = _ode_model_nll_bits(x0, MU, cov, lam0, lam1)
        alpha0 = math.sqrt(1 / (1 + math.exp(-lam0)))
        marginal = gaussian_nll_bits(x0, alpha0 * MU, alpha0**2 * cov + (1 - alpha0**2) * np.eye(D))
        assert np.abs(ref - marginal).max() < 1e-3
        run = jax.jit(
            lambda x, k, probe: ode_likelihood(eps_fn, sch, x, k, levels=None, probe=probe, rtol=1e-8, atol=1e-8),
            static_argnums=2,
        )
        exact = run(x0[:16], jax.random.key(0), "exact")
        assert bool(exact.ok)
        np.testing.assert_allclose(np.asarray(exact.bpd), ref[:16], atol=2e-6)
        for probe in ("rademacher", "gaussian"):
            est = run(x0, jax.random.key(1), probe)
            diff = np.asarray(est.bpd) - ref
            se = diff.std() / math.sqrt(len(diff))
            assert 1e-5 < se < 0.06 and abs(diff.mean()) < 4 * se, (probe, diff.mean(), se)  # an estimate, unbiased


def test_ode_bpd_of_a_flow_model_equals_the_closed_form_nll():
    """The exact velocity field of N(mu, S) (`jdiff.analytic.gaussian_velocity_fn`, prediction "flow") on the flow
    schedule, float64, exact trace: its NLL equals the closed form of the ODE model within 2e-6 bits/dim, as the
    eps model's does (the flow and VP ODEs are one ODE)."""
    from jdiff.analytic import gaussian_velocity_fn

    rng = np.random.default_rng(1)
    a = rng.normal(size=(D, D))
    cov = 0.2 * a @ a.T / D + 0.05 * np.eye(D)
    with jax.enable_x64(True):
        sch = jdiff.get_schedule("flow", 1000, shift=3.0)
        x0 = jnp.asarray(rng.multivariate_normal(MU, cov, size=8))
        lam0, lam1 = float(jdiff.log_snr_at(sch, 0.0)), float(jdiff.log_snr_at(sch, 999.0))
        ref = _ode_model_nll_bits(x0, MU, cov, lam0, lam1)
        v_fn = gaussian_velocity_fn(MU, cov)
        got = ode_likelihood(
            v_fn, sch, x0, jax.random.key(0), prediction="flow", levels=None, probe="exact", rtol=1e-8, atol=1e-8
        )
        assert bool(got.ok)
        np.testing.assert_allclose(np.asarray(got.bpd), ref, atol=2e-6)


def test_ode_bpd_dequantizes_discrete_data():
    """Discrete data: bpd = -log2 p(x0 + u Delta) / D + log2(1 / Delta); for data on 17 levels the offset is 3
    bits, and the result is finite and above the continuous density's figure minus that offset."""
    sch = lambda_schedule(100)
    x0 = jnp.asarray(np.round((MU + S * np.random.default_rng(0).normal(size=(8, D))).clip(-1, 1) * 8) / 8, jnp.float32)
    eps_fn = gaussian_eps_fn(sch, MU, S**2 * np.eye(D))
    k = jax.random.key(0)
    disc = ode_likelihood(eps_fn, sch, x0, k, levels=17)
    assert bool(disc.ok) and np.isfinite(np.asarray(disc.bpd)).all()
    np.testing.assert_allclose(
        np.asarray(disc.bpd), np.asarray(-(disc.prior_logp + disc.delta_logp) / (D * math.log(2)) + 3.0), rtol=1e-6
    )


def test_importance_sampling_history():
    T = 3
    h, c = jnp.zeros((T, 10)), jnp.zeros((T,), jnp.int32)
    np.testing.assert_allclose(importance_probs(h, c), np.full(T, 1 / 3))  # uniform until all rows are full
    t = jnp.asarray([0, 0, 2])
    h, c = update_loss_history(h, c, t, jnp.asarray([1.0, 2.0, 5.0]))
    np.testing.assert_array_equal(np.asarray(c), [2, 0, 1])
    np.testing.assert_array_equal(np.asarray(h[0, :3]), [1.0, 2.0, 0.0])
    for i in range(12):  # fill every row; row 0 keeps only the last 10 of its 14 values
        h, c = update_loss_history(h, c, jnp.asarray([0, 1, 2]), jnp.asarray([10.0 + i, 3.0, 4.0]))
    np.testing.assert_array_equal(np.asarray(c), [10, 10, 10])
    np.testing.assert_array_equal(np.asarray(h[0]), np.arange(12.0, 22.0))
    assert float(h[2, -1]) == 4.0 and float(h[2, 0]) == 4.0  # 5.0 pushed out after 10 newer values
    rms = np.sqrt(np.mean(np.asarray(h) ** 2, axis=1))
    expected = rms / rms.sum() * (1 - 1e-3) + 1e-3 / T
    np.testing.assert_allclose(np.asarray(importance_probs(h, c)), expected, rtol=1e-6)


def test_inputs_are_checked_with_the_argument_named():
    """Issue 24, defect 12: bad data is a ValueError naming the argument and what it must be, never a bits/dim
    ([0, 1] images used to give a plausible 14.3, 0..255 pixels 1e5) nor an IndexError / ZeroDivisionError /
    TypeError; under jit an example outside [-1, 1] is NaN."""
    from jdiff.likelihood import ode_bpd

    sch = jdiff.get_schedule("linear", 4)
    model = lambda x, t, y=None: jnp.zeros_like(x)
    key = jax.random.key(0)
    good = jnp.asarray(np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4))
    for fn in (vlb_bpd, ode_bpd):
        for x0, kwargs, words in [
            (good * 0.5 + 0.5, {}, "looks like [0, 1] images"),
            ((good + 1) * 127.5, {}, "x0 must lie in [-1, 1] for discrete data (levels=256)"),
            (jnp.float32(0.5), {}, "x0 must be an array of shape (B, ...)"),
            (jnp.zeros((0, 4)), {}, "B >= 1"),
            (jnp.zeros((2,)), {}, "at least one non-empty data axis"),
            (good.astype(jnp.int32), {}, "floating-point"),
            (good, {"labels": jnp.zeros((3,), jnp.int32)}, "labels must be an integer array of shape (2,)"),
            (good, {"labels": [0, 1]}, "labels must be"),
            (good, {"levels": 1}, "levels must be an int >= 2"),
        ]:
            with pytest.raises(ValueError) as e:
                fn(model, sch, x0, key, **kwargs)
            assert words in str(e.value), (fn.__name__, str(e.value))
    # continuous data (levels None) is any real array: VAE latents beyond [-1, 1] are scored
    assert np.isfinite(np.asarray(vlb_bpd(model, sch, 3.0 * good, key, levels=None))).all()
    jitted = jax.jit(lambda x: vlb_bpd(model, sch, x, key, levels=17))
    out = np.asarray(jitted(good.at[1, 0].set(2.0)))
    assert np.isfinite(out[0]) and np.isnan(out[1])
