"""Samplers against exact noise predictors of known data distributions, and identities between samplers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff.analytic import gaussian_eps_fn, gaussian_ode_solution, gmm_eps_fn
from jdiff.forward import convert_prediction
from jdiff.sampling import discrete_timesteps, karras_sigmas, make_grid
from jdiff.sampling.denoiser import dynamic_threshold

LIN = jdiff.get_schedule("linear", 1000)
MEAN = np.array([1.0, -0.5])
COV = np.array([[0.3, 0.1], [0.1, 0.05]])
GAUSS = gaussian_eps_fn(LIN, MEAN, COV)
ALL = sorted(jdiff.SAMPLERS)


def test_registry_has_the_issue_samplers():
    assert set(ALL) >= {"ddpm", "ddim", "dpmpp_2m", "euler", "heun"}


@pytest.mark.parametrize(
    "spacing, expected",
    [
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ],
)
def test_timestep_spacings_match_lin_et_al_table(spacing, expected):
    np.testing.assert_array_equal(discrete_timesteps(spacing, 10, 1000), expected)


def test_full_grid_and_karras_sigmas():
    np.testing.assert_array_equal(discrete_timesteps("linspace", 1000, 1000), np.arange(999, -1, -1))
    s = np.asarray(karras_sigmas(jnp.float32(0.002), jnp.float32(80.0), 5, 7.0), np.float64)
    ramp = np.linspace(0, 1, 5)
    ref = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, ref, rtol=1e-5)
    g = make_grid(LIN, "karras", 8)
    edm = np.sqrt((1 - np.asarray(LIN.alphas_cumprod, np.float64)) / np.asarray(LIN.alphas_cumprod, np.float64))
    np.testing.assert_allclose(np.asarray(g.sigma / g.alpha)[[0, -1]], edm[[-1, 0]], rtol=1e-3)
    np.testing.assert_allclose(np.asarray(g.t)[[0, -1]], [999, 0], atol=1e-2)
    for grid in (g, make_grid(LIN, "trailing", 8)):
        assert float(grid.alpha_next[-1]) == 1.0 and float(grid.sigma_next[-1]) == 0.0
        np.testing.assert_allclose(grid.alpha**2 + grid.sigma**2, 1.0, atol=1e-6)


# diffusers DDIMScheduler(num_train_timesteps=1000, steps_offset=1).set_timesteps(N).timesteps (diffusers 0.42.1)
LEADING_OFFSET_1 = {
    1: [1],
    3: [667, 334, 1],
    7: [853, 711, 569, 427, 285, 143, 1],
    10: [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
}
SD = jdiff.get_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("n", sorted(LEADING_OFFSET_1))
def test_leading_steps_offset_matches_diffusers_set_timesteps(n):
    np.testing.assert_array_equal(discrete_timesteps("leading", n, 1000, steps_offset=1), LEADING_OFFSET_1[n])
    g = make_grid(SD, "leading", n, steps_offset=1)
    np.testing.assert_array_equal(np.asarray(g.t), LEADING_OFFSET_1[n])
    np.testing.assert_array_equal(np.asarray(g.t_next), LEADING_OFFSET_1[n][1:] + [-1])
    np.testing.assert_array_equal(np.asarray(discrete_timesteps("leading", 999, 1000, 1))[[0, -1]], [999, 1])
    with pytest.raises(ValueError, match="beyond T-1=999"):
        discrete_timesteps("leading", 1000, 1000, 1)  # diffusers would index alphas_cumprod[1000]


def test_final_level_first_ends_at_the_first_training_level():
    """final_level="first": the last row goes to t = 0, alpha^2 = alphas_cumprod[0] (float64 from the betas),
    every other row is unchanged."""
    clean, first = (make_grid(SD, "leading", 10, steps_offset=1, final_level=f) for f in ("clean", "first"))
    abar0 = 1.0 - np.asarray(SD.betas, np.float64)[0]
    np.testing.assert_allclose(
        [float(first.t_next[-1]), float(first.alpha_next[-1]), float(first.sigma_next[-1])],
        [0.0, np.sqrt(abar0), np.sqrt(1.0 - abar0)],
        rtol=1e-6,
    )
    assert (float(clean.t_next[-1]), float(clean.alpha_next[-1]), float(clean.sigma_next[-1])) == (-1.0, 1.0, 0.0)
    for a, b in zip(clean, first):
        np.testing.assert_array_equal(np.asarray(a)[:-1], np.asarray(b)[:-1])


def _toy_eps(x, t):
    return jnp.sin(x) * (0.5 + t[:, None] / 1000.0)


@pytest.mark.parametrize("n", [7, 10])
def test_ddim_steps_offset_and_final_level_equal_diffusers_step_in_float64(n):
    """diffusers' DDIMScheduler.step (eta 0, steps_offset 1, set_alpha_to_one=False) written out in float64:
    prev_t = t - T // N; abar_prev = alphas_cumprod[prev_t] if prev_t >= 0 else alphas_cumprod[0];
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps. The output is x at abar[0], not x0."""
    abar = np.cumprod(1.0 - np.asarray(SD.betas, np.float64))
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (8, 3)), np.float64)
    x = x_T.copy()
    for t in LEADING_OFFSET_1[n]:
        eps = np.sin(x) * (0.5 + t / 1000.0)
        x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        prev = t - 1000 // n
        a_prev = abar[prev] if prev >= 0 else abar[0]
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    kw = dict(num_steps=n, spacing="leading", x_init=jnp.asarray(x_T, jnp.float32))
    got = jdiff.sample(_toy_eps, SD, x_T.shape, jax.random.key(0), steps_offset=1, final_level="first", **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), x, rtol=1e-5, atol=1e-5)
    clean = jdiff.sample(_toy_eps, SD, x_T.shape, jax.random.key(0), **kw)
    assert np.abs(np.asarray(clean, np.float64) - x).max() > 1e-2  # offset 0 and alpha 1 are really different


def _plms_float64(x_T, n):
    """diffusers' PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).step_plms written out
    in float64 with its timesteps (the first one repeated) and its counter / ets / cur_sample bookkeeping."""
    abar = np.cumprod(1.0 - np.asarray(SD.betas, np.float64))
    ratio = 1000 // n
    ts = np.arange(n) * ratio + 1
    ts = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
    ets, counter, cur, x = [], 0, None, x_T.copy()
    for t in ts:
        out = np.sin(x) * (0.5 + t / 1000.0)
        prev = t - ratio
        if counter != 1:
            ets = ets[-3:] + [out]
        else:
            prev, t = t, t + ratio
        if len(ets) == 1 and counter == 0:
            cur = x
        elif len(ets) == 1 and counter == 1:
            out, x, cur = (out + ets[-1]) / 2, cur, None
        elif len(ets) == 2:
            out = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            out = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        a, a_prev = abar[t], abar[prev] if prev >= 0 else abar[0]
        denom = a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev)
        x = np.sqrt(a_prev / a) * x - (a_prev - a) * out / denom
        counter += 1
    return x, len(ts)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 20])
def test_pndm_equals_diffusers_plms_step_in_float64(n):
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (8, 3)), np.float64)
    want, calls = _plms_float64(x_T, n)
    assert jdiff.SAMPLERS["pndm"].nfe(n) == calls  # N + 1 model calls (N = 1: one)
    kw = dict(sampler="pndm", num_steps=n, spacing="leading", steps_offset=1, final_level="first")
    got = jdiff.sample(_toy_eps, SD, x_T.shape, jax.random.key(0), x_init=jnp.asarray(x_T, jnp.float32), **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_pndm_equals_diffusers_pndm_scheduler():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (8, 3)), np.float64)
    for n in (3, 10):
        sch = diffusers.PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        sch.set_timesteps(n)
        x = torch.tensor(x_T)
        for t in sch.timesteps:
            x = sch.step(torch.sin(x) * (0.5 + float(t) / 1000.0), t, x).prev_sample
        want = x.numpy()  # diffusers keeps alphas_cumprod in float32
        np.testing.assert_allclose(_plms_float64(x_T, n)[0], want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("sampler", ALL)
@pytest.mark.parametrize("spacing", ["linspace", "trailing", "karras"])
def test_single_point_data_is_recovered_exactly(sampler, spacing):
    """For data = one point x*, the exact predictor gives x0_hat = x* at every step, so every sampler must
    land on x* whatever the step count."""
    target = jnp.asarray([[0.5, -0.25, 1.0]])
    f = gaussian_eps_fn(LIN, target[0], np.zeros((3, 3)))
    options = {"eta": 1.0} if "eta" in jdiff.SAMPLERS[sampler].options else {}
    x = jdiff.sample(f, LIN, (64, 3), jax.random.key(0), sampler=sampler, num_steps=7, spacing=spacing, options=options)
    np.testing.assert_allclose(x, jnp.broadcast_to(target, x.shape), atol=2e-4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_zero_terminal_snr_with_v_prediction(sampler):
    z = jdiff.get_schedule("linear", 1000, zero_terminal_snr=True)
    target = jnp.asarray([0.3, -0.7])
    eps = gaussian_eps_fn(z, target, np.zeros((2, 2)))

    def v_model(x, t):
        abar = jdiff.alpha_bar_at(z, t)[:, None]
        a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
        a = jnp.where(t[:, None] >= 999, 0.0, a)  # abar is exactly 0 at the last step
        s = jnp.where(t[:, None] >= 999, 1.0, s)
        e = jnp.where(t[:, None] >= 999, x, eps(x, t))  # at abar = 0, x = eps
        return a * e - s * target

    x = jdiff.sample(
        v_model, z, (16, 2), jax.random.key(1), sampler=sampler, num_steps=10, spacing="trailing", prediction="v"
    )
    np.testing.assert_allclose(x, jnp.broadcast_to(target, x.shape), atol=1e-3)


@pytest.mark.parametrize("spacing", ["linspace", "karras"])
def test_euler_equals_ddim_eta0(spacing):
    x1 = jdiff.sample(GAUSS, LIN, (128, 2), jax.random.key(2), sampler="euler", num_steps=13, spacing=spacing)
    x2 = jdiff.sample(GAUSS, LIN, (128, 2), jax.random.key(2), sampler="ddim", num_steps=13, spacing=spacing)
    np.testing.assert_allclose(x1, x2, atol=1e-4)


def test_ddim_eta1_on_full_grid_equals_ddpm_posterior():
    sch = jdiff.get_schedule("linear", 100)
    f = gaussian_eps_fn(sch, MEAN, COV)
    kw = dict(num_steps=100, spacing="linspace")
    x1 = jdiff.sample(f, sch, (256, 2), jax.random.key(3), sampler="ddim", eta=1.0, **kw)
    x2 = jdiff.sample(f, sch, (256, 2), jax.random.key(3), sampler="ddpm", variance="posterior", **kw)
    np.testing.assert_allclose(x1, x2, atol=2e-4)
    x3 = jdiff.sample(f, sch, (256, 2), jax.random.key(3), sampler="ddim", eta=0.0, **kw)
    assert float(jnp.abs(x3 - x1).mean()) > 0.05  # eta really adds noise


def test_ddim_eta0_is_deterministic_and_invertible():
    x0 = jnp.asarray(np.random.default_rng(0).multivariate_normal(MEAN, COV, size=256), jnp.float32)
    k = dict(num_steps=200, spacing="linspace")
    x_T = jdiff.ddim_invert(GAUSS, LIN, x0, **k)
    assert float(jnp.std(x_T)) > 0.8  # it really moved to noise
    a = jdiff.sample(GAUSS, LIN, x0.shape, jax.random.key(0), x_init=x_T, **k)
    b = jdiff.sample(GAUSS, LIN, x0.shape, jax.random.key(99), x_init=x_T, **k)
    np.testing.assert_array_equal(a, b)  # no randomness after x_T
    assert float(jnp.sqrt(jnp.mean((a - x0) ** 2))) < 0.02


def _ode_rmse(sampler, spacing, nfe, x_T):
    n = (nfe + 1) // 2 if sampler == "heun" else nfe
    g = make_grid(LIN, spacing, n)
    ref = gaussian_ode_solution(MEAN, COV, np.asarray(x_T), float(g.alpha[0]), float(g.sigma[0]))
    x = jdiff.sample(
        GAUSS, LIN, x_T.shape, jax.random.key(0), sampler=sampler, num_steps=n, spacing=spacing, x_init=x_T
    )
    return float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref) ** 2)))


def test_ode_samplers_converge_to_the_exact_flow_and_fast_samplers_beat_ddim():
    """Gaussian data: the probability-flow ODE has a closed-form solution (jdiff.analytic)."""
    x_T = jax.random.normal(jax.random.key(5), (512, 2))
    err = {(s, n): _ode_rmse(s, "karras", n, x_T) for s in ("ddim", "dpmpp_2m", "heun") for n in (11, 21, 81)}
    for s in ("ddim", "dpmpp_2m", "heun"):
        assert err[(s, 81)] < err[(s, 21)]
    assert err[("ddim", 81)] < 0.02 and err[("dpmpp_2m", 81)] < 2e-3 and err[("heun", 81)] < 6e-3
    # Second-order solvers at equal function evaluations (measured: DPM++ 2.4x, 3.1x, 16x better than DDIM
    # at 11, 21, 81 NFE; Heun is worse than DDIM at 11 and 21 NFE and 3.7x better at 81).
    assert err[("dpmpp_2m", 11)] < 0.6 * err[("ddim", 11)]
    assert err[("dpmpp_2m", 21)] < 0.5 * err[("ddim", 21)]
    assert err[("dpmpp_2m", 81)] < 0.1 * err[("ddim", 81)]
    assert err[("heun", 81)] < 0.35 * err[("ddim", 81)]


@pytest.mark.parametrize(
    "sampler, steps, extra",
    [
        ("ddpm", 1000, {"variance": "posterior"}),
        ("ddpm", 1000, {"variance": "beta"}),
        ("ddim", 250, {"eta": 1.0}),
        ("ddim", 100, {"eta": 0.0}),
        ("dpmpp_2m", 25, {}),
        ("heun", 25, {}),
    ],
)
def test_samples_match_the_gaussian(sampler, steps, extra):
    n = 4000
    x = np.asarray(
        jdiff.sample(
            GAUSS,
            LIN,
            (n, 2),
            jax.random.key(11),
            sampler=sampler,
            num_steps=steps,
            spacing="karras" if sampler in ("heun", "dpmpp_2m") else "linspace",
            **extra,
        ),
        np.float64,
    )
    se_mean = np.sqrt(np.diag(COV) / n)
    assert np.all(np.abs(x.mean(0) - MEAN) < 4.5 * se_mean), x.mean(0)
    cov = np.cov(x.T)
    se_cov = np.sqrt((COV**2 + np.outer(np.diag(COV), np.diag(COV))) / n)
    assert np.all(np.abs(cov - COV) < 4.5 * se_cov + 2e-3), cov


@pytest.mark.parametrize(
    "sampler, steps, extra", [("ddpm", 1000, {}), ("ddim", 200, {"eta": 0.5}), ("dpmpp_2m", 50, {}), ("heun", 50, {})]
)
def test_gaussian_mixture_weights_and_spreads(sampler, steps, extra):
    means, stds, w = np.array([[-2.0, 0.0], [2.0, 1.0]]), np.array([0.3, 0.5]), np.array([0.3, 0.7])
    f = gmm_eps_fn(LIN, means, stds, w)
    n = 4000
    spacing = "karras" if sampler in ("heun", "dpmpp_2m") else "linspace"
    x = np.asarray(
        jdiff.sample(f, LIN, (n, 2), jax.random.key(4), sampler=sampler, num_steps=steps, spacing=spacing, **extra)
    )
    comp = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    frac = np.bincount(comp, minlength=2) / n
    assert abs(frac[0] - 0.3) < 4 * np.sqrt(0.21 / n), frac
    for k in range(2):
        xs = x[comp == k]
        np.testing.assert_allclose(xs.mean(0), means[k], atol=0.05)
        np.testing.assert_allclose(xs.std(0), stds[k], rtol=0.08)


def test_prediction_types_give_the_same_samples():
    def as_type(kind):
        def f(x, t):
            abar = jdiff.alpha_bar_at(LIN, t)[:, None]
            return convert_prediction(GAUSS(x, t), x, jnp.sqrt(abar), jnp.sqrt(1 - abar), source="eps", target=kind)

        return f

    outs = [
        jdiff.sample(as_type(k), LIN, (64, 2), jax.random.key(8), sampler="ddpm", num_steps=20, prediction=k)
        for k in ("eps", "x0", "v")
    ]
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-3)
    np.testing.assert_allclose(outs[2], outs[0], atol=2e-3)


# Class-conditional model: class 0 -> N(-1, .1), class 1 -> N(+1, .1); the null label 2 -> their mixture.
_COND = [
    gaussian_eps_fn(LIN, [-1.0], [[0.1]]),
    gaussian_eps_fn(LIN, [1.0], [[0.1]]),
    gmm_eps_fn(LIN, [[-1.0], [1.0]], [0.1**0.5] * 2, [0.5, 0.5]),
]


def _cond_model(x, t, y):
    outs = jnp.stack([f(x, t) for f in _COND])
    return jnp.take_along_axis(outs, y[None, :, None], axis=0)[0]


def test_classifier_free_guidance_identities():
    y = jnp.array([0, 1] * 32)
    kw = dict(sampler="ddim", num_steps=20)
    cond = jdiff.sample(_cond_model, LIN, (64, 1), jax.random.key(0), labels=y, **kw)
    uncond = jdiff.sample(_cond_model, LIN, (64, 1), jax.random.key(0), labels=jnp.full((64,), 2), **kw)
    g1 = jdiff.sample(_cond_model, LIN, (64, 1), jax.random.key(0), labels=y, guidance_scale=1.0, null_label=2, **kw)
    g0 = jdiff.sample(_cond_model, LIN, (64, 1), jax.random.key(0), labels=y, guidance_scale=0.0, null_label=2, **kw)
    g3 = jdiff.sample(_cond_model, LIN, (64, 1), jax.random.key(0), labels=y, guidance_scale=3.0, null_label=2, **kw)
    np.testing.assert_allclose(g1, cond, atol=1e-5)
    np.testing.assert_allclose(g0, uncond, atol=1e-5)
    assert np.all(np.sign(np.asarray(cond)[:, 0]) == np.where(np.asarray(y) == 0, -1, 1))
    # Guidance pushes further towards the class (and tightens it).
    assert float(jnp.mean(jnp.abs(g3))) > float(jnp.mean(jnp.abs(cond)))


def test_clipping_and_dynamic_thresholding():
    far = gaussian_eps_fn(LIN, [3.0, -3.0], np.zeros((2, 2)))
    x = jdiff.sample(far, LIN, (8, 2), jax.random.key(0), num_steps=10, clip_x0=(-1.0, 1.0))
    np.testing.assert_allclose(x, jnp.broadcast_to(jnp.array([1.0, -1.0]), x.shape), atol=1e-5)
    x0 = jnp.array([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.5]])
    out = dynamic_threshold(x0, jnp.float32(1.0))
    np.testing.assert_allclose(out[0], x0[0] / 3.0, rtol=1e-6)  # s = max |x0| = 3
    np.testing.assert_allclose(out[1], x0[1], rtol=1e-6)  # s = max(0.5, 1) = 1: unchanged
    x = jdiff.sample(far, LIN, (8, 2), jax.random.key(0), num_steps=10, dynamic_threshold=0.995)
    assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-5


def test_learned_variance_interpolates_between_beta_and_posterior():
    def with_var(v):
        return functools.partial(lambda v, x, t: jnp.concatenate([GAUSS(x, t), jnp.full_like(x, v)], -1), v)

    kw = dict(sampler="ddpm", num_steps=30)
    for v, ref_var in ((1.0, "beta"), (-1.0, "posterior")):
        learned = jdiff.sample(with_var(v), LIN, (32, 1, 1, 2), jax.random.key(1), variance="learned", **kw)
        ref = jdiff.sample(with_var(v), LIN, (32, 1, 1, 2), jax.random.key(1), variance=ref_var, **kw)
        np.testing.assert_allclose(learned, ref, atol=1e-4)
    a = jdiff.sample(with_var(1.0), LIN, (32, 1, 1, 2), jax.random.key(1), variance="beta", **kw)
    b = jdiff.sample(with_var(1.0), LIN, (32, 1, 1, 2), jax.random.key(1), variance="posterior", **kw)
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_trajectory():
    x, traj = jdiff.sample(GAUSS, LIN, (16, 2), jax.random.key(0), num_steps=10, return_trajectory_every=4)
    assert traj.shape == (1 + 3, 16, 2)  # x_T, after 4, after 8, after 10
    np.testing.assert_array_equal(traj[-1], x)
    x_plain = jdiff.sample(GAUSS, LIN, (16, 2), jax.random.key(0), num_steps=10)
    np.testing.assert_allclose(x, x_plain, atol=1e-6)
    assert float(jnp.std(traj[0])) > 0.8 and float(jnp.abs(traj[1] - traj[2]).mean()) > 1e-3


def test_params_are_passed_to_model_fn():
    def model(params, x, t):
        return GAUSS(x, t) * params["scale"]

    a = jdiff.sample(model, LIN, (16, 2), jax.random.key(0), num_steps=10, params={"scale": jnp.float32(1.0)})
    b = jdiff.sample(GAUSS, LIN, (16, 2), jax.random.key(0), num_steps=10)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="plms"), "allowed values"),
        (dict(spacing="uniform"), "allowed values"),
        (dict(prediction="score"), "allowed values"),
        (dict(num_steps=0), r"\[1, T=1000\]"),
        (dict(num_steps=1001), r"\[1, T=1000\]"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(eta=1.5), r"\[0, 1\]"),
        (dict(eta=-0.1), r"\[0, 1\]"),
        (dict(sampler="ddpm", variance="fixed"), "variance; allowed: posterior, beta, learned"),
        (dict(labels=jnp.zeros(3, jnp.int32)), r"\(4,\)"),
        (dict(guidance_scale=2.0), "labels"),
        (dict(x_init=jnp.zeros((4, 3))), "x_init"),
        (dict(clip_x0=(1.0, -1.0)), "clip_x0"),
        (dict(dynamic_threshold=1.5), "dynamic_threshold"),
        (dict(return_trajectory_every=0), "return_trajectory_every"),
        (dict(shape=(4, 0)), "shape"),
        (dict(steps_offset=1), "steps_offset applies to spacing 'leading' only"),
        (dict(steps_offset=-1, spacing="leading"), "steps_offset must be an int >= 0"),
        (dict(num_steps=1000, steps_offset=1, spacing="leading"), "beyond T-1=999"),
        (dict(final_level="x0"), "final_level"),
        (dict(sampler="euler", final_level="first"), r"applies to samplers \['ddim', 'pndm'\] only"),
    ],
)
def test_bad_input_is_rejected_before_tracing(kwargs, match):
    args = dict(shape=(4, 2))
    args.update(kwargs)
    shape = args.pop("shape")
    with pytest.raises(ValueError, match=match):
        jdiff.sample(GAUSS, LIN, shape, jax.random.key(0), **args)


def test_zero_terminal_snr_rejects_eps_and_karras():
    z = jdiff.get_schedule("linear", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match='prediction="eps"'):
        jdiff.sample(GAUSS, z, (4, 2), jax.random.key(0))
    with pytest.raises(ValueError, match="terminal SNR"):
        jdiff.sample(GAUSS, z, (4, 2), jax.random.key(0), prediction="v", sampler="heun")


def test_model_output_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="model_fn returned shape"):
        jdiff.sample(lambda x, t: x[:, :1], LIN, (4, 2), jax.random.key(0), num_steps=3)
