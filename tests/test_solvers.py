"""The few-step solvers (euler_ancestral, dpmpp_2m_sde, dpmpp_3m, unipc, edm_sde) and the robustness of every
sampler at 5 model calls, against exact noise predictors (`jdiff.analytic`) and closed-form ODE solutions.

Most checks drive a sampler's registered step function eagerly over a grid (`_drive`: the loop `jdiff.sample`
runs inside one `lax.scan`), so no program is compiled per sampler x spacing x step count; the orders of
convergence run that loop in float64. `jdiff.sample` itself is exercised for every registered sampler by
tests/test_samplers.py (single-point data), tests/test_sample_keys.py (per-example keys of every stochastic
sampler) and tests/test_sampler_registry.py / test_sampler_compile.py (options, flags, program size).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler_compile import PARAMS, SHAPE, _conv_model, count_compiles

import jdiff
from jdiff.analytic import gaussian_eps_fn, gmm_eps_fn
from jdiff.sampling import SAMPLERS, SPACINGS, Grid, Step, check_options, make_grid
from jdiff.sampling.base import Noise
from jdiff.sampling.denoiser import Denoised, Guidance, make_denoiser
from jdiff.sampling.timesteps import level_fn

LIN = jdiff.get_schedule("linear", 1000)
MEAN = np.array([1.0, -0.5])
COV = np.array([[0.3, 0.1], [0.1, 0.05]])
# Narrow, well-separated modes: where few-step solvers break (the robustness case).
MODES = np.array([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
MODE_STD, MODE_W = 0.05, np.array([0.1, 0.2, 0.3, 0.4])
NARROW = gmm_eps_fn(LIN, MODES, np.full(4, MODE_STD), MODE_W)
GAUSS = gaussian_eps_fn(LIN, MEAN, COV)
MIX_MEANS, MIX_STDS, MIX_W = np.array([[-2.0, 0.0], [2.0, 1.0]]), np.array([0.3, 0.5]), np.array([0.3, 0.7])
MIX = gmm_eps_fn(LIN, MIX_MEANS, MIX_STDS, MIX_W)


_STEPS = {}


def _step_fn(name, static, denoise):
    """Sampler `name`'s step, jitted once per (sampler, static options, denoiser) with the step index, N, the
    grid row, the key and the traced options as arguments (so one program serves every step and step count)."""
    key = (name, static, denoise)
    if key not in _STEPS:
        smp = SAMPLERS[name]

        def step(carry, row, i, n, rng, traced):
            s = Step(i, i == 0, i == n - 1, row, n, level_fn(LIN))
            return smp.step(denoise, carry, s, Noise(rng, i, False), {**dict(static), **traced})

        _STEPS[key] = jax.jit(step)
    return _STEPS[key]


def _drive(name, x, grid, denoise, options=None, *, key=None, steps=None):
    """The first `steps` (default all) steps of sampler `name` from x at grid level 0: the loop `jdiff.sample`
    runs in one lax.scan, here step by step."""
    smp, n = SAMPLERS[name], int(grid.t.shape[0])
    spec = smp.options
    opts = check_options(name, options or {})
    static = tuple((k, v) for k, v in opts.items() if spec[k].static)
    traced = {k: jnp.asarray(v) for k, v in opts.items() if not spec[k].static}
    step = _step_fn(name, static, denoise)
    key = jax.random.key(0) if key is None else key
    carry = smp.init(x)
    for i in range(n if steps is None else steps):
        carry = step(carry, Grid(*(a[i] for a in grid)), jnp.int32(i), jnp.int32(n), key, traced)
    return smp.output(carry)


@functools.lru_cache(maxsize=None)
def _denoiser(eps_fn):
    return make_denoiser(eps_fn, None, prediction="eps", guidance=Guidance(None, None, None))


def _sample(name, eps_fn, spacing, n, x_T, options=None, key=None):
    return np.asarray(_drive(name, x_T, make_grid(LIN, spacing, n), _denoiser(eps_fn), options, key=key), np.float64)


# --- identities ---------------------------------------------------------------------------------------------


def test_euler_ancestral_is_ddim_eta1_and_its_first_order_sde_step():
    """On a VP model the Euler-ancestral split of sigma_next (s_up, s_down) is DDIM's eta = 1 step (the DDPM
    posterior), draw for draw; so is DPM-Solver++(2M) SDE wherever it is first order (the first step, N = 2)."""
    gauss = GAUSS
    x_T = jax.random.normal(jax.random.key(1), (256, 2))
    for spacing in ("trailing", "karras"):
        ea = _sample("euler_ancestral", gauss, spacing, 7, x_T, key=jax.random.key(3))
        ddim = _sample("ddim", gauss, spacing, 7, x_T, {"eta": 1.0}, key=jax.random.key(3))
        np.testing.assert_allclose(ea, ddim, atol=1e-4)
    sde = _sample("dpmpp_2m_sde", gauss, "trailing", 2, x_T, key=jax.random.key(3))
    np.testing.assert_allclose(
        sde, _sample("ddim", gauss, "trailing", 2, x_T, {"eta": 1.0}, key=jax.random.key(3)), atol=1e-4
    )
    assert np.abs(ea - _sample("ddim", gauss, "karras", 7, x_T, key=jax.random.key(3))).mean() > 0.05  # noise


def test_edm_sde_without_churn_is_heun_and_churn_follows_alg2():
    gauss = GAUSS
    x_T = jax.random.normal(jax.random.key(1), (64, 2))
    heun = _sample("heun", gauss, "karras", 6, x_T)
    np.testing.assert_allclose(_sample("edm_sde", gauss, "karras", 6, x_T, {"s_churn": 0.0}), heun, atol=1e-6)
    # Churn only inside [S_tmin, S_tmax]: a window no grid level falls in gives Heun again.
    out = _sample("edm_sde", gauss, "karras", 6, x_T, {"s_tmin": 1000.0, "s_tmax": 2000.0})
    np.testing.assert_allclose(out, heun, atol=1e-6)
    assert np.abs(_sample("edm_sde", gauss, "karras", 6, x_T) - heun).mean() > 0.01


def _k_diffusion_dpmpp_2m_sde(x, sigmas, denoised_fn, noises):
    """k-diffusion's sample_dpmpp_2m_sde (eta = 1, midpoint), transcribed in EDM variables (x/alpha, sigma/alpha)."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        den = denoised_fn(x, i)
        if sigmas[i + 1] == 0:
            x = den
        else:
            t, s = -np.log(sigmas[i]), -np.log(sigmas[i + 1])
            h = s - t
            x = sigmas[i + 1] / sigmas[i] * np.exp(-h) * x + -np.expm1(-2 * h) * den
            if old is not None:
                x = x + 0.5 * -np.expm1(-2 * h) * (h_last / h) ** -1 * (den - old)
            x = x + noises[i] * sigmas[i + 1] * np.sqrt(-np.expm1(-2 * h))
            h_last = h
        old = den
    return x


def test_dpmpp_2m_sde_matches_k_diffusion_and_dpmpp_3m_reduces_to_2m():
    """A hand-made denoiser whose x0 depends on the step: the VP update equals k-diffusion's (on a grid of
    N >= 15 steps, so no lower-order final step) draw for draw; DPM-Solver++(3M) differs from (2M) only from
    its third step on."""
    n, b = 16, 4
    grid = make_grid(LIN, "karras", n)
    targets = np.asarray(jax.random.normal(jax.random.key(5), (n, b, 2)))

    def denoise(x, t, alpha, sigma):
        x0 = jnp.asarray(targets)[jnp.argmin(jnp.abs(grid.t - t))] + 0.1 * x
        return Denoised(x0, (x - alpha * x0) / sigma, None)

    x_T = jax.random.normal(jax.random.key(6), (b, 2))
    key = jax.random.key(9)
    ours = np.asarray(_drive("dpmpp_2m_sde", x_T, grid, denoise, key=key), np.float64)
    alpha, sigma = np.asarray(grid.alpha, np.float64), np.asarray(grid.sigma, np.float64)
    sig = np.append(sigma / alpha, 0.0)
    noises = [np.asarray(Noise(key, i, False)((b, 2), jnp.float32)) for i in range(n)]
    x0_edm = lambda x, i: targets[i] + 0.1 * x * alpha[i]  # noqa: E731  D(x_edm) with x = alpha x_edm
    ref = _k_diffusion_dpmpp_2m_sde(np.asarray(x_T, np.float64) / alpha[0], sig, x0_edm, noises)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)
    two = [np.asarray(_drive(s, x_T, grid, denoise, steps=k)) for s in ("dpmpp_2m", "dpmpp_3m") for k in (2, 3)]
    np.testing.assert_allclose(two[2], two[0], atol=1e-6)  # steps 0-1: orders 1, 2 in both
    assert np.abs(two[3] - two[1]).max() > 1e-3  # step 2 is third order in 3M


# --- order of convergence (float64, exact Gaussian flow) -----------------------------------------------------

_L, _U = np.linalg.eigh(np.array([[0.3, 0.1, 0.0], [0.1, 0.05, 0.01], [0.0, 0.01, 0.02]]))
_MU = np.array([1.0, -0.5, 0.25])


def _exact_denoise(x, t, a, s):
    z = (x - a * _MU) @ _U
    x0 = _MU + (z * (a * _L / (a**2 * _L + s**2))) @ _U.T
    return Denoised(x0, (x - a * x0) / s, None)


def _karras64(n, smax=80.0, smin=0.02, rho=7.0):
    sig = (smax ** (1 / rho) + np.arange(n) / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    a = 1 / np.sqrt(1 + sig**2)
    nxt = lambda v, last: np.append(v[1:], last)  # noqa: E731
    return Grid(
        *(jnp.asarray(v) for v in (np.zeros(n), a, sig * a, nxt(np.zeros(n), -1.0), nxt(a, 1.0), nxt(sig * a, 0.0)))
    )


def _flow_error(name, n, options):
    """RMS error at the grid's last level (before the final denoising step) vs the exact ODE flow, float64."""
    grid = _karras64(n)
    x = jax.random.normal(jax.random.key(1), (32, 3), jnp.float64)
    out = np.asarray(_drive(name, x, grid, _exact_denoise, options, steps=n - 1))
    (a0, s0), (a1, s1) = ((float(grid.alpha[i]), float(grid.sigma[i])) for i in (0, -1))
    z = (np.asarray(x) - a0 * _MU) @ _U
    ref = a1 * _MU + (z * np.sqrt((a1**2 * _L + s1**2) / (a0**2 * _L + s0**2))) @ _U.T
    return float(np.sqrt(np.mean((out - ref) ** 2)))


@pytest.mark.parametrize(
    "name, options, lo, hi",
    [
        ("euler", {}, 0.9, 1.1),
        ("heun", {}, 1.8, 2.4),
        ("exp_heun", {}, 1.8, 2.4),
        ("dpmpp_2m", {"solver_type": "heun"}, 1.8, 2.4),
        ("dpmpp_2m", {}, 1.8, 2.4),
        # Third order over 20 -> 40 steps; its first step is first order (the multistep warm-up, as in
        # diffusers), whose O(h^2) error takes over beyond ~60 steps (measured 1.9 for 40 -> 80).
        ("dpmpp_3m", {}, 2.6, 3.5),
        ("unipc", {"order": 1}, 1.8, 2.3),  # UniC-p raises UniP-p's order by one (Zhao et al. 2023, Thm. 3.1)
        ("unipc", {}, 2.7, 3.4),
        ("unipc", {"order": 3}, 3.3, 4.8),
    ],
)
def test_order_of_convergence_in_float64(name, options, lo, hi):
    with jax.enable_x64(True):
        e20, e40 = _flow_error(name, 20, options), _flow_error(name, 40, options)
    order = np.log2(e20 / e40)
    assert lo <= order <= hi, (e20, e40, order)


# --- distributions with exact predictors (euler_ancestral: the DDIM eta = 1 identity above and DDIM's own
# distribution tests in test_samplers.py) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, steps, options",
    [
        ("dpmpp_2m_sde", 50, {}),
        ("dpmpp_3m", 20, {}),
        ("unipc", 20, {}),
        ("unipc", 20, {"order": 3}),
        ("edm_sde", 100, {}),  # churn costs accuracy: at 25 / 50 steps the covariance is 13% / 8% small
    ],
)
def test_gaussian_mean_and_covariance(name, steps, options):
    n = 4000
    x_T = jax.random.normal(jax.random.key(11), (n, 2))
    x = _sample(name, GAUSS, "karras", steps, x_T, options, key=jax.random.key(12))
    se_mean = np.sqrt(np.diag(COV) / n)
    assert np.all(np.abs(x.mean(0) - MEAN) < 4.5 * se_mean), x.mean(0)
    se_cov = np.sqrt((COV**2 + np.outer(np.diag(COV), np.diag(COV))) / n)
    assert np.all(np.abs(np.cov(x.T) - COV) < 4.5 * se_cov + 2e-3), np.cov(x.T)


@pytest.mark.parametrize("name, steps", [("dpmpp_2m_sde", 50), ("dpmpp_3m", 25), ("unipc", 25), ("edm_sde", 100)])
def test_gaussian_mixture_weights_and_spreads(name, steps):
    means, stds = MIX_MEANS, MIX_STDS
    n = 4000
    x_T = jax.random.normal(jax.random.key(4), (n, 2))
    x = _sample(name, MIX, "karras", steps, x_T, key=jax.random.key(5))
    comp = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert abs(np.mean(comp == 0) - 0.3) < 4 * np.sqrt(0.21 / n)
    for k in range(2):
        np.testing.assert_allclose(x[comp == k].mean(0), means[k], atol=0.05)
        np.testing.assert_allclose(x[comp == k].std(0), stds[k], rtol=0.08)


# --- robustness at 5 model calls -----------------------------------------------------------------------------


def _five_nfe_steps(name):
    return max(n for n in range(1, 6) if SAMPLERS[name].nfe(n) <= 5)


def _robust_options(name):
    """The options for few steps: DDIM's eta = 1; for the multistep solvers the "ddim_last" lower-order final
    steps (their default, diffusers' rule, leaves dpmpp_2m at |x| ~ 5 here, as diffusers and k-diffusion)."""
    opts = SAMPLERS[name].options
    return {k: v for k, v in (("eta", 1.0), ("lower_order_final", "ddim_last")) if k in opts}


@pytest.mark.parametrize("spacing", SPACINGS)
def test_no_sampler_diverges_at_5_nfe_on_narrow_modes(spacing):
    """Every registered sampler but the three trapezoidal Heuns and PNDM, 5 model calls, narrow well-separated modes:
    every sample stays within the data's range. EDM's trapezoidal correction in sigma (heun = Alg. 1,
    edm_sde = Alg. 2, exactly as diffusers and k-diffusion: tests/test_sampler_peers.py) multiplies D's change
    by (s - s')/(2 s') and lands at |x| ~ 5-40 here (3 steps: s = 157 -> 5.9 -> 0.01); `exp_heun` is the
    variant that stays in range. `flow_heun` is diffusers' FlowMatchHeunDiscreteScheduler step for step
    (tests/test_flow.py), the same trapezoid in the flow variables, and lands at |x| ~ 3-4 here. `pndm` is
    diffusers' PNDMScheduler step for step (tests/test_samplers.py): its Adams-Bashforth extrapolation of eps
    over 4 steps this large lands at |x| ~ 3-6 here."""
    x_T = jax.random.normal(jax.random.key(2), (512, 2))
    bound = np.abs(MODES).max() + 10 * MODE_STD
    far = {}
    for name in sorted(set(SAMPLERS) - {"heun", "edm_sde", "flow_heun", "pndm"}):
        x = _sample(name, NARROW, spacing, _five_nfe_steps(name), x_T, _robust_options(name))
        if not (np.all(np.isfinite(x)) and np.abs(x).max() <= bound):
            far[name] = float(np.abs(x).max())
    assert not far, far


@pytest.fixture(scope="module")
def narrow_reference():
    """A fine solve of the probability-flow ODE from t = 999 (250 DPM-Solver++(3M) steps)."""
    x_T = jax.random.normal(jax.random.key(3), (1024, 2))
    return x_T, _sample("dpmpp_3m", NARROW, "linspace", 250, x_T)


@pytest.mark.parametrize("spacing", ["linspace", "karras"])
def test_high_order_solvers_beat_ddim_at_5_nfe_on_narrow_modes(spacing, narrow_reference):
    """With lower_order_final="ddim_last" (first order into the grid's smallest noise level) the multistep
    solvers are more accurate than DDIM at 5 model calls (with diffusers' rule, the default, DPM-Solver++(2M)
    is worse than DDIM: measured 1.24x on karras)."""
    x_T, ref = narrow_reference
    low = {"lower_order_final": "ddim_last"}
    rms = lambda s, opts: np.sqrt(np.mean((_sample(s, NARROW, spacing, 5, x_T, opts) - ref) ** 2))  # noqa: E731
    err = {s: rms(s, low) for s in ("dpmpp_2m", "dpmpp_3m", "unipc")}
    err["ddim"] = rms("ddim", {})
    for s in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        assert err[s] < 0.95 * err["ddim"], err


# --- through jdiff.sample ------------------------------------------------------------------------------------


def test_edm_churn_options_are_traced_and_the_unipc_order_is_static():
    sch = jdiff.get_schedule("linear", 1000)
    kw = dict(params=PARAMS, num_steps=6, spacing="karras")
    run = lambda name, **o: jdiff.sample(_conv_model, sch, SHAPE, jax.random.key(0), sampler=name, options=o, **kw)  # noqa: E731
    run("edm_sde")  # warm
    run("unipc")
    with count_compiles() as events:
        outs = [
            run("edm_sde", s_churn=c, s_tmin=lo, s_tmax=hi, s_noise=sn)
            for c, lo, hi, sn in [(0.0, 0.05, 50.0, 1.0), (80.0, 0.01, 100.0, 1.007), ("5", "0.1", "10", "1")]
        ]
        jax.block_until_ready(outs)
    assert events == [], f"{len(events)} recompilations"
    assert not np.allclose(outs[0], outs[1])
    with count_compiles() as events:
        run("unipc", order=3).block_until_ready()
    assert len(events) >= 1
    with pytest.raises(ValueError, match="s_tmin must be <= s_tmax"):
        run("edm_sde", s_tmin=2.0, s_tmax=1.0)
    with pytest.raises(ValueError, match=r"order must be in \[1, 3\]"):
        run("unipc", order=4)
