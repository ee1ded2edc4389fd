"""Each named sampler against a float64 reference implementation of its paper's algorithm written here, in
EDM variables (x_edm = x/alpha, s = sigma/alpha, D(x_edm; s) the exact posterior mean of a Gaussian mixture),
not in jdiff's VP form: EDM Alg. 1 (heun) and Alg. 2 (edm_sde, with the same noise draws), the
exponential-integrator Heun (exp_heun), DPM-Solver++(2M), (3M) and (2M) SDE with each lower_order_final rule
and second-order rule. Then every sampler on every schedule x spacing (finite and accurate with exact
predictors: the cosine / Karras NaN of a floored log-SNR), and the declared capabilities of every registered
sampler (nfe, zero_terminal_snr), read from the registry rather than listed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_drive import drive, edm_grid, x0_denoiser

import jdiff
from jdiff.analytic import gmm_x0_fn
from jdiff.sampling import SAMPLERS, SPACINGS, make_grid
from jdiff.sampling.multistep import LOWER_ORDER_FINALS, SOLVER_TYPES

LIN = jdiff.get_schedule("linear", 1000)
MEANS, STDS, WEIGHTS = np.array([[-1.5, 0.5], [1.0, -1.0], [0.5, 1.5]]), np.array([0.3, 0.2, 0.4]), [0.3, 0.3, 0.4]
X0 = gmm_x0_fn(MEANS, STDS, WEIGHTS)
DENOISE = x0_denoiser(X0)


def D(x_edm, s):
    """The mixture's posterior mean at EDM level s, numpy float64 (written independently of gmm_x0_fn)."""
    var = STDS**2 + s**2  # (K,)
    diff = x_edm[:, None, :] - MEANS[None]
    logp = np.log(WEIGHTS) - 0.5 * (diff**2).sum(-1) / var - np.log(var)  # d = 2
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return (r[..., None] * (MEANS[None] + (STDS**2 / var)[None, :, None] * diff)).sum(1)


def alg2(x, s, noise, churn=0.0, tmin=0.0, tmax=np.inf, snoise=1.0):
    """Karras et al. 2022, Alg. 2 (Alg. 1 when churn = 0): x at s[0], levels s then 0."""
    s = np.append(s, 0.0)
    n = len(s) - 1
    for i in range(n):
        gamma = min(churn / n, np.sqrt(2) - 1) if tmin <= s[i] <= tmax else 0.0
        s_hat = s[i] + gamma * s[i]
        x_hat = x + np.sqrt(s_hat**2 - s[i] ** 2) * snoise * noise[i] if gamma > 0 else x
        d = (x_hat - D(x_hat, s_hat)) / s_hat
        x_next = x_hat + (s[i + 1] - s_hat) * d
        if s[i + 1] != 0:
            d2 = (x_next - D(x_next, s[i + 1])) / s[i + 1]
            x_next = x_hat + (s[i + 1] - s_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def exp_heun(x, s):
    """Heun's predictor with the exponential-integrator correction (D linear in -log s, integrated exactly)."""
    s = np.append(s, 0.0)
    for i in range(len(s) - 1):
        d0 = D(x, s[i])
        x_e = x + (s[i + 1] - s[i]) * (x - d0) / s[i]
        if s[i + 1] == 0:
            x = x_e
            continue
        h = np.log(s[i] / s[i + 1])
        x = s[i + 1] / s[i] * x + (1 - np.exp(-h)) * d0 + (1 - (1 - np.exp(-h)) / h) * (D(x_e, s[i + 1]) - d0)
    return x


def orders(n, max_order, rule, always=False):
    """The order of each step: warm-up, last step first order, and the lower_order_final rule."""
    out = []
    for i in range(n):
        o = min(max_order, i + 1)
        if i == n - 1:
            o = 1
        elif rule == "diffusers" and i == n - 2 and (n < 15 or always):
            o = min(o, 2)
        elif rule == "ddim_last" and n < 15:
            o = max(1, min(o, n - 1 - i))
        out.append(o)
    return out


def dpmpp(x, s, order, solver_type="midpoint", noise=None):
    """DPM-Solver++ (Lu et al. 2022) multistep in EDM variables: lambda = -log s, h = lambda' - lambda,
    x' = (s'/s) e^{-eta h} x + (1 - e^{-(1+eta) h}) D_i + second / third-order terms (+ noise for the SDE,
    eta = 1), as in k-diffusion's sample_dpmpp_2m / _2m_sde / _3m_sde."""
    eta = 0.0 if noise is None else 1.0
    s = np.append(s, 0.0)
    ds, hs = [], []
    for i in range(len(s) - 1):
        d = D(x, s[i])
        if s[i + 1] == 0:
            x = d
            continue
        h = np.log(s[i] / s[i + 1])
        he = (1 + eta) * h
        x_new = s[i + 1] / s[i] * np.exp(-eta * h) * x + (1 - np.exp(-he)) * d
        phi2 = (np.exp(-he) - 1) / he + 1
        if order[i] == 2:
            d1 = (d - ds[-1]) / (hs[-1] / h)
            x_new += (0.5 * (1 - np.exp(-he)) if solver_type == "midpoint" else phi2) * d1
        elif order[i] == 3:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0, d1_1 = (d - ds[-1]) / r0, (ds[-1] - ds[-2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_new += phi2 * d1 - (phi2 / he - 0.5) * d2
        if noise is not None:
            x_new += noise[i] * s[i + 1] * np.sqrt(1 - np.exp(-2 * h))
        x = x_new
        ds.append(d)
        hs.append(h)
    return x


def _grid(kind, n):
    if kind == "karras":
        g = make_grid(LIN, "karras", n)
    else:  # a non-Karras grid of another schedule
        g = make_grid(jdiff.get_schedule("cosine", 1000), "trailing", n)
    return np.asarray(g.sigma, np.float64) / np.asarray(g.alpha, np.float64)


def _ours(name, sig, options=None, noise=None):
    z = np.random.default_rng(1).standard_normal((5, 2))
    with jax.enable_x64(True):
        out = drive(name, jnp.asarray(z), edm_grid(sig, np.float64), DENOISE, options, schedule=LIN, noise=noise)
        out = np.asarray(out)
    return out, z * np.sqrt(1 + sig[0] ** 2)  # (jdiff's x_0, the reference's x_edm at s_0)


@pytest.mark.parametrize("kind", ["karras", "cosine_trailing"])
@pytest.mark.parametrize("n", [3, 8])
def test_heun_and_exp_heun_are_their_algorithms(kind, n):
    sig = _grid(kind, n)
    ours, x = _ours("heun", sig)
    np.testing.assert_allclose(ours, alg2(x, sig, None), rtol=1e-9, atol=1e-9)
    ours, x = _ours("exp_heun", sig)
    np.testing.assert_allclose(ours, exp_heun(x, sig), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tmax", [50.0, 1e4])  # 1e4: churn at the first level too, above the schedule's range
def test_edm_sde_is_alg2_draw_for_draw(tmax):
    sig = _grid("karras", 8)
    noise = np.random.default_rng(2).standard_normal((8, 5, 2))
    opts = dict(s_churn=40.0, s_tmin=0.05, s_tmax=tmax, s_noise=1.003)
    ours, x = _ours("edm_sde", sig, opts, noise)
    ref = alg2(x, sig, noise, churn=40.0, tmin=0.05, tmax=tmax, snoise=1.003)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)
    assert np.abs(ref - alg2(x, sig, noise)).max() > 1e-2  # the churn mattered


@pytest.mark.parametrize("rule", LOWER_ORDER_FINALS)
@pytest.mark.parametrize("solver_type", SOLVER_TYPES)
@pytest.mark.parametrize("n", [5, 16])
def test_dpm_solver_pp_are_their_algorithms(rule, solver_type, n):
    sig = _grid("karras" if n == 5 else "cosine_trailing", n)
    opts = {"lower_order_final": rule, "solver_type": solver_type}
    for name, max_order in (("dpmpp_2m", 2), ("dpmpp_3m", 3)):
        ours, x = _ours(name, sig, opts)
        np.testing.assert_allclose(ours, dpmpp(x, sig, orders(n, max_order, rule), solver_type), rtol=1e-9, atol=1e-9)
    noise = np.random.default_rng(3).standard_normal((n, 5, 2))
    ours, x = _ours("dpmpp_2m_sde", sig, opts, noise)
    ref = dpmpp(x, sig, orders(n, 2, rule), solver_type, noise=noise)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_the_lower_order_final_rules_differ_where_they_should():
    """dpmpp_2m: diffusers' rule changes nothing for a second-order method (= "none"); "ddim_last" does."""
    sig = _grid("karras", 5)
    out = {r: _ours("dpmpp_2m", sig, {"lower_order_final": r})[0] for r in LOWER_ORDER_FINALS}
    np.testing.assert_array_equal(out["diffusers"], out["none"])
    assert np.abs(out["ddim_last"] - out["none"]).max() > 1e-3
    out3 = {r: _ours("dpmpp_3m", sig, {"lower_order_final": r})[0] for r in ("diffusers", "none")}
    assert np.abs(out3["diffusers"] - out3["none"]).max() > 1e-4


# --- every sampler x schedule x spacing ------------------------------------------------------------------------

_MU, _COV = np.array([1.0, -0.5]), np.array([[0.3, 0.1], [0.1, 0.05]])
_L, _U = np.linalg.eigh(_COV)


def _gauss_x0(x, alpha, sigma):
    """Exact x0 for N(_MU, _COV) data at the VP level (alpha, sigma), in x's dtype."""
    mu, lam, u = (jnp.asarray(a, x.dtype) for a in (_MU, _L, _U))
    return mu + ((x - alpha * mu) @ u * (alpha * lam / (alpha**2 * lam + sigma**2))) @ u.T


GAUSS = x0_denoiser(_gauss_x0)
SCHEDULES = {
    "linear": jdiff.get_schedule("linear", 1000),
    "linear_T2000": jdiff.get_schedule("linear", 2000),
    "cosine": jdiff.get_schedule("cosine", 1000),
    "scaled_linear": jdiff.get_schedule("scaled_linear", 1000),
    "linear_zero_snr": jdiff.get_schedule("linear", 1000, zero_terminal_snr=True),
}


# The single-step second-order samplers (two model calls per step: the Heun family) take 6 steps here; from
# the top of a schedule with s_max > 1e3 (cosine: 2e4, linear T = 2000: 4e4) that is exact and inaccurate:
# EDM's trapezoid in s multiplies D's change by (s - s')/(2 s') (spread x100 on cosine linspace; k-diffusion
# and diffusers agree, tests/test_sampler_peers.py), the exponential correction evaluates D at the Euler
# predictor, which from s = 2e4 is the data mean (spread x0.16 on cosine karras). Only finiteness is asked there.
HUGE_SIGMA_MAX = 1e3


def _steps(name):
    return 6 if SAMPLERS[name].nfe(10) > 10 else 12  # about 12 model calls each


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_sampler_is_finite_and_accurate_on_every_schedule_and_spacing(schedule, spacing):
    """Exact predictor for Gaussian data, ~12 model calls: every output is finite and the sample mean / spread
    are the data's to a few-step sampler's accuracy (mean within 0.15, spread within a factor 3: measured worst
    0.11 and 2.6x, on the data's narrow direction). The cosine schedule's first Karras levels (alpha 4.9e-5, 1.0e-4,
    2.3e-4) shared one floored lambda: NaN in every multistep solver."""
    sch = SCHEDULES[schedule]
    zero_snr = float(sch.alphas_cumprod[-1]) == 0.0
    if zero_snr and spacing == "karras":
        pytest.skip("jdiff.sample refuses karras spacing with a zero-terminal-SNR schedule")
    x_T = jax.random.normal(jax.random.key(4), (2000, 2))
    for name in sorted(SAMPLERS):
        if zero_snr and not SAMPLERS[name].zero_terminal_snr:
            continue
        opts = {"eta": 1.0} if "eta" in SAMPLERS[name].options else {}
        grid = make_grid(sch, spacing, _steps(name))
        x = np.asarray(drive(name, x_T, grid, GAUSS, opts, schedule=sch, key=jax.random.key(5)), np.float64)
        assert np.all(np.isfinite(x)), (name, schedule, spacing)
        if SAMPLERS[name].nfe(10) > 10 and float(grid.sigma[0] / grid.alpha[0]) > HUGE_SIGMA_MAX:
            continue
        assert np.abs(x.mean(0) - _MU).max() < 0.15, (name, x.mean(0))
        assert np.all(np.abs(np.log(np.sqrt(np.diag(np.cov(x.T)) / np.diag(_COV)))) < 1.1), (name, np.cov(x.T))


def test_readme_example_cosine_dpmpp_2m_karras_through_sample():
    """jdiff.sample with an eps model on the cosine schedule, dpmpp_2m, karras spacing (was NaN everywhere)."""
    sch = SCHEDULES["cosine"]
    eps = jdiff.analytic.gaussian_eps_fn(sch, _MU, _COV)
    x = np.asarray(
        jdiff.sample(eps, sch, (1000, 2), jax.random.key(0), sampler="dpmpp_2m", num_steps=20, spacing="karras")
    )
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x.mean(0), _MU, atol=0.05)
    np.testing.assert_allclose(np.cov(x.T), _COV, atol=0.1)  # measured 0.37 for 0.3: 20 steps from s = 2e4


@pytest.mark.parametrize("schedule", ["cosine", "linear_T2000"])
def test_the_karras_timesteps_map_back_to_their_levels(schedule):
    """The model timestep of every Karras level gives back that level's abar (`alpha_bar_at`): with lambda
    floored at log(2^-24) the cosine schedule's top levels all mapped to t = 999 and abar = 6e-8 (true: 2.4e-9)."""
    sch = SCHEDULES[schedule]
    g = make_grid(sch, "karras", 10)
    abar = np.asarray(jdiff.alpha_bar_at(sch, g.t), np.float64)
    np.testing.assert_allclose(abar, np.asarray(g.alpha, np.float64) ** 2, rtol=2e-3)


# --- declared capabilities of every registered sampler ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_is_the_number_of_model_calls(name):
    calls = []

    def model(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.zeros_like(x)

    opts = {"eta": 1.0} if "eta" in SAMPLERS[name].options else {}
    for n in (1, 4):
        calls.clear()
        jdiff.sample(model, LIN, (2, 2), jax.random.key(0), sampler=name, num_steps=n, options=opts).block_until_ready()
        assert len(calls) == SAMPLERS[name].nfe(n), (n, len(calls))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_zero_terminal_snr_flag(name):
    """A sampler that declares zero_terminal_snr recovers single-point data from abar = 0 (v-prediction);
    one that does not is refused with a ValueError."""
    z = SCHEDULES["linear_zero_snr"]
    target = jnp.asarray([0.3, -0.7])

    def v_model(x, t):  # exact v for data = target: x = alpha target + sigma eps
        abar = jnp.where(t >= 999, 0.0, jdiff.alpha_bar_at(z, t))[:, None]
        a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
        return a * (x - a * target) / s - s * target

    opts = {"eta": 1.0} if "eta" in SAMPLERS[name].options else {}
    run = lambda: jdiff.sample(  # noqa: E731
        v_model,
        z,
        (8, 2),
        jax.random.key(1),
        sampler=name,
        num_steps=6,
        spacing="trailing",
        prediction="v",
        options=opts,
    )
    if SAMPLERS[name].zero_terminal_snr:
        np.testing.assert_allclose(run(), jnp.broadcast_to(target, (8, 2)), atol=1e-3)
    else:
        with pytest.raises(ValueError, match="terminal SNR"):
            run()
