"""EDM (Karras et al. 2022) as a jdiff formulation: Table 1's preconditionings and training distributions, the
EDM loss at the exact denoiser, the "edm" schedule against Alg. 1's time grid, EDM networks sampled by jdiff's
samplers through the denoiser (the same predictor as eps gives the same samples), a tiny EDM training run that
resumes bit-exactly and samples, and one-line errors."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import analytic, edm
from jdiff.sampling import make_grid
from jdiff.sampling.denoiser import Guidance, make_denoiser

SD = 0.5  # sigma_data
SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 1.0, 1.5, 10.0, 80.0])


# Table 1 of the paper, written out here independently of jdiff.edm (float64).
def table1(pre, s, xp=np):
    """(c_skip, c_out, c_in, c_noise) at sigma s, float64 numpy (xp=jnp: traceable float32)."""
    s = xp.asarray(s, np.float64 if xp is np else jnp.float32)
    if pre == "edm":
        r = xp.sqrt(s**2 + SD**2)
        return SD**2 / r**2, s * SD / r, 1.0 / r, xp.log(s) / 4.0
    if pre == "vp":
        t = (xp.sqrt(0.1**2 + 2 * 19.9 * xp.log(s**2 + 1.0)) - 0.1) / 19.9
        return xp.ones_like(s), -s, 1.0 / xp.sqrt(s**2 + 1.0), 999.0 * t
    return xp.ones_like(s), s, xp.ones_like(s), xp.log(s / 2.0)


def sigma_from_c_noise(pre, c):
    """The sigma whose c_noise is c (inverting Table 1's c_noise)."""
    if pre == "edm":
        return jnp.exp(4.0 * c)
    if pre == "vp":
        t = c / 999.0
        return jnp.sqrt(jnp.expm1(0.5 * 19.9 * t**2 + 0.1 * t))
    return 2.0 * jnp.exp(c)


def exact_net(pre, denoiser):
    """The network F whose preconditioned denoiser is `denoiser(x (B, d), sigma (B,)) -> D`, EDM variables:
    F(x_in, c_noise) = (D(x; s) - c_skip x)/c_out with s from c_noise and x = x_in/c_in (Table 1 inverted)."""

    def net(x_in, c_noise, y=None):
        s = sigma_from_c_noise(pre, c_noise)
        c_skip, c_out, c_in, _ = (a[:, None] for a in table1(pre, s, jnp))
        x = x_in.reshape(x_in.shape[0], -1) / c_in
        return ((denoiser(x, s) - c_skip * x) / c_out).reshape(x_in.shape)

    return net


# -------------------------------------------------------------------------------------------------------------
# Table 1


def test_coefficients_match_table1():
    for pre in edm.PRECONDITIONINGS:
        got = edm.coefficients(pre, sigma=SIGMAS)
        for name, g, want in zip(got._fields, got, table1(pre, SIGMAS)):
            np.testing.assert_allclose(np.asarray(g), want, rtol=2e-6, atol=1e-6, err_msg=f"{pre} {name}")
    # Hand-computed values: edm at sigma 1.5 (s^2 + sd^2 = 2.5); vp at its t = 1 and t = 0.5; ve at sigma 2.
    c = edm.coefficients("edm", sigma=1.5)
    np.testing.assert_allclose(c, [0.1, 0.75 / math.sqrt(2.5), 1 / math.sqrt(2.5), math.log(1.5) / 4], rtol=1e-6)
    s1, s_half = math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), math.sqrt(math.expm1(0.5 * 19.9 / 4 + 0.05))
    np.testing.assert_allclose(edm.coefficients("vp", sigma=np.array([s1, s_half])).c_noise, [999.0, 499.5], rtol=1e-5)
    np.testing.assert_allclose(edm.vp_sigma(t=np.array([1.0, 0.5])), [s1, s_half], rtol=1e-6)
    np.testing.assert_allclose(edm.coefficients("ve", sigma=2.0), [1.0, 2.0, 1.0, 0.0], atol=1e-7)


def test_preconditioning_invariants():
    s = np.logspace(-3, 3, 25)
    for pre in edm.PRECONDITIONINGS:  # lambda(sigma) c_out(sigma)^2 = 1 (EDM eq. 8)
        c = edm.coefficients(pre, sigma=s)
        np.testing.assert_allclose(edm.loss_weight(pre, sigma=s) * np.asarray(c.c_out) ** 2, 1.0, rtol=1e-5)
    c_skip, c_out, c_in, _ = (np.asarray(a, np.float64) for a in edm.coefficients("edm", sigma=s))
    # Data of std sigma_data: unit-variance network input and effective training target (EDM App. B.6), and
    # c_skip minimises the target's variance ((1 - c)^2 sd^2 + c^2 s^2)' = 0.
    np.testing.assert_allclose(c_in**2 * (SD**2 + s**2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(((1 - c_skip) ** 2 * SD**2 + c_skip**2 * s**2) / c_out**2, 1.0, rtol=1e-5)
    np.testing.assert_allclose(-(1 - c_skip) * SD**2 + c_skip * s**2, 0.0, atol=1e-6)
    t = np.linspace(1e-3, 1.0, 11)
    np.testing.assert_allclose(edm.vp_sigma_inv(sigma=edm.vp_sigma(t=t)), t, rtol=1e-4)


def test_training_sigma_distributions():
    key = jax.random.PRNGKey(0)
    ln = np.log(np.asarray(edm.training_sigma("edm", key, (20000,))))
    assert abs(ln.mean() + 1.2) < 0.03 and abs(ln.std() - 1.2) < 0.03  # ln sigma ~ N(P_mean, P_std^2)
    ln = np.log(np.asarray(edm.training_sigma("edm", key, (20000,), p_mean=0.5, p_std=0.1)))
    assert abs(ln.mean() - 0.5) < 0.01 and abs(ln.std() - 0.1) < 0.01
    ln = np.log(np.asarray(edm.training_sigma("ve", key, (20000,))))  # ln sigma ~ U(ln 0.02, ln 100)
    assert ln.min() >= math.log(0.02) - 1e-5 and ln.max() <= math.log(100) + 1e-5
    assert abs(ln.mean() - 0.5 * (math.log(0.02) + math.log(100))) < 0.05
    t = np.asarray(edm.vp_sigma_inv(sigma=edm.training_sigma("vp", key, (20000,))))  # t ~ U(eps_t, 1)
    assert t.min() >= 0 and t.max() <= 1 + 1e-5 and abs(t.mean() - 0.5) < 0.01


# -------------------------------------------------------------------------------------------------------------
# The loss at the exact denoiser


@pytest.mark.parametrize("pre", edm.PRECONDITIONINGS)
def test_loss_is_zero_for_single_point_data(pre):
    mu = jax.random.uniform(jax.random.PRNGKey(1), (64,), minval=-1, maxval=1)
    x0 = jnp.broadcast_to(mu, (32, 64)).reshape(32, 8, 8, 1)
    net = exact_net(pre, lambda x, s: jnp.broadcast_to(mu, x.shape))  # D(x; sigma) = mu
    loss, aux = edm.edm_loss(net, x0, jax.random.PRNGKey(2), preconditioning=pre)
    assert float(loss) < 1e-8 and float(aux["mse"]) < 1e-8
    wrong = exact_net(pre, lambda x, s: jnp.broadcast_to(mu + 0.1, x.shape))
    loss_wrong, aux_wrong = edm.edm_loss(wrong, x0, jax.random.PRNGKey(2), preconditioning=pre)
    np.testing.assert_allclose(float(aux_wrong["mse"]), 0.01, rtol=1e-3)  # ||D - y||^2 per pixel
    assert float(loss_wrong) > 1e-3


def test_loss_at_the_exact_denoiser_of_gaussian_data_is_one():
    """Data N(mu, sd^2 I): D(x; s) = mu + sd^2/(sd^2 + s^2) (x - mu), whose error has variance sd^2 s^2/(sd^2 +
    s^2) = 1/lambda(s), so the expected EDM loss is 1 at every sigma; an offset delta of F adds delta^2."""
    b, d = 64, 4096
    mu = jax.random.uniform(jax.random.PRNGKey(3), (d,), minval=-0.5, maxval=0.5)
    x0 = (mu + SD * jax.random.normal(jax.random.PRNGKey(4), (b, d))).reshape(b, 64, 64, 1)
    opt = lambda x, s: mu + (SD**2 / (SD**2 + s**2))[:, None] * (x - mu)
    net = exact_net("edm", opt)
    rng = jax.random.PRNGKey(5)
    loss, _ = edm.edm_loss(net, x0, rng)
    assert abs(float(loss) - 1.0) < 0.02
    shifted, _ = edm.edm_loss(lambda x, c: net(x, c) + 0.1, x0, rng)
    np.testing.assert_allclose(float(shifted) - float(loss), 0.01, atol=2e-3)
    # Per-example weights: a 0/1 mask is the loss of the kept examples alone.
    mask = (jnp.arange(b) < 16).astype(jnp.float32)
    masked, _ = edm.edm_loss(net, x0, rng, weights=mask)
    assert abs(float(masked) - 1.0) < 0.05 and float(masked) != float(loss)


# -------------------------------------------------------------------------------------------------------------
# The edm schedule: EDM's sigma grid in a VP Schedule


def alg1_steps(n, smin=0.002, smax=80.0, rho=7.0):
    """Karras et al. 2022, Alg. 1 / eq. 5: t_i for i = 0..N-1 (decreasing), float64."""
    i = np.arange(n, dtype=np.float64)
    return (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def test_edm_schedule_is_the_alg1_grid():
    n = 18
    sch = jdiff.get_schedule("edm", n)
    t_i = alg1_steps(n)
    np.testing.assert_allclose(np.asarray(sch.sqrt_recipm1_alphas_cumprod)[::-1], t_i, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sch.alphas_cumprod)[::-1], 1 / (1 + t_i**2), rtol=1e-6)
    betas = np.asarray(sch.betas)
    assert np.all((betas > 0) & (betas < 1))
    # "linspace" with N = T visits exactly these levels; EDM sigma = sigma/alpha of the grid.
    g = make_grid(sch, "linspace", n)
    np.testing.assert_allclose(np.asarray(g.sigma / g.alpha), t_i, rtol=1e-6)
    # The karras spacing on a fine edm schedule is Alg. 1's grid. make_grid takes the end points from the float32
    # abar, whose 1 - abar at sigma_min = 0.002 (4e-6) is good to ~1e-3 relative; that bounds the tolerance.
    big = jdiff.get_schedule("edm", 1000, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    for n in (5, 18):
        g = make_grid(big, "karras", n)
        np.testing.assert_allclose(np.asarray(g.sigma / g.alpha), alg1_steps(n), rtol=2e-3)
    other = jdiff.get_schedule("edm", 50, sigma_min=0.01, sigma_max=10.0, rho=3.0)
    np.testing.assert_allclose(
        np.asarray(other.sqrt_recipm1_alphas_cumprod)[::-1], alg1_steps(50, 0.01, 10.0, 3.0), rtol=1e-6
    )


# -------------------------------------------------------------------------------------------------------------
# EDM networks in jdiff's denoiser and samplers


def test_denoiser_calls_the_network_with_edm_inputs():
    pre = "edm"
    calls = []

    def net(x_in, c_noise, y):
        calls.append((x_in, c_noise))
        return jnp.tanh(x_in) * (1.0 + 0.1 * y[:, None, None, None]) + 0.05 * c_noise[:, None, None, None]

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1))
    alpha, sigma = jnp.float32(0.6), jnp.float32(0.8)
    s = sigma / alpha  # EDM sigma 4/3, x_edm = x/alpha
    c_skip, c_out, c_in, c_noise = table1(pre, float(s))
    labels = jnp.array([1, 2, 3], jnp.int32)
    d = make_denoiser(net, None, prediction="edm", guidance=Guidance(labels, None, None))(x, 7.0, alpha, sigma)
    np.testing.assert_allclose(calls[0][0], c_in * x / alpha, rtol=1e-6)
    np.testing.assert_allclose(calls[0][1], [c_noise] * 3, rtol=1e-6)  # the time input is c_noise, not t
    want = c_skip * x / alpha + c_out * net(c_in * x / alpha, jnp.full((3,), c_noise, jnp.float32), labels)
    np.testing.assert_allclose(d.x0, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha * d.x0 + sigma * d.eps, x, atol=1e-5)  # x = alpha x0 + sigma eps
    # Guidance on F is guidance on D: D_u + w (D_c - D_u).
    g = Guidance(labels, jnp.int32(0), jnp.float32(3.0))
    dg = make_denoiser(net, None, prediction="edm", guidance=g)(x, 7.0, alpha, sigma)
    unc = make_denoiser(net, None, prediction="edm", guidance=Guidance(jnp.zeros(3, jnp.int32), None, None))
    du = unc(x, 7.0, alpha, sigma).x0
    np.testing.assert_allclose(dg.x0, du + 3.0 * (d.x0 - du), rtol=1e-5, atol=1e-5)
    # A zero-terminal-SNR level (alpha = 0) stays finite: the network is evaluated at sigma_edm = 4096.
    d0 = make_denoiser(net, None, prediction="edm", guidance=Guidance(labels, None, None))(x, 0.0, 0.0, 1.0)
    assert np.isfinite(np.asarray(d0.x0)).all() and np.isfinite(np.asarray(d0.eps)).all()


MU = np.array([0.3, -0.2, 0.5, 0.1])
_A = np.array([[0.5, 0.1, 0.0, 0.0], [0.1, 0.4, 0.05, 0.0], [0.0, 0.05, 0.3, 0.0], [0.0, 0.0, 0.1, 0.4]])
COV = _A @ _A.T
SHAPE = (512, 2, 2, 1)


def gaussian_denoiser(x, s):
    """E[y | y + s n = x] for y ~ N(MU, COV): MU + COV (COV + s^2 I)^-1 (x - MU)."""
    c = jnp.asarray(COV, jnp.float32)
    m = jax.vmap(lambda si: c @ jnp.linalg.inv(c + si**2 * jnp.eye(4)))(s)
    return MU + jnp.einsum("bij,bj->bi", m, x - MU)


EDM_NETS = {p: exact_net(p, gaussian_denoiser) for p in edm.PRECONDITIONINGS}
EDM_SCHEDULE = jdiff.get_schedule("edm", 1000)
EPS_FN = analytic.gaussian_eps_fn(EDM_SCHEDULE, MU, COV)
X_T = jax.random.normal(jax.random.PRNGKey(1), SHAPE)


@pytest.mark.parametrize(
    "sampler,spacing,steps,ode_err",  # ode_err: ~2x the measured mean error against the exact ODE solution
    [("ddim", "linspace", 30, 0.06), ("heun", "karras", 30, 0.01), ("dpmpp_2m", "karras", 20, 0.03)],
)
def test_exact_edm_network_samples_the_data_and_equals_its_eps_form(sampler, spacing, steps, ode_err):
    kw = dict(sampler=sampler, spacing=spacing, num_steps=steps, x_init=X_T)
    x = jdiff.sample(EDM_NETS["edm"], EDM_SCHEDULE, SHAPE, jax.random.PRNGKey(0), prediction="edm", **kw)
    x_eps = jdiff.sample(EPS_FN, EDM_SCHEDULE, SHAPE, jax.random.PRNGKey(0), prediction="eps", **kw)
    np.testing.assert_allclose(x, x_eps, atol=2e-5)  # one predictor, two parameterisations, one conversion
    flat = np.asarray(x, np.float64).reshape(SHAPE[0], -1)
    g = make_grid(EDM_SCHEDULE, spacing, steps)
    exact = analytic.gaussian_ode_solution(MU, COV, X_T, float(g.alpha[0]), float(g.sigma[0])).reshape(SHAPE[0], -1)
    assert np.mean(np.abs(flat - exact)) < ode_err  # the probability-flow ODE's own solution from X_T
    # The data's mean and covariance, to the sampling error of 512 draws (std ~0.025 and ~0.02).
    np.testing.assert_allclose(flat.mean(0), MU, atol=0.1)
    np.testing.assert_allclose(np.cov(flat.T), COV, atol=0.06)


def test_every_preconditioning_denoises_like_its_eps_form():
    """The denoiser of an exact "edm" / "edm_vp" / "edm_ve" network returns the (x0, eps) of the exact eps
    predictor at every level of a grid (what every sampler consumes)."""
    x = X_T[:64]
    g = make_grid(EDM_SCHEDULE, "karras", 8)
    plain = make_denoiser(EPS_FN, None, prediction="eps", guidance=Guidance(None, None, None))
    for prediction, pre in [("edm", "edm"), ("edm_vp", "vp"), ("edm_ve", "ve")]:
        assert edm.preconditioning_of(prediction) == pre
        den = make_denoiser(EDM_NETS[pre], None, prediction=prediction, guidance=Guidance(None, None, None))
        for i in range(8):
            a, s = g.alpha[i], g.sigma[i]
            xi = a * jnp.asarray(MU, jnp.float32).reshape(1, 2, 2, 1) + s * x
            want, got = plain(xi, g.t[i], a, s), den(xi, g.t[i], a, s)
            sig = float(s / a)  # float32 rounding grows like sigma_edm in x0 and 1/sigma_edm in eps
            np.testing.assert_allclose(got.x0, want.x0, atol=4e-6 * (1 + sig), err_msg=f"{pre} level {i}")
            np.testing.assert_allclose(got.eps, want.eps, atol=4e-6 * (1 + 1 / sig), err_msg=f"{pre} level {i}")


# -------------------------------------------------------------------------------------------------------------
# Training, config, errors


def _one_line(e):
    assert "\n" not in str(e.value), str(e.value)


def test_tiny_edm_run_trains_resumes_exactly_and_samples(tiny_config, tmp_path):
    from test_train_checkpoint import QUIET, _assert_trees_equal, _restore

    from jdiff.run import load_for_inference
    from jdiff.training import train

    over = {"diffusion.prediction": "edm", "diffusion.schedule": "edm", "optim.steps": 4, "run.checkpoint_every": 2}
    dev = jax.devices()[:1]
    c = tiny_config(workdir=tmp_path / "c", **over)
    assert train(c, devices=dev, **QUIET).step == 4  # uninterrupted, checkpoints 2 and 4
    # b: the same run killed after checkpoint 2 was written (its checkpoint 4 and checksums removed), resumed.
    shutil.copytree(c.run.workdir, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    os.remove(tmp_path / "b" / "checksums" / "4.json")
    b = tiny_config(workdir=tmp_path / "b", **over)
    rb = train(b, devices=dev, **QUIET)
    assert (rb.step, rb.last_checkpoint) == (4, 4)
    _assert_trees_equal(_restore(b, 4, dev), _restore(c, 4, dev), exact=True)
    import json

    with open(os.path.join(c.run.workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses and all(np.isfinite(losses))
    config, model, schedule, ema = load_for_inference(c.run.workdir)
    assert config.diffusion.prediction == "edm"
    x = jdiff.sample(
        model.apply,
        schedule,
        (2, 8, 8, 1),
        jax.random.PRNGKey(0),
        params={"params": ema},
        labels=np.array([1, 2], np.int32),
        num_steps=3,
        prediction=config.diffusion.prediction,
        clip_x0=(-1, 1),
    )
    assert x.shape == (2, 8, 8, 1) and np.isfinite(np.asarray(x)).all()


def test_presets_and_config_rules():
    from jdiff.config import ConfigError, apply_overrides, get_preset

    p = get_preset("digits_edm")
    assert (p.diffusion.prediction, p.diffusion.schedule, p.model.name) == ("edm", "edm", "unet_small")
    c = get_preset("cifar10_edm")
    assert (c.diffusion.prediction, c.optim.batch_size, c.optim.lr) == ("edm", 512, 1e-3)
    cases = [
        ({"diffusion.weighting": "min_snr"}, "does not apply to prediction edm"),
        ({"diffusion.zero_terminal_snr": True}, "zero_terminal_snr does not apply to prediction edm"),
    ]
    for over, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            apply_overrides(p, over.items())
        _one_line(e)
    with pytest.raises(ConfigError, match="apply to prediction edm only") as e:
        apply_overrides(get_preset("digits"), {"diffusion.edm_p_mean": 0.0}.items())
    _one_line(e)
    ok = apply_overrides(p, {"diffusion.edm_p_mean": -1.0, "diffusion.edm_p_std": 1.0}.items())
    assert (ok.diffusion.edm_p_mean, ok.diffusion.edm_p_std) == (-1.0, 1.0)
    assert apply_overrides(get_preset("digits"), {"diffusion.prediction": "edm_ve"}.items()).diffusion.prediction


def test_errors_are_one_line():
    x = jnp.zeros((2, 4, 4, 1))
    net = lambda x, t: x
    sch = jdiff.get_schedule("linear", 100)
    for call, msg in [
        (lambda: jdiff.diffusion_loss(net, sch, x, jax.random.PRNGKey(0), prediction="edm"), "allowed values"),
        (lambda: jdiff.to_x0_eps("edm", x, x, 1.0, 0.0), "jdiff.edm.edm_loss"),
        (lambda: edm.edm_loss(net, x, jax.random.PRNGKey(0), preconditioning="ddpm"), "allowed values"),
        (lambda: edm.edm_loss(net, x, jax.random.PRNGKey(0), sigma_data=0.0), "sigma_data"),
        (lambda: edm.coefficients("vpsde", sigma=1.0), "allowed values"),
        (lambda: jdiff.get_schedule("edm", 1), "num_timesteps"),
        (lambda: jdiff.get_schedule("edm", 10, sigma_min=1.0, sigma_max=0.5), "sigma_min"),
        (lambda: jdiff.sample(net, sch, (2, 4, 4, 1), jax.random.PRNGKey(0), prediction="edm_x"), "edm_ve"),
    ]:
        with pytest.raises(ValueError, match=msg) as e:
            call()
        _one_line(e)
    with pytest.raises(ValueError, match=r"allowed values: \['eps', 'x0', 'v'\]"):
        jdiff.diffusion_loss(net, sch, x, jax.random.PRNGKey(0), prediction="edm")
