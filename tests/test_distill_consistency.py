"""Consistency models (jdiff.sampling.consistency, jdiff.distill.consistency): the boundary condition, the
parameterisation against the paper's (Song et al. 2023, App. C), iCT's discretisation / curriculum / index
distribution / pseudo-Huber against float64 re-derivations, the CD loss at the exact consistency function of
Gaussian data (zero) and off it, CD training of a small network towards the exact ODE map with the exact
Gaussian denoiser as teacher, and the multistep sampler against a float64 reference of Alg. 1."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdiff
from jdiff import edm
from jdiff.analytic import gaussian_eps_fn
from jdiff.distill import consistency as cm
from jdiff.distill.net import Net
from jdiff.sampling import SAMPLERS, make_grid
from jdiff.sampling.consistency import boundary_coefficients, consistency_function
from jdiff.sampling.timesteps import level_fn

LIN = jdiff.get_schedule("linear", 1000)
MEAN = np.array([0.5, -0.3])
VAR = np.array([0.25, 1.0])  # diagonal covariance
TEACHER = Net(gaussian_eps_fn(LIN, MEAN, np.diag(VAR)), None, "eps")
LEVEL = level_fn(LIN)
SIG_LO = float(np.sqrt((1 - LIN.alphas_cumprod[0]) / LIN.alphas_cumprod[0]))
SIG_HI = float(np.sqrt((1 - LIN.alphas_cumprod[-1]) / LIN.alphas_cumprod[-1]))


def exact_map(x, sig, sig_to):
    """The probability-flow ODE map of N(MEAN, diag VAR) data in EDM variables from sig to sig_to (float64):
    each coordinate keeps its standardised value."""
    x, sig, sig_to = (np.asarray(v, np.float64) for v in (x, sig, sig_to))
    sig, sig_to = sig.reshape(-1, 1), np.reshape(sig_to, (-1, 1))
    return MEAN + np.sqrt((VAR + sig_to**2) / (VAR + sig**2)) * (x - MEAN)


def test_boundary_condition_is_exact():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 2)) * 5, jnp.float32)
    junk = jnp.asarray(rng.normal(size=(4, 3, 3, 2)) * 1e3, jnp.float32)  # any denoiser output
    for smin in (0.002, 0.0101, 0.5):
        s = jnp.float32(smin)
        assert np.array_equal(np.asarray(consistency_function(junk, x, s, s)), np.asarray(x))
        c_skip, c_out = boundary_coefficients(s, s)
        assert float(c_skip) == 1.0 and float(c_out) == 0.0
    # through a model: the consistency function of the Gaussian teacher at sigma_min returns its input
    f = cm.consistency_fn(TEACHER, None, LEVEL, SIG_LO, 0.5)
    xs = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    out = f(xs, jnp.full((5,), SIG_LO, jnp.float32))
    assert np.array_equal(np.asarray(out), np.asarray(xs))


def test_parameterisation_is_the_papers_on_an_edm_network():
    """f = c_skip x + c_out F (CM App. C) for an EDM-preconditioned network F, with D = c_skip^EDM x + c_out^EDM F."""
    rng = np.random.default_rng(1)
    x, big_f = rng.normal(size=(2, 6, 5))
    for sig in (0.01, 0.3, 2.0, 80.0):
        smin, sd = 0.002, 0.5
        c = edm.coefficients("edm", sigma=sig)
        d = float(c.c_skip) * x + float(c.c_out) * big_f
        got = np.asarray(consistency_function(jnp.asarray(d, jnp.float32), jnp.asarray(x, jnp.float32), sig, smin))
        c_skip = sd**2 / ((sig - smin) ** 2 + sd**2)
        c_out = sd * (sig - smin) / math.sqrt(sd**2 + sig**2)
        np.testing.assert_allclose(got, c_skip * x + c_out * big_f, rtol=1e-5, atol=2e-5)
    # sigma_min = 0: the consistency function is the denoiser itself
    d = rng.normal(size=(6, 5))
    got = consistency_function(jnp.asarray(d, jnp.float32), jnp.asarray(x, jnp.float32), 1.7, 0.0)
    np.testing.assert_allclose(np.asarray(got), d, rtol=1e-5, atol=1e-5)


def test_karras_levels_curriculum_and_index_distribution():
    n = 11
    want = np.asarray(jdiff.sampling.karras_sigmas(0.002, 80.0, n))[::-1]
    got = np.asarray(cm.karras_level(jnp.arange(n), n, 0.002, 80.0))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # iCT eq. 5 with K = 400k (their CIFAR-10 run): K' = 50000, N doubles 10 -> 1280 intervals
    got = [int(cm.curriculum_levels(k, 400_000)) for k in (0, 49_999, 50_000, 100_000, 349_999, 350_000, 399_999)]
    assert got == [11, 11, 21, 41, 641, 1281, 1281]
    # lognormal index probabilities: float64 re-derivation
    lv = 0.002 ** (1 / 7) + np.arange(n) / (n - 1) * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))
    lv = lv**7
    cdf = np.array([math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in lv])
    p = np.diff(cdf) / np.sum(np.diff(cdf))
    got = np.asarray(cm.lognormal_index_probs(n, 20, 0.002, 80.0))
    np.testing.assert_allclose(got[: n - 1], p, rtol=1e-4, atol=1e-7)
    assert np.all(got[n - 1 :] == 0)


def test_pseudo_huber():
    a, b = np.random.default_rng(2).normal(size=(2, 3, 4, 4, 1))
    c = cm.huber_c(16)
    assert c == pytest.approx(0.00054 * 4)
    want = np.sqrt(np.sum((a - b) ** 2, axis=(1, 2, 3)) + c**2) - c
    np.testing.assert_allclose(np.asarray(cm.pseudo_huber(jnp.asarray(a), jnp.asarray(b), c)), want, rtol=1e-5)


def _exact_f(smin):
    """The exact consistency function of the Gaussian data: the ODE map to sigma_min, as a jax function."""

    def f(x, sig):
        s = sig[:, None]
        return MEAN + jnp.sqrt((VAR + smin**2) / (VAR + s**2)) * (x - MEAN)

    return f


def test_cd_loss_is_zero_at_the_exact_consistency_function():
    """With the exact ODE step as the teacher's solver, the exact consistency function has zero CD loss;
    one off by 0.01 sigma does not. Also: the CT target (x0 + sigma_i z) differs, so the CT loss is not zero."""
    x0 = jnp.asarray(MEAN + np.sqrt(VAR) * np.random.default_rng(3).normal(size=(256, 2)), jnp.float32)
    smin, smax = 0.01, 50.0
    f = _exact_f(smin)

    def exact_step(x, s_from, s_to):
        return MEAN + jnp.sqrt((VAR + s_to[:, None] ** 2) / (VAR + s_from[:, None] ** 2)) * (x - MEAN)

    kw = dict(sigma_min=smin, sigma_max=smax, max_levels=41, huber=1e-3)
    rng = jax.random.key(0)
    loss, _ = cm.consistency_loss(f, x0, rng, 18, teacher_step=exact_step, **kw)
    assert float(loss) < 1e-3 * 1e-3 * 20  # float32 round-off only (huber c = 1e-3: d ~ ||e||^2/2c)
    off = lambda x, s: f(x, s) + 0.01 * s[:, None]  # noqa: E731
    loss_off, _ = cm.consistency_loss(off, x0, rng, 18, teacher_step=exact_step, **kw)
    assert float(loss_off) > 100 * max(float(loss), 1e-9)
    loss_ct, _ = cm.consistency_loss(f, x0, rng, 18, **kw)
    assert float(loss_ct) > 100 * max(float(loss), 1e-9)


def test_solver_step_is_the_samplers_step():
    """The CD teacher's one-step solver (heun from sigma_{i+1} to sigma_i) against the Heun rule written out."""
    step = cm.solver_step(SAMPLERS["heun"], {}, TEACHER, None, LEVEL)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 2)) * 3, jnp.float32)
    s_from, s_to = jnp.asarray([3.0, 0.5, 10.0]), jnp.asarray([2.0, 0.3, 4.0])
    got = np.asarray(step(x, s_from, s_to))
    for j in range(3):
        a, b = float(s_from[j]), float(s_to[j])
        d = lambda y, s: MEAN + VAR / (VAR + s**2) * (y - MEAN)  # noqa: E731 (exact EDM denoiser)
        xj = np.asarray(x[j], np.float64)
        d0 = (xj - d(xj, a)) / a
        xe = xj + (b - a) * d0
        want = xj + (b - a) * 0.5 * (d0 + (xe - d(xe, b)) / b)
        np.testing.assert_allclose(got[j], want, rtol=2e-3, atol=2e-3)


def _mlp_eps_model(hidden=32):
    """x0(x (B, 2), t (B,)) = a(t) x + b(t), [a, b] from a tanh MLP of t/1000: the family of the exact one
    (an x0-predicting student: an eps one divides its error by alpha ~ 0.006 at sigma_max)."""

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (1, hidden)) * 2.0,
            "b1": jnp.linspace(-2.0, 2.0, hidden),
            "w2": jax.random.normal(k2, (hidden, 4)) * 0.01,
            "b2": jnp.zeros((4,)),
        }

    def apply(p, x, t):
        h = jnp.tanh((t[:, None] / 1000.0) @ p["w1"] + p["b1"])
        o = h @ p["w2"] + p["b2"]
        return o[:, :2] * x + o[:, 2:]

    return init, apply


def test_cd_trains_a_small_network_towards_the_exact_map():
    """Consistency distillation (heun teacher steps, iCT loss, fixed N = 18) from the exact Gaussian denoiser:
    the 1-step student's RMS error against the exact ODE map from sigma_max falls below 0.1 (measured 0.06; the
    data's stds are 0.5 and 1), more than 10x below the start; at sigma = 1 below 0.05 (measured 0.025)."""
    init, apply = _mlp_eps_model()
    params = init(jax.random.key(1))
    teacher_step = cm.solver_step(SAMPLERS["heun"], {}, TEACHER, None, LEVEL)
    kw = dict(sigma_min=SIG_LO, sigma_max=SIG_HI, max_levels=19, huber=cm.huber_c(2), teacher_step=teacher_step)
    tx = optax.adam(3e-3)

    def student(p):
        return cm.consistency_fn(Net(apply, p, "x0"), None, LEVEL, SIG_LO, 0.5)

    def loss_fn(p, x0, key):
        return cm.consistency_loss(student(p), x0, key, 18, **kw)[0]

    @jax.jit
    def train(p, opt, key):
        def body(c, k):
            p, opt = c
            k1, k2 = jax.random.split(k)
            x0 = jnp.asarray(MEAN, jnp.float32) + jnp.sqrt(jnp.asarray(VAR, jnp.float32)) * jax.random.normal(
                k1, (256, 2)
            )
            g = jax.grad(loss_fn)(p, x0, k2)
            upd, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, upd), opt), None

        (p, opt), _ = jax.lax.scan(body, (p, opt), jax.random.split(key, 1000))
        return p, opt

    def err(p, sig):
        x = MEAN + np.sqrt(VAR + sig**2) * np.random.default_rng(5).normal(size=(2000, 2))
        got = np.asarray(student(p)(jnp.asarray(x, jnp.float32), jnp.full((2000,), sig, jnp.float32)))
        return float(np.sqrt(np.mean((got - exact_map(x, sig, SIG_LO)) ** 2)))

    before = err(params, SIG_HI)
    params, _ = train(params, tx.init(params), jax.random.key(2))
    after, mid = err(params, SIG_HI), err(params, 1.0)
    assert after < 0.1 and mid < 0.05 and after < before / 10, (before, after, mid)


def _alg1_reference(x_t, zs, grid, smin, sd=0.5):
    """CM Alg. 1 in float64 with the exact Gaussian denoiser, on the grid's levels (EDM sigma = sigma/alpha)."""
    sig = np.asarray(grid.sigma, np.float64) / np.asarray(grid.alpha, np.float64)

    def f(x, s):
        d = MEAN + VAR / (VAR + s**2) * (x - MEAN)
        c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
        return c_skip * x + (s - smin) / s * (d - sd**2 / (s**2 + sd**2) * x)

    x = f(np.asarray(x_t, np.float64) / float(grid.alpha[0]), sig[0])
    for n in range(1, len(sig)):
        x = f(x + math.sqrt(sig[n] ** 2 - smin**2) * zs[n], sig[n])
    return x


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sampler_matches_alg1_in_float64(steps):
    keys = jax.random.split(jax.random.key(7), 16)
    eps_fn = gaussian_eps_fn(LIN, MEAN, np.diag(VAR))
    smin = 0.02
    out = jdiff.sample(
        eps_fn,
        LIN,
        (16, 2),
        None,
        sampler="consistency",
        num_steps=steps,
        spacing="trailing",
        options={"sigma_min": smin},
        sample_keys=keys,
    )
    # the sampler's draws: x_T from fold_in(key_j, 0), step n's z from fold_in(key_j, n + 1)
    draw = lambda d: np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, d), (2,))) for k in keys])  # noqa: E731
    zs = [draw(n + 1) for n in range(steps)]
    want = _alg1_reference(draw(0), zs, make_grid(LIN, "trailing", steps), smin)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-3, atol=2e-3)


def test_flow_and_eps_teachers_give_one_consistency_function():
    """Formulation-agnostic: the exact Gaussian flow-matching velocity (prediction flow) and the exact eps predictor
    (prediction eps) give the same consistency function and the same one-step teacher solver."""
    from jdiff.analytic import gaussian_velocity_fn

    flow_net = Net(gaussian_velocity_fn(MEAN, np.diag(VAR)), None, "flow", 1000.0)
    rng = np.random.default_rng(8)
    sig = jnp.asarray([0.05, 0.5, 2.0, 20.0], jnp.float32)
    x = jnp.asarray(MEAN + np.sqrt(VAR + np.asarray(sig)[:, None] ** 2) * rng.normal(size=(4, 2)), jnp.float32)
    got = [np.asarray(cm.consistency_fn(n, None, LEVEL, 0.02, 0.5)(x, sig)) for n in (flow_net, TEACHER)]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-3, atol=1e-3)
    steps = [
        np.asarray(cm.solver_step(SAMPLERS["euler"], {}, n, None, LEVEL)(x, sig, sig * 0.7))
        for n in (flow_net, TEACHER)
    ]
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-3, atol=1e-3)
